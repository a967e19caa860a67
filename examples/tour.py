"""A tour of tether's mechanism, on the scenarios of PyTorch's parametrizations tutorial.

Run it with ``python examples/tour.py``. Every step prints what it shows and checks it, so the
tour doubles as a smoke test. It takes a second; it accepts ``--quick``, as every example does,
and runs the same with it.
"""

from __future__ import annotations

import argparse
import pickle

import torch
from torch import nn

import tether


class Symmetric(nn.Module):
    """X -> upper triangle of X mirrored below the diagonal."""

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X.triu() + X.triu(1).mT

    def right_inverse(self, A: torch.Tensor) -> torch.Tensor:
        return A.triu()


class Skew(nn.Module):
    """X -> A - Aᵀ with A the strict upper triangle of X (works on batches of matrices)."""

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        A = X.triu(1)
        return A - A.mT

    def right_inverse(self, S: torch.Tensor) -> torch.Tensor:
        return S.triu(1)


class Cayley(nn.Module):
    """Skew-symmetric S -> (I + S)(I - S)⁻¹, an orthogonal matrix."""

    def forward(self, S: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
        return torch.linalg.solve(eye - S, eye + S, left=False)

    def right_inverse(self, Q: torch.Tensor) -> torch.Tensor:
        # The inverse Cayley map: S = (Q - I)(Q + I)⁻¹.
        eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
        return torch.linalg.solve(Q + eye, Q - eye, left=False)


class CountingSymmetric(Symmetric):
    calls = 0

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        CountingSymmetric.calls += 1
        return super().forward(X)


class PruningMask(nn.Module):
    """Multiplies by a fixed 0/1 mask: the entries where the mask is 0 are pruned."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X * self.mask


def section(title: str) -> None:
    print(f"\n== {title} ==")


def show(label: str, value: object) -> None:
    print(f"  {label:<48} {value}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the same tour: it is already quick")
    parser.parse_args(argv)
    torch.manual_seed(0)

    section("1. A symmetric layer")
    layer = nn.Linear(3, 3)
    weight = layer.weight
    tether.register_parametrization(layer, "weight", Symmetric())
    show("type(layer).__name__", type(layer).__name__)
    show("isinstance(layer, nn.Linear)", isinstance(layer, nn.Linear))
    show("layer.weight is symmetric", torch.equal(layer.weight, layer.weight.T))
    original = layer.parametrizations.weight.original
    show("original is the same Parameter as before", original is weight)
    show("state_dict keys", list(layer.state_dict()))

    section("2. Skew-symmetric convolution kernels (a batch of 3x3 matrices)")
    conv = nn.Conv2d(8, 4, kernel_size=3)
    tether.register_parametrization(conv, "weight", Skew())
    kernel = conv.weight
    show("kernel shape", tuple(kernel.shape))
    show("every 3x3 slice is skew", torch.equal(kernel, -kernel.mT))

    section("3. Caching: compute a weight once per block")
    layer = tether.register_parametrization(nn.Linear(3, 3), "weight", CountingSymmetric())
    CountingSymmetric.calls = 0
    for _ in range(4):
        layer.weight  # noqa: B018  (reading the property computes the parametrization)
    show("reads outside cached(): forward calls", CountingSymmetric.calls)
    CountingSymmetric.calls = 0
    with tether.cached():
        for _ in range(4):
            layer.weight  # noqa: B018
    show("reads inside cached(): forward calls", CountingSymmetric.calls)

    section("4. A chain: Skew then Cayley gives orthogonal weights")
    layer = nn.Linear(4, 4)
    tether.register_parametrization(layer, "weight", Skew())
    tether.register_parametrization(layer, "weight", Cayley())
    Q = layer.weight
    error = (Q.T @ Q - torch.eye(4)).abs().max().item()
    show("chain", [type(p).__name__ for p in layer.parametrizations.weight])
    show("max |QᵀQ - I|", f"{error:.1e}")

    section("5. right_inverse: assigning goes backwards through the chain")
    target = torch.linalg.qr(torch.randn(4, 4)).Q
    target[:, 0] *= torch.linalg.det(target).sign()  # Cayley reaches rotations (det +1)
    layer.weight = target
    matches = torch.allclose(layer.weight, target, atol=1e-5)
    show("layer.weight == assigned orthogonal matrix", matches)
    original = layer.parametrizations.weight.original
    show("the original is the strict upper triangle", torch.equal(original, original.triu(1)))

    section("6. A pruning mask as a parametrization")
    layer = nn.Linear(4, 4)
    mask = (torch.rand(4, 4) > 0.5).float()
    tether.register_parametrization(layer, "weight", PruningMask(mask))
    show("pruned entries", int((layer.weight == 0).sum()))
    show("mask is saved in state_dict", "parametrizations.weight.0.mask" in layer.state_dict())

    section("7. What PyTorch's parametrize cannot do")
    model = nn.Sequential(tether.register_parametrization(nn.Linear(3, 3), "weight", Symmetric()))
    copy = pickle.loads(pickle.dumps(model))
    show("pickle round trip keeps the parametrization", tether.is_parametrized(copy[0], "weight"))
    show("same values", torch.equal(copy[0].weight, model[0].weight))
    plain = tether.plain_state_dict(model)
    show("plain_state_dict keys (no parametrizations)", list(plain))
    show("loads into a plain model", nn.Sequential(nn.Linear(3, 3)).load_state_dict(plain))

    section("8. Removal: the same Parameter comes back")
    layer = nn.Linear(3, 3)
    weight = layer.weight
    tether.register_parametrization(layer, "weight", Symmetric())
    tether.remove_parametrizations(layer, "weight", leave_parametrized=True)
    show("type after removal", type(layer).__name__)
    show("layer.weight is the original Parameter", layer.weight is weight)
    show("and keeps the symmetric value", torch.equal(layer.weight, layer.weight.T))


if __name__ == "__main__":
    main()

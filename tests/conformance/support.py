"""What the conformance checks share: models built from a case, inputs, a loss, a training
step, membership of the set a row defines, and tolerances from the dtype's epsilon."""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from tests.conformance import table
from tests.conformance.table import SHAPES, Case
from tether.constraints import Constraint, WeightNorm
from tether.functional import weight_normalize
from tether.prune import PruningMask

SEED = 0
# Training-mode reads that let spectral norm's power iteration converge after the originals
# were redrawn, so that the weight is in the set before it is exported or copied.
SETTLE_READS = 30
# Redrawn originals are N(0, SCRAMBLE_SCALE²): exponential maps stay moderate.
SCRAMBLE_SCALE = 0.5
# One SGD step of at most LR in norm: large enough to move a bfloat16 weight, small enough for
# spectral norm's power iteration to follow.
LR = 0.05


def layer_of(model: nn.Module) -> nn.Module:
    """The constrained layer of a model built by :func:`build`."""
    return model[0]  # type: ignore[index]


def build(case: Case, seed: int = SEED) -> nn.Sequential:
    """A small ``nn.Sequential`` holding the case's layer, with the row's helper registered on
    its ``weight``; the same seed gives the same model (and the same pruning mask)."""
    torch.manual_seed(seed)
    layer = SHAPES[case.shape].make(dtype=case.dtype)
    case.row.register(layer, "weight")
    return nn.Sequential(layer)


def build_plain(case: Case, seed: int = SEED) -> nn.Sequential:
    """The same model without any parametrization."""
    torch.manual_seed(seed)
    return nn.Sequential(SHAPES[case.shape].make(dtype=case.dtype))


def inputs(case: Case, seed: int = 1) -> Tensor:
    """A batch of inputs for the case's layer, in its dtype, on the device of ``--device``
    (drawn on the CPU, so that every device gets the same values)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPES[case.shape].input, generator=generator, dtype=case.dtype)
    return x if table.DEVICE is None else x.to(table.DEVICE)


def loss(output: Tensor) -> Tensor:
    """A real scalar that depends on every output entry (complex outputs included)."""
    return output.abs().square().sum()


def settle(model: nn.Module, case: Case) -> None:
    """For rows whose weight is an estimate (spectral norm), training-mode reads without
    gradients, which let the power iteration converge to the current originals."""
    if not case.row.estimate:
        return
    training = model.training
    model.train()
    with torch.no_grad():
        for _ in range(SETTLE_READS):
            layer_of(model).weight  # noqa: B018  # the read runs the power iteration
    model.train(training)


def scramble(model: nn.Module, case: Case, seed: int = 2) -> nn.Module:
    """Redraw every parameter (the originals and the bias), then :func:`settle`: the weight is
    a member of the set far from the one a fresh model of the same case has."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            drawn = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            parameter.copy_(SCRAMBLE_SCALE * drawn)
    settle(model, case)
    return model


def source(case: Case) -> nn.Sequential:
    """A constrained model of the case far from a fresh one, in eval mode (built with the same
    seed as :func:`build`, so with the same pruning mask)."""
    return scramble(build(case), case).eval()  # type: ignore[return-value]


def train_step(model: nn.Module, x: Tensor, lr: float = LR) -> None:
    """One SGD step on ``loss(model(x))`` in training mode, the gradient clipped to norm 1."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    optimizer.zero_grad()
    loss(model(x)).backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def trained(model: nn.Module, case: Case, steps: int = 3, lr: float = 0.3) -> nn.Module:
    """A few large training steps, then :func:`settle`, in eval mode: originals moved the way
    training moves them, which keeps any convention of the map (PyTorch's Householder map
    reads the signs of the original's diagonal, which its gradient never changes)."""
    x = inputs(case, seed=3)
    for _ in range(steps):
        train_step(model, x, lr)
    settle(model, case)
    return model.eval()


def state(model: nn.Module) -> dict[str, Tensor]:
    """A copy of the ``state_dict``."""
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_same_state(got: nn.Module, expected: dict[str, Tensor]) -> None:
    now = got.state_dict()
    assert list(now) == list(expected)
    for key, value in expected.items():
        assert torch.equal(now[key], value), f"{key} changed"


def grads(model: nn.Module) -> dict[str, Tensor | None]:
    return {name: p.grad for name, p in model.named_parameters()}


# --- the set -------------------------------------------------------------------------------------


def _wide(X: Tensor) -> Tensor:
    return X.to(torch.complex128 if X.is_complex() else torch.float64)


def distance(layer: nn.Module, name: str = "weight") -> float:
    """How far ``layer.<name>`` is from the set of the last helper in its chain, in float64.

    The chains of the table put only :class:`tests.parametrizations.Negated` after a helper,
    which keeps the sets it is chained with.
    """
    value = _wide(getattr(layer, name).detach())
    # (LAPACK's eigenvalue routines may not return on non-finite input)
    assert bool(value.isfinite().all()), f"{name} has non-finite entries"
    chain = layer.parametrizations[name]  # type: ignore[index]
    helpers = [p for p in chain if isinstance(p, Constraint | WeightNorm | PruningMask)]
    assert helpers, f"no helper in the chain of {name}"
    helper = helpers[-1]
    with torch.no_grad():
        if isinstance(helper, Constraint):
            return float(helper.distance(value))
        if isinstance(helper, PruningMask):
            return float((value * (helper.mask == 0)).abs().max())
        g, v = (_wide(t) for t in chain.originals())
        return float((value - weight_normalize(g, v, helper.dim)).abs().max())


def membership_tolerance(case: Case) -> float:
    """``sqrt(eps)``: far above the rounding of a map's forward pass, far below a real miss;
    ``eps ** 0.25`` for the rows whose weight is an iterative estimate."""
    eps = torch.finfo(case.dtype).eps
    return eps**0.25 if case.row.estimate else math.sqrt(eps)


def assert_member(layer: nn.Module, case: Case) -> None:
    off, tolerance = distance(layer), membership_tolerance(case)
    assert off <= tolerance, (
        f"the weight is {off:.3g} away from the set (tolerance {tolerance:.3g})"
    )


# --- tolerances ----------------------------------------------------------------------------------


def rounding(dtype: torch.dtype) -> float:
    """Relative tolerance for the same value computed along another path: ``64 eps``."""
    return 64 * torch.finfo(dtype).eps


def round_trip(case: Case) -> float:
    """Relative tolerance for a value that went through a right inverse and back, whose
    conditioning multiplies the rounding: the membership tolerance."""
    return membership_tolerance(case)


def assert_close(got: Tensor, expected: Tensor, rtol: float, msg: str = "") -> None:
    """Equal to ``rtol`` relative, and ``rtol`` times the size of ``expected`` absolute."""
    assert got.dtype == expected.dtype, f"{msg} dtype {got.dtype}, expected {expected.dtype}"
    assert got.shape == expected.shape, f"{msg} shape {got.shape}, expected {expected.shape}"
    scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(
        got.detach(), expected.detach(), rtol=rtol, atol=rtol * scale, msg=lambda m: f"{msg} {m}"
    )


def assert_same_grads(got: nn.Module, expected: nn.Module) -> None:
    """The same gradient (or none) for every parameter, up to rounding."""
    theirs = dict(expected.named_parameters())
    for name, parameter in got.named_parameters():
        want = theirs[name].grad
        if want is None:
            assert parameter.grad is None, f"{name}: a gradient where there is none"
            continue
        assert parameter.grad is not None, f"{name}: no gradient"
        assert_close(parameter.grad, want, rounding(want.dtype), f"gradient of {name}:")


def twin(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)

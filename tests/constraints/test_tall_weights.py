"""Tall weights cost ``O(n k²)`` time and ``O(n k)`` memory in every constraint that takes them.

A weight of shape ``n x k`` with ``n >> k`` (an embedding, a projection to few features) must
never pay for an ``n x n`` matrix: not at registration, in forward or backward, on assignment
(``right_inverse``), in ``sample()``, ``in_manifold`` or ``tether.update_base`` (issue 15).
Timing a test is noisy, so this file counts instead: :class:`Cost` records every operator that
runs (the dispatcher sees the backward pass, factory functions and decompositions too) with
a model of its work:

- a matrix product ``(m x p) @ (p x q)`` costs ``m p q``;
- a decomposition or solve (QR, SVD, ``eigh``, ``matrix_exp``, a triangular solve...) costs
  ``max(m, p) · min(m, p)²`` for each matrix it is given;
- anything else (elementwise, copies, concatenations, reductions) the elements it reads and
  writes.

A thin ``n x k`` weight passes when no operator does more than ``C · n k²`` work and none
returns more than ``C · n k`` elements, with ``C = 8``; at ``n = 4096, k = 8`` an ``n x n``
tensor is 64 times that memory bound, an ``n x n`` decomposition 2000 times the work bound.
The PSD constraints of rank ``k`` have an ``n x n`` weight: for them the bounds are ``C · n² k``
work (no ``O(n³)`` decomposition of the weight) and ``C · n²`` elements.

Wide weights (``k x n``) go through the transposition the constraints apply, with the same
bounds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import tether
from tether.constraints import PSDFixedRank, PSDLowRank
from tether.functional import fixed_rank_psd_factors, gram, gram_factor
from tether.functional._symmetric import low_rank_eigh

# Operators whose work is a matrix product: m p q.
_PRODUCTS = {"mm", "bmm", "addmm", "baddbmm", "addbmm", "matmul", "dot", "vdot", "mv", "addmv"}
# Name parts (split at "_") that mark a dense decomposition or solve: max(m, p) min(m, p)² per
# matrix. tether's own operators (namespace "tether") are opaque here and costed the same way.
_DECOMPOSITIONS = {
    "geqrf",
    "ormqr",
    "orgqr",
    "householder",
    "triangular",
    "cholesky",
    "lu",
    "eig",
    "eigh",
    "eigvals",
    "eigvalsh",
    "svd",
    "svdvals",
    "qr",
    "solve",
    "inv",
    "inverse",
    "det",
    "slogdet",
    "lstsq",
    "pinv",
    "lobpcg",
    "factor",
}


def _shapes(values: object) -> list[torch.Size]:
    leaves, _ = tree_flatten(values)
    return [leaf.shape for leaf in leaves if isinstance(leaf, Tensor)]


def _work(
    namespace: str, name: str, inputs: Sequence[torch.Size], outputs: Sequence[torch.Size]
) -> int:
    """The work model of the module docstring for one operator call."""
    if name in _PRODUCTS and len(inputs) >= 2:
        a, b = inputs[-2], inputs[-1]
        if len(a) < 2 or len(b) < 2:
            return max(math.prod(a), math.prod(b))
        batch = max(math.prod(a[:-2]), math.prod(b[:-2]))
        return batch * a[-2] * a[-1] * b[-1]
    parts = set(name.split("_"))
    if "matrix_exp" in name or namespace == "tether" or parts & _DECOMPOSITIONS:
        work = 0
        for shape in inputs:
            if len(shape) >= 2:
                m, p = shape[-2], shape[-1]
                work += math.prod(shape[:-2]) * max(m, p) * min(m, p) ** 2
        return max(work, 1)
    return sum(math.prod(shape) for shape in (*inputs, *outputs))


@dataclass
class Call:
    name: str
    inputs: list[torch.Size]
    outputs: list[torch.Size]
    work: int

    def __str__(self) -> str:
        return f"{self.name}{[tuple(s) for s in self.inputs]} -> {[tuple(s) for s in self.outputs]}"


@dataclass
class Cost(TorchDispatchMode):
    """Records each operator call with its work (see the module docstring) and output size."""

    calls: list[Call] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        result = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__.lstrip("_")
        inputs, outputs = _shapes((args, kwargs)), _shapes(result)
        self.calls.append(Call(name, inputs, outputs, _work(func.namespace, name, inputs, outputs)))
        return result

    def worst(self, bound: Callable[[Call], int]) -> list[Call]:
        return sorted((c for c in self.calls if bound(c) > 0), key=bound, reverse=True)[:5]


N, K = 4096, 8  # tall weights: n x k
N_PSD, K_PSD = 768, 8  # PSD weights of rank k: n x n
C = 8


@dataclass(frozen=True)
class Helper:
    """A constraint on a weight: how to register it, and the shape and bounds it is checked at."""

    register: Callable[[nn.Module], nn.Module]
    psd: bool = False
    assignable: bool = True  # right_inverse exists (use_trivialization=False: householder only)

    def layer(self, wide: bool) -> nn.Module:
        if self.psd:
            # A PSD weight of rank k: the nearest member of a matrix of higher rank needs its
            # k largest eigenpairs exactly, a dense eigh (Note [Eigenpairs of a symmetric
            # matrix of low rank]); a member costs O(n² k).
            layer = nn.Linear(N_PSD, N_PSD, bias=False)
            with torch.no_grad():
                B = torch.randn(N_PSD, K_PSD) / math.sqrt(N_PSD)
                layer.weight.copy_(B @ B.T)
            return layer
        return nn.Linear(N, K, bias=False) if wide else nn.Linear(K, N, bias=False)

    def bounds(self) -> tuple[int, int]:
        """The most work of one operator, and the most elements of one output."""
        if self.psd:
            return C * N_PSD**2 * K_PSD, C * N_PSD**2
        return C * N * K**2, C * N * K


def _orthogonal(orthogonal_map: str, trivialization: bool) -> Helper:
    return Helper(
        lambda m: tether.orthogonal(
            m, orthogonal_map=orthogonal_map, use_trivialization=trivialization
        ),
        assignable=trivialization or orthogonal_map == "householder",
    )


HELPERS: dict[str, Helper] = {
    "orthogonal_matrix_exp": _orthogonal("matrix_exp", True),
    "orthogonal_cayley": _orthogonal("cayley", True),
    "orthogonal_householder": _orthogonal("householder", True),
    "orthogonal_matrix_exp_no_base": _orthogonal("matrix_exp", False),
    "orthogonal_cayley_no_base": _orthogonal("cayley", False),
    "orthogonal_householder_no_base": _orthogonal("householder", False),
    "grassmannian_matrix_exp": Helper(
        lambda m: tether.grassmannian(m, orthogonal_map="matrix_exp")
    ),
    "grassmannian_cayley": Helper(lambda m: tether.grassmannian(m, orthogonal_map="cayley")),
    "low_rank": Helper(lambda m: tether.low_rank(m, rank=K // 2)),
    "fixed_rank": Helper(lambda m: tether.fixed_rank(m, rank=K // 2)),
    "sphere": Helper(tether.sphere),
    "sphere_rows": Helper(lambda m: tether.sphere(m, dim=-1)),
    "poincare_ball": Helper(tether.poincare_ball),
    "psd_low_rank": Helper(lambda m: tether.psd_low_rank(m, rank=K_PSD), psd=True),
    "psd_fixed_rank": Helper(lambda m: tether.psd_fixed_rank(m, rank=K_PSD), psd=True),
}


def _constraint(layer: nn.Module) -> Any:
    return layer.parametrizations.weight[0]


def _member(layer: nn.Module) -> Tensor:
    with torch.no_grad():
        return _constraint(layer).sample()


def _other(layer: nn.Module) -> Tensor:
    """A matrix off the set (for the PSD ones: of full rank), to be projected on assignment."""
    return torch.randn_like(layer.weight)


def _forward_backward(layer: nn.Module) -> None:
    W = layer.weight
    (W * torch.ones_like(W)).sum().backward()


# Each operation gets a freshly registered layer; `prepare` runs outside the recording.
@dataclass(frozen=True)
class Operation:
    run: Callable[[nn.Module, Any], object]
    prepare: Callable[[nn.Module], Any] = lambda layer: None
    needs_assignment: bool = False
    # What the operation must still get right, checked after the recording.
    verify: Callable[[nn.Module, Any, object], object] = lambda layer, argument, result: None


def _weight_is(layer: nn.Module, W: Tensor, result: object) -> None:
    torch.testing.assert_close(layer.weight.detach(), W, atol=1e-4, rtol=0)


def _is_member(layer: nn.Module, W: Tensor, result: object) -> None:
    """The result (a sample, or the answer of in_manifold) and the weight are members."""
    if isinstance(result, Tensor):
        assert _constraint(layer).in_manifold(result)
    else:
        assert result is None or result is True
    assert _constraint(layer).in_manifold(layer.weight.detach())


def _is_not_member(layer: nn.Module, W: Tensor, result: object) -> None:
    assert result is False


OPERATIONS: dict[str, Operation] = {
    "forward": Operation(lambda layer, _: layer.weight),
    "forward_backward": Operation(lambda layer, _: _forward_backward(layer)),
    "assign_member": Operation(
        lambda layer, W: setattr(layer, "weight", W), _member, True, _weight_is
    ),
    "assign_other": Operation(
        lambda layer, W: setattr(layer, "weight", W), _other, True, _is_member
    ),
    "sample": Operation(lambda layer, _: _constraint(layer).sample(), verify=_is_member),
    "in_manifold_member": Operation(
        lambda layer, W: _constraint(layer).in_manifold(W),
        lambda layer: layer.weight.detach(),
        verify=_is_member,
    ),
    "in_manifold_other": Operation(
        lambda layer, W: _constraint(layer).in_manifold(W), _other, verify=_is_not_member
    ),
    "update_base": Operation(
        lambda layer, _: tether.update_base(layer),
        lambda layer: layer.weight.detach().clone(),
        True,
        _weight_is,
    ),
}


def _cases() -> Iterator[Any]:
    for helper in HELPERS:
        yield pytest.param(helper, "register", id=f"{helper}-register")
        for operation in OPERATIONS:
            yield pytest.param(helper, operation, id=f"{helper}-{operation}")


def _check(cost: Cost, helper: Helper, what: str) -> None:
    most_work, most_elements = helper.bounds()
    too_much = cost.worst(lambda c: c.work if c.work > most_work else 0)
    assert not too_much, f"{what}: operators above the work bound {most_work}: " + "; ".join(
        f"{c} ({c.work})" for c in too_much
    )
    too_big = cost.worst(lambda c: max(map(math.prod, c.outputs), default=0) > most_elements)
    assert not too_big, f"{what}: outputs above {most_elements} elements: " + "; ".join(
        map(str, too_big)
    )


@pytest.mark.parametrize("wide", [False, True], ids=["tall", "wide"])
@pytest.mark.parametrize(("helper_name", "operation_name"), list(_cases()))
def test_a_tall_weight_costs_n_k_squared(helper_name: str, operation_name: str, wide: bool) -> None:
    helper = HELPERS[helper_name]
    if wide and helper.psd:
        pytest.skip("a PSD weight is square")
    if operation_name == "register":
        layer = helper.layer(wide)
        with Cost() as cost:
            helper.register(layer)
        _check(cost, helper, "registration")
        return
    operation = OPERATIONS[operation_name]
    if helper.psd and operation_name.endswith("_other"):
        pytest.skip("projecting a PSD matrix of full rank takes a dense eigh, O(n³), by design")
    if operation.needs_assignment and not helper.assignable:
        pytest.skip("orthogonal(use_trivialization=False) assigns only with householder")
    layer = helper.register(helper.layer(wide))
    argument = operation.prepare(layer)
    with Cost() as cost:
        result = operation.run(layer, argument)
    _check(cost, helper, operation_name)
    operation.verify(layer, argument, result)


def test_the_cost_model_sees_an_n_by_n_matrix() -> None:
    """The check can fail: the square formulation (PyTorch's orthogonal) breaks both bounds."""
    from torch.nn.utils import parametrizations

    layer = nn.Linear(K, N // 8, bias=False)
    with Cost() as cost:
        parametrizations.orthogonal(layer, orthogonal_map="matrix_exp")
        _forward_backward(layer)
    n = N // 8
    assert max(c.work for c in cost.calls) >= n**3
    assert max(math.prod(s) for c in cost.calls for s in c.outputs) >= n * n


# --- the eigenpairs of a PSD matrix of low rank, against the dense eigh ---------------------


def _psd_of_rank(batch: tuple[int, ...], n: int, rank: int, dtype: torch.dtype) -> Tensor:
    B = torch.randn(*batch, n, rank, dtype=dtype) / math.sqrt(n)
    return gram(B)


def _dense_distance(X: Tensor, rank: int) -> Tensor:
    S = (X + X.mH) / 2
    L = torch.linalg.eigvalsh(S)
    kept = torch.cat([torch.zeros_like(L[..., :-rank]), L[..., -rank:].clamp(min=0)], dim=-1)
    skew = torch.linalg.matrix_norm((X - X.mH) / 2)
    return torch.sqrt(skew**2 + torch.linalg.vector_norm(L - kept, dim=-1) ** 2).amax()


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128, torch.float32])
@pytest.mark.parametrize("batch", [(), (3,)])
@pytest.mark.parametrize("true_rank", [1, 3, 6])
def test_low_rank_eigh_gives_the_largest_eigenpairs_of_a_matrix_of_low_rank(
    dtype: torch.dtype, batch: tuple[int, ...], true_rank: int
) -> None:
    n, rank = 40, 3  # 2 rank = 6 eigenpairs: a rank up to 6 is captured
    S = _psd_of_rank(batch, n, true_rank, dtype)
    pairs = low_rank_eigh(S, rank)
    assert pairs is not None
    dense = torch.linalg.eigvalsh(S)
    atol = 1e-4 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(pairs.values[..., -rank:], dense[..., -rank:], atol=atol, rtol=0)
    rebuilt = (pairs.vectors * pairs.values.unsqueeze(-2).to(dtype)) @ pairs.vectors.mH
    torch.testing.assert_close(rebuilt, S, atol=atol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_low_rank_eigh_declines_a_matrix_of_higher_rank(dtype: torch.dtype) -> None:
    """Of rank 7 > 2 rank, or within a batch of which one is: the dense eigh must run."""
    assert low_rank_eigh(_psd_of_rank((), 40, 7, dtype), 3) is None
    batch = torch.stack([_psd_of_rank((), 40, 2, dtype), _psd_of_rank((), 40, 40, dtype)])
    assert low_rank_eigh(batch, 3) is None
    assert low_rank_eigh(_psd_of_rank((), 10, 2, dtype), 3) is None  # 4 rank > n: no gain
    # A tail just above rounding is not rounding.
    S = _psd_of_rank((), 40, 2, dtype)
    tail = 1e-4 * gram(torch.randn(40, 40, dtype=dtype) / 40)
    assert low_rank_eigh(S + tail, 3) is None


def test_low_rank_eigh_leaves_the_global_random_stream_alone() -> None:
    S = _psd_of_rank((), 40, 2, torch.float64)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    first = low_rank_eigh(S, 3)
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)
    second = low_rank_eigh(S, 3)
    assert first is not None and second is not None
    torch.testing.assert_close(first.values, second.values, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.complex128])
@pytest.mark.parametrize("perturbation", [0.0, 1e-3])
def test_psd_of_rank_right_inverse_and_distance_match_the_dense_eigh(
    dtype: torch.dtype, perturbation: float
) -> None:
    """Members go through low_rank_eigh, non-members through the dense eigh: both as before."""
    n, rank = 48, 3
    real = torch.float64 if dtype != torch.float32 else torch.float32
    X = _psd_of_rank((2,), n, rank, dtype)
    X = X + perturbation * torch.randn(2, n, n, dtype=real).to(dtype)
    atol = 1e-4 if dtype == torch.float32 else 1e-10
    for constraint in (PSDLowRank(rank), PSDFixedRank(rank)):
        torch.testing.assert_close(
            constraint.distance(X), _dense_distance(X, rank).to(real), atol=atol, rtol=0
        )
    # The projection: the r largest eigenpairs of the symmetric part, clamped.
    S = (X + X.mH) / 2
    L, Q = torch.linalg.eigh(S.to(torch.complex128 if X.is_complex() else torch.float64))
    nearest = (Q[..., -rank:] * L[..., -rank:].clamp(min=0).unsqueeze(-2)) @ Q[..., -rank:].mH
    torch.testing.assert_close(gram(gram_factor(S, rank)), nearest.to(dtype), atol=atol, rtol=0)
    B, s = fixed_rank_psd_factors(S, rank)
    torch.testing.assert_close(
        (B * torch.nn.functional.softplus(s).unsqueeze(-2).to(dtype)) @ B.mH,
        nearest.to(dtype),
        atol=atol,
        rtol=0,
    )
    member = PSDFixedRank(rank)
    assert member.in_manifold(X) == (perturbation == 0.0)

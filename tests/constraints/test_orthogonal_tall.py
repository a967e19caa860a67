"""Thin orthogonal weights (``n x k``, ``n > 2k``, ``n > 64``) in ``O(n k²)``: the same weights
as the ``n x n`` formulation, exact gradients, no ``n x n`` tensor anywhere, and checkpoints
that cross to and from PyTorch's layout (Note [Thin orthogonal weights])."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn.utils import parametrizations as torch_parametrizations
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils._python_dispatch import TorchDispatchMode

import tether
from tether.constraints import Grassmannian, Orthogonal
from tether.functional import householder, skew_matrix_exp

MAPS = ["matrix_exp", "cayley", "householder"]
GROUP_MAPS = ["matrix_exp", "cayley"]
REAL = [torch.float32, torch.float64]
COMPLEX = [torch.complex64, torch.complex128]


# --- the n x n formulation, the reference ---------------------------------------------------


def dense_generator(X: Tensor, rotate: bool = True) -> Tensor:
    """The skew ``n x n`` generator of a tall original, as the square formulation builds it."""
    n, k = X.shape[-2], X.shape[-1]
    L = X.tril() if rotate else torch.cat([torch.zeros_like(X[..., :k, :]), X[..., k:, :]], -2)
    L = torch.cat([L, L.new_zeros(*L.shape[:-1], n - k)], dim=-1)
    return L - L.mH


def dense_cayley(S: Tensor) -> Tensor:
    eye = torch.eye(S.shape[-1], dtype=S.dtype)
    return torch.linalg.solve(eye - S / 2, eye + S / 2)


def dense_columns(X: Tensor, orthogonal_map: str, rotate: bool = True) -> Tensor:
    """``map(S)[:, :k]`` through the ``n x n`` matrix ``map(S)``."""
    k = X.shape[-1]
    if orthogonal_map == "householder":
        return householder(X)
    S = dense_generator(X, rotate)
    square = torch.linalg.matrix_exp(S) if orthogonal_map == "matrix_exp" else dense_cayley(S)
    return square[..., :k]


def square_base(U: Tensor) -> Tensor:
    """``[U, U⊥]``: ``U`` completed by the Householder reflectors of its QR decomposition."""
    n, k = U.shape[-2], U.shape[-1]
    reflectors, tau = torch.geqrf(U)
    padded = torch.cat([reflectors, reflectors.new_zeros(*U.shape[:-1], n - k)], dim=-1)
    H = torch.linalg.householder_product(
        padded, torch.cat([tau, tau.new_zeros(*tau.shape[:-1], n - k)], -1)
    )
    return torch.cat([U, H[..., k:]], dim=-1)


def reference(constraint: Orthogonal, X: Tensor) -> Tensor:
    """What ``constraint(X)`` is by the ``n x n`` formulation, in double precision."""
    precise = torch.complex128 if X.is_complex() else torch.float64
    transposed = X.shape[-2] < X.shape[-1]
    tall = (X.mT if transposed else X).to(precise)
    rotate = not isinstance(constraint, Grassmannian)
    Q = dense_columns(tall, constraint.orthogonal_map, rotate)
    if constraint.use_trivialization:
        assert constraint.base is not None
        Q = square_base(constraint.base.to(precise)) @ Q
    return Q.mT if transposed else Q


# --- helpers ------------------------------------------------------------------------------------


def module_with(weight: Tensor) -> nn.Module:
    module = nn.Module()
    module.weight = nn.Parameter(weight.clone())
    return module


def tolerance(dtype: torch.dtype, n: int, scale: float = 1.0) -> float:
    """Rounding of an ``n``-row map, grown with the generator's norm (scaling and squaring)."""
    return 50 * n * torch.finfo(dtype).eps * max(1.0, scale)


def orthonormality_error(W: Tensor) -> float:
    tall = (W.mT if W.shape[-2] < W.shape[-1] else W).detach()
    eye = torch.eye(tall.shape[-1], dtype=tall.dtype)
    return float((tall.mH @ tall - eye).abs().max())


@st.composite
def thin_cases(draw: st.DrawFn, maps: list[str]) -> tuple[Tensor, str, int]:
    """A thin original (tall or wide, batched or not, real or complex), a map and a seed."""
    orthogonal_map = draw(st.sampled_from(maps))
    k = draw(st.integers(1, 6))
    n = draw(st.integers(65, 90))
    batch = draw(st.sampled_from([(), (2,)]))
    dtypes = REAL if orthogonal_map == "householder" else REAL + COMPLEX
    dtype = draw(st.sampled_from(dtypes))
    wide = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    shape = (*batch, k, n) if wide else (*batch, n, k)
    return torch.randn(shape, dtype=dtype, generator=generator), orthogonal_map, seed


def scrambled(module: nn.Module, seed: int, scale: float) -> Tensor:
    """Overwrite the original with ``scale`` times a Gaussian; return it."""
    original = module.parametrizations.weight.original
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        drawn = torch.randn(original.shape, dtype=original.dtype, generator=generator)
        original.copy_(scale * drawn)
    return original.detach().clone()


# --- the weights: the n x n formulation's -------------------------------------------------------


@given(case=thin_cases(MAPS), scale=st.sampled_from([0.0, 0.1, 1.0]))
@settings(max_examples=40, deadline=None)
def test_a_thin_weight_is_the_square_formulations(case, scale):
    X, orthogonal_map, seed = case
    module = tether.orthogonal(module_with(X), orthogonal_map=orthogonal_map)
    constraint = module.parametrizations.weight[0]
    original = scrambled(module, seed, scale)
    W = module.weight
    assert W.shape == X.shape and W.dtype == X.dtype
    norm = float(torch.linalg.matrix_norm(original).max())
    expected = reference(constraint, original).to(W.dtype)
    atol = tolerance(X.dtype, max(X.shape[-2:]), norm)
    torch.testing.assert_close(W, expected, atol=atol, rtol=0)


@given(case=thin_cases(GROUP_MAPS), scale=st.sampled_from([0.0, 0.1, 1.0]))
@settings(max_examples=20, deadline=None)
def test_a_thin_grassmannian_weight_is_the_square_formulations(case, scale):
    X, orthogonal_map, seed = case
    module = tether.grassmannian(module_with(X), orthogonal_map=orthogonal_map)
    original = scrambled(module, seed, scale)
    norm = float(torch.linalg.matrix_norm(original).max())
    expected = reference(module.parametrizations.weight[0], original).to(X.dtype)
    atol = tolerance(X.dtype, max(X.shape[-2:]), norm)
    torch.testing.assert_close(module.weight, expected, atol=atol, rtol=0)


@given(case=thin_cases(MAPS))
@settings(max_examples=20, deadline=None)
def test_without_trivialization_a_thin_weight_is_the_square_formulations(case):
    X, orthogonal_map, _ = case
    constraint = Orthogonal(orthogonal_map, use_trivialization=False)
    norm = float(torch.linalg.matrix_norm(X).max())
    expected = reference(constraint, X).to(X.dtype)
    atol = tolerance(X.dtype, max(X.shape[-2:]), norm)
    torch.testing.assert_close(constraint(X), expected, atol=atol, rtol=0)


@pytest.mark.parametrize("orthogonal_map", MAPS)
@pytest.mark.parametrize("shape", [(80, 3), (3, 80), (2, 70, 4)], ids=str)
def test_the_base_of_a_thin_weight_is_its_columns(shape, orthogonal_map):
    W = Orthogonal().sample(shape, dtype=torch.float64)
    module = tether.orthogonal(module_with(W), orthogonal_map=orthogonal_map)
    base = module.parametrizations.weight[0].base
    tall = W.mT if shape[-2] < shape[-1] else W
    assert base.shape == tall.shape
    torch.testing.assert_close(base, tall)
    torch.testing.assert_close(module.weight, W, atol=tolerance(torch.float64, 80), rtol=0)


@pytest.mark.parametrize("shape", [(64, 3), (12, 6), (5, 3)], ids=str)
def test_small_or_nearly_square_tall_weights_keep_pytorchs_square_base(shape):
    module = tether.orthogonal(module_with(torch.randn(shape)))
    assert module.parametrizations.weight[0].base.shape == (shape[0], shape[0])


@pytest.mark.parametrize("rotate", [True, False], ids=["orthogonal", "grassmannian"])
@pytest.mark.parametrize("dtype", REAL + COMPLEX, ids=str)
@pytest.mark.parametrize("shape", [(5, 5), (2, 40, 40)], ids=str)
def test_a_square_weight_is_bitwise_what_it_was(shape, dtype, rotate):
    # The exponential now receives 2L instead of L - Lᴴ (its skew part is taken once): the
    # values must not move by a single bit.
    X = torch.randn(shape, dtype=dtype)
    constraint = Orthogonal() if rotate else Grassmannian()
    constraint.right_inverse(Orthogonal().sample(shape, dtype=dtype))
    assert constraint.base is not None
    expected = constraint.base @ skew_matrix_exp(dense_generator(X, rotate))
    assert torch.equal(constraint(X), expected)


# --- gradients ----------------------------------------------------------------------------------
# fast_mode: a numerical derivative in a few random directions rather than the whole Jacobian
# of these n x k maps (n > 64), which is what makes the full check slow.


@pytest.mark.parametrize("start", ["neutral", "random"])
@pytest.mark.parametrize("trivialization", [True, False], ids=["base", "no_base"])
@pytest.mark.parametrize("orthogonal_map", MAPS)
@pytest.mark.parametrize("shape", [(70, 2), (2, 70), (2, 66, 3)], ids=str)
def test_gradcheck(shape, orthogonal_map, trivialization, start):
    # From the neutral point (where B = 0: the original of a freshly set weight) and off it.
    constraint = Orthogonal(orthogonal_map, use_trivialization=trivialization)
    if trivialization:
        constraint.right_inverse(constraint.sample(shape, dtype=torch.float64))
    X = -torch.eye(*shape[-2:], dtype=torch.float64).expand(shape)
    if start == "random":
        X = X + 0.3 * torch.randn(shape, dtype=torch.float64)
    assert torch.autograd.gradcheck(constraint, X.clone().requires_grad_(), fast_mode=True)


@pytest.mark.parametrize("orthogonal_map", GROUP_MAPS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128], ids=str)
@pytest.mark.parametrize("cls", [Orthogonal, Grassmannian])
def test_gradcheck_grassmannian_and_complex(cls, dtype, orthogonal_map):
    constraint = cls(orthogonal_map)
    constraint.right_inverse(Orthogonal().sample((68, 2), dtype=dtype))
    X = 0.3 * torch.randn(68, 2, dtype=dtype)
    assert torch.autograd.gradcheck(constraint, X.requires_grad_(), fast_mode=True)


@pytest.mark.parametrize("orthogonal_map", MAPS)
def test_a_thin_weight_stays_orthonormal_through_training(orthogonal_map):
    layer = tether.orthogonal(nn.Linear(4, 100), orthogonal_map=orthogonal_map)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    x, y = torch.randn(32, 4), torch.randn(32, 100)
    for step in range(10):
        optimizer.zero_grad()
        (layer(x) - y).square().mean().backward()
        optimizer.step()
        if step == 5:
            tether.update_base(layer)
    assert orthonormality_error(layer.weight) <= tolerance(torch.float32, 100)


# --- nothing of size n x n ----------------------------------------------------------------------


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        result = func(*args, **(kwargs or {}))
        for value in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(value, Tensor):
                self.largest = max(self.largest, value.numel())
        return result


N, K = 20000, 4

Use = Callable[[nn.Module], object]


def _train_step(layer: nn.Module) -> None:
    layer.weight.square().sum().backward()


def _averaged_update_base(layer: nn.Module) -> None:
    ema = AveragedModel(layer, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    with torch.no_grad():
        next(layer.parameters()).add_(1e-3)  # a training step
    ema.update_parameters(layer)
    tether.update_base(layer, averaged=ema)


USES: dict[str, Use] = {
    "forward_backward": _train_step,
    "right_inverse": lambda layer: setattr(layer, "weight", layer.weight.detach() + 1e-3),
    "sample_uniform": lambda layer: layer.parametrizations.weight[0].sample(),
    "sample_torus": lambda layer: layer.parametrizations.weight[0].sample("torus"),
    "in_manifold": lambda layer: layer.parametrizations.weight[0].in_manifold(layer.weight),
    "update_base": lambda layer: tether.update_base(layer),
    "update_base_averaged": _averaged_update_base,
    "state_dict_round_trip": lambda layer: layer.load_state_dict(layer.state_dict()),
}
REGISTER: dict[str, Callable[[nn.Module], nn.Module]] = {
    "matrix_exp": lambda m: tether.orthogonal(m, orthogonal_map="matrix_exp"),
    "cayley": lambda m: tether.orthogonal(m, orthogonal_map="cayley"),
    "householder": lambda m: tether.orthogonal(m, orthogonal_map="householder"),
    "grassmannian": tether.grassmannian,
    "low_rank": lambda m: tether.low_rank(m, rank=2),
    "fixed_rank": lambda m: tether.fixed_rank(m, rank=2),
}
NO_AVERAGED_COPY = ("grassmannian",)  # update_base refuses it (the copy is out of reach)


@pytest.mark.parametrize("use", list(USES))
@pytest.mark.parametrize("constraint", list(REGISTER))
def test_no_tensor_of_size_n_by_n(constraint, use):
    if use == "update_base_averaged" and constraint in NO_AVERAGED_COPY:
        pytest.skip("update_base(averaged=) refuses a Grassmannian weight")
    if use == "sample_torus" and constraint in ("low_rank", "fixed_rank"):
        pytest.skip("the torus is the orthogonal family's")
    layer = nn.Linear(K, N, bias=False)
    spy = LargestTensor()
    with spy:
        REGISTER[constraint](layer)
        USES[use](layer)
    # n x k tensors, a few side by side (a concatenation); n x n would be 5000 times more.
    assert spy.largest <= 4 * N * K


# --- the base on the meta device and under the compiler -----------------------------------------


def test_a_thin_weight_builds_on_the_meta_device():
    with torch.device("meta"):
        layer = tether.orthogonal(nn.Linear(4, 100), orthogonal_map="matrix_exp")
        assert layer.parametrizations.weight[0].base.shape == (100, 4)
        assert layer.weight.shape == (100, 4)


@pytest.mark.filterwarnings(
    "ignore:<class 'torch.autograd.function.Function'> should not be instantiated"
)
@pytest.mark.filterwarnings("ignore:`torch._prims_common.check` is deprecated")
@pytest.mark.parametrize("orthogonal_map", MAPS)
def test_a_thin_weight_compiles_whole_and_matches_eager(orthogonal_map):
    torch._dynamo.reset()
    layer = tether.orthogonal(nn.Linear(3, 80).double(), orthogonal_map=orthogonal_map)
    eager = copy.deepcopy(layer)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(5, 3, dtype=torch.float64)
    for call in (compiled, eager):
        call(x).square().sum().backward()
    torch.testing.assert_close(compiled(x), eager(x))
    for p, q in zip(layer.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    torch._dynamo.reset()


# --- sampling -----------------------------------------------------------------------------------


@pytest.mark.parametrize("orthogonal_map", MAPS)
@pytest.mark.parametrize("shape", [(80, 3), (80, 4), (3, 81)], ids=str)
def test_a_thin_torus_sample_is_the_square_ones_columns(shape, orthogonal_map):
    constraint = Orthogonal(orthogonal_map)
    Q = constraint.sample(shape, distribution="torus", generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    transposed = shape[-2] < shape[-1]
    n, k = (shape[-1], shape[-2]) if transposed else shape
    angles = torch.pi * (2 * torch.rand(n // 2, generator=generator) - 1)
    below = torch.zeros(n - 1)
    below[::2] = angles
    S = torch.diag_embed(below, offset=-1)
    group_map = dense_cayley if orthogonal_map == "cayley" else torch.linalg.matrix_exp
    expected = group_map(S - S.mT)[..., :k]
    torch.testing.assert_close(Q, expected.mT if transposed else expected)


# --- checkpoints --------------------------------------------------------------------------------


def trained_torch(orthogonal_map: str, shape: tuple[int, int]) -> nn.Module:
    """PyTorch's orthogonal weight, moved from its base by a few SGD steps."""
    layer = torch_parametrizations.orthogonal(
        nn.Linear(shape[1], shape[0]), orthogonal_map=orthogonal_map
    )
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        layer(torch.randn(8, shape[1])).square().sum().backward()
        optimizer.step()
    return layer


@pytest.mark.parametrize("orthogonal_map", MAPS)
@pytest.mark.parametrize("shape", [(90, 4), (4, 90)], ids=str)
def test_a_pytorch_checkpoint_loads_converted_to_the_compact_base(shape, orthogonal_map):
    theirs = trained_torch(orthogonal_map, shape)
    ours = tether.orthogonal(nn.Linear(shape[1], shape[0]), orthogonal_map=orthogonal_map)
    result = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert result.missing_keys == result.unexpected_keys == []
    n, k = max(shape), min(shape)
    assert ours.parametrizations.weight[0].base.shape == (n, k)
    torch.testing.assert_close(ours.weight, theirs.weight, atol=tolerance(torch.float32, n), rtol=0)


@pytest.mark.parametrize("orthogonal_map", MAPS)
def test_a_pytorch_checkpoint_loads_into_a_constraint_registered_as_a_class(orthogonal_map):
    # No loading hook on the module: the constraint keeps the square base it is given, and
    # goes compact at the next assignment or update_base.
    theirs = trained_torch(orthogonal_map, (90, 4))
    ours = tether.register_parametrization(nn.Linear(4, 90), "weight", Orthogonal(orthogonal_map))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    constraint = ours.parametrizations.weight[0]
    assert constraint.base.shape == (90, 90)
    atol = tolerance(torch.float32, 90)
    torch.testing.assert_close(ours.weight, theirs.weight, atol=atol, rtol=0)
    tether.update_base(ours)
    assert constraint.base.shape == (90, 4)
    torch.testing.assert_close(ours.weight, theirs.weight, atol=atol, rtol=0)


@pytest.mark.parametrize("orthogonal_map", GROUP_MAPS)
def test_a_square_base_checkpoint_of_a_grassmannian_loads_converted(orthogonal_map):
    # The layout tether saved for every tall weight before thin ones had their own.
    n, k = 80, 3
    base = Orthogonal().sample((n, n), dtype=torch.float64)
    original = 0.5 * torch.randn(n, k, dtype=torch.float64)
    state = {"parametrizations.weight.0.base": base, "parametrizations.weight.original": original}
    expected = base @ dense_columns(original, orthogonal_map, rotate=False)
    ours = tether.grassmannian(
        module_with(torch.randn(n, k, dtype=torch.float64)), orthogonal_map=orthogonal_map
    )
    ours.load_state_dict(state)
    assert ours.parametrizations.weight[0].base.shape == (n, k)
    torch.testing.assert_close(ours.weight, expected, atol=tolerance(torch.float64, n), rtol=0)


@pytest.mark.parametrize("orthogonal_map", MAPS)
@pytest.mark.parametrize("shape", [(90, 4), (4, 90)], ids=str)
def test_a_thin_checkpoint_goes_to_pytorch_as_a_plain_one(shape, orthogonal_map):
    ours = tether.orthogonal(nn.Linear(shape[1], shape[0]), orthogonal_map=orthogonal_map)
    scrambled(ours, seed=0, scale=0.1)
    plain = nn.Linear(shape[1], shape[0])
    plain.load_state_dict(tether.plain_state_dict(ours))
    theirs = torch_parametrizations.orthogonal(plain, orthogonal_map=orthogonal_map)
    atol = tolerance(torch.float32, max(shape))
    torch.testing.assert_close(theirs.weight, ours.weight, atol=atol, rtol=0)


@pytest.mark.parametrize("orthogonal_map", MAPS)
def test_a_thin_checkpoint_round_trips(orthogonal_map):
    source = tether.orthogonal(nn.Linear(4, 90), orthogonal_map=orthogonal_map)
    scrambled(source, seed=1, scale=0.3)
    target = tether.orthogonal(nn.Linear(4, 90), orthogonal_map=orthogonal_map)
    target.load_state_dict(source.state_dict(), strict=True)
    torch.testing.assert_close(target.weight, source.weight, atol=0, rtol=0)


def test_a_compact_checkpoint_replaces_a_square_base():
    # A constraint holding a square base (loaded from PyTorch) takes a compact checkpoint.
    theirs = trained_torch("matrix_exp", (90, 4))
    ours = tether.register_parametrization(nn.Linear(4, 90), "weight", Orthogonal())
    ours.load_state_dict(theirs.state_dict())
    source = tether.orthogonal(nn.Linear(4, 90), orthogonal_map="matrix_exp")
    scrambled(source, seed=2, scale=0.3)
    ours.load_state_dict(source.state_dict())
    assert ours.parametrizations.weight[0].base.shape == (90, 4)
    torch.testing.assert_close(ours.weight, source.weight, atol=0, rtol=0)


# --- update_base with an averaged copy ----------------------------------------------------------

AVERAGED = {
    "tall_householder": lambda dtype: tether.orthogonal(nn.Linear(3, 80, dtype=dtype)),
    "wide_householder": lambda dtype: tether.orthogonal(nn.Linear(80, 3, dtype=dtype)),
    "tall_matrix_exp": lambda dtype: tether.orthogonal(
        nn.Linear(3, 80, dtype=dtype), orthogonal_map="matrix_exp"
    ),
    "wide_cayley": lambda dtype: tether.orthogonal(
        nn.Linear(80, 3, dtype=dtype), orthogonal_map="cayley"
    ),
}


@pytest.mark.parametrize("dtype", REAL, ids=str)
@pytest.mark.parametrize("model", list(AVERAGED))
def test_update_base_moves_an_averaged_copy_of_a_thin_weight(model, dtype):
    layer = AVERAGED[model](dtype)
    ema = AveragedModel(layer, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    x = torch.randn(16, layer.in_features, dtype=dtype)
    y = torch.randn(16, layer.out_features, dtype=dtype)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    atol = 64 * max(layer.weight.shape) * torch.finfo(dtype).eps
    for step in range(1, 21):
        optimizer.zero_grad()
        (layer(x) - y).square().mean().backward()
        optimizer.step()
        ema.update_parameters(layer)
        if step % 10 == 0:
            before = ema.module.weight.detach().clone()
            tether.update_base(layer, averaged=ema)
            assert float((ema.module.weight.detach() - before).abs().max()) <= atol
    assert ema.module.parametrizations.weight[0].base.shape == (80, 3)
    for _ in range(400):  # the model stops moving: the average converges to it
        ema.update_parameters(layer)
    torch.testing.assert_close(ema.module.weight, layer.weight, rtol=0, atol=atol)

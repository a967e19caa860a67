"""SpectralNorm and spectral_norm, against PyTorch's (the maps: tests/functional/test_norms.py)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrizations as torch_parametrizations

import tether
from tether import _torch_compat
from tether.constraints import SpectralNorm, _spectral_norm
from tether.testing import check_parametrization

LAYERS = {
    "linear": lambda: nn.Linear(5, 3),
    "linear_float64": lambda: nn.Linear(4, 6, dtype=torch.float64),
    "conv1d": lambda: nn.Conv1d(2, 4, 3),
    "conv2d": lambda: nn.Conv2d(3, 4, 3),
    "conv_transpose2d": lambda: nn.ConvTranspose2d(3, 4, 2),
    "conv3d": lambda: nn.Conv3d(2, 3, 2),
}
OPTIONS = {
    "defaults": {},
    "dim1": {"dim": 1},
    "three_iterations": {"n_power_iterations": 3},
    "eps": {"eps": 1e-3},
}
# Convolutions whose operator we normalize: (layer, input_shape).
CONVS = {
    "conv1d": (lambda: nn.Conv1d(2, 3, 3), (2, 7)),
    "conv2d_padded": (lambda: nn.Conv2d(2, 3, 3, padding=1), (2, 5, 6)),
    "conv2d_same": (lambda: nn.Conv2d(2, 3, (2, 3), padding="same", dilation=(2, 1)), (2, 5, 5)),
    "conv2d_strided": (lambda: nn.Conv2d(4, 2, 3, stride=2, padding=1, groups=2), (4, 6, 5)),
    "conv3d": (lambda: nn.Conv3d(1, 2, 2, padding=(1, 0, 1)), (1, 3, 3, 4)),
    "conv_transpose1d": (lambda: nn.ConvTranspose1d(2, 3, 3, stride=2, output_padding=1), (2, 4)),
    "conv_transpose2d": (
        lambda: nn.ConvTranspose2d(2, 4, 3, stride=1, padding=1, dilation=2, output_padding=1),
        (2, 4, 3),
    ),
}


def tolerance(dtype: torch.dtype) -> float:
    return 100 * torch.finfo(dtype).eps


def sigma(W: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """The largest singular value of W reshaped to a matrix as spectral normalization does."""
    W = W.movedim(dim, 0)
    return torch.linalg.matrix_norm(W.reshape(W.shape[0], -1), ord=2)


def seeded_pair(make, seed=0, **options):
    """The same layer twice: with tether's spectral_norm and with torch's."""
    torch.manual_seed(seed)
    ours = tether.spectral_norm(make(), **options)
    torch.manual_seed(seed)
    theirs = torch_parametrizations.spectral_norm(make(), **options)
    return ours, theirs


def buffers(module):
    norm = module.parametrizations.weight[0]
    return norm._u, norm._v


def module_with(weight: torch.Tensor) -> nn.Module:
    module = nn.Module()
    module.weight = nn.Parameter(weight.clone())
    return module


def conv_operator_norm(layer: nn.Module, input_shape) -> torch.Tensor:
    """The norm of the layer's linear part, from the Jacobian of its forward."""

    def linear_part(x):
        return layer(x[None])[0] - layer(torch.zeros_like(x)[None])[0]

    x = torch.zeros(input_shape, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(linear_part, x)
    return torch.linalg.matrix_norm(J.reshape(J[..., 0].numel() // x[..., 0].numel(), -1), ord=2)


@st.composite
def weights(draw):
    """Matrices and conv kernels of small shapes, a dim, a dtype and a seed."""
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    dim = draw(st.integers(0, ndim - 1))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return torch.randn(shape, dtype=dtype, generator=generator), dim


# Compatibility with torch.nn.utils.parametrizations.spectral_norm


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("layer", LAYERS)
def test_values_and_buffers_match_torch_over_training_steps(layer, options):
    ours, theirs = seeded_pair(LAYERS[layer], **OPTIONS[options])
    for _ in range(4):  # each access in training mode is a power-iteration step
        assert torch.equal(ours.weight, theirs.weight)
        for mine, torchs in zip(buffers(ours), buffers(theirs), strict=True):
            assert torch.equal(mine, torchs)
    ours.eval()
    theirs.eval()
    for _ in range(2):  # eval mode: no steps, the same weight each time
        assert torch.equal(ours.weight, theirs.weight)


def test_a_vector_is_normalized_as_torch_does():
    vector = torch.randn(7)
    ours = tether.spectral_norm(module_with(vector))
    theirs = torch_parametrizations.spectral_norm(module_with(vector))
    assert torch.equal(ours.weight, theirs.weight)
    keys = ["parametrizations.weight.original"]  # no vectors: a vector's norm is exact
    assert list(ours.state_dict()) == list(theirs.state_dict()) == keys


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_weights_match_torch(dtype):
    weight = torch.randn(4, 3, dtype=dtype)
    torch.manual_seed(1)
    ours = tether.spectral_norm(module_with(weight))
    torch.manual_seed(1)
    theirs = torch_parametrizations.spectral_norm(module_with(weight))
    for _ in range(3):
        assert torch.equal(ours.weight, theirs.weight)
    exact = tether.spectral_norm(module_with(weight), exact=True, bound=0.5)
    assert torch.linalg.matrix_norm(exact.weight, ord=2).item() == pytest.approx(0.5)


def test_buffers_change_only_in_training_mode():
    layer = tether.spectral_norm(nn.Linear(5, 4))
    layer.eval()
    u, v = (b.clone() for b in buffers(layer))
    layer(torch.randn(2, 5))
    assert torch.equal(buffers(layer)[0], u) and torch.equal(buffers(layer)[1], v)
    layer.train()
    with torch.no_grad():
        layer.parametrizations.weight.original.add_(torch.randn(4, 5))
    layer(torch.randn(2, 5))
    assert not torch.equal(buffers(layer)[0], u)


@pytest.mark.parametrize("layer", ["linear", "conv2d", "conv_transpose2d"])
def test_gradients_match_torch(layer):
    ours, theirs = seeded_pair(LAYERS[layer])
    cotangent = torch.randn_like(ours.parametrizations.weight.original)  # no power step
    for module in [ours, theirs]:
        (module.weight * cotangent).sum().backward()
        (module.weight * cotangent).sum().backward()  # a second step, with new vectors
    ours_grad = ours.parametrizations.weight.original.grad
    theirs_grad = theirs.parametrizations.weight.original.grad
    assert torch.allclose(ours_grad, theirs_grad, atol=1e-6, rtol=1e-6)


def test_two_evaluations_backpropagate_together():
    # The GAN pattern D(real) - D(fake): the vectors change in between.
    layer = tether.spectral_norm(nn.Linear(4, 1))
    loss = layer(torch.randn(3, 4)).mean() - layer(torch.randn(3, 4)).mean()
    loss.backward()
    assert torch.isfinite(layer.parametrizations.weight.original.grad).all()


@pytest.mark.parametrize("layer", ["linear", "conv_transpose2d"])
def test_state_dict_keys_match_torch(layer):
    ours, theirs = seeded_pair(LAYERS[layer])
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert list(ours.state_dict())[1:] == [
        "parametrizations.weight.original",
        "parametrizations.weight.0._u",
        "parametrizations.weight.0._v",
    ]


@pytest.mark.parametrize("direction", ["torch_to_tether", "tether_to_torch"])
def test_checkpoints_move_both_ways(direction):
    ours, theirs = seeded_pair(LAYERS["conv2d"], seed=0)
    source, target = (theirs, ours) if direction == "torch_to_tether" else (ours, theirs)
    with torch.no_grad():
        source.parametrizations.weight.original.mul_(3.0)
    for _ in range(3):
        source(torch.randn(2, 3, 5, 5))  # power-iteration steps
    target.load_state_dict(source.state_dict(), strict=True)
    for module in [source, target]:
        module.eval()
    assert torch.equal(target.weight, source.weight)
    for mine, theirs_ in zip(buffers(target), buffers(source), strict=True):
        assert torch.equal(mine, theirs_)


def test_right_inverse_keeps_the_tensor_as_torch_does_and_fits_the_vectors():
    ours, theirs = seeded_pair(LAYERS["linear"])
    X = torch.randn(3, 5)
    ours.weight = X
    theirs.weight = X
    assert torch.equal(ours.parametrizations.weight.original, X)
    assert torch.equal(theirs.parametrizations.weight.original, X)
    # torch keeps the vectors of the old weight, so its estimate lags; ours are fitted to X.
    assert sigma(ours.weight).item() == pytest.approx(1.0, abs=tolerance(torch.float32))
    assert sigma(theirs.weight).item() > 1 + 1e-3


# Checkpoints of the old hook-based torch.nn.utils.spectral_norm


INPUTS = {"linear": (2, 5), "conv2d": (2, 3, 5, 5), "conv_transpose2d": (2, 3, 5, 5)}


def trained_old_spectral_norm(layer, steps=3):
    old = torch.nn.utils.spectral_norm(LAYERS[layer]())
    for _ in range(steps):
        with torch.no_grad():
            old.weight_orig.add_(0.1 * torch.randn_like(old.weight_orig))
        old(torch.randn(INPUTS[layer]))
    old.eval()
    old(torch.randn(INPUTS[layer]))  # sets old.weight from the buffers, without a step
    return old


@pytest.mark.parametrize("layer", ["linear", "conv2d", "conv_transpose2d"])
def test_old_hook_based_checkpoint_loads(layer):
    old = trained_old_spectral_norm(layer)
    new = tether.spectral_norm(LAYERS[layer]())
    new.load_state_dict(old.state_dict(), strict=True)
    new.eval()
    assert torch.allclose(new.weight, old.weight, atol=1e-6)
    assert torch.equal(buffers(new)[0], old.weight_u)


def test_old_checkpoint_loads_into_a_nested_model_and_after_pickling():
    old = nn.Sequential(nn.ReLU(), trained_old_spectral_norm("linear"))
    new = nn.Sequential(nn.ReLU(), tether.spectral_norm(LAYERS["linear"]()))
    for model in [new, pickle.loads(pickle.dumps(new)), copy.deepcopy(new)]:
        model.load_state_dict(old.state_dict(), strict=True)
        model.eval()
        assert torch.allclose(model[1].weight, old[1].weight, atol=1e-6)


def test_old_checkpoint_loads_into_exact_normalization():
    old = trained_old_spectral_norm("linear")
    new = tether.spectral_norm(LAYERS["linear"](), exact=True)
    new.load_state_dict(old.state_dict(), strict=True)
    original = old.weight_orig.detach()
    assert torch.allclose(new.weight, original / sigma(original))


def test_old_checkpoint_loads_into_a_conv_operator_with_fitted_vectors():
    old = trained_old_spectral_norm("conv2d")
    input_shape = (3, 5, 5)
    new = tether.spectral_norm(LAYERS["conv2d"](), conv_operator=True, input_shape=input_shape)
    new.load_state_dict(old.state_dict(), strict=True)  # the old vectors do not carry over
    new.eval()
    assert torch.equal(new.parametrizations.weight.original, old.weight_orig)
    assert buffers(new)[0].shape == (4, 3, 3)
    norm = conv_operator_norm(new.double(), input_shape).item()
    assert norm == pytest.approx(1.0, abs=tolerance(torch.float32))


# Vectors fitted to an assigned or loaded weight (Note [Power-iteration state after a load or
# an assignment])

# Layers in float64, how to normalize them, and their true largest singular value.
FITTED = {
    "linear": (lambda: nn.Linear(5, 3), {}),
    "conv1d": (lambda: nn.Conv1d(2, 4, 3), {}),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3), {}),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(3, 4, 2), {}),
    "conv_operator": (CONVS["conv2d_strided"][0], {"conv_operator": True}),
    "conv_transpose_operator": (CONVS["conv_transpose1d"][0], {"conv_operator": True}),
}
OPERATOR_INPUTS = {
    "conv_operator": CONVS["conv2d_strided"][1],
    "conv_transpose_operator": CONVS["conv_transpose1d"][1],
}


def fitted_layer(kind: str, seed: int = 0) -> nn.Module:
    make, options = FITTED[kind]
    torch.manual_seed(seed)
    if kind in OPERATOR_INPUTS:
        options = {**options, "input_shape": OPERATOR_INPUTS[kind]}
    return tether.spectral_norm(make().double(), **options)


def true_sigma(layer: nn.Module, kind: str) -> float:
    if kind in OPERATOR_INPUTS:
        return conv_operator_norm(layer, OPERATOR_INPUTS[kind]).item()
    transposed = isinstance(layer, nn.ConvTranspose2d)
    return sigma(layer.weight.detach(), dim=1 if transposed else 0).item()


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("kind", FITTED)
def test_assignment_fits_the_vectors_to_the_new_weight(kind, mode):
    layer = fitted_layer(kind).train(mode == "train")
    original = layer.parametrizations.weight.original
    X = 3.0 * torch.randn_like(original)
    layer.weight = X
    assert torch.equal(original, X)
    assert true_sigma(layer, kind) == pytest.approx(1.0, abs=tolerance(torch.float64))


@pytest.mark.parametrize("kind", FITTED)
def test_fitting_vectors_that_are_already_fitted_changes_nothing(kind):
    layer = fitted_layer(kind).eval()
    X = torch.randn_like(layer.parametrizations.weight.original)
    layer.weight = X
    u, v = (b.clone() for b in buffers(layer))
    weight = layer.weight.detach().clone()
    layer.weight = X
    for before, after in zip((u, v), buffers(layer), strict=True):
        assert torch.allclose(before, after, atol=tolerance(torch.float64))
    assert torch.allclose(layer.weight, weight, atol=tolerance(torch.float64))


@pytest.mark.parametrize("kind", ["linear", "conv_operator"])
def test_power_method_fits_layers_beyond_the_dense_limit(kind, monkeypatch):
    monkeypatch.setattr("tether.constraints._weight_operator._DENSE_LIMIT", 0)
    layer = fitted_layer(kind).eval()
    layer.weight = torch.randn_like(layer.parametrizations.weight.original)
    assert true_sigma(layer, kind) == pytest.approx(1.0, abs=1e-8)


@pytest.mark.parametrize("dense_limit", [0, 1 << 22], ids=["power_method", "svd"])
def test_vectors_that_are_not_finite_are_replaced(dense_limit, monkeypatch):
    # What to_empty() leaves after building on the meta device, say.
    monkeypatch.setattr("tether.constraints._weight_operator._DENSE_LIMIT", dense_limit)
    layer = fitted_layer("linear").eval()
    for vector in buffers(layer):
        vector.fill_(float("nan"))
    layer.weight = torch.randn(3, 5, dtype=torch.float64)
    assert true_sigma(layer, "linear") == pytest.approx(1.0, abs=1e-8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_assignment_fits_the_vectors(dtype):
    layer = tether.spectral_norm(nn.Linear(6, 4, dtype=dtype)).eval()
    layer.weight = 3.0 * torch.randn(4, 6, dtype=dtype)
    assert buffers(layer)[0].dtype == dtype and layer.weight.dtype == dtype
    value = sigma(layer.weight.detach().double()).item()
    assert value == pytest.approx(1.0, abs=8 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("kind", FITTED)
def test_checkpoint_with_vectors_loads_them_as_they_are(kind):
    # Saved after an optimizer step: the vectors lag the original, and the loaded model must
    # still compute exactly what the saved one does.
    source = fitted_layer(kind)
    with torch.no_grad():
        source.parametrizations.weight.original.add_(torch.randn_like(source.weight))
    target = fitted_layer(kind, seed=1)
    target.load_state_dict(source.state_dict(), strict=True)
    for module in [source, target]:
        module.eval()
    assert torch.equal(target.weight, source.weight)


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("kind", FITTED)
def test_checkpoint_without_vectors_gets_vectors_fitted_to_its_original(kind, strict):
    source = fitted_layer(kind)
    checkpoint = {k: v for k, v in source.state_dict().items() if not k.endswith(("_u", "_v"))}
    target = fitted_layer(kind, seed=1).eval()
    result = target.load_state_dict(checkpoint, strict=strict)
    assert result.missing_keys == result.unexpected_keys == []
    assert torch.equal(
        target.parametrizations.weight.original, checkpoint["parametrizations.weight.original"]
    )
    assert true_sigma(target, kind) == pytest.approx(1.0, abs=tolerance(torch.float64))


# The vectors are updated in place, never rebound: DataParallel replicas share their storage
# and compiled graphs hold them.


def assign(layer, kind):
    layer.weight = 3.0 * torch.randn_like(layer.parametrizations.weight.original)


def train_forward(layer, kind):
    for _ in range(3):
        layer.weight  # noqa: B018  (each evaluation in training mode is a power step)


def load_checkpoint(layer, kind):
    layer.load_state_dict(fitted_layer(kind, seed=1).state_dict(), strict=True)


def load_checkpoint_without_vectors(layer, kind):
    checkpoint = fitted_layer(kind, seed=1).state_dict()
    layer.load_state_dict({k: v for k, v in checkpoint.items() if not k.endswith(("_u", "_v"))})


def load_hook_based_checkpoint(layer, kind):
    old = torch.nn.utils.spectral_norm(FITTED[kind][0]().double())
    old(torch.randn(INPUTS[kind], dtype=torch.float64))  # a power step
    layer.load_state_dict(old.state_dict(), strict=True)


def update_base(layer, kind):
    tether.update_base(layer)


def reset_parameters(layer, kind):
    layer.reset_parameters()


IN_PLACE = [
    train_forward,
    assign,
    load_checkpoint,
    load_checkpoint_without_vectors,
    update_base,
    reset_parameters,
]


@pytest.mark.parametrize("kind", ["linear", "conv2d", "conv_transpose2d", "conv_operator"])
@pytest.mark.parametrize("operation", IN_PLACE, ids=lambda f: f.__name__)
def test_the_vectors_stay_the_same_tensors(operation, kind):
    layer = fitted_layer(kind).train()
    before = [(vector, vector.data_ptr(), vector.clone()) for vector in buffers(layer)]
    operation(layer, kind)
    for (vector, address, _), now in zip(before, buffers(layer), strict=True):
        assert now is vector and now.data_ptr() == address
    assert not torch.equal(before[1][2], buffers(layer)[1])  # the operation wrote to them


@pytest.mark.parametrize("kind", ["linear", "conv2d", "conv_transpose2d"])
def test_loading_a_hook_based_checkpoint_writes_into_the_vectors(kind):
    layer = fitted_layer(kind).train()
    u, v = buffers(layer)
    address, value = u.data_ptr(), u.clone()
    load_hook_based_checkpoint(layer, kind)
    assert buffers(layer)[0] is u and buffers(layer)[1] is v and u.data_ptr() == address
    assert not torch.equal(u, value)


# Exact normalization and bounds


@given(example=weights())
def test_exact_normalization_has_largest_singular_value_one(example):
    W, dim = example
    module = tether.spectral_norm(module_with(W), dim=dim, exact=True)
    assert module.weight.shape == W.shape and module.weight.dtype == W.dtype
    assert abs(sigma(module.weight, dim).item() - 1) <= tolerance(W.dtype) * max(W.shape)


@given(example=weights(), bound=st.floats(0.1, 5.0), exact=st.booleans())
def test_bound_caps_the_largest_singular_value(example, bound, exact):
    W, dim = example
    module = tether.spectral_norm(
        module_with(W), dim=dim, bound=bound, exact=exact, n_power_iterations=50
    )
    result = module.weight.detach()
    error = tolerance(W.dtype) * max(W.shape) if exact else 1e-2
    assert sigma(result, dim) <= bound * (1 + error)
    if sigma(W, dim) <= bound * (1 - error):
        assert torch.equal(result, W)  # inside the bound: untouched


@given(example=weights())
def test_power_iteration_converges_to_one(example):
    W, dim = example
    module = tether.spectral_norm(module_with(W), dim=dim, n_power_iterations=100)
    assert abs(sigma(module.weight.detach(), dim).item() - 1) <= 1e-2


@pytest.mark.parametrize("options", [{"exact": True}, {"exact": True, "bound": 2.0}])
def test_check_parametrization(options):
    W = torch.randn(4, 6, dtype=torch.float64)
    norm = SpectralNorm(W, **options)
    check_parametrization(norm, norm.sample(W.shape, dtype=torch.float64))


@pytest.mark.parametrize("options", [{}, {"exact": True}, {"bound": 0.5}, {"dim": 1}])
def test_sample_is_a_member(options):
    norm = SpectralNorm(torch.randn(3, 2, 2), **options)
    generator = torch.Generator().manual_seed(1)
    sample = norm.sample((3, 2, 2), dtype=torch.float64, generator=generator)
    assert sample.dtype == torch.float64 and norm.in_manifold(sample)
    assert not norm.in_manifold(3 * sample)


def test_distance():
    norm = SpectralNorm(torch.randn(3, 3), bound=2.0)
    assert norm.distance(torch.diag(torch.tensor([3.0, 1.0, 0.0]))).item() == pytest.approx(1.0)
    assert norm.distance(torch.eye(3)).item() == 0.0
    assert not norm.in_manifold(torch.eye(4))


@pytest.mark.parametrize(
    "options",
    [{"exact": True}, {"exact": True, "bound": 0.5}, {"n_power_iterations": 2}, {"dim": 2}],
    ids=str,
)
def test_gradcheck(options):
    W = torch.randn(3, 2, 4, dtype=torch.float64)
    norm = SpectralNorm(W, **options).eval()  # eval: the vectors are constants
    assert torch.autograd.gradcheck(norm, (W.clone().requires_grad_(),))


# The convolution operator


@pytest.mark.parametrize("conv", CONVS)
def test_exact_conv_operator_normalization_gives_a_1_lipschitz_layer(conv):
    make, input_shape = CONVS[conv]
    layer = tether.spectral_norm(
        make().double(), conv_operator=True, input_shape=input_shape, exact=True
    )
    assert conv_operator_norm(layer, input_shape).item() == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize("conv", ["conv2d_padded", "conv2d_strided", "conv_transpose2d"])
def test_conv_operator_power_iteration_converges(conv):
    make, input_shape = CONVS[conv]
    layer = tether.spectral_norm(
        make().double(), conv_operator=True, input_shape=input_shape, n_power_iterations=100
    )
    assert conv_operator_norm(layer, input_shape).item() == pytest.approx(1.0, abs=1e-3)
    layer.eval()
    weight = layer.weight
    assert torch.equal(layer.weight, weight)


def test_conv_operator_with_a_bound():
    make, input_shape = CONVS["conv2d_padded"]
    layer = tether.spectral_norm(
        make().double(), conv_operator=True, input_shape=input_shape, exact=True, bound=0.25
    )
    assert conv_operator_norm(layer, input_shape).item() <= 0.25 + 1e-10


@pytest.mark.parametrize("exact", [True, False])
def test_conv_operator_gradcheck(exact):
    make, input_shape = CONVS["conv2d_strided"]
    layer = make().double()
    norm = SpectralNorm(layer.weight, conv=layer, input_shape=input_shape, exact=exact).eval()
    assert torch.autograd.gradcheck(norm, (layer.weight.detach().clone().requires_grad_(),))


def test_conv_operator_state_dict_and_pickling():
    make, input_shape = CONVS["conv2d_padded"]
    layer = tether.spectral_norm(make(), conv_operator=True, input_shape=input_shape)
    u, v = buffers(layer)
    assert u.shape == (3, 5, 6) and v.shape == input_shape
    restored = pickle.loads(pickle.dumps(layer))
    twin = copy.deepcopy(layer)
    for module in [layer, restored, twin]:
        module.eval()
    assert torch.equal(restored.weight, layer.weight) and torch.equal(twin.weight, layer.weight)
    fresh = tether.spectral_norm(make(), conv_operator=True, input_shape=input_shape).eval()
    fresh.load_state_dict(layer.state_dict(), strict=True)
    assert torch.equal(fresh.weight, layer.weight)


# Training


@pytest.mark.parametrize("options", [{}, {"bound": 2.0, "exact": True}], ids=str)
def test_training_keeps_the_largest_singular_value(options):
    torch.manual_seed(0)
    layer = tether.spectral_norm(nn.Linear(6, 4), **options)
    target = nn.Linear(6, 4)
    with torch.no_grad():
        target.weight.mul_(5.0)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    X = torch.randn(64, 6)
    Y = target(X).detach()
    for _ in range(200):
        optimizer.zero_grad()
        (layer(X) - Y).pow(2).mean().backward()
        optimizer.step()
    layer.eval()
    value = sigma(layer.weight.detach()).item()
    if "bound" in options:
        assert value <= 2.0 * (1 + 1e-5)
    else:
        assert value == pytest.approx(1.0, abs=1e-2)


# Errors


@pytest.mark.parametrize(
    ("options", "error", "words"),
    [
        ({"n_power_iterations": 0}, ValueError, "n_power_iterations.*positive"),
        ({"n_power_iterations": -1}, ValueError, "n_power_iterations.*positive"),
        ({"n_power_iterations": 1.5}, TypeError, "n_power_iterations.*int"),
        ({"eps": 0.0}, ValueError, "`eps` must be a positive float"),
        ({"eps": -1e-12}, ValueError, "`eps` must be a positive float"),
        ({"bound": 0.0}, ValueError, "`bound` must be None or a positive float"),
        ({"bound": -2}, ValueError, "`bound` must be None or a positive float"),
        ({"bound": float("inf")}, ValueError, "`bound` must be None or a positive float"),
        ({"exact": "yes"}, TypeError, "`exact` must be a bool"),
        ({"dim": 2}, IndexError, "out of range"),
        ({"conv_operator": True}, ValueError, "conv_operator=True needs a convolution layer"),
        ({"input_shape": (5,)}, ValueError, "`input_shape` is only used with"),
        ({"conv_operator": 1}, TypeError, "`conv_operator` must be a bool"),
    ],
    ids=str,
)
def test_bad_arguments_raise(options, error, words):
    with pytest.raises(error, match=r"spectral_norm\(\) on Linear.weight: .*" + words):
        tether.spectral_norm(nn.Linear(5, 3), **options)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({}, r"needs `input_shape`.*\(C, H, W\).*input_shape=\(3, 32, 32\)"),
        ({"input_shape": (4, 8, 8)}, "in_channels=3; got"),
        ({"input_shape": (3, 8)}, r"must be \(C, H, W\)"),
        ({"input_shape": (3, 8, 0)}, r"must be \(C, H, W\)"),
        ({"input_shape": (3, 1, 1)}, "smaller than the kernel"),
        ({"input_shape": (3, 8, 8), "dim": 0}, "`dim` has no meaning"),
    ],
    ids=str,
)
def test_bad_conv_operator_arguments_raise(options, words):
    with pytest.raises(ValueError, match=r"spectral_norm\(\) on Conv2d.weight: .*" + words):
        tether.spectral_norm(nn.Conv2d(3, 2, 3), conv_operator=True, **options)


def test_conv_operator_needs_zero_padding():
    layer = nn.Conv2d(3, 2, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match=r"padding_mode='zeros'.*'reflect'"):
        tether.spectral_norm(layer, conv_operator=True, input_shape=(3, 8, 8))


@pytest.mark.parametrize("name", ["kernel", "bias"])
def test_missing_tensor_raises_the_registration_error(name):
    layer = nn.Linear(5, 3, bias=False)
    with pytest.raises(ValueError) as expected:
        tether.register_parametrization(layer, name, nn.Identity())
    with pytest.raises(ValueError) as error:
        tether.spectral_norm(layer, name=name)
    assert str(error.value) == str(expected.value)
    assert f"Linear.{name}" in str(error.value)


def test_zero_dimensional_tensor_raises_value_error():
    with pytest.raises(ValueError, match=r"needs at least one dimension; got shape \(\)"):
        tether.spectral_norm(module_with(torch.tensor(2.0)))


def test_class_checks_its_arguments_and_shapes():
    with pytest.raises(ValueError, match="SpectralNorm on the weight: expected `n_power_it"):
        SpectralNorm(torch.randn(3, 3), n_power_iterations=0)
    with pytest.raises(ValueError, match=r"SpectralNorm on the weight: .*conv.*got Linear"):
        SpectralNorm(torch.randn(3, 3), conv=nn.Linear(3, 3), input_shape=(3,))
    with pytest.raises(ValueError, match=r"SpectralNorm on shape needs the shape \(3, 3\)"):
        SpectralNorm(torch.randn(3, 3)).sample((4, 3))
    with pytest.raises(ValueError, match=r"kernel shape \(2, 3, 3, 3\)"):
        SpectralNorm(torch.randn(3, 3), conv=nn.Conv2d(3, 2, 3), input_shape=(3, 8, 8))


def test_the_load_hook_is_registered_once():
    layer = tether.spectral_norm(nn.Linear(5, 3))
    tether.remove_parametrizations(layer, "weight")
    tether.spectral_norm(layer)
    assert len(_torch_compat.load_state_dict_pre_hooks(layer)) == 1


def test_old_keys_are_not_renamed_once_the_norm_is_removed():
    old = trained_old_spectral_norm("linear")
    layer = tether.remove_parametrizations(tether.spectral_norm(LAYERS["linear"]()), "weight")
    with pytest.raises(RuntimeError, match="weight_orig"):
        layer.load_state_dict(old.state_dict())


def test_spectral_norm_checks_its_arguments_and_builds_the_operator_once(monkeypatch):
    calls = {"_checked": 0, "conv_operator": 0}

    def counted(name):
        function = getattr(_spectral_norm, name)

        def wrapper(*args):
            calls[name] += 1
            return function(*args)

        return wrapper

    for name in calls:
        monkeypatch.setattr(_spectral_norm, name, counted(name))
    tether.spectral_norm(nn.Conv2d(3, 2, 3), conv_operator=True, input_shape=(3, 8, 8))
    assert calls == {"_checked": 1, "conv_operator": 1}

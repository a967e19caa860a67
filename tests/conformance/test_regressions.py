"""The failures of issue 12, cases 1 to 8, each reproduced as it was reported."""

from __future__ import annotations

import copy
import functools
import io
import pickle
from collections.abc import Callable

import pytest
import torch
import torch.nn.utils.parametrize as torch_parametrize
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_linear_bn_eval
from torch.utils.checkpoint import checkpoint

import tether
from tests.conformance.support import assert_close, assert_same_grads, rounding
from tests.parametrizations import Counting, Negated

pytestmark = pytest.mark.usefixtures("one_thread")

Register = Callable[[nn.Module], nn.Module]


def saved(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def pickled(model: nn.Module) -> nn.Module:
    return pickle.loads(pickle.dumps(model))


def orthogonality_error(W: Tensor) -> float:
    W = W.detach()
    tall = W.mT if W.shape[-2] < W.shape[-1] else W
    eye = torch.eye(tall.shape[-1], dtype=W.dtype)
    return float((tall.mT @ tall - eye).abs().max())


# --- 1. saving a model with an orthogonal weight ---------------------------------------------

ORTHOGONAL_MODELS: dict[str, Callable[[], nn.Module]] = {
    "square": lambda: tether.orthogonal(nn.Linear(4, 4)),
    "square-untrivialized": lambda: tether.orthogonal(nn.Linear(4, 4), use_trivialization=False),
    "cayley-square": lambda: tether.orthogonal(nn.Linear(4, 4), orthogonal_map="cayley"),
    "cayley-tall": lambda: tether.orthogonal(nn.Linear(3, 5), orthogonal_map="cayley"),
    "cayley-wide": lambda: tether.orthogonal(nn.Linear(5, 3), orthogonal_map="cayley"),
    "special_orthogonal": lambda: tether.special_orthogonal(nn.Linear(4, 4)),
    "grassmannian": lambda: tether.grassmannian(nn.Linear(2, 5)),
    "rnn-kernel": lambda: tether.orthogonal(nn.RNN(3, 4), "weight_hh_l0"),  # the demo's
}


@pytest.mark.parametrize("save", [pickled, saved], ids=["pickle", "torch.save"])
@pytest.mark.parametrize("make", ORTHOGONAL_MODELS.values(), ids=ORTHOGONAL_MODELS.keys())
def test_regression_1_square_orthogonal_model_pickles(make, save):
    model = nn.Sequential(make())
    copied = save(model)
    for (name, got), (_, expected) in zip(
        copied.state_dict().items(), model.state_dict().items(), strict=True
    ):
        assert torch.equal(got, expected), name
    x = torch.randn(2, 3) if isinstance(model[0], nn.RNN) else torch.randn(2, model[0].in_features)
    out, expected = copied(x), model(x)
    out, expected = (out[0], expected[0]) if isinstance(out, tuple) else (out, expected)
    assert torch.equal(out, expected)


# --- 2. a plain checkpoint into a spectral-norm model in eval mode ---------------------------


def spectral_resnet() -> nn.Sequential:
    """A small convolutional network with every weight spectrally normalized."""
    return nn.Sequential(
        tether.spectral_norm(nn.Conv2d(3, 4, 3, padding=1)),
        nn.ReLU(),
        tether.spectral_norm(nn.Conv2d(4, 4, 3, padding=1)),
        nn.Flatten(),
        tether.spectral_norm(nn.Linear(64, 2)),
    )


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_regression_2_plain_checkpoint_into_eval_spectral_norm_model(mode):
    torch.manual_seed(0)
    source = spectral_resnet()
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.mul_(10.0)
        for _ in range(30):  # training-mode reads: the power iteration converges
            source(torch.randn(2, 3, 4, 4))
    source.eval()
    torch.manual_seed(1)
    target = spectral_resnet().train(mode == "train")
    result = target.load_state_dict(tether.plain_state_dict(source))
    assert result.missing_keys == result.unexpected_keys == []
    tolerance = torch.finfo(torch.float32).eps ** 0.25  # the power method's estimate
    for index in (0, 2, 4):
        W = target[index].weight.detach().flatten(1)
        assert abs(float(torch.linalg.matrix_norm(W, 2)) - 1.0) <= tolerance, index
    x = torch.randn(2, 3, 4, 4)
    expected = source(x)
    assert_close(target(x), expected, tolerance)


# --- 3. appending a helper to a chain ---------------------------------------------------------

FIRST_LINKS: dict[str, Register] = {
    "user": lambda layer: tether.register_parametrization(layer, "weight", Negated()),
    "orthogonal": tether.orthogonal,
    "spectral_norm": tether.spectral_norm,
}
APPENDED: dict[str, Register] = {
    "orthogonal": tether.orthogonal,
    "special_orthogonal": tether.special_orthogonal,
    "cayley": functools.partial(tether.orthogonal, orthogonal_map="cayley"),
}


@pytest.mark.parametrize("helper", APPENDED.values(), ids=APPENDED.keys())
@pytest.mark.parametrize("first", FIRST_LINKS.values(), ids=FIRST_LINKS.keys())
def test_regression_3_helpers_append_to_a_chain(first, helper):
    layer = helper(first(nn.Linear(4, 4)))
    assert len(layer.parametrizations.weight) >= 2
    W = layer.weight
    assert orthogonality_error(W) <= 64 * torch.finfo(W.dtype).eps
    if helper is tether.special_orthogonal:
        assert float(torch.linalg.det(W.detach())) > 0
    W.sum().backward()
    assert layer.parametrizations.weight.original.grad is not None


# --- 4. PyTorch's cached() ----------------------------------------------------------------------


def test_regression_4_torch_cached_is_honoured():
    layer = tether.orthogonal(nn.Linear(4, 4))
    counter = Counting()
    tether.register_parametrization(layer, "weight", counter)
    counter.calls = 0
    with torch_parametrize.cached():
        assert layer.weight is layer.weight
        layer(torch.randn(2, 4))
    assert counter.calls == 1


# --- 5. low-precision models --------------------------------------------------------------------

LOW_PRECISION_HELPERS: dict[str, Register] = {
    "orthogonal": tether.orthogonal,
    "low_rank": functools.partial(tether.low_rank, rank=2),
    "positive_definite": tether.positive_definite,
    "invertible": tether.invertible,
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("helper", LOW_PRECISION_HELPERS.values(), ids=LOW_PRECISION_HELPERS.keys())
def test_regression_5_low_precision_models(helper, dtype):
    layer = helper(nn.Linear(4, 4).to(dtype))
    assert layer.weight.dtype == dtype
    layer(torch.randn(2, 4, dtype=dtype)).float().square().sum().backward()
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.dtype == dtype, name


# --- 6. an integer buffer -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "helper", [tether.orthogonal, tether.positive], ids=["orthogonal", "positive"]
)
def test_regression_6_integer_buffer_gets_a_clear_type_error(helper):
    layer = nn.Linear(4, 4)
    layer.register_buffer("idx", torch.arange(16).reshape(4, 4))
    message = r"(?s)(?=.*Linear\.idx)(?=.*floating.point)(?=.*torch\.int64)"
    with pytest.raises(TypeError, match=message) as raised:
        helper(layer, "idx")
    assert "finfo" not in str(raised.value)  # torch's own error, which said nothing useful


# --- 7. autocache and the context of a read ----------------------------------------------------


class Logged(nn.Module):
    """Reads the weight under no_grad to log its norm, then uses it."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = tether.orthogonal(nn.Linear(4, 4))

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            self.norm = self.layer.weight.norm()
        return self.layer(x)


class Checkpointed(nn.Module):
    """The layer inside a reentrant checkpoint segment and again outside it."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = tether.orthogonal(nn.Linear(4, 4))

    def forward(self, x: Tensor) -> Tensor:
        x = x.detach().requires_grad_()
        return checkpoint(self.layer, x, use_reentrant=True) + self.layer(2 * x)


class Autocast(nn.Module):
    """Reads the weight under bfloat16 autocast and again with autocast disabled."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = tether.orthogonal(nn.Linear(4, 4))

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = self.layer(x)
            with torch.autocast("cpu", enabled=False):
                full = self.layer(x)
        return low.float() + full


@pytest.mark.parametrize("make", [Logged, Checkpointed, Autocast], ids=lambda m: m.__name__)
def test_regression_7_autocache_gradients(make):
    torch.manual_seed(0)
    expected_model = make()
    model = tether.autocache(copy.deepcopy(expected_model))
    x = torch.randn(3, 4)
    expected, got = expected_model(x), model(x)
    assert_close(got, expected, rounding(torch.float32))
    expected.square().sum().backward()
    got.square().sum().backward()
    assert_same_grads(model, expected_model)


# --- 8. assigning a Parameter -------------------------------------------------------------------


def test_regression_8_fusing_an_orthogonal_linear_raises_a_key_error():
    linear = tether.orthogonal(nn.Linear(4, 4)).eval()
    bn = nn.BatchNorm1d(4).eval()
    with pytest.raises(KeyError, match=r"(?s)Linear\.weight.*remove_parametrizations"):
        fuse_linear_bn_eval(linear, bn)


def test_regression_8_tying_a_weight_normed_head_raises_a_key_error():
    embedding = nn.Embedding(5, 4)
    head = tether.weight_norm(nn.Linear(4, 5))
    with pytest.raises(KeyError, match=r"(?s)Linear\.weight.*before registering"):
        head.weight = embedding.weight
    assert len(list(head.parameters())) == 3  # g, v and the bias: nothing was tied


def test_regression_8_assigning_a_tensor_still_goes_through_right_inverse():
    head = tether.weight_norm(nn.Linear(4, 5))
    W = torch.randn(5, 4)
    head.weight = W
    assert_close(head.weight, W, rounding(torch.float32))

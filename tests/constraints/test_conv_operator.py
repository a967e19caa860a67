"""The convolution operator of tether.constraints._conv_operator, against the dense operator
(the Jacobian of the layer) and torch.linalg."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from tether.constraints._conv_operator import ConvOperator, conv_operator

# Convolutions in float64 without a bias, so that the layer is its operator, and the shape
# (C, *spatial) of one input.
CONVS = {
    "conv1d": (lambda: nn.Conv1d(2, 3, 3), (2, 7)),
    "conv1d_strided_padded": (lambda: nn.Conv1d(2, 3, 4, stride=3, padding=2), (2, 9)),
    "conv2d_padded": (lambda: nn.Conv2d(2, 3, 3, padding=1), (2, 5, 6)),
    "conv2d_valid": (lambda: nn.Conv2d(2, 3, 3, padding="valid"), (2, 5, 4)),
    "conv2d_same_even_kernel": (
        lambda: nn.Conv2d(2, 3, (2, 3), padding="same", dilation=(2, 1)),
        (2, 5, 5),
    ),
    "conv2d_strided_groups": (lambda: nn.Conv2d(4, 2, 3, stride=2, padding=1, groups=2), (4, 6, 5)),
    "conv2d_dilated": (lambda: nn.Conv2d(1, 2, 2, dilation=(2, 3), padding=(1, 0)), (1, 5, 7)),
    "conv2d_depthwise": (lambda: nn.Conv2d(3, 6, 3, groups=3, stride=(1, 2)), (3, 5, 6)),
    "conv3d": (lambda: nn.Conv3d(1, 2, 2, padding=(1, 0, 1)), (1, 3, 3, 4)),
    "conv_transpose1d": (lambda: nn.ConvTranspose1d(2, 3, 3, stride=2, output_padding=1), (2, 4)),
    "conv_transpose2d_dilated": (
        lambda: nn.ConvTranspose2d(2, 4, 3, stride=1, padding=1, dilation=2, output_padding=1),
        (2, 4, 3),
    ),
    "conv_transpose2d_groups": (
        lambda: nn.ConvTranspose2d(4, 2, 2, stride=2, padding=1, groups=2),
        (4, 3, 4),
    ),
    "conv_transpose3d": (lambda: nn.ConvTranspose3d(1, 2, 2, stride=(1, 2, 1)), (1, 2, 2, 3)),
}

pytestmark = pytest.mark.usefixtures("one_thread")


def tolerance(n: int) -> float:
    return 100 * n * torch.finfo(torch.float64).eps


def layer_and_operator(conv: str) -> tuple[nn.Module, ConvOperator]:
    make, input_shape = CONVS[conv]
    torch.manual_seed(0)
    layer = make().double()
    layer.bias = None
    return layer, conv_operator("test()", "Conv.weight", layer.weight, layer, input_shape)


def dense_operator(layer: nn.Module, input_shape: tuple[int, ...]) -> torch.Tensor:
    """The layer (linear without its bias) as an ``(output size, input size)`` matrix: its
    column ``j`` is the layer's output for the ``j``-th basis input."""
    n = math.prod(input_shape)
    basis = torch.eye(n, dtype=torch.float64).view(n, *input_shape)
    with torch.no_grad():
        return layer(basis).reshape(n, -1).mT


@pytest.mark.parametrize("conv", CONVS)
def test_output_shape_is_the_layers(conv):
    layer, operator = layer_and_operator(conv)
    x = torch.randn(1, *operator.input_shape, dtype=torch.float64)
    assert operator.output_shape == tuple(layer(x).shape[1:])


@pytest.mark.parametrize("conv", CONVS)
def test_apply_is_the_layer_without_its_bias(conv):
    layer, operator = layer_and_operator(conv)
    x = torch.randn(2, *operator.input_shape, dtype=torch.float64)
    assert torch.allclose(operator.apply(x, layer.weight), layer(x), atol=tolerance(x[0].numel()))


@pytest.mark.parametrize("conv", CONVS)
def test_adjoint_is_the_transpose(conv):
    layer, operator = layer_and_operator(conv)
    x = torch.randn(2, *operator.input_shape, dtype=torch.float64)
    y = torch.randn(2, *operator.output_shape, dtype=torch.float64)
    inner = (operator.apply(x, layer.weight) * y).sum()
    adjoint_inner = (x * operator.adjoint(y, layer.weight)).sum()
    assert torch.allclose(inner, adjoint_inner, atol=tolerance(x.numel()))
    one = operator.adjoint_vector(layer.weight, y[0])
    assert torch.equal(one, operator.adjoint(y[:1], layer.weight)[0])


@pytest.mark.parametrize("conv", CONVS)
def test_matrix_is_the_dense_operator(conv):
    layer, operator = layer_and_operator(conv)
    A = dense_operator(layer, operator.input_shape)
    assert torch.allclose(operator.matrix(layer.weight), A, atol=tolerance(A.shape[1]))
    assert operator.dense_size == A.numel()


@pytest.mark.parametrize("conv", CONVS)
def test_norm_is_the_largest_singular_value_of_the_dense_operator(conv):
    layer, operator = layer_and_operator(conv)
    expected = torch.linalg.svdvals(dense_operator(layer, operator.input_shape))[0]
    assert torch.allclose(operator.norm(layer.weight), expected, rtol=tolerance(expected.numel()))


@pytest.mark.parametrize("conv", CONVS)
def test_power_iteration_estimates_grow_towards_the_norm(conv):
    layer, operator = layer_and_operator(conv)
    u = torch.randn(operator.output_shape, dtype=torch.float64)
    v = torch.randn(operator.input_shape, dtype=torch.float64)
    norm = operator.norm(layer.weight).item()
    estimates = []
    for steps in [1, 10, 100]:
        u, v = operator.power_iteration(layer.weight, u, v, steps, 1e-12)
        estimates.append(operator.estimate(layer.weight, u, v).item())
    assert u.shape == operator.output_shape and v.shape == operator.input_shape
    slack = norm * tolerance(1)
    assert all(a <= b + slack for a, b in itertools.pairwise(estimates))
    assert estimates[-1] <= norm + slack


@pytest.mark.parametrize("conv", CONVS)
def test_the_top_singular_vectors_are_a_fixed_point_of_power_iteration(conv):
    layer, operator = layer_and_operator(conv)
    U, S, Vh = torch.linalg.svd(dense_operator(layer, operator.input_shape))
    u, v = U[:, 0].reshape(operator.output_shape), Vh[0].reshape(operator.input_shape)
    next_u, next_v = operator.power_iteration(layer.weight, u, v, 1, 1e-12)
    atol = tolerance(U.shape[0] + Vh.shape[0])
    assert torch.allclose(next_u, u, atol=atol) and torch.allclose(next_v, v, atol=atol)
    assert operator.estimate(layer.weight, u, v).item() == pytest.approx(S[0].item(), rel=atol)


@pytest.mark.parametrize("conv", ["conv2d_padded", "conv_transpose1d"])
def test_power_iteration_computes_in_the_dtype_of_the_weight(conv):
    # A low-precision layer's weight arrives in float32 while its vectors stay in float16.
    layer, operator = layer_and_operator(conv)
    u = torch.randn(operator.output_shape, dtype=torch.float16)
    v = torch.randn(operator.input_shape, dtype=torch.float16)
    u, v = operator.power_iteration(layer.weight, u, v, 1, 1e-12)
    assert u.dtype == v.dtype == torch.float64
    assert operator.estimate(layer.weight, u.half(), v.half()).dtype == torch.float64


# Errors of the builder: "function on label: ..."


@pytest.mark.parametrize(
    ("make", "input_shape", "words"),
    [
        (lambda: nn.Linear(3, 3), (3,), "needs a layer nn.Conv1d/2d/3d.*got Linear"),
        (lambda: nn.Conv2d(3, 2, 3, padding_mode="circular"), (3, 8, 8), "padding_mode"),
        (lambda: nn.Conv2d(3, 2, 3), None, r"needs `input_shape`.*\(C, H, W\)"),
        (lambda: nn.Conv2d(3, 2, 3), (3, 8), r"`input_shape` must be \(C, H, W\)"),
        (lambda: nn.Conv2d(3, 2, 3), (4, 8, 8), "in_channels=3"),
        (lambda: nn.Conv2d(3, 2, 3), (3, 2, 8), "smaller than the kernel's reach"),
        (lambda: nn.ConvTranspose1d(2, 2, 1, padding=2), (2, 3), "empty output"),
    ],
    ids=["not_a_conv", "padding_mode", "no_input_shape", "rank", "channels", "small", "empty"],
)
def test_bad_layers_and_input_shapes_raise_value_errors_naming_the_tensor(make, input_shape, words):
    layer = make()
    with pytest.raises(ValueError, match=r"^f\(\) on Conv\.weight: .*" + words):
        conv_operator("f()", "Conv.weight", layer.weight, layer, input_shape)


def test_a_kernel_of_another_shape_raises_value_error():
    layer = nn.Conv2d(3, 2, 3)
    with pytest.raises(ValueError, match=r"kernel shape \(2, 3, 3, 3\); got shape \(3, 3\)"):
        conv_operator("f()", "Conv.weight", torch.randn(3, 3), layer, (3, 8, 8))

"""The linear operator of a convolution layer, whose norm is the layer's Lipschitz constant.

:class:`tether.constraints.SpectralNorm` with ``conv`` normalizes this operator instead of the
reshaped kernel (:class:`~tether.constraints._weight_operator.MatrixOperator`):
:meth:`ConvOperator.apply` is the layer without its bias, and :meth:`ConvOperator.adjoint` its
transpose, for the power method; the exact norm comes from the dense matrix
(:meth:`ConvOperator.matrix`), for small inputs.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tether._checks import bad_shape, bad_value
from tether.constraints._weight_operator import WeightOperator

__all__ = [
    "CONV_LAYERS",
    "CONV_TRANSPOSE_LAYERS",
    "ConvLayer",
    "ConvOperator",
    "conv_operator",
]

ConvLayer = (
    nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d
)
CONV_TRANSPOSE_LAYERS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
CONV_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, *CONV_TRANSPOSE_LAYERS)
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _normalize(x: Tensor, eps: float) -> Tensor:
    return x / x.norm().clamp_min(eps)


class ConvOperator(WeightOperator):
    """The linear map ``x -> conv(x, weight)`` of a convolution layer (bias left out).

    It acts on inputs of one shape ``(C, *spatial)``; :meth:`apply` and :meth:`adjoint` take
    a leading batch dimension. Subclasses fix the layer's kind; only hyperparameters are kept
    (never the layer, which owns this object through its parametrization).
    """

    @abc.abstractmethod
    def apply(self, x: Tensor, weight: Tensor) -> Tensor:
        """The convolution of a batch ``x`` of shape ``(B, *input_shape)``."""

    @abc.abstractmethod
    def adjoint(self, y: Tensor, weight: Tensor) -> Tensor:
        """The transpose of :meth:`apply`, on a batch ``y`` of shape ``(B, *output_shape)``."""

    def power_iteration(
        self, weight: Tensor, u: Tensor, v: Tensor, n_power_iterations: int, eps: float
    ) -> tuple[Tensor, Tensor]:
        """The steps of :func:`tether.functional.power_iteration`, through the layer.

        The vectors are taken in the weight's dtype: a low-precision layer's weight arrives
        here in float32 (Note [Low-precision tensors]) while its buffers stay in its dtype.
        """
        u, v = u.to(weight.dtype), v.to(weight.dtype)
        for _ in range(n_power_iterations):
            u = _normalize(self.apply(v[None], weight)[0], eps)
            v = _normalize(self.adjoint(u[None], weight)[0], eps)
        return u, v

    def estimate(self, weight: Tensor, u: Tensor, v: Tensor) -> Tensor:
        u, v = u.to(weight.dtype), v.to(weight.dtype)
        return torch.vdot(u.flatten(), self.apply(v[None], weight).flatten())

    def adjoint_vector(self, weight: Tensor, u: Tensor) -> Tensor:
        return self.adjoint(u[None], weight)[0]

    def matrix(self, weight: Tensor) -> Tensor:
        """The operator as a dense ``(output size, input size)`` matrix (small inputs only)."""
        n = math.prod(self.input_shape)
        basis = torch.eye(n, dtype=weight.dtype, device=weight.device)
        return self.apply(basis.view(n, *self.input_shape), weight).reshape(n, -1).mT


class _Conv(ConvOperator):
    """``x -> conv(pad(x), weight)``: the zero padding is explicit, so its adjoint is a crop."""

    def __init__(
        self, conv: nn.Conv1d | nn.Conv2d | nn.Conv3d, input_shape: tuple[int, ...]
    ) -> None:
        kernel, stride, dilation = conv.kernel_size, conv.stride, conv.dilation
        self.nd, self.groups = len(kernel), conv.groups
        self.stride, self.dilation = stride, dilation
        pads = [_padding(conv, i) for i in range(self.nd)]
        spatial = input_shape[1:]
        padded = [s + left + right for s, (left, right) in zip(spatial, pads, strict=True)]
        reach = [d * (k - 1) + 1 for d, k in zip(dilation, kernel, strict=True)]
        out = [(p - r) // s + 1 for p, r, s in zip(padded, reach, stride, strict=True)]
        if min(p - r for p, r in zip(padded, reach, strict=True)) < 0:
            raise ValueError(
                f"input_shape {input_shape} is smaller than the kernel's reach {tuple(reach)}."
            )
        self.pad = tuple(amount for pair in reversed(pads) for amount in pair)  # F.pad's order
        self.output_padding = tuple(
            p - ((o - 1) * s + r) for p, o, s, r in zip(padded, out, stride, reach, strict=True)
        )
        self.crop = (
            slice(None),
            slice(None),
            *(slice(left, left + s) for s, (left, _) in zip(spatial, pads, strict=True)),
        )
        self.input_shape = input_shape
        self.output_shape = (conv.out_channels, *out)

    def apply(self, x: Tensor, weight: Tensor) -> Tensor:
        x = F.pad(x, self.pad)
        return _CONV[self.nd](x, weight, None, self.stride, 0, self.dilation, self.groups)

    def adjoint(self, y: Tensor, weight: Tensor) -> Tensor:
        conv_t = _CONV_TRANSPOSE[self.nd]
        x = conv_t(y, weight, None, self.stride, 0, self.output_padding, self.groups, self.dilation)
        return x[self.crop]


class _ConvTranspose(ConvOperator):
    """``x -> conv_transpose(x, weight)``, whose adjoint is the convolution."""

    def __init__(
        self,
        conv: nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d,
        input_shape: tuple[int, ...],
    ) -> None:
        self.nd, self.stride, self.dilation = len(conv.kernel_size), conv.stride, conv.dilation
        # Transposed convolutions take no string padding; the ints make that plain to mypy.
        self.padding = tuple(int(p) for p in conv.padding)
        self.output_padding = conv.output_padding
        self.groups = conv.groups
        out = [
            (i - 1) * s - 2 * p + d * (k - 1) + o + 1
            for i, s, p, d, k, o in zip(
                input_shape[1:],
                conv.stride,
                self.padding,
                conv.dilation,
                conv.kernel_size,
                conv.output_padding,
                strict=True,
            )
        ]
        if min(out) < 1:
            raise ValueError(f"input_shape {input_shape} gives an empty output {tuple(out)}.")
        self.input_shape = input_shape
        self.output_shape = (conv.out_channels, *out)
        # With output_padding >= stride (allowed when dilation > stride), the convolution of
        # an output has one more position than the input; that row is outside the operator.
        self.crop = (slice(None), slice(None), *(slice(0, s) for s in input_shape[1:]))

    def apply(self, x: Tensor, weight: Tensor) -> Tensor:
        conv_t = _CONV_TRANSPOSE[self.nd]
        stride, padding, dilation = self.stride, self.padding, self.dilation
        return conv_t(x, weight, None, stride, padding, self.output_padding, self.groups, dilation)

    def adjoint(self, y: Tensor, weight: Tensor) -> Tensor:
        x = _CONV[self.nd](y, weight, None, self.stride, self.padding, self.dilation, self.groups)
        return x[self.crop]


def _padding(conv: nn.Conv1d | nn.Conv2d | nn.Conv3d, i: int) -> tuple[int, int]:
    """The (left, right) zero padding of spatial dimension ``i``, as the layer applies it."""
    if conv.padding == "valid":
        return 0, 0
    if conv.padding == "same":  # torch puts the odd extra on the right
        total = conv.dilation[i] * (conv.kernel_size[i] - 1)
        return total // 2, total - total // 2
    amount = int(conv.padding[i])
    return amount, amount


def conv_operator(
    function: str, label: str, weight: Tensor, conv: nn.Module, input_shape: object
) -> ConvOperator:
    """The operator of ``conv`` on inputs of ``input_shape``, or an error naming the bad one.

    ``function`` and ``label`` start the messages, e.g. ``"spectral_norm()"`` and
    ``"Conv2d.weight"``; ``weight`` must have the layer's kernel shape.
    """
    who = f"{function} on {label}"
    if not isinstance(conv, CONV_LAYERS):
        raise ValueError(
            f"{who}: the convolution operator needs a layer nn.Conv1d/2d/3d or "
            f"nn.ConvTranspose1d/2d/3d; got {type(conv).__name__}. Without conv_operator, "
            "the reshaped weight is normalized."
        )
    if conv.padding_mode != "zeros":
        raise ValueError(
            f"{who}: the convolution operator supports padding_mode='zeros'; the layer has "
            f"padding_mode={conv.padding_mode!r}."
        )
    # From the hyperparameters: reading conv.weight would evaluate its parametrizations.
    channels = (conv.in_channels, conv.out_channels)
    if isinstance(conv, CONV_TRANSPOSE_LAYERS):
        kernel_shape = (channels[0], channels[1] // conv.groups, *conv.kernel_size)
    else:
        kernel_shape = (channels[1], channels[0] // conv.groups, *conv.kernel_size)
    if tuple(weight.shape) != kernel_shape:
        raise bad_shape(function, label, weight.shape, f"the layer's kernel shape {kernel_shape}")
    nd = len(conv.kernel_size)
    example = "(C, " + {1: "L", 2: "H, W", 3: "D, H, W"}[nd] + ")"
    if input_shape is None:
        raise ValueError(
            f"{who}: the convolution operator needs `input_shape`, the shape {example} of "
            f"one input to the layer (without the batch dimension), e.g. "
            f"input_shape={(conv.in_channels, *[32] * nd)}."
        )
    shape = tuple(input_shape) if isinstance(input_shape, Sequence) else ()
    if (
        len(shape) != nd + 1
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
        or shape[0] != conv.in_channels
    ):
        needs = f"{example}: {nd + 1} positive ints starting with the layer's in_channels"
        raise bad_value(who, "input_shape", f"{needs}={conv.in_channels}", input_shape)
    try:
        if isinstance(conv, CONV_TRANSPOSE_LAYERS):
            return _ConvTranspose(conv, shape)
        return _Conv(conv, shape)
    except ValueError as error:
        raise ValueError(f"{who}: {error}") from None

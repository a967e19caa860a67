"""The linear map whose largest singular value spectral normalization divides a weight by.

:class:`tether.constraints.SpectralNorm` measures one of two maps built from its weight ``X``:
``X`` reshaped to a matrix (:class:`MatrixOperator`, here, as torch does), or the convolution
with kernel ``X`` (:class:`~tether.constraints._conv_operator.ConvOperator`). Both are a
:class:`WeightOperator`: what the power method, the exact norm and the fit of the
power-iteration vectors need, so that the constraint holds one operator chosen at
construction and never asks which kind it has.
"""

from __future__ import annotations

import abc
import math

import torch
from torch import Tensor

from tether.functional import largest_singular_value, power_iteration, singular_value_estimate
from tether.functional._precision import precision_eps

__all__ = ["MatrixOperator", "WeightOperator"]

# Fit with an SVD up to this many entries of the dense matrix (16 MiB in float32); beyond, the
# SVD costs seconds on a CPU while the power method usually stops after a few dozen steps.
_DENSE_LIMIT = 1 << 22
# The power method's fit: steps between two looks at the estimate, and at most this many.
_FIT_STEPS = 10
_FIT_ITERATIONS = 1000


class WeightOperator(abc.ABC):
    """A linear map ``A(X)`` defined by a weight ``X``, for the power method on ``A(X)``.

    ``A(X)`` maps tensors of shape :attr:`input_shape` (the right vector ``v``) to tensors of
    shape :attr:`output_shape` (the left vector ``u``). Only shapes and hyperparameters are
    kept, never the weight: each method takes ``X``.
    """

    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]

    @abc.abstractmethod
    def power_iteration(
        self, X: Tensor, u: Tensor, v: Tensor, n_power_iterations: int, eps: float
    ) -> tuple[Tensor, Tensor]:
        """Steps ``u = normalize(A v)``, ``v = normalize(Aᴴ u)``, in the dtype of ``X``."""

    @abc.abstractmethod
    def estimate(self, X: Tensor, u: Tensor, v: Tensor) -> Tensor:
        """The estimate ``uᴴ A v`` of the largest singular value, differentiable in ``X``."""

    @abc.abstractmethod
    def adjoint_vector(self, X: Tensor, u: Tensor) -> Tensor:
        """``Aᴴ u`` for one left vector ``u`` of shape :attr:`output_shape`."""

    @abc.abstractmethod
    def matrix(self, X: Tensor) -> Tensor:
        """``A(X)`` as a dense ``(output size, input size)`` matrix."""

    @property
    def dense_size(self) -> int:
        """The number of entries of :meth:`matrix`."""
        return math.prod(self.output_shape) * math.prod(self.input_shape)

    def norm(self, X: Tensor) -> Tensor:
        """The exact largest singular value of ``A(X)``, from its dense matrix."""
        return largest_singular_value(self.matrix(X))

    def top_singular_vectors(
        self, X: Tensor, u_old: Tensor, v_old: Tensor, eps: float
    ) -> tuple[Tensor, Tensor]:
        """Unit ``u``, ``v`` with ``A v = sigma u`` and ``Aᴴ u = sigma v``, ``sigma`` the largest.

        A fixed point of the power method, on which ``uᴴ A v`` is ``sigma``: from an SVD of the
        dense matrix up to ``_DENSE_LIMIT`` entries, else from the power method started at
        ``(u_old, v_old)`` and run until the estimate stops growing. The pair takes the sign
        (phase) of ``(u_old, v_old)`` where those are finite: ``u`` and ``v`` turn together,
        so the estimate does not change, and vectors that were already right stay as they
        are. ``X`` and the old vectors are in one dtype, that of the result.
        """
        if self.dense_size <= _DENSE_LIMIT:
            U, _, Vh = torch.linalg.svd(self.matrix(X), full_matrices=False)
            u, v = U[:, 0].view(self.output_shape), Vh[0].conj().view(self.input_shape)
        else:
            u, v = self._power_fit(X, u_old, v_old, eps)
        overlap = torch.vdot(v.flatten(), v_old.flatten())
        if bool(overlap.isfinite()) and bool(overlap.abs() > 0):
            phase = overlap / overlap.abs()
            u, v = u * phase, v * phase
        return u, v

    def _power_fit(self, X: Tensor, u: Tensor, v: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        """The power method from ``(u, v)`` until the estimate stops growing (or a cap)."""
        if not (bool(u.isfinite().all()) and bool(v.isfinite().all())) or not bool(v.any()):
            # No usable start (a model built on the meta device, then to_empty): a fixed one.
            generator = torch.Generator().manual_seed(0)
            v = torch.randn(v.shape, generator=generator, dtype=v.dtype).to(v.device)
        tolerance = precision_eps(v)
        sigma = self.estimate(X, u, v).abs()
        for _ in range(_FIT_ITERATIONS // _FIT_STEPS):
            u, v = self.power_iteration(X, u, v, _FIT_STEPS, eps)
            previous, sigma = sigma, self.estimate(X, u, v).abs()
            # In exact arithmetic the estimate only grows, towards the largest singular value.
            if bool(sigma - previous <= tolerance * sigma):
                break
        return u, v

    def is_power_state(self, X: Tensor, u: Tensor, v: Tensor, eps: float) -> bool:
        """Whether ``(u, v)`` is a power-method state of ``A(X)``: ``v = normalize(Aᴴ u)``.

        Checked to ``sqrt(eps)`` of the dtype: an error ``δ`` in ``v`` changes the estimate
        by ``δ²``.
        """
        back = self.adjoint_vector(X, u)
        back = back / back.norm().clamp_min(eps)
        return bool((back - v).norm() <= math.sqrt(precision_eps(X)))


class MatrixOperator(WeightOperator):
    """A weight of shape ``(*)`` as a matrix: dimension ``dim`` first, the others flattened.

    The matrix torch's spectral normalization measures; its power method and estimate are
    :func:`tether.functional.power_iteration` and
    :func:`tether.functional.singular_value_estimate` on it, so that results are torch's bit
    for bit.

    Example:
        >>> import torch
        >>> operator = MatrixOperator(torch.Size([4, 3, 2]), dim=1)
        >>> operator.output_shape, operator.input_shape
        ((3,), (8,))
    """

    def __init__(self, shape: torch.Size, dim: int) -> None:
        self.dim = dim % len(shape)
        self.output_shape = (shape[self.dim],)
        self.input_shape = (math.prod(s for d, s in enumerate(shape) if d != self.dim),)

    def matrix(self, X: Tensor) -> Tensor:
        if self.dim != 0:
            X = X.permute(self.dim, *(d for d in range(X.ndim) if d != self.dim))
        return X.flatten(1)

    def power_iteration(
        self, X: Tensor, u: Tensor, v: Tensor, n_power_iterations: int, eps: float
    ) -> tuple[Tensor, Tensor]:
        return power_iteration(self.matrix(X), u, v, n_power_iterations, eps)

    def estimate(self, X: Tensor, u: Tensor, v: Tensor) -> Tensor:
        return singular_value_estimate(self.matrix(X), u, v)

    def adjoint_vector(self, X: Tensor, u: Tensor) -> Tensor:
        return self.matrix(X).mH @ u

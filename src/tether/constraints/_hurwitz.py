"""Stable (Hurwitz) matrices: every eigenvalue in the open left half-plane, as ``(J - R) P``."""

from __future__ import annotations

import math
from typing import TypeVar

import torch
from torch import Tensor, nn

from tether._checks import check_square
from tether.constraints._base import (
    Constraint,
    Draw,
    default_atol,
    gaussian_matrix,
    register_constraint,
    worst,
)
from tether.functional import (
    dissipative,
    dissipative_inverse,
    log_cholesky,
    log_cholesky_inverse,
    solve_lyapunov,
)

__all__ = ["Hurwitz", "hurwitz"]

M = TypeVar("M", bound=nn.Module)

# δ of Hurwitz._project, relative to the matrix's RMS singular value.
_PROJECTION_MARGIN = 0.1


class Hurwitz(Constraint):
    """Stable matrices: every eigenvalue has a negative real part, as ``(J - R) P``.

    The set is ``{A : Re λ < 0 for every eigenvalue λ of A}`` for square weights of shape
    ``(*, n, n)``: the matrices for which ``dx/dt = A x`` decays to 0 from any start. The map
    is the port-Hamiltonian form ``A = (J - R) P`` with ``J`` skew-symmetric, ``R`` and ``P``
    positive definite: ``V(x) = xᵀ P x`` decreases along every trajectory, so ``A`` is stable,
    and every stable ``A`` is reached (take ``P⁻¹`` the solution of ``A X + X Aᵀ = -2I``,
    then ``R = I`` and ``J = (A X - X Aᵀ) / 2``). ``J - R`` is
    :func:`tether.functional.dissipative` of ``original0`` and ``P`` is
    :func:`tether.functional.log_cholesky` of ``original1`` (lower triangle used). Choose it
    for linear state-space layers and learned dynamics that must not blow up; the eigenvalues
    are free inside the half-plane, unlike a diagonal or normal parametrization.

    ``right_inverse`` sets any member exactly, up to the accuracy of the Lyapunov solve
    (:func:`tether.functional.solve_lyapunov`, in float64), which degrades as eigenvalues
    approach the imaginary axis. A non-member is moved into the set by :meth:`_project`,
    ``A - (a + δ) I`` with ``a`` its spectral abscissa and ``δ`` a tenth of its RMS singular
    value: the nearest stable matrix has no closed form (a hard, non-convex problem), and a
    shift keeps the eigenvectors and the gaps between eigenvalues, so that registering on a
    fresh ``nn.Linear``, rarely stable, works.
    :meth:`distance` is the excess spectral abscissa ``max(0, max Re λ)`` (the spectral-norm
    distance to the closure for normal matrices, an upper bound otherwise). Samples are
    Ginibre matrices (i.i.d. ``N(0, 1/n)`` entries) shifted to spectral abscissa ``-1``.

    Args:
        size: the shape it will constrain, optional (see :class:`Constraint`).

    Raises:
        ValueError: at registration or assignment, the tensor is not square, or a member is
            too close to the imaginary axis to be set accurately.

    References:
        Port-Hamiltonian systems: an introductory overview. Arjan van der Schaft, Dimitri
        Jeltsema, 2014. https://doi.org/10.1561/2600000002

    Example:
        >>> import torch, tether
        >>> layer = tether.hurwitz(torch.nn.Linear(4, 4))
        >>> bool(torch.linalg.eigvals(layer.weight).real.max() < 0)
        True
    """

    _owner = "hurwitz()"
    supports_complex = False

    def forward(self, Y: Tensor, Z: Tensor) -> Tensor:  # type: ignore[override]  # two originals
        return dissipative(Y) @ log_cholesky(Z)

    @torch.no_grad()
    def right_inverse(self, A: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]  # two originals
        self.check_shape(A.shape, "the assigned value")
        if A.is_meta:  # no values on the meta device: originals of the right shape only
            return torch.empty_like(A), torch.empty_like(A)
        A = self._project(A)
        A64 = A.to(torch.float64)
        n = A.shape[-1]
        eye = torch.eye(n, dtype=torch.float64, device=A.device)
        try:
            X = solve_lyapunov(A64, -2 * eye)  # A X + X Aᵀ = -2I, X positive definite
        except ValueError:
            raise self._inaccurate(A, math.inf) from None
        L, info = torch.linalg.cholesky_ex((X + X.mT) / 2)
        if bool((info != 0).any()):
            raise self._inaccurate(A, math.inf)
        P = torch.cholesky_inverse(L)
        # (J - R) P = (c J - c I)(P / c) for any c > 0: pick the c giving R and P the same
        # mean eigenvalue, so that neither factor starts much larger than the other.
        c = (P.diagonal(dim1=-2, dim2=-1).mean(dim=-1) ** 0.5)[..., None, None]
        originals = dissipative_inverse(c * (A64 @ X)), log_cholesky_inverse(P / c)
        error = float((self(*originals) - A64).abs().max())
        scale = max(float(A64.abs().max()), 1.0)
        if not error <= default_atol(A.dtype) * scale:
            raise self._inaccurate(A, error / scale)
        return originals[0].to(A.dtype), originals[1].to(A.dtype)

    def _project(self, A: Tensor) -> Tensor:
        """``A`` where it is Hurwitz, else ``A - (a + δ) I``: each non-member moved along the
        identity, which shifts its spectrum without changing its eigenvectors, to spectral
        abscissa ``-δ``, with ``δ`` a tenth of its RMS singular value ``‖A‖_F / √n`` (a tenth
        when ``A = 0``), far enough from the imaginary axis to be set accurately."""
        if A.numel() == 0:
            return A
        abscissa = self._abscissa(A)
        if bool(abscissa.isnan().any()):
            raise ValueError(
                f"{self._owner}: the assigned value has NaN eigenvalues; assign finite values."
            )
        outside = abscissa >= 0
        if not bool(outside.any()):
            return A
        rms = torch.linalg.matrix_norm(A.to(abscissa.dtype)) / A.shape[-1] ** 0.5
        margin = _PROJECTION_MARGIN * torch.where(rms > 0, rms, 1.0)
        shift = torch.where(outside, abscissa + margin, 0.0).to(A.dtype)[..., None, None]
        return A - shift * torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)

    def _inaccurate(self, A: Tensor, error: float) -> ValueError:
        return ValueError(
            f"{self._owner}: the assigned value is Hurwitz but too close to the imaginary axis "
            f"to be set accurately (largest real part of an eigenvalue "
            f"{float(self._abscissa(A).max()):.2e}, relative reconstruction error {error:.2e}, "
            f"tolerance {default_atol(A.dtype):.2e}). Shift it left, e.g. A - t I with t > 0."
        )

    @staticmethod
    def _abscissa(A: Tensor) -> Tensor:
        """The spectral abscissa ``max Re λ`` of each matrix."""
        return torch.linalg.eigvals(A).real.amax(dim=-1)

    def _draw(self, shape: torch.Size, draw: Draw) -> Tensor:
        """A Ginibre matrix (i.i.d. ``N(0, 1/n)`` entries) shifted to spectral abscissa -1."""
        shape = torch.Size(shape)
        self.check_shape(shape, "the sample")
        G = gaussian_matrix(shape, draw)
        if G.numel() == 0:
            return G
        shift = (self._abscissa(G) + 1).to(G.dtype)[..., None, None]
        return G - shift * torch.eye(shape[-1], dtype=G.dtype, device=G.device)

    def distance(self, X: Tensor) -> Tensor:
        """The excess spectral abscissa ``max(0, max Re λ)`` (the worst over a batch)."""
        if X.numel() == 0:
            return X.new_zeros(())
        return worst(self._abscissa(X).clamp_min(0).to(X.dtype))

    def check_shape(self, shape: torch.Size, label: str) -> None:
        check_square(self._owner, label, shape)


def hurwitz(module: M, name: str = "weight") -> M:
    """Constrain ``module.<name>`` to stable (Hurwitz) matrices (:class:`Hurwitz`).

    A tensor that is not Hurwitz is shifted into the set first (see :class:`Hurwitz`).

    Args:
        module: the module holding the tensor.
        name: the tensor to constrain, a square matrix or a batch of them ``(*, n, n)``.

    Returns:
        ``module``.

    Raises:
        ValueError: the tensor is not square (or a batch of square matrices), or so close to
            the imaginary axis that it cannot be set accurately.
    """
    return register_constraint(module, name, Hurwitz())

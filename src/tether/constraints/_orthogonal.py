"""Orthogonal and unitary matrices, SO(n), the Grassmannian, and the dynamic trivialization."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tether._checks import bad_shape, bad_value, choice, tensor_label, tensor_to_constrain
from tether._parametrization_list import plists_of
from tether.constraints._base import Constraint, Draw, default_atol, register_constraint, worst
from tether.constraints._legacy_checkpoints import add_load_hook, first_parametrization
from tether.constraints._rebase import averaged_module, original_against
from tether.constraints._tall_orthogonal import (
    apply_base,
    cayley_columns,
    compact_base,
    complement_coordinates,
    exp_columns,
    is_orthonormal,
    is_thin,
)
from tether.functional import cayley, householder, orthonormalize, skew_matrix_exp
from tether.functional._base_householder import base_householder
from tether.functional._lower_cayley import lower_cayley
from tether.functional._lower_exp import lower_exp, takes_lower_exp
from tether.functional._precision import compute_dtype, upcast
from tether.functional._small_matrices import base_product

__all__ = [
    "Grassmannian",
    "Orthogonal",
    "SpecialOrthogonal",
    "grassmannian",
    "orthogonal",
    "special_orthogonal",
    "update_base",
]

M = TypeVar("M", bound=nn.Module)
OrthogonalMap = Literal["matrix_exp", "cayley", "householder"]
_MAPS = ("matrix_exp", "cayley", "householder")
_GROUP_MAPS = ("matrix_exp", "cayley")  # the maps of SpecialOrthogonal and Grassmannian
Distribution = Literal["uniform", "torus"]
_DISTRIBUTIONS = ("uniform", "torus")

# Note [Trivialization with a base point]
#     A map from a vector space onto the orthogonal group (the exponential, the Cayley map)
#     is only well conditioned near the identity. With ``use_trivialization=True`` the
#     constraint stores an orthogonal ``base`` and returns ``base @ map(A)``: assigning a
#     weight ``Q`` sets ``base`` to ``Q`` (completed to a square orthogonal matrix for tall
#     weights) and the original to the neutral point, so any orthogonal ``Q`` is set exactly.
#     ``tether.update_base`` does the same mid-training, which keeps long runs accurate
#     ("dynamic trivialization", Lezcano-Casado 2019). The original's neutral point is
#     ``-I`` rather than ``0`` because the Householder map reads signs from the diagonal, and
#     the layout (``original``, ``0.base``) is torch's, so checkpoints move both ways. A thin
#     weight (n x k with n > 2k and n > 64) stores instead the k columns of its base, shape
#     (n, k), and completes them implicitly (Note [Thin orthogonal weights] in
#     ``_tall_orthogonal``); ``orthogonal()`` and ``grassmannian()`` convert PyTorch's square
#     base of such a weight when loading its checkpoint (``_load_square_base``), and a
#     constraint registered as a class keeps the square base it is given.


def _lower(X: Tensor, rotate: bool) -> Tensor:
    """``L`` of shape ``(*, n, n)``, the generator ``L - Lᴴ`` of a tall ``(*, n, k)`` original.

    ``L`` is the lower triangle of ``X``, padded with zero columns; without ``rotate`` (the
    Grassmannian) its top ``k x k`` block is zero too.
    """
    n, k = X.shape[-2], X.shape[-1]
    L = X.tril() if rotate else torch.cat([torch.zeros_like(X[..., :k, :]), X[..., k:, :]], -2)
    if n != k:
        L = torch.cat([L, L.new_zeros(*L.shape[:-1], n - k)], dim=-1)
    return L


def _blocks(X: Tensor, rotate: bool) -> tuple[Tensor | None, Tensor]:
    """``A`` (``None`` without ``rotate``) and ``B`` of the generator ``[[A, -Bᴴ], [B, 0]]``."""
    k = X.shape[-1]
    if not rotate:
        return None, X[..., k:, :]
    L = X[..., :k, :].tril()
    return L - L.mH, X[..., k:, :]


def _exp_map(rotate: bool, X: Tensor, base: Tensor | None = None) -> Tensor:
    """The first ``k`` columns of ``exp`` of the generator of a tall ``X``, after ``base``.

    A module-level function bound with ``functools.partial`` rather than a closure, so that
    the constraint holding it pickles (a closure cannot be pickled by reference).
    """
    n, k = X.shape[-2], X.shape[-1]
    if rotate and takes_lower_exp(X):  # convolution kernels: closed forms, base inside
        return lower_exp(X, base)
    if is_thin(n, k):
        Q = exp_columns(*_blocks(X, rotate))
    else:
        # skew_matrix_exp takes the skew part of its input itself: given 2L it exponentiates
        # L - Lᴴ, the generator, without a second skew part being taken here.
        Q = skew_matrix_exp(2 * _lower(X, rotate))
        # (no slice for a square X: one autograd node fewer, which small matrices notice)
        Q = Q if n == k else Q[..., :k]
    return Q if base is None else _with_base(base, Q)


def _cayley_map(rotate: bool, X: Tensor, base: Tensor | None = None) -> Tensor:
    """The first ``k`` columns of ``cayley`` of the generator of a tall ``X``, after ``base``
    (see :func:`_exp_map`).

    A square ``X`` takes :func:`lower_cayley`, which applies the base inside the map's
    autograd Function (one product fewer backward, no autograd passes for the triangle).
    """
    n, k = X.shape[-2], X.shape[-1]
    if n == k:
        return lower_cayley(X if rotate else _lower(X, rotate), base)
    if is_thin(n, k):
        Q = cayley_columns(*_blocks(X, rotate))
    else:
        # _lower's L is lower triangular already: lower_cayley's tril keeps it.
        Q = lower_cayley(_lower(X, rotate))[..., :k]
    return Q if base is None else _with_base(base, Q)


def _householder_map(X: Tensor, base: Tensor | None = None) -> Tensor:
    """:func:`householder` of a tall ``X``, after ``base``; for a thin one, always in compact
    WY form.

    ``"auto"`` takes :func:`torch.linalg.householder_product` below 8 reflectors, whose
    backward forms an ``n x n`` matrix; the WY form stays ``O(n k²)`` (Note [Thin orthogonal
    weights]).
    """
    n, k = X.shape[-2], X.shape[-1]
    if base is not None and n == k:
        return base_householder(X, base)
    Q = householder(X, algorithm="wy") if is_thin(n, k) else householder(X)
    return Q if base is None else _with_base(base, Q)


def _neutral(like: Tensor) -> Tensor:
    """``-I`` of the shape of ``like``: the original that maps to the base point."""
    neutral = torch.zeros_like(like)
    neutral.diagonal(dim1=-2, dim2=-1).fill_(-1.0)
    return neutral


def _complete(Q: Tensor) -> Tensor:
    """A square orthogonal matrix whose first columns are (the QR projection of) tall ``Q``."""
    n, k = Q.shape[-2], Q.shape[-1]
    if n == k:
        # On the meta device there are no values to check: only shapes matter there.
        return Q.clone() if not Q.is_meta and is_orthonormal(Q) else orthonormalize(Q)
    extra = torch.randn(*Q.shape[:-2], n, n - k, dtype=Q.dtype, device=Q.device)
    return orthonormalize(torch.cat([Q, extra], dim=-1))


def _with_base(base: Tensor, Q: Tensor) -> Tensor:
    """``base @ Q`` for a square base, ``[U, U⊥] @ Q`` for a compact one (a thin weight's)."""
    if base.shape[-1] == base.shape[-2]:
        return base_product(base, Q) if Q.shape[-2] == Q.shape[-1] else base @ Q
    return apply_base(base, Q)


def householder_inverse(tall: Tensor) -> Tensor:
    """The original ``X`` with ``householder(X) == tall``, for ``tall`` with orthonormal columns.

    The reflectors of ``tall``'s QR decomposition, with ``diag(R) > 0`` folded into the signs
    of the diagonal; for another ``tall``, those of the ``Q`` of its QR decomposition.
    """
    A, tau = torch.geqrf(tall)
    # diag(R) > 0: keep the reflectors' signs on the diagonal; LAPACK returns tau == 0
    # exactly when it skips a reflection, which flips the sign convention for that column.
    A.diagonal(dim1=-2, dim2=-1).sign_()
    A.diagonal(dim1=-2, dim2=-1)[tau == 0.0] *= -1
    return A


class Orthogonal(Constraint):
    """Matrices with orthonormal columns (tall), rows (wide), or orthogonal/unitary (square).

    The set is ``{Q : Qᴴ Q = I}`` for a tall ``(*, n, k)`` weight and ``{Q : Q Qᴴ = I}`` for a
    wide one, real or complex, batched over leading dimensions. The same maps, defaults and
    ``state_dict`` layout as :func:`torch.nn.utils.parametrizations.orthogonal`:

    - ``"matrix_exp"`` and ``"cayley"`` map a skew-symmetric (skew-Hermitian) matrix built
      from the original's lower triangle onto the group; they train well. The Cayley map is
      cheaper but never reaches matrices with eigenvalue -1.
    - ``"householder"`` multiplies reflectors (real only); cheapest for thin or wide matrices.

    With ``use_trivialization=True`` (the default) the result is ``base @ map(A)`` with an
    orthogonal ``base`` buffer, so that assignment sets any orthogonal matrix exactly and
    :func:`tether.update_base` can move the base during training. Registration keeps an
    orthogonal weight as it is and replaces any other by the ``Q`` of its QR decomposition
    (as PyTorch does).

    A thin weight, ``n x k`` (or ``k x n``) with ``n > 2k`` and ``n > 64`` (an embedding, a
    projection to few features), costs ``O(n k²)`` time and ``O(n k)`` memory with every
    map: its ``base`` is stored as its ``k`` orthonormal columns, shape ``(*, n, k)``,
    rather than PyTorch's ``(*, n, n)`` (see ``docs/serialization.md`` for moving such
    checkpoints between the two libraries). Other shapes keep PyTorch's layout.

    Args:
        orthogonal_map: ``"matrix_exp"``, ``"cayley"`` or ``"householder"``.
        use_trivialization: keep a base point (see above). Without it, assignment works only
            for ``"householder"``.
        size: the shape it will constrain, optional (see :class:`Constraint`).

    References:
        Trivializations for Gradient-Based Optimization on Manifolds. Mario Lezcano-Casado,
        2019. https://arxiv.org/abs/1909.09501

    Example:
        >>> import torch, tether
        >>> layer = tether.orthogonal(torch.nn.Linear(5, 3))
        >>> W = layer.weight                                   # wide: orthonormal rows
        >>> torch.allclose(W @ W.T, torch.eye(3), atol=1e-6)
        True
    """

    base: Tensor | None
    # The maps the class offers (SpecialOrthogonal and Grassmannian offer two).
    _maps: tuple[str, ...] = _MAPS

    def __init__(
        self,
        orthogonal_map: OrthogonalMap = "matrix_exp",
        *,
        use_trivialization: bool = True,
        size: Sequence[int] | None = None,
    ) -> None:
        super().__init__(size=size)
        choice(orthogonal_map, "orthogonal_map", self._maps, f"{type(self).__name__}()")
        self.orthogonal_map = orthogonal_map
        self.use_trivialization = use_trivialization
        self._map = self._choose_map(orthogonal_map)
        if use_trivialization:
            self.register_buffer("base", None)

    def _choose_map(self, orthogonal_map: str) -> Callable[..., Tensor]:
        if orthogonal_map == "householder":
            return _householder_map
        group_map = _exp_map if orthogonal_map == "matrix_exp" else _cayley_map
        return functools.partial(group_map, True)

    def forward(self, X: Tensor) -> Tensor:
        transposed = X.shape[-2] < X.shape[-1]
        if transposed:
            X = X.mT
        if self.use_trivialization:
            if self.base is None:
                raise RuntimeError(
                    f"{type(self).__name__} has no base point yet: register it with "
                    "tether.register_parametrization (or assign a weight) before using it."
                )
            # The base is stored in the weight's dtype: cast it to the one computed in.
            Q = self._map(X, self.base.to(X.dtype))
        else:
            Q = self._map(X)
        return Q.mT if transposed else Q

    @torch.no_grad()
    def right_inverse(self, Q: Tensor) -> Tensor:
        self.check_shape(Q.shape, "the assigned value")
        transposed = Q.shape[-2] < Q.shape[-1]
        tall = Q.mT if transposed else Q
        if self.use_trivialization:
            self._set_base(self._base_for(tall))
            return _neutral(Q)
        if self.orthogonal_map != "householder":
            raise NotImplementedError(
                f"{type(self).__name__}({self.orthogonal_map!r}, use_trivialization=False) has "
                "no right inverse: use use_trivialization=True (the default) or "
                "orthogonal_map='householder' to assign weights."
            )
        A = householder_inverse(tall)
        return A.mT if transposed else A

    def _base_for(self, tall: Tensor) -> Tensor:
        n, k = tall.shape[-2], tall.shape[-1]
        return compact_base(tall) if is_thin(n, k) else _complete(tall)

    def coordinates(self, tall: Tensor) -> Tensor:
        """``baseᴴ @ tall``: a tall matrix in the coordinates of the base point.

        With a compact base (a thin weight), ``[U, U⊥]ᴴ @ tall`` (Note [Thin orthogonal
        weights]). ``forward`` of an original maps to ``base`` applied to the map's columns;
        this undoes the base.
        """
        if self.base is None:
            raise RuntimeError(f"{type(self).__name__} has no base point yet.")
        base = self.base.to(tall.dtype)
        if base.shape[-1] == base.shape[-2]:
            return base.mH @ tall
        return complement_coordinates(base, tall)

    def _set_base(self, base: Tensor) -> None:
        current = self.base
        if (
            current is not None
            and (current.shape, current.device) == (base.shape, base.device)
            and compute_dtype(current.dtype) == base.dtype
        ):
            # In place, rounded to the stored dtype: a compiled model does not recompile.
            current.copy_(base)
        else:
            # QR returns column-major matrices; safetensors saves only contiguous tensors.
            self.base = base.contiguous()

    def _base_shapes(self) -> tuple[torch.Size, ...]:
        """The shapes the base may have: square (PyTorch's) and, for a thin weight, compact."""
        if self._target is None:
            return ()
        shape = self._target[0]
        *batch, n, k = (*shape[:-2], shape[-1], shape[-2]) if shape[-2] < shape[-1] else shape
        return (torch.Size((*batch, n, n)), torch.Size((*batch, n, k)))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # A thin weight's base is compact where PyTorch's is square (Note [Trivialization
        # with a base point]): this takes either, and forward applies the one it holds, so
        # that a checkpoint of either library keeps its weight.
        incoming, current = state_dict.get(prefix + "base"), self._buffers.get("base")
        if (
            isinstance(incoming, Tensor)
            and isinstance(current, Tensor)
            and incoming.shape != current.shape
            and incoming.shape in self._base_shapes()
        ):
            self.base = current.new_empty(incoming.shape)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def sample(
        self,
        shape: Sequence[int] | Distribution | None = None,
        *,
        distribution: Distribution | None = None,
        init_: Callable[[Tensor], object] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draw a member: Haar-distributed (``"uniform"``) or near a torus (``"torus"``).

        As :meth:`Constraint.sample`, with geotorch's two distributions, also accepted in
        place of the shape (``sample("torus")``, geotorch's spelling):

        - ``"uniform"`` (the default): the Haar measure, the QR decomposition of a Gaussian
          matrix with the signs of ``R``'s diagonal fixed.
        - ``"torus"``: ``map(S)`` for a block-diagonal skew matrix ``S`` with blocks
          ``[[0, -θ], [θ, 0]]``, ``θ`` drawn by ``init_`` (default uniform on ``(-π, π)``)
          and ``map`` the constraint's (the exponential for ``"householder"``): for the
          exponential, a block-diagonal rotation whose eigenvalues ``exp(±iθ)`` spread around
          the unit circle. Tall or wide shapes take the first columns (rows) of the square
          one. The initialisation of orthogonal recurrent kernels (Henaff et al., 2016).

        Args:
            shape: the shape, or a distribution (then the shape is the registered one).
            distribution: ``"uniform"`` or ``"torus"``.
            init_: fills a tensor of angles ``θ`` in place (a ``torch.nn.init`` function);
                only with ``"torus"``.
            dtype: the dtype of the sample.
            device: its device.
            generator: the random number generator (the default ``init_`` uses it).

        Raises:
            ValueError: an unknown distribution, or ``init_`` without ``"torus"``.
            TypeError: no shape, and the constraint was never registered.

        References:
            Recurrent Orthogonal Networks and Long-Memory Tasks. Mikael Henaff, Arthur Szlam,
            Yann LeCun, 2016. https://arxiv.org/abs/1602.06662

        Example:
            >>> import torch, tether
            >>> rnn_cell = tether.orthogonal(torch.nn.Linear(6, 6))
            >>> rnn_cell.weight = rnn_cell.parametrizations.weight[0].sample("torus")
        """
        if isinstance(shape, str):
            if distribution is not None:
                raise TypeError(
                    f"{type(self).__name__}.sample() got the distribution twice: "
                    f"{shape!r} and distribution={distribution!r}. Pass it once."
                )
            shape, distribution = None, shape
        owner = f"{type(self).__name__}.sample()"
        distribution = "uniform" if distribution is None else distribution
        choice(distribution, "distribution", _DISTRIBUTIONS, owner)
        if init_ is not None and distribution != "torus":
            hint = "init_ draws the torus' angles."
            raise bad_value(owner, "distribution", "'torus' with init_", distribution, hint)
        return self._sample(shape, dtype, device, generator, distribution=distribution, init_=init_)

    def _draw(
        self,
        shape: torch.Size,
        draw: Draw,
        distribution: Distribution = "uniform",
        init_: Callable[[Tensor], object] | None = None,
    ) -> Tensor:
        self.check_shape(shape, "sample()")
        transposed = shape[-2] < shape[-1]
        tall_shape = torch.Size((*shape[:-2], shape[-1], shape[-2]) if transposed else shape)
        if distribution == "torus":
            Q = self._torus(tall_shape, draw, init_)
        else:
            Q = orthonormalize(torch.randn(tall_shape, **draw.kwargs))
        return Q.mT if transposed else Q

    def _torus(
        self, tall_shape: torch.Size, draw: Draw, init_: Callable[[Tensor], object] | None
    ) -> Tensor:
        """The first columns of ``map(S)``, ``S`` block-diagonal skew: see :meth:`sample`."""
        *batch, n, k = tall_shape
        real = draw.dtype.to_real() if draw.dtype.is_complex else draw.dtype
        if init_ is None:
            U = torch.rand(*batch, n // 2, dtype=real, device=draw.device, generator=draw.generator)
            angles = math.pi * (2 * U - 1)
        else:
            angles = torch.empty(*batch, n // 2, dtype=real, device=draw.device)
            with torch.no_grad():
                init_(angles)
        # The 2 x 2 blocks that meet the first k columns fill the top m x m corner; below it,
        # those columns are zero (m x m rather than n x n: a tall sample costs O(n k)).
        m = min(n, k + k % 2)
        below = torch.zeros(*batch, max(m - 1, 0), dtype=real, device=draw.device)
        below[..., ::2] = angles[..., : m // 2]
        S = torch.diag_embed(below, offset=-1)
        S = (S - S.mT).to(draw.dtype)
        group_map = cayley if self.orthogonal_map == "cayley" else skew_matrix_exp
        Q = group_map(S)[..., :k]
        return Q if m == n else F.pad(Q, (0, 0, 0, n - m))

    def distance(self, X: Tensor) -> Tensor:
        """``max |Qᴴ Q - I|`` over the entries (``Q Qᴴ`` for a wide ``X``)."""
        tall = X.mT if X.shape[-2] < X.shape[-1] else X
        eye = torch.eye(tall.shape[-1], dtype=tall.dtype, device=tall.device)
        return worst((tall.mH @ tall - eye).abs())

    def check_shape(self, shape: torch.Size, label: str) -> None:
        if len(shape) < 2:
            raise bad_shape(
                "orthogonal()",
                label,
                shape,
                "a matrix or a batch of matrices",
                "For vectors use tether.sphere.",
            )

    def extra_repr(self) -> str:
        return (
            f"orthogonal_map={self.orthogonal_map!r}, use_trivialization={self.use_trivialization}"
        )


class SpecialOrthogonal(Orthogonal):
    """Rotations: real square matrices in SO(n), orthogonal with determinant +1.

    ``base @ map(A)`` with ``base`` in SO(n) and ``A`` skew-symmetric: both maps stay in the
    connected component of the identity, so the determinant never leaves +1. Choose it over
    :class:`Orthogonal` when reflections must be excluded (rigid motions, normalising flows
    that need ``log|det| = 0`` with a fixed orientation). A non-member is projected to the
    ``Q`` of its QR decomposition with the last column's sign flipped if ``det Q = -1``.

    Args:
        orthogonal_map: ``"matrix_exp"`` or ``"cayley"``.
        size: the shape it will constrain, optional (see :class:`Constraint`).

    Example:
        >>> import torch, tether
        >>> layer = tether.special_orthogonal(torch.nn.Linear(4, 4))
        >>> round(torch.linalg.det(layer.weight).item(), 5)
        1.0
    """

    supports_complex = False
    _maps = _GROUP_MAPS

    def __init__(
        self,
        orthogonal_map: Literal["matrix_exp", "cayley"] = "matrix_exp",
        *,
        size: Sequence[int] | None = None,
    ) -> None:
        super().__init__(orthogonal_map, use_trivialization=True, size=size)

    def _base_for(self, tall: Tensor) -> Tensor:
        base = _complete(tall)
        flip = torch.ones_like(base[..., 0, :])
        flip[..., -1] = torch.linalg.det(base).sign()
        return base * flip.unsqueeze(-2)

    def _draw(
        self,
        shape: torch.Size,
        draw: Draw,
        distribution: Distribution = "uniform",
        init_: Callable[[Tensor], object] | None = None,
    ) -> Tensor:
        # Haar on O(n), then into SO(n); the torus is there already (exp of a skew matrix).
        return self._base_for(super()._draw(shape, draw, distribution, init_))

    def distance(self, X: Tensor) -> Tensor:
        """Distance to O(n), or 2 when the determinant is negative (the other component)."""
        off = super().distance(X)
        negative = (torch.linalg.det(X) < 0).any()
        return torch.where(negative, torch.full_like(off, 2.0), off)

    def check_shape(self, shape: torch.Size, label: str) -> None:
        if len(shape) < 2 or shape[-1] != shape[-2]:
            raise bad_shape(
                "special_orthogonal()",
                label,
                shape,
                "a square matrix or a batch of square matrices",
                "For rectangular weights use tether.orthogonal.",
            )


class Grassmannian(Orthogonal):
    """Subspaces: matrices with orthonormal columns (rows if wide), moved only across subspaces.

    A point of the Grassmannian Gr(n, k) is a k-dimensional subspace of Rⁿ, represented by an
    ``n x k`` matrix with orthonormal columns spanning it. The map is ``base @ exp(A)`` with
    ``A = [[0, -Bᴴ], [B, 0]]``: only the ``(n - k) x k`` block ``B`` is trained, so gradient
    steps change the subspace and never waste effort rotating within it. Choose it over
    :class:`Orthogonal` when only the span matters (subspace tracking, PCA-like layers).

    Args:
        orthogonal_map: ``"matrix_exp"`` or ``"cayley"``.
        size: the shape it will constrain, optional (see :class:`Constraint`).

    Example:
        >>> import torch, tether
        >>> layer = tether.grassmannian(torch.nn.Linear(2, 6))
        >>> W = layer.weight
        >>> torch.allclose(W.T @ W, torch.eye(2), atol=1e-6)
        True
    """

    _maps = _GROUP_MAPS

    def __init__(
        self,
        orthogonal_map: Literal["matrix_exp", "cayley"] = "matrix_exp",
        *,
        size: Sequence[int] | None = None,
    ) -> None:
        super().__init__(orthogonal_map, use_trivialization=True, size=size)

    def _choose_map(self, orthogonal_map: str) -> Callable[..., Tensor]:
        group_map = _exp_map if orthogonal_map == "matrix_exp" else _cayley_map
        return functools.partial(group_map, False)

    def check_shape(self, shape: torch.Size, label: str) -> None:
        if len(shape) < 2:
            raise bad_shape("grassmannian()", label, shape, "a matrix or a batch of matrices")


def orthogonal(
    module: M,
    name: str = "weight",
    orthogonal_map: OrthogonalMap | None = None,
    *,
    use_trivialization: bool = True,
) -> M:
    """Constrain ``module.<name>`` to orthonormal columns / rows (orthogonal if square).

    A drop-in for :func:`torch.nn.utils.parametrizations.orthogonal`: same signature, default
    map (``"matrix_exp"`` for square or complex weights, ``"householder"`` otherwise),
    numerics and ``state_dict`` keys, so checkpoints load both ways; except that a thin
    weight (``n x k``, ``n > 2k``, ``n > 64``) stores its base as ``n x k`` and costs
    ``O(n k²)``: PyTorch's checkpoints of it load (converted), and ``tether.plain_state_dict``
    takes it to PyTorch. See :class:`Orthogonal`.

    Args:
        module: the module holding the tensor.
        name: the tensor to constrain, a matrix or a batch of them ``(*, n, k)``.
        orthogonal_map: ``"matrix_exp"``, ``"cayley"`` or ``"householder"``; by default
            ``"matrix_exp"`` for square or complex tensors, ``"householder"`` otherwise (PyTorch's
            defaults).
        use_trivialization: keep a base point, so that any orthogonal matrix can be assigned and
            :func:`tether.update_base` works (see :class:`Orthogonal`).

    Returns:
        ``module``.

    Raises:
        ValueError: the tensor is not a matrix or batch of matrices, the map is unknown, or
            ``"householder"`` is asked for a complex tensor.

    Example:
        >>> import torch, tether
        >>> layer = tether.orthogonal(torch.nn.Linear(3, 3))
        >>> Q = layer.weight
        >>> torch.allclose(Q.T @ Q, torch.eye(3), atol=1e-6)
        True
    """
    weight = tensor_to_constrain(module, name)
    if weight.ndim >= 2 and orthogonal_map is None:
        square = weight.shape[-2] == weight.shape[-1]
        orthogonal_map = "matrix_exp" if square or weight.is_complex() else "householder"
    if orthogonal_map == "householder" and weight.is_complex():
        raise ValueError(
            f"orthogonal() on {tensor_label(module, name)}: the householder map does not support "
            "complex tensors. Use orthogonal_map='matrix_exp' or 'cayley'."
        )
    constraint = Orthogonal(orthogonal_map or "matrix_exp", use_trivialization=use_trivialization)
    register_constraint(module, name, constraint)
    add_load_hook(module, functools.partial(_load_square_base, name))
    return module


def special_orthogonal(
    module: M, name: str = "weight", orthogonal_map: Literal["matrix_exp", "cayley"] = "matrix_exp"
) -> M:
    """Constrain ``module.<name>`` to rotations, SO(n). See :class:`SpecialOrthogonal`.

    Args:
        module: the module holding the tensor.
        name: the tensor to constrain, a square matrix or a batch of them ``(*, n, n)``.
        orthogonal_map: ``"matrix_exp"`` (default) or ``"cayley"``; geotorch's ``triv``.

    Raises:
        ValueError: the tensor is not square (or a batch of square matrices), or is complex.
    """
    weight = tensor_to_constrain(module, name)
    if weight.is_complex():
        raise ValueError(
            f"special_orthogonal() on {tensor_label(module, name)} needs a real tensor; got "
            f"{weight.dtype}. For unitary matrices use tether.orthogonal."
        )
    return register_constraint(module, name, SpecialOrthogonal(orthogonal_map))


def grassmannian(
    module: M, name: str = "weight", orthogonal_map: Literal["matrix_exp", "cayley"] = "matrix_exp"
) -> M:
    """Constrain ``module.<name>`` to a point of the Grassmannian. See :class:`Grassmannian`.

    Args:
        module: the module holding the tensor.
        name: the tensor to constrain, a matrix or a batch of them ``(*, n, k)``.
        orthogonal_map: ``"matrix_exp"`` (default) or ``"cayley"``; geotorch's ``triv``.
    """
    register_constraint(module, name, Grassmannian(orthogonal_map))
    add_load_hook(module, functools.partial(_load_square_base, name))
    return module


def _load_square_base(
    name: str, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    """Give a thin weight's checkpoint with PyTorch's square base the compact one, same weight.

    A load_state_dict pre-hook on ``module`` (the pattern of Note [Loading the checkpoints
    of torch's hook-based norms]), for the weight's chain whose first parametrization is an
    :class:`Orthogonal` with a base point: the weight ``W = base @ map(original)`` becomes
    the base (compact) and the original the neutral point, as :func:`update_base` leaves
    them; computed once, in double precision. It costs ``O(n² k)``, the size of the square
    base read. Anything else (another layout, a chain whose first parametrization is not
    the orthogonal one) is left to :meth:`Orthogonal._load_from_state_dict`, which keeps a
    square base as it is.
    """
    constraint = first_parametrization(module, name)
    if not isinstance(constraint, Orthogonal) or not constraint.use_trivialization:
        return
    block = f"{prefix}parametrizations.{name}."
    base, original = state_dict.get(block + "0.base"), state_dict.get(block + "original")
    if not (isinstance(base, Tensor) and isinstance(original, Tensor)):
        return
    transposed = original.shape[-2] < original.shape[-1]
    tall = original.mT if transposed else original
    *batch, n, k = tall.shape
    if base.is_meta or not is_thin(n, k) or base.shape != (*batch, n, n):
        return
    precise = torch.complex128 if tall.is_complex() else torch.float64
    with torch.no_grad():
        W = base.to(precise) @ constraint._map(tall.to(precise))
        state_dict[block + "0.base"] = compact_base(W).to(base.dtype)
        state_dict[block + "original"] = _neutral(original)


def _layout(chain: nn.Module) -> dict[str, torch.Size]:
    return {key: t.shape for key, t in chain.state_dict().items()}


def update_base(
    module: nn.Module, name: str = "weight", *, averaged: nn.Module | None = None
) -> None:
    """Move the base point of ``module.<name>``'s trivialization to the current weight.

    The weight does not change; its original goes back to the neutral point and the base
    absorbs the current value. Call it every few hundred steps of a long training run so that
    the map keeps working near the identity, where it is best conditioned (Note [Trivialization
    with a base point]). Optimizer state for the original (momentum, Adam moments) refers to
    the old coordinates; resetting it is usually wise.

    It works on every parametrized tensor, as geotorch's ``update_base`` does: where no
    constraint of the chain has a base point (everything but the orthogonal family with
    ``use_trivialization=True``), it re-assigns the current weight through the chain,
    ``module.<name> = module.<name>``: the weight stays, and the originals are written afresh
    by the right inverses (for :class:`tether.constraints.LowRank`, factors with orthonormal
    columns again).

    An averaged copy of the model (EMA or SWA, as :class:`torch.optim.swa_utils.AveragedModel`
    makes) averages the originals, which only means something while it shares the model's
    base. Pass it as ``averaged`` and it moves along: it takes the model's new base and the
    original that keeps its own weight where it was (to rounding), so both average against
    one base again, the average stays orthogonal, and once the model stops moving it
    converges to the model's weight. Without it the copy's weight jumps at each call (Note
    [An averaged copy and update_base] in ``tether.constraints._rebase``). ``averaged`` is the
    copy of ``module`` (``ema.module.<path>``), or the ``AveragedModel`` when ``module`` is the
    whole model; both ``use_buffers`` settings work. For a chain without a base point the
    copy's weight is re-assigned the same way, so that both average originals written by the
    same right inverse; neither weight moves.

    Args:
        module: the module holding the constrained tensor.
        name: the constrained tensor.
        averaged: the averaged copy of ``module`` to move along, if any.

    Raises:
        NotImplementedError: the chain has no base point and no right inverse (e.g.
            ``orthogonal(..., use_trivialization=False)``): nothing to update.
        ValueError: ``module.<name>`` is not parametrized; or, with ``averaged``: it is
            not a copy of ``module`` with the same constraints on ``name``, or (with a base
            point) the constraint with a base is not the first of its chain, it is a
            Grassmannian, or the averaged weight is too far from the model's to be written
            against the new base. Nothing is changed then.

    Example:
        >>> import torch, tether
        >>> layer = tether.orthogonal(torch.nn.Linear(3, 3))
        >>> with torch.no_grad():
        ...     _ = layer.parametrizations.weight.original.add_(0.1)
        >>> before = layer.weight.detach().clone()
        >>> tether.update_base(layer)
        >>> torch.allclose(layer.weight, before, atol=1e-6)
        True

        With an exponential moving average of the model:

        >>> from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        >>> ema = AveragedModel(layer, multi_avg_fn=get_ema_multi_avg_fn(0.99))
        >>> with torch.no_grad():
        ...     _ = layer.parametrizations.weight.original.add_(0.1)  # a training step
        >>> ema.update_parameters(layer)
        >>> average = ema.module.weight.detach().clone()
        >>> tether.update_base(layer, averaged=ema)
        >>> torch.allclose(ema.module.weight, average, atol=1e-6)
        True
    """
    who = f"update_base() on {tensor_label(module, name)}"
    plist = plists_of(module).get(name)
    if plist is None:
        raise ValueError(
            f"{who}: the tensor has no parametrization. Register a constraint on it first, "
            f"e.g. tether.orthogonal(module, {name!r})."
        )
    copy_chain = twin = None
    if averaged is not None:
        twin = averaged_module(averaged)
        copy_chain = plists_of(twin).get(name) if isinstance(twin, nn.Module) else None
    if averaged is not None and (
        copy_chain is None
        or [type(p) for p in copy_chain] != [type(p) for p in plist]
        or _layout(copy_chain) != _layout(plist)
    ):
        raise ValueError(
            f"{who}: `averaged` must be the averaged copy of this module, with the same "
            f"parametrizations on {name!r}; got {type(twin).__name__}. Pass the copy of this "
            "very module, e.g. update_base(model.layer, averaged=ema.module.layer)."
        )
    if copy_chain is None or not any(isinstance(getattr(p, "base", None), Tensor) for p in plist):
        # No base point (or no averaged copy): re-assign the weight through its chain, which
        # leaves it where it is and writes its originals afresh (geotorch's update_base).
        try:
            with torch.no_grad():
                setattr(module, name, getattr(module, name))
                if twin is not None:
                    setattr(twin, name, getattr(twin, name))
        except NotImplementedError as refusal:
            raise NotImplementedError(
                f"{who}: no parametrization of the tensor has a base point to move, and the "
                f"chain cannot write its weight back to the originals ({refusal}). Nothing "
                "was changed. For an orthogonal weight, register it with "
                "use_trivialization=True (the default) to move its base during training."
            ) from refusal
        return
    constraint, copy_constraint = plist[0], copy_chain[0]
    if (
        not isinstance(constraint, Orthogonal)
        or not isinstance(copy_constraint, Orthogonal)
        or not isinstance(constraint.base, Tensor)
        or any(isinstance(getattr(p, "base", None), Tensor) for p in list(plist)[1:])
    ):
        raise ValueError(
            f"{who}: with `averaged`, the constraint with a base point must be the first "
            "parametrization on the tensor, and the only one with a base. Register it first."
        )
    if isinstance(constraint, Grassmannian):
        raise ValueError(
            f"{who}: an averaged copy of a Grassmannian weight cannot follow update_base: the "
            "weight moves only across subspaces, so the copy's weight is generally out of "
            "reach of the model's new base. Use tether.orthogonal, or rebuild the averaged "
            "copy after update_base."
        )
    saved = [
        (each, {key: t.clone() for key, t in each.state_dict().items()})
        for each in (plist, copy_chain)
    ]
    try:
        with torch.no_grad():
            value = copy_constraint(copy_chain.original)
            setattr(module, name, getattr(module, name))
            base = constraint.base
            copy_constraint._set_base(
                base.to(device=value.device, dtype=compute_dtype(value.dtype))
            )
            transposed = value.shape[-2] < value.shape[-1]
            tall = upcast(value.mT if transposed else value)
            A = original_against(
                copy_constraint.coordinates(tall), constraint.orthogonal_map, householder_inverse
            )
            original = None if A is None else (A.mT if transposed else A).to(value.dtype)
            error = (
                float("inf")
                if original is None
                else float((copy_constraint(original) - value).abs().max())
            )
            if original is None or error > default_atol(value.dtype):
                raise ValueError(
                    f"{who}: the averaged copy's weight is too far from the model's to be "
                    f"written against the new base (off by {error:.2g} after the attempt). "
                    "Call update_base more often, or rebuild the averaged copy."
                )
            copy_chain.original.copy_(original)
        copy_chain.changed()
    except BaseException:
        for each, state in saved:
            each.load_state_dict(state)
        raise

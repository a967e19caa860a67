"""Positive definite and positive semidefinite matrices, of full, bounded or fixed rank."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, TypeVar, cast

import torch
from torch import Tensor, nn

from tether._checks import bad_shape, bad_type, bad_value, check_square, required_rank
from tether.constraints._base import Constraint, Draw, register_constraint, worst
from tether.functional import (
    fixed_rank_psd,
    fixed_rank_psd_factors,
    gram,
    gram_factor,
    orthonormalize,
    skew_part,
    spd_exp,
    spd_log,
    spd_softplus,
    spd_softplus_inverse,
    symmetric_part,
)
from tether.functional._precision import precision_eps, stored_as, upcast
from tether.functional._symmetric import low_rank_eigh

__all__ = [
    "PSDFixedRank",
    "PSDLowRank",
    "PositiveDefinite",
    "PositiveSemidefinite",
    "positive_definite",
    "positive_semidefinite",
    "psd_fixed_rank",
    "psd_low_rank",
]

M = TypeVar("M", bound=nn.Module)
PositiveDefiniteMap = Literal["matrix_exp", "softplus"]
_MAPS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "matrix_exp": (spd_exp, spd_log),
    "softplus": (spd_softplus, spd_softplus_inverse),
}
# geotorch's names for the maps onto the eigenvalues (its `f`) that tether offers too.
_EIGENVALUE_MAPS = ("softplus",)
_DOUBLE = {torch.float32: torch.float64, torch.complex64: torch.complex128}

# Note [Right inverses in double precision]
#     update_base re-assigns a weight through right_inverse (these constraints have no base
#     point to move), as does loading a plain checkpoint, so forward(right_inverse(W)) should
#     give W back as closely as the dtype allows. In float32 the eigh (or square root) of
#     right_inverse adds its own rounding, 10 to 20 eps · max|W| for n <= 32, to that of
#     forward. Computed in float64 and rounded, the original carries only its own rounding:
#     the round trip then costs about what forward's rounding costs (a few eps · max|W| for
#     the Gram maps; about 10 eps · max|W| for the eigh of the matrix_exp and softplus maps,
#     which only keeping the originals would avoid). right_inverse runs on assignment, not
#     in training, so the cost stays out of the training step. The eigenvalue floor keeps the
#     stored dtype's eps (stored_as). float64 values, values stored in a lower precision
#     (Note [Low-precision tensors]) and devices without float64 (MPS) are computed as is.


def _in_double(inverse: Callable[[Tensor], Tensor], X: Tensor) -> Tensor:
    """``inverse(X)`` computed in double precision, rounded back to ``X``'s dtype.

    See Note [Right inverses in double precision].
    """
    double = _DOUBLE.get(X.dtype)
    if double is None or X.device.type == "mps" or precision_eps(X) > torch.finfo(X.dtype).eps:
        return inverse(X)
    with stored_as(X.dtype):
        return inverse(X.to(double)).to(X.dtype)


def _eigenvalue_map(f: object, owner: str, hint: str = "") -> str:
    """geotorch's ``f`` if tether offers it (only ``"softplus"``), else a ``ValueError``."""
    if isinstance(f, str) and f in _EIGENVALUE_MAPS:
        return f
    if callable(f) or isinstance(f, tuple):
        hint = f"Callables and pairs (f, f_inverse) are not supported. {hint}".rstrip()
    needs = "'softplus' (geotorch's default), the only map onto the eigenvalues offered as `f`"
    raise bad_value(owner, "f", needs, f, hint)


def _sample(shape: Sequence[int], rank: int, draw: Draw) -> Tensor:
    """``Q H Hᴴ Qᴴ / 2r``: ``Q`` uniform ``n x r`` orthonormal, ``H`` Gaussian ``r x 2r``.

    Rank ``r`` and, by the Marchenko-Pastur law, with its ``r`` positive eigenvalues spread over
    about ``[0.09, 2.9]``: well conditioned on its column space for every ``r``, where a plain
    Wishart ``G Gᴴ / n`` of a square ``G`` has eigenvalues down to about ``1 / n²``.
    """
    *batch, n, _ = shape
    G = torch.randn(*batch, n, rank, **draw.kwargs)
    H = torch.randn(*batch, rank, 2 * rank, **draw.kwargs)
    Q = orthonormalize(G)
    return gram(Q @ H) / (2 * rank)


def _psd_distance(X: Tensor, rank: int | None = None) -> Tensor:
    """Frobenius distance to the PSD matrices of rank at most ``rank`` (the worst in a batch).

    The nearest such matrix keeps the ``rank`` largest eigenvalues of the symmetric part,
    clamped at zero (Eckart-Young for the symmetric part, Higham 1988 for the sign), so the
    squared distance is that of the skew part plus that of the dropped eigenvalues.
    """
    S = symmetric_part(X)
    pairs = None if rank is None else low_rank_eigh(S, rank)
    # Of rank 2r to rounding, the r largest of the 2r nonzero eigenvalues and the residual
    # (an upper bound within rounding): Note [Eigenpairs of a symmetric matrix of low rank].
    L = torch.linalg.eigvalsh(S) if pairs is None else pairs.values
    kept = L.clamp(min=0)
    if rank is not None:
        # eigvalsh sorts the eigenvalues in ascending order: the largest are the last ones.
        kept = torch.cat([torch.zeros_like(L[..., :-rank]), kept[..., -rank:]], dim=-1)
    skew = torch.linalg.matrix_norm(skew_part(X))
    squared = skew**2 + torch.linalg.vector_norm(L - kept, dim=-1) ** 2
    if pairs is not None:
        squared = squared + pairs.residual**2
    return worst(torch.sqrt(squared))


def _has_positive_eigenvalues(X: Tensor, count: int) -> bool:
    """Whether the symmetric part of ``X`` has ``count`` clearly positive eigenvalues.

    Clearly: above ``n · eps · max|λ|``, the threshold of ``torch.linalg.matrix_rank``, so
    that rounding errors in a singular matrix do not count as positive eigenvalues.
    """
    # In the compute dtype, with the threshold of the stored one: Note [Low-precision tensors].
    S = symmetric_part(upcast(X))
    # A matrix of rank 2 count (to rounding) has no other eigenvalue above rounding: Note
    # [Eigenpairs of a symmetric matrix of low rank].
    pairs = low_rank_eigh(S, count)
    L = torch.linalg.eigvalsh(S) if pairs is None else pairs.values
    tolerance = X.shape[-1] * torch.finfo(X.dtype).eps * L.abs().amax(dim=-1)
    return bool((L[..., -count] > tolerance).all())


def _rank_argument(rank: object, owner: str) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise bad_type(owner, "rank", "an int", rank)
    if rank < 1:
        raise bad_value(owner, "rank", "at least 1 (and at most n for an n x n weight)", rank)
    return rank


def _check_square_of_rank(constraint: str, label: str, shape: Sequence[int], rank: int) -> None:
    check_square(constraint, label, shape)
    if shape[-1] < rank:
        raise bad_shape(
            constraint,
            label,
            shape,
            f"n x n matrices with n >= rank = {rank}",
            f"Use a rank between 1 and {shape[-1]}.",
        )


class PositiveDefinite(Constraint):
    """Symmetric positive definite matrices (Hermitian for complex tensors).

    The set is ``{X : X = Xᴴ, λ_min(X) > 0}`` of shape ``(*, n, n)``, reached through a map
    from the symmetric part ``S`` of the original:

    - ``"matrix_exp"`` (default): ``exp(S)``, a diffeomorphism from the symmetric matrices
      (the log-Euclidean view). Eigenvalues live on a log scale, which suits covariances and
      metrics whose scales span orders of magnitude; an eigenvalue ``λ`` gets gradients of
      size ``λ``, so tiny ones move slowly.
    - ``"softplus"``: ``Q diag(softplus(λ)) Qᴴ`` for ``S = Q diag(λ) Qᴴ``. Close to the
      identity for large eigenvalues, so a well-conditioned weight trains as a plain
      symmetric one; costs an ``eigh`` per forward pass. Differentiable at repeated
      eigenvalues too (the identity included), unlike a naive ``eigh``.

    ``right_inverse`` takes the matrix logarithm (inverse softplus) of the eigenvalues, via
    ``torch.linalg.eigh`` (in float64 for a float32 weight, so that re-assigning the weight,
    as :func:`tether.update_base` does, moves it only by the rounding of ``forward``), so a
    positive definite matrix is set exactly. Any other matrix is
    projected: symmetric part, then eigenvalues raised to a floor of ``sqrt(eps) · max|λ|``
    (``eps`` the dtype's machine epsilon; ``sqrt(eps)`` for the zero matrix), because the set
    is open and the nearest point of its closure is singular. Eigenvalues at that floor train
    slowly: prefer setting a member (``layer.weight = torch.eye(n)``, :meth:`sample`).

    ``distance`` is the Frobenius distance to the closure (the PSD matrices) and
    :meth:`in_manifold` asks, on top, for full numerical rank: ``λ_min > n · eps · max|λ|``,
    the threshold of ``torch.linalg.matrix_rank``. geotorch's ``PSD`` is the same set with a
    softplus map plus ``1e-6``, and asks ``λ_min >= 1e-6``.

    Args:
        map: ``"matrix_exp"`` or ``"softplus"``, see above; ``None`` (the default) is
            ``"matrix_exp"``, or ``"softplus"`` with ``f="softplus"``.
        f: geotorch's name for the map onto the eigenvalues: ``"softplus"``, the same as
            ``map="softplus"`` (without geotorch's ``+ 1e-6``), is the one offered.
        size: the shape it will constrain, optional (see :class:`Constraint`).

    Raises:
        ValueError: ``map`` is not one of the above, ``f`` is not ``"softplus"`` (or
            contradicts ``map``), or the tensor is not square.

    References:
        Geometric Means in a Novel Vector Space Structure on Symmetric Positive-Definite
        Matrices. Vincent Arsigny, Pierre Fillard, Xavier Pennec, Nicholas Ayache, 2007.
        https://doi.org/10.1137/050637996

    Example:
        >>> import torch, tether
        >>> layer = tether.positive_definite(torch.nn.Linear(4, 4), map="softplus")
        >>> bool(torch.linalg.eigvalsh(layer.weight).min() > 0)
        True
        >>> layer.weight = torch.eye(4)                        # set a member exactly
        >>> torch.allclose(layer.weight, torch.eye(4), atol=1e-6)
        True
    """

    def __init__(
        self,
        map: PositiveDefiniteMap | None = None,
        *,
        f: str | None = None,
        size: Sequence[int] | None = None,
    ) -> None:
        super().__init__(size=size)
        self.map = _positive_definite_map(map, f)
        self._map, self._inverse = _MAPS[self.map]

    def forward(self, X: Tensor) -> Tensor:
        return self._map(X)

    @torch.no_grad()
    def right_inverse(self, X: Tensor) -> Tensor:
        self.check_shape(X.shape, "the assigned value")
        return _in_double(self._inverse, X)

    def _draw(self, shape: torch.Size, draw: Draw) -> Tensor:
        """A Wishart matrix ``G Gᴴ / 2n`` with ``G`` a standard Gaussian ``n x 2n``.

        Its eigenvalues spread over about ``[0.09, 2.9]`` (Marchenko-Pastur).
        """
        self.check_shape(shape, "the sample")
        return _sample(shape, shape[-1], draw)

    def distance(self, X: Tensor) -> Tensor:
        """The Frobenius distance to the closure of the set, the PSD matrices."""
        return _psd_distance(X)

    def in_manifold(self, X: Tensor, atol: float | None = None) -> bool:
        """``distance(X) <= atol`` and ``λ_min > n · eps · max|λ|`` (full numerical rank)."""
        return super().in_manifold(X, atol) and _has_positive_eigenvalues(X, X.shape[-1])

    def check_shape(self, shape: Sequence[int], label: str) -> None:
        check_square("positive_definite()", label, shape)

    def extra_repr(self) -> str:
        return f"map={self.map!r}"


def _positive_definite_map(map: object, f: object) -> PositiveDefiniteMap:
    """The map of :class:`PositiveDefinite`: ``map``, or geotorch's ``f``, or the default."""
    owner = "positive_definite()"
    if map is not None and map not in _MAPS:  # a ValueError whatever the type, as documented
        raise bad_value(owner, "map", f"one of {', '.join(repr(m) for m in _MAPS)}", map)
    if f is None:
        return "matrix_exp" if map is None else cast(PositiveDefiniteMap, map)
    _eigenvalue_map(f, owner, "For the matrix exponential, pass map='matrix_exp' instead.")
    if map not in (None, "softplus"):
        raise ValueError(
            f"{owner}: `f`={f!r} is map='softplus', but map={map!r} was passed too. Pass "
            "one of them."
        )
    return "softplus"


class PositiveSemidefinite(Constraint):
    """Symmetric positive semidefinite matrices (Hermitian for complex tensors).

    The set is ``{X : X = Xᴴ, λ_min(X) >= 0}`` of shape ``(*, n, n)``, closed, so singular
    matrices are members. The map is the Gram matrix ``B Bᴴ`` of the original ``B`` (shape
    ``(*, n, n)``, that of the weight): a polynomial with smooth gradients everywhere and no
    eigendecomposition in the forward pass. ``right_inverse`` returns the PSD square root, so
    a member is set exactly, and projects any other matrix onto the set first (symmetric
    part, negative eigenvalues set to zero: the nearest PSD matrix in the Frobenius norm).

    Choose it over :class:`PositiveDefinite` when singular weights are allowed (a kernel, a
    precision matrix that may drop directions) or the ``eigh`` of the softplus map is too
    slow; over :class:`PSDLowRank` when the rank is not bounded. The factor is defined up to
    an orthogonal ``B ↦ B U``, a symmetry the optimizer does not see. geotorch's ``PSSD`` is
    the same set, parametrized by eigenvalues ``|λ|`` on an orthogonal frame.

    Args:
        size: the shape it will constrain, optional (see :class:`Constraint`).

    Raises:
        ValueError: the tensor is not square, shape ``(*, n, n)``.

    References:
        Computing a Nearest Symmetric Positive Semidefinite Matrix. Nicholas J. Higham, 1988.
        https://doi.org/10.1016/0024-3795(88)90223-6

    Example:
        >>> import torch, tether
        >>> layer = tether.positive_semidefinite(torch.nn.Linear(4, 4))
        >>> bool(torch.linalg.eigvalsh(layer.weight).min() > -1e-6)
        True
    """

    def forward(self, X: Tensor) -> Tensor:
        return gram(X)

    @torch.no_grad()
    def right_inverse(self, X: Tensor) -> Tensor:
        self.check_shape(X.shape, "the assigned value")
        # Note [Right inverses in double precision].
        return _in_double(gram_factor, X)

    def _draw(self, shape: torch.Size, draw: Draw) -> Tensor:
        """A Wishart matrix ``G Gᴴ / 2n`` with ``G`` a standard Gaussian ``n x 2n``."""
        self.check_shape(shape, "the sample")
        return _sample(shape, shape[-1], draw)

    def distance(self, X: Tensor) -> Tensor:
        """The Frobenius distance to the set (to the projection described above)."""
        return _psd_distance(X)

    def check_shape(self, shape: Sequence[int], label: str) -> None:
        check_square("positive_semidefinite()", label, shape)


class _PSDOfRank(Constraint):
    """What :class:`PSDLowRank` and :class:`PSDFixedRank` share: all but the map."""

    _function: str  # the registering function; messages add the rank: psd_low_rank(rank=2)

    def __init__(self, rank: int, *, size: Sequence[int] | None = None) -> None:
        super().__init__(size=size)
        self.rank = _rank_argument(rank, f"{self._function}()")

    def _draw(self, shape: torch.Size, draw: Draw) -> Tensor:
        """``Q H Hᴴ Qᴴ / 2r``: ``Q`` uniform ``n x r`` orthonormal, ``H`` Gaussian ``r x 2r``."""
        self.check_shape(shape, "the sample")
        return _sample(shape, self.rank, draw)

    def distance(self, X: Tensor) -> Tensor:
        """The Frobenius distance to the PSD matrices of rank at most ``rank``.

        That is the set of :class:`PSDLowRank`, and the closure of that of :class:`PSDFixedRank`.
        """
        return _psd_distance(X, self.rank)

    def check_shape(self, shape: Sequence[int], label: str) -> None:
        _check_square_of_rank(f"{self._function}(rank={self.rank})", label, shape, self.rank)

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


class PSDLowRank(_PSDOfRank):
    """Positive semidefinite matrices of rank at most ``rank``.

    The set is ``{X : X = Xᴴ, λ_min(X) >= 0, rank X <= r}`` of shape ``(*, n, n)``, reached as
    ``B Bᴴ`` from a factor ``B`` of shape ``(*, n, r)`` (Burer-Monteiro). The original *is*
    the factor: ``parametrizations.<name>.original`` has shape ``(*, n, r)``, so memory, the
    optimizer's state and the forward pass (``O(n² r)``) all cost what the factor costs.
    ``right_inverse`` returns ``Q_r diag(λ_r)^(1/2)`` from the ``r`` largest eigenpairs: a
    member is set exactly, any other matrix is replaced by its nearest member in the
    Frobenius norm (symmetric part, ``r`` largest eigenvalues kept, clamped at zero). Create
    the optimizer after registering, as the original changes shape.

    Choose it for low-rank covariances, kernels and metric learning (``B`` is the learnt
    projection); use :class:`PSDFixedRank` when the rank must not drop.

    Args:
        rank: ``r``, with ``1 <= r <= n``.
        size: the shape it will constrain, optional (see :class:`Constraint`).

    Raises:
        TypeError: ``rank`` is not an int.
        ValueError: ``rank < 1``, or the tensor is not square with ``n >= rank``.

    References:
        A Nonlinear Programming Algorithm for Solving Semidefinite Programs via Low-rank
        Factorization. Samuel Burer, Renato D. C. Monteiro, 2003.
        https://doi.org/10.1007/s10107-002-0352-8

    Example:
        >>> import torch, tether
        >>> layer = tether.psd_low_rank(torch.nn.Linear(5, 5), rank=2)
        >>> tuple(layer.parametrizations.weight.original.shape)
        (5, 2)
        >>> int(torch.linalg.matrix_rank(layer.weight))
        2
    """

    _function = "psd_low_rank"

    def forward(self, X: Tensor) -> Tensor:
        return gram(X)

    @torch.no_grad()
    def right_inverse(self, X: Tensor) -> Tensor:
        self.check_shape(X.shape, "the assigned value")
        # Note [Right inverses in double precision].
        return _in_double(lambda A: gram_factor(A, self.rank), X)


class PSDFixedRank(_PSDOfRank):
    """Positive semidefinite matrices of rank exactly ``rank``.

    The set is ``{X : X = Xᴴ, λ_min(X) >= 0, rank X = r}`` of shape ``(*, n, n)``, reached as
    ``Q diag(softplus(s)) Qᴴ`` with ``Q`` the orthonormalized columns
    (:func:`tether.functional.orthonormalize`) of a factor ``B``: ``r`` eigenvalues that
    never reach zero. The original packs both factors in one tensor of shape
    ``(*, n + 1, r)``: rows ``0..n-1`` are ``B`` and the last row is ``s`` (for complex
    weights its imaginary part is unused). ``right_inverse`` puts the ``r`` leading
    eigenvectors in ``B`` and the inverse softplus of their eigenvalues in ``s``, so a member
    is set exactly. Any other matrix is projected like :class:`PSDLowRank` does, with the
    ``r`` kept eigenvalues raised to the floor of :class:`PositiveDefinite`
    (``sqrt(eps) · max|λ|``). Create the optimizer after registering, as the original
    changes shape.

    Choose it over :class:`PSDLowRank` when a drop in rank would break the model (a
    whitening transform, a metric on a subspace); ``rank = n`` gives positive definite
    matrices with the softplus on a QR frame. ``distance`` is the Frobenius distance to the
    closure (rank at most ``r``), and :meth:`in_manifold` asks, on top, for numerical rank
    ``r``: ``r`` eigenvalues above ``n · eps · max|λ|``, the threshold of
    ``torch.linalg.matrix_rank``. geotorch's ``PSSDFixedRank`` is the same set with a
    softplus plus ``1e-6``, and asks for ``r`` eigenvalues ``>= 1e-6``.

    Args:
        rank: ``r``, with ``1 <= r <= n``.
        f: the map onto the eigenvalues, as geotorch's ``f``: only ``"softplus"`` (geotorch's
            default, here without its ``+ 1e-6``) is offered.
        size: the shape it will constrain, optional (see :class:`Constraint`).

    Raises:
        TypeError: ``rank`` is not an int.
        ValueError: ``rank < 1``, ``f`` is not ``"softplus"``, or the tensor is not square
            with ``n >= rank``.

    References:
        Trivializations for Gradient-Based Optimization on Manifolds. Mario Lezcano-Casado,
        2019. https://arxiv.org/abs/1909.09501

    Example:
        >>> import torch, tether
        >>> layer = tether.psd_fixed_rank(torch.nn.Linear(5, 5), rank=2)
        >>> tuple(layer.parametrizations.weight.original.shape)
        (6, 2)
        >>> int(torch.linalg.matrix_rank(layer.weight))
        2
    """

    _function = "psd_fixed_rank"

    def __init__(
        self, rank: int, f: str = "softplus", *, size: Sequence[int] | None = None
    ) -> None:
        super().__init__(rank, size=size)
        self.f = _eigenvalue_map(f, f"{self._function}()")

    def forward(self, X: Tensor) -> Tensor:
        return fixed_rank_psd(X[..., :-1, :], X[..., -1, :].real)

    @torch.no_grad()
    def right_inverse(self, X: Tensor) -> Tensor:
        self.check_shape(X.shape, "the assigned value")
        # Note [Right inverses in double precision].
        return _in_double(self._factors, X)

    def _factors(self, X: Tensor) -> Tensor:
        """``B`` and ``s`` of the eigendecomposition, packed as the original (see above)."""
        Q, s = fixed_rank_psd_factors(X, self.rank)
        return torch.cat([Q, s.unsqueeze(-2).to(Q.dtype)], dim=-2)

    def in_manifold(self, X: Tensor, atol: float | None = None) -> bool:
        """``distance(X) <= atol`` and ``rank`` eigenvalues above ``n · eps · max|λ|``."""
        return super().in_manifold(X, atol) and _has_positive_eigenvalues(X, self.rank)


def positive_definite(
    module: M,
    name: str = "weight",
    f: str | None = None,
    *,
    map: PositiveDefiniteMap | None = None,
) -> M:
    """Constrain ``module.<name>`` to positive definite matrices: see :class:`PositiveDefinite`.

    ``f`` may be passed by position, as in geotorch's
    ``positive_definite(module, "weight", "softplus")``.

    Args:
        module: the module holding the tensor.
        name: the tensor to constrain, a square matrix or a batch of them ``(*, n, n)``.
        f: geotorch's name for the map: ``"softplus"`` is ``map="softplus"``.
        map: ``"matrix_exp"`` (default) or ``"softplus"`` on the eigenvalues.

    Example:
        >>> import torch, tether
        >>> layer = tether.positive_definite(torch.nn.Linear(3, 3))
        >>> bool(torch.linalg.eigvalsh(layer.weight).min() > 0)
        True
    """
    return register_constraint(module, name, PositiveDefinite(map, f=f))


def positive_semidefinite(module: M, name: str = "weight") -> M:
    """Constrain ``module.<name>`` to PSD matrices: see :class:`PositiveSemidefinite`.

    Args:
        module: the module holding the tensor.
        name: the tensor to constrain, a square matrix or a batch of them ``(*, n, n)``.
    """
    return register_constraint(module, name, PositiveSemidefinite())


def psd_low_rank(module: M, name: str = "weight", rank: int | None = None) -> M:
    """Constrain ``module.<name>`` to PSD matrices of rank ``<= rank``: see :class:`PSDLowRank`.

    ``rank`` is required; it may be passed by position, as in geotorch's
    ``positive_semidefinite_low_rank(module, "weight", 2)``.

    Args:
        module: the module holding the tensor.
        name: the tensor to constrain, a square matrix or a batch of them.
        rank: the largest rank allowed, ``1 <= rank <= n``.

    Returns:
        ``module``.
    """
    return register_constraint(module, name, PSDLowRank(required_rank(rank, "psd_low_rank")))


def psd_fixed_rank(
    module: M, name: str = "weight", rank: int | None = None, f: str = "softplus"
) -> M:
    """Constrain ``module.<name>`` to PSD matrices of rank ``rank``: see :class:`PSDFixedRank`.

    ``rank`` is required; it and ``f`` may be passed by position, as in geotorch's
    ``positive_semidefinite_fixed_rank(module, "weight", 2, "softplus")``.

    Args:
        module: the module holding the tensor.
        name: the tensor to constrain, a square matrix or a batch of them.
        rank: the rank, ``1 <= rank <= n``.
        f: the map onto the eigenvalues: ``"softplus"``, the only one offered (geotorch's
            default).

    Returns:
        ``module``.

    Raises:
        TypeError: ``rank`` is missing or not an int.
        ValueError: ``rank < 1``, ``f`` is not ``"softplus"``, or the tensor is not square
            with ``n >= rank``.

    Example:
        >>> import torch, tether
        >>> layer = tether.psd_fixed_rank(torch.nn.Linear(4, 4), "weight", 2, "softplus")
        >>> int(torch.linalg.matrix_rank(layer.weight))
        2
    """
    constraint = PSDFixedRank(required_rank(rank, "psd_fixed_rank"), f)
    return register_constraint(module, name, constraint)

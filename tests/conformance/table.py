"""The conformance table: every public helper of tether, the shapes and dtypes it admits, and
the combinations that cannot work, each with the clear error it must raise.

The test modules of this directory parametrize over :data:`ROWS` through :func:`cases` and
:func:`refusals`, one module per promise of the README and the docs (serialization,
``state_dict`` with PyTorch, plain checkpoints, chains, caches, assignment, dtypes,
integrations). So a row added here gets every check, and a combination listed in a row's
``refuses`` is asserted to raise its error instead; ``docs/conformance.md`` lists the same
matrix, and ``test_table.py`` checks that it does.

A row is a picklable description: its registering function is a module-level function or a
``functools.partial`` of one, called as ``register(module, name)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import pytest
import torch
import torch.nn.utils.parametrizations as torch_parametrizations
import torch.nn.utils.prune as torch_prune
from torch import nn

import tether
from tests.parametrizations import Negated

Register = Callable[[nn.Module, str], object]

# --- shapes and dtypes ------------------------------------------------------------------------

# The device :meth:`Shape.make` builds layers on: pytest's ``--device`` option, which
# ``conftest.py`` of this directory sets here. ``None`` (no option) leaves it to torch: the CPU.
DEVICE: torch.device | None = None


@dataclass(frozen=True)
class Shape:
    """A class of tensor shapes, as the weight of a small layer.

    Attributes:
        factory: builds the layer; takes ``dtype=`` and ``device=``.
        input: the shape of an input batch for the layer.
        matrix: the weight is a matrix or a batch of matrices.
    """

    factory: Callable[..., nn.Module]
    input: tuple[int, ...]
    matrix: bool = True

    def make(self, **kwargs: Any) -> nn.Module:
        """The layer (``kwargs`` go to the factory), on :data:`DEVICE` unless the caller builds
        on a device of its own (``with torch.device("meta")``)."""
        if DEVICE is not None and torch.get_default_device().type == "cpu":
            kwargs.setdefault("device", DEVICE)
        return self.factory(**kwargs)


SHAPES: Mapping[str, Shape] = MappingProxyType(
    {
        "square": Shape(functools.partial(nn.Linear, 4, 4), (2, 4)),
        "tall": Shape(functools.partial(nn.Linear, 3, 5), (2, 3)),  # weight (5, 3)
        "wide": Shape(functools.partial(nn.Linear, 5, 3), (2, 5)),  # weight (3, 5)
        # A batch of 2 x 2 square 3 x 3 matrices: the conv-kernel and batched shape class.
        "conv": Shape(functools.partial(nn.Conv2d, 2, 2, 3), (2, 2, 4, 4)),
        "vector": Shape(functools.partial(nn.LayerNorm, 4), (2, 4), matrix=False),
    }
)

DTYPE_NAMES: Mapping[torch.dtype, str] = MappingProxyType(
    {
        torch.float32: "float32",
        torch.float64: "float64",
        torch.bfloat16: "bfloat16",
        torch.float16: "float16",
        torch.complex64: "complex64",
    }
)
REAL = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
REAL_AND_COMPLEX = (*REAL, torch.complex64)
LOW_PRECISION = (torch.bfloat16, torch.float16)

MATRICES = ("square", "tall", "wide", "conv")
SQUARE = ("square", "conv")
ANY_SHAPE = (*MATRICES, "vector")

# --- features a row may refuse ------------------------------------------------------------------

ASSIGN = "assign a member"  # layer.weight = X, through right_inverse
PLAIN_CHECKPOINT = "load a plain checkpoint"  # a plain `weight` key, through right_inverse
META_INIT = "meta device, to_empty, reset_parameters()"
APPEND = "append to a chain"  # registered after another parametrization
REMOVE_UNPARAMETRIZED = "remove with leave_parametrized=False"
TO_TORCH = "state_dict into PyTorch's"
FROM_TORCH = "state_dict from PyTorch's"
FEATURES = (
    ASSIGN,
    PLAIN_CHECKPOINT,
    META_INIT,
    APPEND,
    REMOVE_UNPARAMETRIZED,
    TO_TORCH,
    FROM_TORCH,
)


@dataclass(frozen=True)
class Refusal:
    """A combination that cannot work, and the clear error it must raise instead.

    Attributes:
        error: the exception type (the one PyTorch raises in the same situation).
        match: a regular expression the message must match (searched, dot matches newline).
        reason: why it cannot work, as ``docs/conformance.md`` says.
    """

    error: type[Exception]
    match: str
    reason: str

    def raises(self) -> Any:
        """``pytest.raises`` for this refusal."""
        return pytest.raises(self.error, match=f"(?s){self.match}")


_NO_RIGHT_INVERSE = "the map has no right inverse without a base point"
_NO_INVERSE = {
    ASSIGN: Refusal(
        NotImplementedError, r"no right inverse.*use_trivialization", _NO_RIGHT_INVERSE
    ),
    PLAIN_CHECKPOINT: Refusal(
        RuntimeError, r"weight' through right_inverse.*no right inverse", _NO_RIGHT_INVERSE
    ),
    META_INIT: Refusal(
        NotImplementedError,
        r"reset_parameters\(\) of \w+\.weight.*no right inverse",
        _NO_RIGHT_INVERSE,
    ),
}
_FIRST_ONLY = "it has several originals, so it must be the first parametrization of a chain"
_SEVERAL_ORIGINALS = {
    APPEND: Refusal(ValueError, r"\w+\.weight.*several originals.*first", _FIRST_ONLY),
    REMOVE_UNPARAMETRIZED: Refusal(
        ValueError,
        r"\w+\.weight.*leave_parametrized=False.*leave_parametrized=True",
        "there is no single original to leave",
    ),
}
_FACTOR_SHAPED = {
    APPEND: Refusal(
        ValueError,
        r"\w+\.weight.*first",
        "its original has the shape of a factor, not of the weight, so it must be the first "
        "parametrization of a chain",
    ),
}

# --- registering functions ----------------------------------------------------------------------


def negated_then_orthogonal(module: nn.Module, name: str) -> nn.Module:
    """A user's parametrization, then ``tether.orthogonal`` appended to its chain."""
    tether.register_parametrization(module, name, Negated())
    return tether.orthogonal(module, name)


def orthogonal_then_negated(module: nn.Module, name: str) -> nn.Module:
    """``tether.orthogonal``, then a user's parametrization appended to its chain."""
    tether.orthogonal(module, name)
    return tether.register_parametrization(module, name, Negated())


def spectral_norm_then_orthogonal(module: nn.Module, name: str) -> nn.Module:
    """Two helpers on one tensor: ``spectral_norm``, then ``orthogonal`` (issue 12, case 3)."""
    tether.spectral_norm(module, name)
    return tether.orthogonal(module, name)


# --- the rows -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One public helper with its options.

    Attributes:
        name: the id in test names, e.g. ``orthogonal-cayley``.
        register: registers the helper on ``module.<name>``: ``register(module, name)``.
        shapes: the shape classes it admits (keys of :data:`SHAPES`); the first is the one
            used by the checks that run on one shape per row.
        dtypes: the dtypes it admits; complex only on matrix shapes.
        originals: how many originals the chain has (checked against the registered module).
        torch_twin: PyTorch's registering function for the same parametrization, whose
            ``state_dict`` must load both ways.
        refuses: the features it cannot offer, each with the error it must raise.
        integers: it applies to integer tensors too (pruning); otherwise registering it on
            an integer tensor is a ``TypeError``.
        representative: one of the rows ``torch.compile`` and ``torch.export`` are checked
            on (a subset, to keep the suite's time bounded).
        estimate: the weight depends on an iterative estimate (spectral norm's power method),
            which training-mode reads advance: models are settled before use, and the weight
            is checked to ``eps ** 0.25`` instead of ``sqrt(eps)``.
        real_original: the original that is real for a complex tensor (weight norm's
            magnitude ``original0``, as in PyTorch), of the complex dtype's real counterpart.
    """

    name: str
    register: Register
    shapes: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] = REAL
    originals: int = 1
    torch_twin: Register | None = None
    refuses: Mapping[str, Refusal] = field(default_factory=dict)
    integers: bool = False
    representative: bool = False
    estimate: bool = False
    real_original: str | None = None


def _orthogonal_rows() -> list[Row]:
    rows = [
        Row(
            "orthogonal",
            tether.orthogonal,
            MATRICES,
            REAL_AND_COMPLEX,
            torch_twin=torch_parametrizations.orthogonal,
            representative=True,
        )
    ]
    maps: tuple[Literal["matrix_exp", "cayley", "householder"], ...] = (
        "matrix_exp",
        "cayley",
        "householder",
    )
    for orthogonal_map in maps:
        complex_ok = orthogonal_map != "householder"
        for trivialization in (True, False):
            suffix = "" if trivialization else "-untrivialized"
            rows.append(
                Row(
                    f"orthogonal-{orthogonal_map}{suffix}",
                    functools.partial(
                        tether.orthogonal,
                        orthogonal_map=orthogonal_map,
                        use_trivialization=trivialization,
                    ),
                    MATRICES,
                    REAL_AND_COMPLEX if complex_ok else REAL,
                    torch_twin=functools.partial(
                        torch_parametrizations.orthogonal,
                        orthogonal_map=orthogonal_map,
                        use_trivialization=trivialization,
                    ),
                    refuses=_NO_INVERSE if not trivialization and complex_ok else {},
                    representative=orthogonal_map == "householder" and trivialization,
                )
            )
    return rows


ROWS: tuple[Row, ...] = (
    *_orthogonal_rows(),
    Row("special_orthogonal", tether.special_orthogonal, SQUARE),
    Row(
        "special_orthogonal-cayley",
        functools.partial(tether.special_orthogonal, orthogonal_map="cayley"),
        SQUARE,
    ),
    # Square matrices are a single point of the Grassmannian, which training cannot move.
    Row("grassmannian", tether.grassmannian, ("tall", "wide")),
    Row("symmetric", tether.symmetric, SQUARE, REAL_AND_COMPLEX),
    Row("skew", tether.skew, SQUARE, REAL_AND_COMPLEX),
    Row(
        "positive_definite",
        tether.positive_definite,
        SQUARE,
        REAL_AND_COMPLEX,
        representative=True,
    ),
    Row(
        "positive_definite-softplus",
        functools.partial(tether.positive_definite, map="softplus"),
        SQUARE,
        REAL_AND_COMPLEX,
    ),
    Row("positive_semidefinite", tether.positive_semidefinite, SQUARE, REAL_AND_COMPLEX),
    Row(
        "psd_low_rank",
        functools.partial(tether.psd_low_rank, rank=2),
        SQUARE,
        REAL_AND_COMPLEX,
        refuses=_FACTOR_SHAPED,
    ),
    Row(
        "psd_fixed_rank",
        functools.partial(tether.psd_fixed_rank, rank=2),
        SQUARE,
        REAL_AND_COMPLEX,
        refuses=_FACTOR_SHAPED,
    ),
    Row(
        "low_rank",
        functools.partial(tether.low_rank, rank=2),
        MATRICES,
        originals=3,
        refuses=_SEVERAL_ORIGINALS,
        representative=True,
    ),
    Row(
        "fixed_rank",
        functools.partial(tether.fixed_rank, rank=2),
        MATRICES,
        originals=3,
        refuses=_SEVERAL_ORIGINALS,
    ),
    Row("invertible", tether.invertible, SQUARE, originals=2, refuses=_SEVERAL_ORIGINALS),
    Row("special_linear", tether.special_linear, SQUARE, originals=2, refuses=_SEVERAL_ORIGINALS),
    Row(
        "almost_orthogonal",
        tether.almost_orthogonal,
        MATRICES,
        originals=3,
        refuses=_SEVERAL_ORIGINALS,
    ),
    Row("hurwitz", tether.hurwitz, SQUARE, originals=2, refuses=_SEVERAL_ORIGINALS),
    Row("sphere", tether.sphere, ANY_SHAPE, representative=True),
    Row("poincare_ball", tether.poincare_ball, ANY_SHAPE),
    Row("positive", tether.positive, ANY_SHAPE),
    Row("positive-exp", functools.partial(tether.positive, map="exp"), ANY_SHAPE),
    Row("bounded", functools.partial(tether.bounded, low=-0.5, high=0.5), ANY_SHAPE),
    Row("simplex", tether.simplex, ANY_SHAPE),
    Row(
        "weight_norm",
        tether.weight_norm,
        ANY_SHAPE,
        REAL_AND_COMPLEX,
        originals=2,
        real_original="original0",
        torch_twin=torch_parametrizations.weight_norm,
        refuses=_SEVERAL_ORIGINALS,
        representative=True,
    ),
    Row(
        "spectral_norm",
        tether.spectral_norm,
        ANY_SHAPE,
        REAL_AND_COMPLEX,
        torch_twin=torch_parametrizations.spectral_norm,
        representative=True,
        estimate=True,
    ),
    Row(
        "prune-l1_unstructured",
        functools.partial(tether.prune.l1_unstructured, amount=0.5),
        ANY_SHAPE,
        torch_twin=functools.partial(torch_prune.l1_unstructured, amount=0.5),
        refuses={
            TO_TORCH: Refusal(
                RuntimeError,
                r"weight_orig",
                "PyTorch's pruning keeps `weight_orig` and `weight_mask` on the module, with "
                "no hook to read tether's layout; load `tether.plain_state_dict` instead",
            ),
            META_INIT: Refusal(
                NotImplementedError,
                r"\w+\.weight.*meta",
                "the L1 mask is computed from the tensor's values, which a tensor on the meta "
                "device does not have: prune after `to_empty` and `reset_parameters()`",
            ),
        },
        integers=True,
        representative=True,
    ),
    Row(
        "chain-negated-then-orthogonal",
        negated_then_orthogonal,
        MATRICES,
        REAL_AND_COMPLEX,
        representative=True,
    ),
    Row("chain-orthogonal-then-negated", orthogonal_then_negated, MATRICES, REAL_AND_COMPLEX),
    Row(
        "chain-spectral_norm-then-orthogonal",
        spectral_norm_then_orthogonal,
        MATRICES,
        REAL_AND_COMPLEX,
        estimate=True,
    ),
)

# --- cases ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One row on one shape class in one dtype."""

    row: Row
    shape: str
    dtype: torch.dtype

    @property
    def id(self) -> str:
        return f"{self.row.name}/{self.shape}/{DTYPE_NAMES[self.dtype]}"


def _admitted(row: Row, shape: str, dtype: torch.dtype) -> bool:
    return dtype in row.dtypes and (SHAPES[shape].matrix or not dtype.is_complex)


def _all(
    dtypes: tuple[torch.dtype, ...] | None, first_shape: bool, where: Callable[[Row], bool]
) -> Iterator[Case]:
    for row in ROWS:
        if not where(row):
            continue
        for shape in row.shapes[:1] if first_shape else row.shapes:
            for dtype in row.dtypes if dtypes is None else dtypes:
                if _admitted(row, shape, dtype):
                    yield Case(row, shape, dtype)


def cases(
    *,
    dtypes: tuple[torch.dtype, ...] | None = (torch.float32,),
    first_shape: bool = False,
    supporting: tuple[str, ...] = (),
    where: Callable[[Row], bool] | None = None,
) -> list[Any]:
    """``pytest.param`` of every admitted case, with ids like ``orthogonal-cayley/tall/float32``.

    Args:
        dtypes: the dtypes to take, among those each row admits; ``None`` for all of them.
        first_shape: only the first shape class of each row.
        supporting: only rows that refuse none of these features.
        where: only rows for which this is true.
    """
    return [
        pytest.param(case, id=case.id)
        for case in _all(
            dtypes,
            first_shape,
            lambda row: (
                (where is None or where(row)) and not any(f in row.refuses for f in supporting)
            ),
        )
    ]


def refusals(feature: str, *, first_shape: bool = True) -> list[Any]:
    """``pytest.param`` of the float32 cases of the rows that refuse ``feature``."""
    return [
        pytest.param(case, id=case.id)
        for case in _all((torch.float32,), first_shape, lambda row: feature in row.refuses)
    ]

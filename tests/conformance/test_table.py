"""The table itself: every registering function of tether has a row, the rows are well
formed, and ``docs/conformance.md`` lists every row and every refusal."""

from __future__ import annotations

import functools
import inspect
import pickle
import re
from pathlib import Path

import pytest

import tether
from tests.conformance.table import FEATURES, ROWS, SHAPES, Row, cases

PAGE = Path(__file__).resolve().parents[2] / "docs" / "conformance.md"

# Public names of tether that register nothing: the mechanism, the caches, the exports and
# the namespaces (tether.prune is covered through its functions).
NOT_HELPERS = {
    "FunctionParametrization",
    "ParametrizationList",
    "autocache",
    "cached",
    "chains",
    "constraints",
    "functional",
    "is_parametrized",
    "parametrizations",  # PyTorch's spellings of orthogonal, weight_norm, spectral_norm
    "plain_state_dict",
    "prune",
    "register_parametrization",
    "remove_parametrizations",
    "testing",
    "transfer_parametrizations_and_params",
    "type_before_parametrizations",
    "update_base",
}


def called(row: Row) -> set[str]:
    """The names of tether's registering functions a row's ``register`` calls."""
    register = row.register
    function = register.func if isinstance(register, functools.partial) else register
    if function.__module__.startswith("tether"):
        return {function.__name__}
    source = inspect.getsource(function)
    return set(re.findall(r"tether\.(\w+)\(", source))


def test_every_registering_function_of_tether_has_a_row():
    helpers = set(tether.__all__) - NOT_HELPERS
    covered = set().union(*(called(row) for row in ROWS))
    assert helpers - covered == set()
    assert "l1_unstructured" in covered  # pruning, through tether.prune


def test_row_names_are_unique():
    names = [row.name for row in ROWS]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_a_row_is_well_formed_and_pickles(row: Row):
    assert row.shapes
    assert set(row.shapes) <= set(SHAPES)
    assert set(row.refuses) <= set(FEATURES)
    assert pickle.loads(pickle.dumps(row)).name == row.name  # no lambdas in the table


def test_case_ids_name_row_shape_and_dtype():
    ids = [param.id for param in cases(dtypes=None)]
    assert "orthogonal-cayley/tall/float32" in ids
    assert len(ids) == len(set(ids))


def test_the_docs_list_every_row_and_refusal():
    page = PAGE.read_text()
    for row in ROWS:
        assert f"`{row.name}`" in page, row.name
        for feature, refusal in row.refuses.items():
            assert feature in page, feature
            assert " ".join(refusal.reason.split()) in " ".join(page.split()), refusal.reason

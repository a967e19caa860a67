"""Tests for the mask computations (``tether.prune._methods``), against torch's methods."""

from __future__ import annotations

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from hypothesis import given
from hypothesis import strategies as st

from tether.prune._base import merge
from tether.prune._methods import (
    CustomFromMask,
    Identity,
    L1Unstructured,
    LnStructured,
    RandomStructured,
    RandomUnstructured,
    check_amount,
)

DTYPES = [torch.float32, torch.float64]


def tied(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Small integers: many entries (and channel norms) are equal, so ties decide the masks."""
    return torch.randint(-2, 3, shape, generator=generator).double()


def pair(method: str, *args: object) -> tuple[object, object]:
    """tether's method and torch's, built with the same arguments."""
    return globals()[method](*args), getattr(torch_prune, method)(*args)


# --- check_amount ----------------------------------------------------------------------------


@pytest.mark.parametrize("amount", [0, 3, 0.0, 0.25, 1.0, 1, True])
def test_check_amount_accepts_what_torch_accepts(amount):
    check_amount(amount)
    torch_prune.L1Unstructured(amount)


@pytest.mark.parametrize(
    ("amount", "error", "words"),
    [
        (-1, ValueError, "negative"),
        (1.5, ValueError, "[0, 1]"),
        (-0.1, ValueError, "[0, 1]"),
        ("0.3", TypeError, "a str"),
        (None, TypeError, "None"),
    ],
)
def test_check_amount_rejects_what_torch_rejects_with_the_same_type(amount, error, words):
    with pytest.raises(error) as ours:
        check_amount(amount)
    assert words in str(ours.value)
    assert "amount" in str(ours.value)
    with pytest.raises(error):
        torch_prune.L1Unstructured(amount)


# --- the methods, one call on a fresh mask -----------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("amount", [0, 1, 7, 0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("method", ["L1Unstructured", "RandomUnstructured"])
def test_unstructured_masks_equal_torchs(method, amount, dtype):
    t = tied((3, 5), torch.Generator().manual_seed(1)).to(dtype)
    ours, theirs = pair(method, amount)
    torch.manual_seed(2)
    expected = theirs.compute_mask(t, torch.ones_like(t))
    torch.manual_seed(2)
    got = ours.compute_mask(t, torch.ones_like(t))
    assert torch.equal(got, expected)
    assert got.dtype == dtype


@pytest.mark.parametrize("dim", [0, 1, 2, 3, -1, -3])
@pytest.mark.parametrize("amount", [0, 2, 0.5, 1.0])
def test_random_structured_masks_equal_torchs(amount, dim):
    t = torch.randn(4, 3, 2, 5)
    ours, theirs = pair("RandomStructured", amount, dim)
    torch.manual_seed(3)
    expected = theirs.compute_mask(t, torch.ones_like(t))
    torch.manual_seed(3)
    assert torch.equal(ours.compute_mask(t, torch.ones_like(t)), expected)


@pytest.mark.parametrize("n", [1, 2, 3.5, float("inf"), float("-inf"), "fro"])
@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("amount", [0, 1, 0.5])
def test_ln_structured_masks_equal_torchs_ties_included(amount, dim, n):
    t = tied((4, 3, 4), torch.Generator().manual_seed(4))
    ours, theirs = pair("LnStructured", amount, n, dim)
    expected = theirs.compute_mask(t, torch.ones_like(t))
    assert torch.equal(ours.compute_mask(t, torch.ones_like(t)), expected)


def test_nuc_norm_works_where_torch_norm_allows_it():
    t = torch.randn(5, 3, 4)
    ours, theirs = pair("LnStructured", 2, "nuc", 0)
    expected = theirs.compute_mask(t, torch.ones_like(t))
    assert torch.equal(ours.compute_mask(t, torch.ones_like(t)), expected)


def test_structured_methods_respect_the_default_mask():
    t = torch.randn(4, 6)
    default = (torch.rand(4, 6) > 0.3).double()
    for ours, theirs in [pair("LnStructured", 2, 1, 1), pair("RandomStructured", 2, 0)]:
        torch.manual_seed(5)
        expected = theirs.compute_mask(t, default)
        torch.manual_seed(5)
        assert torch.equal(ours.compute_mask(t, default), expected)


def test_identity_and_custom_from_mask_equal_torchs():
    t = torch.randn(3, 4)
    default = (torch.rand(3, 4) > 0.5).float()
    custom = torch.rand(3, 4) > 0.5
    assert torch.equal(Identity().compute_mask(t, default), default)
    expected = torch_prune.CustomFromMask(custom).compute_mask(t, default)
    assert torch.equal(CustomFromMask(custom).compute_mask(t, default), expected)


def test_random_unstructured_draws_as_much_as_torch():
    t = torch.randn(6, 7)
    ours, theirs = pair("RandomUnstructured", 0.4)
    torch.manual_seed(6)
    theirs.compute_mask(t, torch.ones_like(t))
    after_theirs = torch.rand(3)
    torch.manual_seed(6)
    ours.compute_mask(t, torch.ones_like(t))
    assert torch.equal(torch.rand(3), after_theirs)


def test_nothing_to_prune_draws_nothing():
    t = torch.randn(6, 7)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    RandomUnstructured(0).compute_mask(t, torch.ones_like(t))
    RandomStructured(0.0, 0).compute_mask(t, torch.ones_like(t))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    ("method", "t", "error", "words"),
    [
        (L1Unstructured(13), torch.randn(3, 4), ValueError, ["12 still unpruned", "at most 12"]),
        (RandomStructured(4, 0), torch.randn(3, 4), ValueError, ["channels", "3 still"]),
        (LnStructured(1, 2, 0), torch.randn(5), ValueError, ["2 or more", "(5,)"]),
        (RandomStructured(1, 2), torch.randn(3, 4), IndexError, ["dim=2", "[-2, 1]"]),
        (LnStructured(1, 2, -3), torch.randn(3, 4), IndexError, ["dim=-3"]),
    ],
)
def test_methods_reject_bad_inputs_as_torch_does(method, t, error, words):
    with pytest.raises(error) as ours:
        method.compute_mask(t, torch.ones_like(t))
    assert all(word in str(ours.value) for word in words)
    theirs = getattr(torch_prune, type(method).__name__)
    args = {"amount": method.amount}
    if hasattr(method, "n"):
        args["n"] = method.n
    if hasattr(method, "dim"):
        args["dim"] = method.dim
    with pytest.raises(error):
        theirs(**args).compute_mask(t, torch.ones_like(t))


def test_ln_structured_rejects_a_norm_order_that_is_not_one():
    with pytest.raises(TypeError, match="order of the norm"):
        LnStructured(1, [2], 0)


def test_custom_from_mask_rejects_a_mask_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"expected shape: \(3, 4\)"):
        CustomFromMask(torch.ones(4, 3)).compute_mask(torch.randn(3, 4), torch.ones(3, 4))
    with pytest.raises(TypeError, match="tensor of zeros and ones"):
        CustomFromMask([1, 0])


# --- merge: pruning on top of a mask, as torch's PruningContainer ------------------------------


def torch_merge(method: object, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    container = torch_prune.PruningContainer()
    container._tensor_name = method._tensor_name = "t"
    container.add_pruning_method(method)
    return container.compute_mask(t, mask.clone())


MERGE_CASES = [
    ("L1Unstructured", 0.5),
    ("L1Unstructured", 3),
    ("RandomUnstructured", 0.3),
    ("RandomStructured", 0.5, 1),
    ("RandomStructured", 1, -1),
    ("LnStructured", 0.5, 2, 0),
    ("LnStructured", 1, 1, 2),
    ("Identity",),
]


@pytest.mark.parametrize("case", MERGE_CASES, ids=str)
def test_merge_equals_torchs_pruning_container(case):
    generator = torch.Generator().manual_seed(8)
    t = tied((4, 5, 3), generator)
    mask = (torch.rand(4, 5, 3, generator=generator) > 0.4).double()
    mask[:, 2] = 0  # a whole channel along dim 1 already pruned
    t = t * mask
    ours, theirs = pair(*case)
    torch.manual_seed(9)
    expected = torch_merge(theirs, t, mask)
    torch.manual_seed(9)
    assert torch.equal(merge(ours, t, mask), expected)


def test_merge_of_custom_masks_multiplies():
    t = torch.randn(3, 4)
    first, second = (torch.rand(3, 4) > 0.5).float(), (torch.rand(3, 4) > 0.5).float()
    got = merge(CustomFromMask(second), t, first)
    assert torch.equal(got, first * second)
    assert torch.equal(got, torch_merge(torch_prune.CustomFromMask(second), t, first))


def test_merge_accepts_torchs_methods():
    t = torch.randn(5, 4)
    mask = (torch.rand(5, 4) > 0.5).float()
    expected = merge(L1Unstructured(0.5), t, mask)
    assert torch.equal(merge(torch_prune.L1Unstructured(0.5), t, mask), expected)


def test_merge_does_not_modify_the_mask_it_is_given():
    mask = torch.ones(3, 4)
    merge(L1Unstructured(0.5), torch.randn(3, 4), mask)
    assert torch.equal(mask, torch.ones(3, 4))


def test_merge_rejects_unknown_pruning_types():
    class Odd:
        PRUNING_TYPE = "sideways"

        def compute_mask(self, t, default_mask):
            return default_mask

    with pytest.raises(ValueError, match="'unstructured', 'structured' or 'global'"):
        merge(Odd(), torch.randn(2, 2), torch.ones(2, 2))

    class Structured(Odd):
        PRUNING_TYPE = "structured"

    with pytest.raises(AttributeError, match="`dim`"):
        merge(Structured(), torch.randn(2, 2), torch.ones(2, 2))


@st.composite
def rounds(draw):
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=2, max_size=4)))
    cases = []
    for _ in range(draw(st.integers(1, 3))):
        dim = draw(st.integers(-len(shape), len(shape) - 1))
        kind = draw(st.sampled_from(["L1Unstructured", "RandomUnstructured", "Ln", "Random"]))
        amount = draw(st.one_of(st.integers(0, 1), st.floats(0.0, 1.0)))
        if kind == "Ln":
            cases.append(("LnStructured", amount, draw(st.sampled_from([1, 2, -1])), dim))
        elif kind == "Random":
            cases.append(("RandomStructured", amount, dim))
        else:
            cases.append((kind, amount))
    return shape, cases


@given(rounds(), st.sampled_from(DTYPES), st.integers(0, 2**16))
def test_repeated_merges_equal_torchs_for_any_shape_amount_and_seed(drawn, dtype, seed):
    shape, cases = drawn
    t = tied(shape, torch.Generator().manual_seed(seed)).to(dtype)
    ours_mask = theirs_mask = torch.ones_like(t)
    for i, case in enumerate(cases):
        ours, theirs = pair(*case)
        torch.manual_seed(seed + i)
        try:
            theirs_mask = torch_merge(theirs, t * theirs_mask, theirs_mask)
        except ValueError:  # an int amount above what is left: ours must refuse too
            with pytest.raises(ValueError):
                merge(ours, t * ours_mask, ours_mask)
            return
        torch.manual_seed(seed + i)
        ours_mask = merge(ours, t * ours_mask, ours_mask)
        assert torch.equal(ours_mask, theirs_mask)
        assert ours_mask.dtype == dtype
        assert bool(((ours_mask == 0) | (ours_mask == 1)).all())

"""Tests for the method classes (``tether.prune._base``): torch's API, torch's masks."""

from __future__ import annotations

import copy
import pickle
from unittest import mock

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

import tether
from tether import prune
from tether.prune._base import merge

CLASSES = [
    "BasePruningMethod",
    "CustomFromMask",
    "Identity",
    "L1Unstructured",
    "LnStructured",
    "PruningContainer",
    "RandomStructured",
    "RandomUnstructured",
]

# (class name, positional args, keyword args) for Cls.apply(module, "weight", *args, **kwargs),
# on a Conv2d weight of shape (4, 3, 3, 3).
METHODS = [
    ("Identity", (), {}),
    ("RandomUnstructured", (0.4,), {}),
    ("L1Unstructured", (), {"amount": 7}),
    ("RandomStructured", (0.5,), {"dim": 1}),
    ("LnStructured", (2,), {"n": 1, "dim": 0}),
    ("LnStructured", (), {"amount": 0.5, "n": float("inf"), "dim": -1}),
]


def mask_for_conv(seed: int) -> torch.Tensor:
    return (torch.rand(4, 3, 3, 3, generator=torch.Generator().manual_seed(seed)) > 0.3).float()


def custom_args(name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return ((mask_for_conv(1),), {}) if name == "CustomFromMask" else (args, kwargs)


def twins() -> tuple[nn.Module, nn.Module]:
    theirs = nn.Conv2d(3, 4, 3)
    return theirs, copy.deepcopy(theirs)


def apply_both(theirs, ours, name, args, kwargs, seed=0, **extra):
    torch.manual_seed(seed)
    got_theirs = getattr(torch_prune, name).apply(theirs, "weight", *args, **kwargs, **extra)
    torch.manual_seed(seed)
    got_ours = getattr(prune, name).apply(ours, "weight", *args, **kwargs, **extra)
    return got_theirs, got_ours


class EveryOther(prune.BasePruningMethod):
    """PyTorch tutorial's example method: prunes every other unpruned entry."""

    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t, default_mask):
        mask = default_mask.clone()
        mask.view(-1)[::2] = 0
        return mask


class TorchEveryOther(torch_prune.BasePruningMethod):
    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t, default_mask):
        mask = default_mask.clone()
        mask.view(-1)[::2] = 0
        return mask


class Threshold(prune.BasePruningMethod):
    """A method with an argument and a bool mask, as users often write them."""

    PRUNING_TYPE = "unstructured"

    def __init__(self, threshold):
        self.threshold = threshold

    def compute_mask(self, t, default_mask):
        return t.abs() > self.threshold


# --- the public surface ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", CLASSES)
def test_every_method_class_of_torch_is_exported(name):
    assert name in prune.__all__
    assert issubclass(getattr(prune, name), prune.BasePruningMethod)


@pytest.mark.parametrize("name", [n for n in CLASSES if n != "BasePruningMethod"])
def test_pruning_type_is_torchs(name):
    theirs = getattr(getattr(torch_prune, name), "PRUNING_TYPE", None)
    assert getattr(getattr(prune, name), "PRUNING_TYPE", None) == theirs


def test_base_class_is_abstract():
    with pytest.raises(TypeError):
        prune.BasePruningMethod()  # type: ignore[abstract]


# --- apply ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "args", "kwargs"), [*METHODS, ("CustomFromMask", (), {})])
@pytest.mark.parametrize("seed", [0, 1])
def test_apply_gives_torchs_mask_and_values(name, args, kwargs, seed):
    theirs, ours = twins()
    args, kwargs = custom_args(name, args, kwargs)
    apply_both(theirs, ours, name, args, kwargs, seed)
    assert torch.equal(ours.weight_mask, theirs.weight_mask)
    assert torch.equal(ours.weight, theirs.weight)


@pytest.mark.parametrize(("first", "first_args", "first_kwargs"), METHODS)
@pytest.mark.parametrize(("second", "second_args", "second_kwargs"), METHODS)
def test_applying_twice_combines_masks_as_torchs_container(
    first, first_args, first_kwargs, second, second_args, second_kwargs
):
    theirs, ours = twins()
    apply_both(theirs, ours, first, first_args, first_kwargs, seed=0)
    got_theirs, got_ours = apply_both(theirs, ours, second, second_args, second_kwargs, seed=1)
    assert torch.equal(ours.weight_mask, theirs.weight_mask)
    assert [type(m).__name__ for m in got_ours] == [type(m).__name__ for m in got_theirs]


@pytest.mark.parametrize(("name", "args", "kwargs"), [METHODS[2], METHODS[4]])
def test_apply_with_importance_scores_gives_torchs_mask(name, args, kwargs):
    theirs, ours = twins()
    scores = torch.randn(4, 3, 3, 3)
    apply_both(theirs, ours, name, args, kwargs, importance_scores=scores)
    assert torch.equal(ours.weight_mask, theirs.weight_mask)


def test_apply_returns_the_method_then_a_growing_container():
    layer = nn.Linear(4, 3)
    first = prune.L1Unstructured.apply(layer, "weight", 0.25)
    assert isinstance(first, prune.L1Unstructured)
    assert first._tensor_name == "weight"
    second = prune.RandomStructured.apply(layer, "weight", amount=1, dim=0)
    third = prune.Identity.apply(layer, "weight")
    assert third is second
    assert isinstance(second, prune.PruningContainer)
    assert [type(m) for m in second] == [
        prune.L1Unstructured,
        prune.RandomStructured,
        prune.Identity,
    ]
    assert second._tensor_name == "weight"
    assert layer.parametrizations.weight[0].method is second


def test_apply_keeps_tethers_state_dict_layout():
    layer = nn.Linear(4, 3)
    prune.LnStructured.apply(layer, "weight", amount=1, n=2, dim=0)
    assert list(layer.state_dict()) == [
        "bias",
        "parametrizations.weight.original",
        "parametrizations.weight.0.mask",
    ]


def test_the_functions_go_through_the_classes():
    layer = nn.Linear(5, 2)
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0, 1.0]])
    with mock.patch("tether.prune.RandomUnstructured.compute_mask", return_value=mask):
        prune.random_unstructured(layer, "weight", amount=0.9)
    assert torch.equal(layer.weight_mask, mask)


def test_apply_that_fails_leaves_the_module_unchanged():
    layer = nn.Linear(5, 2)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    with (
        mock.patch("tether.prune.L1Unstructured.compute_mask", side_effect=RuntimeError("boom")),
        pytest.raises(RuntimeError, match="boom"),
    ):
        prune.l1_unstructured(layer, "weight", amount=0.5)
    assert type(layer) is nn.Linear
    assert not prune.is_pruned(layer)
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in state.items())


def test_a_failed_second_pruning_keeps_mask_and_history():
    layer = nn.Linear(5, 2)
    method = prune.L1Unstructured.apply(layer, "weight", amount=3)
    mask = layer.weight_mask.clone()
    with pytest.raises(ValueError, match="amount=9"):
        prune.L1Unstructured.apply(layer, "weight", amount=9)
    assert torch.equal(layer.weight_mask, mask)
    assert layer.parametrizations.weight[0].method is method


# --- user-written methods (PyTorch's tutorial recipe) ---------------------------------------------


@pytest.mark.parametrize("name", ["weight", "bias"])
def test_tutorial_method_applies_as_torchs(name):
    theirs, ours = nn.Linear(5, 4), nn.Linear(5, 4)
    TorchEveryOther.apply(theirs, name)
    EveryOther.apply(ours, name)
    assert torch.equal(getattr(ours, f"{name}_mask"), getattr(theirs, f"{name}_mask"))


def test_tutorial_method_prunes_again_among_the_unpruned():
    theirs, ours = nn.Linear(5, 4), nn.Linear(5, 4)
    for method in (TorchEveryOther, TorchEveryOther):
        method.apply(theirs, "weight")
    for method in (EveryOther, EveryOther):
        method.apply(ours, "weight")
    assert torch.equal(ours.weight_mask, theirs.weight_mask)


@pytest.mark.parametrize("amount", [0.3, 5])
def test_global_unstructured_takes_a_user_subclass(amount):
    class Largest(prune.BasePruningMethod):
        PRUNING_TYPE = "unstructured"

        def __init__(self, amount):
            self.inner = prune.L1Unstructured(amount)

        def compute_mask(self, t, default_mask):
            return self.inner.compute_mask(t, default_mask)

    theirs = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    ours = copy.deepcopy(theirs)
    torch_prune.global_unstructured(
        [(theirs[0], "weight"), (theirs[1], "weight")], torch_prune.L1Unstructured, amount=amount
    )
    prune.global_unstructured([(ours[0], "weight"), (ours[1], "weight")], Largest, amount=amount)
    assert torch.equal(ours[0].weight_mask, theirs[0].weight_mask)
    assert torch.equal(ours[1].weight_mask, theirs[1].weight_mask)


def test_a_bool_mask_from_a_user_method_is_stored_in_the_tensors_dtype():
    layer = nn.Linear(6, 6)
    Threshold.apply(layer, "weight", threshold=0.2)
    assert layer.weight_mask.dtype == layer.weight.dtype
    assert torch.equal(layer.weight_mask.bool(), layer.parametrizations.weight.original.abs() > 0.2)


@pytest.mark.parametrize(
    ("returned", "error", "words"),
    [
        (torch.ones(3), ValueError, "wrong shape"),
        ([1.0, 0.0], TypeError, "a list"),
    ],
)
def test_a_bad_mask_from_a_user_method_names_method_module_and_fix(returned, error, words):
    class Broken(prune.BasePruningMethod):
        PRUNING_TYPE = "unstructured"

        def compute_mask(self, t, default_mask):
            return returned

    layer = nn.Linear(2, 2)
    with pytest.raises(error) as info:
        Broken.apply(layer, "weight")
    message = str(info.value)
    assert "Broken.apply() on Linear.weight" in message
    assert "Broken.compute_mask" in message
    assert words in message
    assert "shape of t" in message
    assert not prune.is_pruned(layer)


def test_a_structured_user_method_without_dim_says_so():
    class NoDim(prune.BasePruningMethod):
        PRUNING_TYPE = "structured"

        def compute_mask(self, t, default_mask):
            return default_mask

    layer = nn.Linear(3, 3)
    prune.l1_unstructured(layer, "weight", amount=1)
    with pytest.raises(AttributeError, match=r"NoDim.*`dim`"):
        NoDim.apply(layer, "weight")


# --- prune, apply_mask, remove --------------------------------------------------------------------


@pytest.mark.parametrize(("name", "args", "kwargs"), [*METHODS, ("CustomFromMask", (), {})])
@pytest.mark.parametrize("scores", [False, True])
def test_prune_equals_torchs(name, args, kwargs, scores):
    args, kwargs = custom_args(name, args, kwargs)
    t = torch.randn(4, 3, 3, 3)
    default = mask_for_conv(2)
    extra = {"importance_scores": torch.randn(4, 3, 3, 3)} if scores else {}
    torch.manual_seed(3)
    theirs = getattr(torch_prune, name)(*args, **kwargs).prune(t, default, **extra)
    torch.manual_seed(3)
    ours = getattr(prune, name)(*args, **kwargs).prune(t, default, **extra)
    assert torch.equal(ours, theirs)


def test_prune_without_default_mask_uses_ones():
    t = torch.tensor([3.0, -1.0, 0.5, 2.0])
    assert torch.equal(prune.L1Unstructured(2).prune(t), t * torch.tensor([1.0, 0.0, 0.0, 1.0]))


def test_prune_refuses_scores_of_another_shape():
    with pytest.raises(ValueError, match=r"L1Unstructured\.prune: importance_scores"):
        prune.L1Unstructured(1).prune(torch.ones(3), importance_scores=torch.ones(4))


def test_apply_mask_is_the_pruned_tensor():
    layer = nn.Linear(4, 3)
    method = prune.RandomUnstructured.apply(layer, "weight", 0.5)
    assert torch.equal(method.apply_mask(layer), layer.weight)


@pytest.mark.parametrize("applied", [False, True])
def test_apply_mask_of_a_method_not_pruning_the_module_raises(applied):
    method = prune.L1Unstructured(1)
    if applied:
        method = prune.L1Unstructured.apply(nn.Linear(2, 2), "weight", 1)
    with pytest.raises(ValueError, match=r"L1Unstructured.apply_mask\(Linear\).*apply\(module"):
        method.apply_mask(nn.Linear(2, 2))


def test_method_remove_makes_the_pruning_permanent():
    layer = nn.Linear(4, 3)
    weight = layer.weight
    method = prune.L1Unstructured.apply(layer, "weight", 6)
    pruned = layer.weight.detach().clone()
    method.remove(layer)
    assert type(layer) is nn.Linear
    assert layer.weight is weight
    assert torch.equal(layer.weight, pruned)


def test_remove_of_a_method_never_applied_says_how():
    with pytest.raises(ValueError, match=r"never applied.*prune.remove\(module, name\)"):
        prune.Identity().remove(nn.Linear(2, 2))


# --- PruningContainer -----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "args", "kwargs"), METHODS)
def test_container_compute_mask_equals_torchs(name, args, kwargs):
    t = torch.randn(4, 3, 3, 3)
    default = mask_for_conv(4)
    ours, theirs = prune.PruningContainer(), torch_prune.PruningContainer()
    ours._tensor_name = theirs._tensor_name = "w"
    for container, module in ((ours, prune), (theirs, torch_prune)):
        method = getattr(module, name)(*args, **kwargs)
        method._tensor_name = "w"
        container.add_pruning_method(method)
    torch.manual_seed(5)
    expected = theirs.compute_mask(t, default.clone())  # torch's writes into a float mask
    torch.manual_seed(5)
    assert torch.equal(ours.compute_mask(t, default), expected)


def test_container_leaves_the_default_mask_alone():
    method = prune.L1Unstructured(1)
    default = torch.tensor([1.0, 1.0, 0.0])
    prune.PruningContainer(method).compute_mask(torch.tensor([3.0, 1.0, 2.0]), default)
    assert torch.equal(default, torch.tensor([1.0, 1.0, 0.0]))


def test_container_takes_the_name_of_its_first_method():
    first, second = prune.L1Unstructured(1), prune.Identity()
    first._tensor_name = second._tensor_name = "weight"
    container = prune.PruningContainer(first, second)
    assert container._tensor_name == "weight"
    assert len(container) == 2
    assert container[1] is second


@pytest.mark.parametrize("item", [10, "ugh", torch_prune.L1Unstructured(1)])
def test_container_refuses_what_is_not_a_tether_method(item):
    with pytest.raises(TypeError, match="BasePruningMethod"):
        prune.PruningContainer().add_pruning_method(item)


def test_container_refuses_a_method_of_another_tensor():
    container = prune.PruningContainer()
    container._tensor_name = "weight"
    other = prune.L1Unstructured(1)
    other._tensor_name = "bias"
    with pytest.raises(ValueError, match=r"'weight'.*'bias'"):
        container.add_pruning_method(other)


def test_empty_container_cannot_compute_a_mask():
    with pytest.raises(IndexError, match=r"empty.*add_pruning_method"):
        prune.PruningContainer().compute_mask(torch.ones(2), torch.ones(2))


def test_merge_refuses_an_unknown_pruning_type():
    class Odd(prune.Identity):
        PRUNING_TYPE = "sideways"

    with pytest.raises(ValueError, match="Odd has PRUNING_TYPE='sideways'"):
        merge(Odd(), torch.ones(2, 2), torch.ones(2, 2))


# --- copies ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))])
def test_copies_keep_the_history_and_the_torch_names(copier):
    layer = nn.Linear(4, 3)
    prune.L1Unstructured.apply(layer, "weight", 3)
    prune.LnStructured.apply(layer, "weight", 1, n=2, dim=0)
    copied = copier(layer)
    history = copied.parametrizations.weight[0].method
    assert [type(m) for m in history] == [prune.L1Unstructured, prune.LnStructured]
    assert torch.equal(copied.weight_mask, layer.weight_mask)
    assert torch.equal(copied.weight, layer.weight)


def test_a_pruned_constraint_keeps_its_method():
    layer = tether.orthogonal(nn.Linear(4, 4))
    method = prune.L1Unstructured.apply(layer, "weight", 4)
    assert layer.parametrizations.weight[-1].method is method
    assert int((layer.weight == 0).sum()) == 4

"""Tests for the pruning functions, against ``torch.nn.utils.prune`` on the same inputs."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import tether
from tests.copies import ROUNDTRIPS
from tests.parametrizations import Double
from tether import prune
from tether.prune._base import merge

# --- helpers -----------------------------------------------------------------------------------


def conv() -> nn.Module:
    return nn.Conv2d(3, 4, 3)


def linear() -> nn.Module:
    return nn.Linear(6, 5)


def tied_linear() -> nn.Module:
    """A layer whose weights take few values: ties decide which entries go."""
    layer = nn.Linear(6, 5)
    with torch.no_grad():
        layer.weight.copy_(torch.randint(-2, 3, (5, 6)).float())
    return layer


def input_for(module: nn.Module) -> torch.Tensor:
    return torch.randn(2, 3, 5, 5) if isinstance(module, nn.Conv2d) else torch.randn(2, 6)


def twins(make: Callable[[], nn.Module]) -> tuple[nn.Module, nn.Module]:
    """Two identical modules: one for torch's pruning, one for tether's."""
    theirs = make()
    return theirs, copy.deepcopy(theirs)


def both(function: str, theirs: nn.Module, ours: nn.Module, seed: int, *args, **kwargs) -> None:
    """Apply the function of the same name from torch and tether, under the same seed."""
    torch.manual_seed(seed)
    getattr(torch_prune, function)(theirs, *args, **kwargs)
    torch.manual_seed(seed)
    getattr(prune, function)(ours, *args, **kwargs)


def mask_of(module: nn.Module, name: str = "weight") -> torch.Tensor:
    return module.parametrizations[name][0].mask


def assert_like_torch(theirs: nn.Module, ours: nn.Module, name: str = "weight") -> None:
    """Same mask, values, state_dict and gradients as the module torch pruned."""
    assert torch.equal(mask_of(ours, name), getattr(theirs, f"{name}_mask"))
    assert torch.equal(getattr(ours, name), getattr(theirs, name))

    renamed = {
        f"{name}_orig": f"parametrizations.{name}.original",
        f"{name}_mask": f"parametrizations.{name}.0.mask",
    }
    theirs_state = {renamed.get(k, k): v for k, v in theirs.state_dict().items()}
    ours_state = ours.state_dict()
    assert set(ours_state) == set(theirs_state)
    for key, value in theirs_state.items():
        assert torch.equal(ours_state[key], value), key

    x = input_for(theirs)
    theirs(x).square().sum().backward()
    ours(x).square().sum().backward()
    theirs_grad = getattr(theirs, f"{name}_orig").grad
    ours_grad = ours.parametrizations[name].original.grad
    assert torch.equal(ours_grad, theirs_grad)
    assert bool((ours_grad[mask_of(ours, name) == 0] == 0).all())


# --- each function, once, against torch ---------------------------------------------------------

ONE_CALL = [
    ("identity", {}),
    ("random_unstructured", {"amount": 0.3}),
    ("random_unstructured", {"amount": 7}),
    ("random_unstructured", {"amount": 0}),
    ("l1_unstructured", {"amount": 0.5}),
    ("l1_unstructured", {"amount": 1.0}),
    ("l1_unstructured", {"amount": 4}),
    ("random_structured", {"amount": 0.5, "dim": 0}),
    ("random_structured", {"amount": 1, "dim": 1}),
    ("random_structured", {"amount": 0.34, "dim": -1}),
    ("ln_structured", {"amount": 0.5, "n": 2, "dim": 0}),
    ("ln_structured", {"amount": 2, "n": 1, "dim": 1}),
    ("ln_structured", {"amount": 0.5, "n": float("inf"), "dim": -1}),
    ("ln_structured", {"amount": 1, "n": float("-inf"), "dim": 0}),
]


@pytest.mark.parametrize("make", [linear, conv, tied_linear])
@pytest.mark.parametrize(("function", "kwargs"), ONE_CALL, ids=str)
def test_one_call_gives_torchs_mask_values_state_dict_and_gradients(function, kwargs, make):
    theirs, ours = twins(make)
    both(function, theirs, ours, 0, "weight", **kwargs)
    assert_like_torch(theirs, ours)


@pytest.mark.parametrize("dim", [0, 1, 2, 3, -1, -2])
@pytest.mark.parametrize("function", ["random_structured", "ln_structured"])
def test_structured_pruning_of_a_conv2d_along_each_dim_equals_torchs(function, dim):
    theirs, ours = twins(lambda: nn.Conv2d(3, 4, (3, 2)))
    kwargs = {"n": 2} if function == "ln_structured" else {}
    both(function, theirs, ours, 1, "weight", amount=0.5, dim=dim, **kwargs)
    assert_like_torch(theirs, ours)


@pytest.mark.parametrize(
    ("function", "kwargs"),
    [("l1_unstructured", {"amount": 0.4}), ("ln_structured", {"amount": 2, "n": 1, "dim": 0})],
)
def test_importance_scores_rank_the_entries_as_in_torch(function, kwargs):
    theirs, ours = twins(conv)
    scores = torch.randn(4, 3, 3, 3)
    both(function, theirs, ours, 0, "weight", importance_scores=scores, **kwargs)
    assert_like_torch(theirs, ours)


@pytest.mark.parametrize(
    "mask", [torch.rand(5, 6) > 0.5, (torch.rand(5, 6) > 0.5).int(), torch.randint(0, 2, (5, 6))]
)
def test_custom_from_mask_equals_torchs_for_any_mask_dtype(mask):
    theirs, ours = twins(linear)
    both("custom_from_mask", theirs, ours, 0, "weight", mask=mask)
    assert_like_torch(theirs, ours)


def test_pruning_a_bias_equals_torchs():
    theirs, ours = twins(linear)
    both("l1_unstructured", theirs, ours, 0, "bias", amount=2)
    assert_like_torch(theirs, ours, "bias")


def test_functions_return_the_module():
    layer = linear()
    assert prune.l1_unstructured(layer, "weight", 0.2) is layer
    assert prune.identity(layer, "bias") is layer
    assert prune.remove(layer, "weight") is layer


# --- pruning again: the new amount applies to what is left -------------------------------------

ROUNDS = {
    "l1 then l1": [("l1_unstructured", {"amount": 0.5}), ("l1_unstructured", {"amount": 0.5})],
    "random three times": [("random_unstructured", {"amount": 0.3})] * 3,
    "counts": [("l1_unstructured", {"amount": 20}), ("random_unstructured", {"amount": 30})],
    "unstructured then structured": [
        ("l1_unstructured", {"amount": 0.6}),
        ("ln_structured", {"amount": 0.5, "n": 2, "dim": 0}),
        ("random_structured", {"amount": 1, "dim": 1}),
    ],
    "structured then unstructured": [
        ("random_structured", {"amount": 0.5, "dim": 2}),
        ("l1_unstructured", {"amount": 0.5}),
        ("ln_structured", {"amount": 0.34, "n": 1, "dim": 3}),
    ],
    "along every dim": [
        ("ln_structured", {"amount": 1, "n": 2, "dim": d}) for d in (0, 1, 2, 3, -1)
    ],
    "identity and custom in between": [
        ("l1_unstructured", {"amount": 0.2}),
        ("identity", {}),
        ("custom_from_mask", {"mask": torch.rand(4, 3, 3, 3) > 0.3}),
        ("random_unstructured", {"amount": 0.25}),
    ],
}


@pytest.mark.parametrize("steps", ROUNDS.values(), ids=ROUNDS.keys())
def test_iterative_pruning_of_a_conv2d_equals_torchs_container(steps):
    theirs, ours = twins(conv)
    for seed, (function, kwargs) in enumerate(steps):
        both(function, theirs, ours, seed, "weight", **kwargs)
        assert torch.equal(mask_of(ours), theirs.weight_mask), (seed, function)
    assert len(ours.parametrizations.weight) == 1
    assert_like_torch(theirs, ours)


def test_pruning_twice_by_half_leaves_a_quarter():
    layer = prune.l1_unstructured(nn.Linear(10, 10), "weight", 0.5)
    prune.l1_unstructured(layer, "weight", 0.5)
    assert int(mask_of(layer).sum()) == 25


def test_pruning_again_keeps_the_mask_buffer_object():
    layer = prune.l1_unstructured(linear(), "weight", 0.3)
    buffer = mask_of(layer)
    prune.random_unstructured(layer, "weight", 0.3)
    assert mask_of(layer) is buffer


@st.composite
def steps(draw, shape):
    chosen = []
    for _ in range(draw(st.integers(1, 3))):
        amount = draw(st.one_of(st.integers(0, 2), st.floats(0.0, 1.0)))
        dim = draw(st.integers(-len(shape), len(shape) - 1))
        chosen.append(
            draw(
                st.sampled_from(
                    [
                        ("l1_unstructured", {"amount": amount}),
                        ("random_unstructured", {"amount": amount}),
                        ("random_structured", {"amount": amount, "dim": dim}),
                        ("ln_structured", {"amount": amount, "n": 2, "dim": dim}),
                    ]
                )
            )
        )
    return chosen


@given(st.data(), st.sampled_from([torch.float32, torch.float64]), st.integers(0, 2**16))
def test_any_shape_amount_and_seed_give_torchs_masks(data, dtype, seed):
    shape = tuple(data.draw(st.lists(st.integers(1, 4), min_size=2, max_size=4)))
    generator = torch.Generator().manual_seed(seed)
    module = nn.Module()
    module.w = nn.Parameter(torch.randint(-3, 4, shape, generator=generator).to(dtype))
    theirs, ours = module, copy.deepcopy(module)
    for i, (function, kwargs) in enumerate(data.draw(steps(shape))):
        try:
            torch.manual_seed(seed + i)
            getattr(torch_prune, function)(theirs, "w", **kwargs)
        except ValueError:  # an int amount above what is left: ours must refuse too
            with pytest.raises(ValueError, match="still unpruned"):
                getattr(prune, function)(ours, "w", **kwargs)
            return
        torch.manual_seed(seed + i)
        getattr(prune, function)(ours, "w", **kwargs)
        assert torch.equal(mask_of(ours, "w"), theirs.w_mask)
        assert torch.equal(ours.w, theirs.w)
        assert ours.w.dtype == dtype


# --- global_unstructured -------------------------------------------------------------------------


def network() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(36, 8), nn.Linear(8, 2)
    )


def pairs_of(net: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(net[0], "weight"), (net[3], "weight"), (net[4], "weight"), (net[4], "bias")]


def assert_network_like_torch(theirs: nn.Module, ours: nn.Module) -> None:
    for (mine, name), (other, _) in zip(pairs_of(ours), pairs_of(theirs), strict=True):
        assert torch.equal(mask_of(mine, name), getattr(other, f"{name}_mask"))
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(ours(x), theirs(x))


@pytest.mark.parametrize(
    ("ours_method", "theirs_method"),
    [
        (prune.L1Unstructured, torch_prune.L1Unstructured),
        (prune.RandomUnstructured, torch_prune.RandomUnstructured),
        (torch_prune.L1Unstructured, torch_prune.L1Unstructured),
        (prune.l1_unstructured, torch_prune.L1Unstructured),
        (prune.random_unstructured, torch_prune.RandomUnstructured),
    ],
)
def test_global_pruning_over_several_rounds_equals_torchs(ours_method, theirs_method):
    theirs, ours = twins(network)
    for seed, amount in enumerate([0.3, 40, 0.5]):
        torch.manual_seed(seed)
        torch_prune.global_unstructured(pairs_of(theirs), theirs_method, amount=amount)
        torch.manual_seed(seed)
        prune.global_unstructured(pairs_of(ours), ours_method, amount=amount)
        assert_network_like_torch(theirs, ours)


def test_global_pruning_on_top_of_per_layer_pruning_equals_torchs():
    theirs, ours = twins(network)
    both("ln_structured", theirs[0], ours[0], 0, "weight", amount=1, n=2, dim=0)
    both("random_unstructured", theirs[3], ours[3], 1, "weight", amount=0.5)
    torch_prune.global_unstructured(pairs_of(theirs), torch_prune.L1Unstructured, amount=0.4)
    prune.global_unstructured(pairs_of(ours), prune.L1Unstructured, amount=0.4)
    assert_network_like_torch(theirs, ours)


def test_global_pruning_with_importance_scores_equals_torchs():
    theirs, ours = twins(network)
    scores = {3: torch.randn(8, 36), 4: torch.randn(8, 36)}
    their_scores = {(theirs[3], "weight"): scores[3]}
    our_scores = {(ours[3], "weight"): scores[3]}
    torch_prune.global_unstructured(
        pairs_of(theirs), torch_prune.L1Unstructured, their_scores, amount=0.5
    )
    prune.global_unstructured(pairs_of(ours), prune.L1Unstructured, our_scores, amount=0.5)
    assert_network_like_torch(theirs, ours)


def test_global_pruning_ranks_across_layers():
    net = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[1].weight.fill_(2.0)
    prune.global_unstructured(
        [(net[0], "weight"), (net[1], "weight")], prune.L1Unstructured, amount=16
    )
    assert int(mask_of(net[0]).sum()) == 0
    assert int(mask_of(net[1]).sum()) == 16


# --- remove and is_pruned -------------------------------------------------------------------------


@pytest.mark.parametrize("make", [linear, conv])
def test_remove_keeps_the_parameter_and_the_pruned_values_as_torch(make):
    theirs, ours = twins(make)
    parameter = ours.weight
    both("l1_unstructured", theirs, ours, 0, "weight", amount=0.5)
    both("random_structured", theirs, ours, 1, "weight", amount=1, dim=0)
    torch_prune.remove(theirs, "weight")
    prune.remove(ours, "weight")
    assert ours.weight is parameter
    assert type(ours) is type(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert torch.equal(ours.weight, theirs.weight)
    assert not prune.is_pruned(ours)
    assert ours._load_state_dict_pre_hooks == {}


def test_remove_one_tensor_keeps_the_other_pruned():
    layer = prune.l1_unstructured(prune.identity(linear(), "bias"), "weight", 0.5)
    prune.remove(layer, "weight")
    assert prune.is_pruned(layer)
    assert type(layer).__name__ == "ParametrizedLinear"
    assert len(layer._load_state_dict_pre_hooks) == 1


@pytest.mark.parametrize("make", [linear, network])
def test_is_pruned_agrees_with_torch(make):
    theirs, ours = twins(make)
    assert prune.is_pruned(ours) == torch_prune.is_pruned(theirs) is False
    target = (lambda m: m[3]) if isinstance(theirs, nn.Sequential) else (lambda m: m)
    both("random_unstructured", target(theirs), target(ours), 0, "weight", amount=0.2)
    assert prune.is_pruned(ours) == torch_prune.is_pruned(theirs) is True


# --- errors: torch's types, messages that name the module, the tensor and a fix ------------------

ERRORS = [
    (
        "random_unstructured",
        ("weight",),
        {"amount": -1},
        ValueError,
        ["random_unstructured() on Linear.weight", "negative"],
    ),
    ("l1_unstructured", ("weight",), {"amount": 1.5}, ValueError, ["Linear.weight", "[0, 1]"]),
    ("l1_unstructured", ("weight",), {"amount": "0.3"}, TypeError, ["Linear.weight", "amount"]),
    ("l1_unstructured", ("weight",), {"amount": 31}, ValueError, ["30 still", "at most 30"]),
    (
        "random_structured",
        ("weight",),
        {"amount": 7, "dim": 1},
        ValueError,
        ["random_structured() on Linear.weight", "channels"],
    ),
    ("ln_structured", ("bias",), {"amount": 1, "n": 2, "dim": 0}, ValueError, ["Linear.bias"]),
    ("ln_structured", ("weight",), {"amount": 1, "n": 2, "dim": 2}, IndexError, ["dim=2"]),
    ("random_structured", ("weight",), {"amount": 1, "dim": -3}, IndexError, ["[-2, 1]"]),
    ("l1_unstructured", ("weihgt",), {"amount": 1}, AttributeError, ["'weight', 'bias'"]),
    ("identity", ("forward",), {}, TypeError, ["Linear.forward", "not a tensor"]),
]


@pytest.mark.parametrize(("function", "args", "kwargs", "error", "words"), ERRORS, ids=str)
def test_bad_arguments_raise_torchs_error_type_with_a_message_naming_the_tensor(
    function, args, kwargs, error, words
):
    theirs, ours = twins(linear)
    with pytest.raises(error):
        getattr(torch_prune, function)(theirs, *args, **kwargs)
    with pytest.raises(error) as raised:
        getattr(prune, function)(ours, *args, **kwargs)
    assert all(word in str(raised.value) for word in words), str(raised.value)


@pytest.mark.parametrize(
    ("args", "words"), [((3, "weight"), "nn.Module"), ((nn.Linear(2, 2), 3), "as a str")]
)
def test_a_module_or_name_of_the_wrong_type_is_a_type_error(args, words):
    with pytest.raises(TypeError, match=words):
        prune.l1_unstructured(*args, amount=1)


def test_a_bias_of_none_is_refused_with_the_reason():
    with pytest.raises(TypeError, match="bias=False"):
        prune.l1_unstructured(nn.Linear(2, 2, bias=False), "bias", 1)


def test_wrong_shapes_are_value_errors_where_torch_asserts():
    layer = linear()
    with pytest.raises(
        ValueError, match=r"(?s)l1_unstructured\(\) on Linear.weight.*expected shape"
    ):
        prune.l1_unstructured(layer, "weight", 0.5, importance_scores=torch.randn(6, 5))
    with pytest.raises(ValueError, match=r"(?s)custom_from_mask\(\) on Linear.weight.*shape"):
        prune.custom_from_mask(layer, "weight", torch.ones(6, 5))
    with pytest.raises(TypeError, match="importance_scores must be a tensor"):
        prune.l1_unstructured(layer, "weight", 0.5, importance_scores=[1.0])


def test_remove_of_an_unpruned_tensor_is_a_value_error_like_torchs():
    theirs, ours = twins(linear)
    prune.l1_unstructured(ours, "bias", 1)
    with pytest.raises(ValueError):
        torch_prune.remove(theirs, "weight")
    with pytest.raises(ValueError, match=r"Linear.weight: it is not pruned.*: 'bias'"):
        prune.remove(ours, "weight")
    with pytest.raises(TypeError, match="a module and a tensor name"):
        prune.remove(ours, 0)


GLOBAL_ERRORS = [
    ({"parameters": 3}, TypeError, "iterable of (module, name) pairs"),
    ({"parameters": [linear()]}, TypeError, "(module, name) pairs"),
    ({"parameters": []}, ValueError, "at least one"),
    ({"importance_scores": [1]}, TypeError, "`importance_scores` as a dict"),
    ({"pruning_method": torch_prune.LnStructured, "n": 2, "dim": 0}, TypeError, "unstructured"),
    ({"amount": 1.5}, ValueError, "global_unstructured(): amount=1.5"),
    ({"amount": 10**6}, ValueError, "still unpruned"),
]


@pytest.mark.parametrize(("change", "error", "words"), GLOBAL_ERRORS, ids=str)
def test_global_unstructured_rejects_bad_arguments(change, error, words):
    net = network()
    arguments = {
        "parameters": pairs_of(net),
        "pruning_method": prune.L1Unstructured,
        "importance_scores": None,
        "amount": 0.5,
        **change,
    }
    with pytest.raises(error) as raised:
        prune.global_unstructured(**arguments)
    assert words in str(raised.value)
    assert not prune.is_pruned(net)


def test_a_failed_pruning_leaves_the_module_as_it_was():
    layer = linear()
    with pytest.raises(ValueError):
        prune.l1_unstructured(layer, "weight", 100)
    assert type(layer) is nn.Linear
    prune.l1_unstructured(layer, "weight", 10)
    before = mask_of(layer).clone()
    with pytest.raises(ValueError):
        prune.l1_unstructured(layer, "weight", 21)
    assert torch.equal(mask_of(layer), before)


# --- composition with other parametrizations ---------------------------------------------------


class Orthogonal(nn.Module):
    """exp of the skew-symmetric part of X: an orthogonal matrix."""

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        A = X.triu(1)
        return torch.matrix_exp(A - A.mT)


def test_pruning_an_orthogonal_weight_masks_the_orthogonal_matrix():
    layer = tether.register_parametrization(nn.Linear(4, 4), "weight", Orthogonal())
    Q = layer.weight.detach()
    prune.l1_unstructured(layer, "weight", 0.25)
    first = prune.L1Unstructured(0.25).compute_mask(Q, torch.ones_like(Q))
    assert torch.equal(layer.parametrizations.weight[1].mask, first)
    assert torch.equal(layer.weight, Q * first)
    layer(torch.randn(2, 4)).sum().backward()
    assert layer.parametrizations.weight.original.grad is not None

    prune.l1_unstructured(layer, "weight", 0.5)  # again: half of the entries of Q left
    second = merge(prune.L1Unstructured(0.5), Q * first, first)
    assert len(layer.parametrizations.weight) == 2
    assert torch.equal(layer.parametrizations.weight[1].mask, second)
    assert int((second == 0).sum()) == 4 + 6

    with pytest.raises(ValueError, match="comes after Orthogonal"):
        prune.remove(layer, "weight")
    tether.remove_parametrizations(layer, "weight")
    assert torch.equal(layer.weight, Q * second)


def test_pruning_then_another_parametrization_and_pruning_again():
    layer = linear()
    original = layer.weight
    prune.l1_unstructured(layer, "weight", 0.5)
    tether.register_parametrization(layer, "weight", Double())
    first = mask_of(layer).clone()
    assert torch.equal(layer.weight, 2 * original * first)
    prune.l1_unstructured(layer, "weight", 0.5)  # merges into the mask at index 0
    assert len(layer.parametrizations.weight) == 2
    expected = merge(prune.L1Unstructured(0.5), original * first, first)
    assert torch.equal(mask_of(layer), expected)
    prune.remove(layer, "weight")  # the mask is first: folded into the original
    assert layer.parametrizations.weight.original is original
    assert [type(p) for p in layer.parametrizations.weight] == [Double]
    assert torch.equal(layer.weight, 2 * original)
    assert bool((original[expected == 0] == 0).all())


# --- pickling, copying, compiling, caching, training ----------------------------------------------


@pytest.mark.parametrize("roundtrip", ROUNDTRIPS.values(), ids=ROUNDTRIPS.keys())
def test_pruned_models_pickle_copy_and_stay_prunable(roundtrip):
    net = network()
    prune.global_unstructured(pairs_of(net), prune.L1Unstructured, amount=0.5)
    clone = roundtrip(net)
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(clone(x), net(x))
    assert torch.equal(mask_of(clone[3]), mask_of(net[3]))
    prune.l1_unstructured(clone[3], "weight", 0.5)
    assert not torch.equal(mask_of(clone[3]), mask_of(net[3]))
    prune.remove(clone[3], "weight")
    assert type(clone[3]) is nn.Linear


def test_compile_fullgraph_without_graph_breaks_and_sees_new_masks():
    torch._dynamo.reset()
    net = network()
    prune.global_unstructured(pairs_of(net), prune.L1Unstructured, amount=0.5)
    x = torch.randn(2, 3, 5, 5)
    compiled = torch.compile(net, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), net(x))
    prune.ln_structured(net[3], "weight", amount=2, n=2, dim=0)
    assert torch.equal(compiled(x), net(x))
    assert torch._dynamo.explain(net)(x).graph_break_count == 0


def test_compiled_backward_gives_the_eager_gradients():
    torch._dynamo.reset()
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    prune.l1_unstructured(net[0], "weight", 0.5)
    original = net[0].parametrizations.weight.original
    x = torch.randn(3, 6)
    net(x).square().sum().backward()
    eager = original.grad.clone()
    original.grad = None
    torch.compile(net, fullgraph=True, backend="aot_eager")(x).square().sum().backward()
    torch.testing.assert_close(original.grad, eager)
    assert bool((original.grad[mask_of(net[0]) == 0] == 0).all())


@pytest.mark.parametrize("cached", [False, True])
def test_pruned_entries_get_zero_gradient_in_and_out_of_cached(cached):
    net = network()
    prune.global_unstructured(pairs_of(net), prune.L1Unstructured, amount=0.6)
    x = torch.randn(4, 3, 5, 5)
    if cached:
        with tether.cached():
            (net(x).square().sum() + net(x).sum()).backward()
    else:
        (net(x).square().sum() + net(x).sum()).backward()
    for module, name in pairs_of(net):
        grad = module.parametrizations[name].original.grad
        assert bool((grad[mask_of(module, name) == 0] == 0).all())
        assert bool((grad[mask_of(module, name) == 1] != 0).any())


@pytest.mark.parametrize("cached", [False, True])
def test_training_never_revives_a_pruned_entry(cached):
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
    for i in (0, 2):
        prune.l1_unstructured(net[i], "weight", amount=0.5)
    originals = [net[i].parametrizations.weight.original for i in (0, 2)]
    frozen = [o.detach().clone() for o in originals]
    masks = [mask_of(net[i]) for i in (0, 2)]
    x = torch.randn(64, 3)
    y = x.sin().sum(dim=1, keepdim=True)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(200):
        optimizer.zero_grad()
        with tether.cached() if cached else contextlib.nullcontext():
            loss = (net(x) - y).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 4
    for i, original, before, mask in zip((0, 2), originals, frozen, masks, strict=True):
        assert bool((net[i].weight[mask == 0] == 0).all())
        assert torch.equal(original[mask == 0], before[mask == 0])
        assert not torch.equal(original[mask == 1], before[mask == 1])


def test_a_buffer_can_be_pruned_too():
    module = nn.Module()
    module.register_buffer("table", torch.arange(1.0, 7.0).reshape(2, 3))
    prune.l1_unstructured(module, "table", 2)
    assert torch.equal(module.table, torch.tensor([[0.0, 0.0, 3.0], [4.0, 5.0, 6.0]]))

"""``torch.func`` on parametrized models: ``functional_call`` with either key, ``grad`` and
``vmap`` through it, and ensembles with ``stack_module_state``; compared with PyTorch's
parametrize where it differs, and where it agrees (a ``state_dict`` of originals given to
``functional_call``, as a torch twin)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.utils.parametrize as torch_parametrize
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

import tether
from tests.parametrizations import Symmetric, Tril, UpperPlusLower
from tests.twins import assert_same, twin

N = 4


def linear(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return x @ W.mT + b


def untouched(layer: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    """The layer's state is what it was, and its weight is computed again."""
    state = layer.state_dict()
    plist = layer.parametrizations.weight
    same = all(torch.equal(state[k], v) for k, v in before.items())
    return same and "forward" not in plist.__dict__ and not plist.__dict__.get("_tether_served")


def snapshot(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in layer.state_dict().items()}


def test_plain_name_is_used_as_given_where_torch_inverts_or_raises():
    x, W = torch.randn(2, N), torch.randn(N, N)
    ours = tether.register_parametrization(nn.Linear(N, N), "weight", Symmetric())
    theirs = torch_parametrize.register_parametrization(nn.Linear(N, N), "weight", Symmetric())
    before = snapshot(ours)
    expected = linear(x, W, ours.bias)
    assert torch.allclose(functional_call(ours, {"weight": W}, (x,)), expected)
    assert untouched(ours, before)
    # torch sends W through right_inverse: the layer computes with the symmetric part.
    projected = linear(x, W.triu() + W.triu(1).mT, theirs.bias)
    assert torch.allclose(functional_call(theirs, {"weight": W}, (x,)), projected)

    ours = tether.register_parametrization(nn.Linear(N, N), "weight", Tril())
    theirs = torch_parametrize.register_parametrization(nn.Linear(N, N), "weight", Tril())
    assert torch.allclose(functional_call(ours, {"weight": W}, (x,)), linear(x, W, ours.bias))
    with pytest.raises(RuntimeError, match="right_inverse"):
        functional_call(theirs, {"weight": W}, (x,))


def test_original_key_goes_through_the_parametrization():
    x, A = torch.randn(2, N), torch.randn(N, N)
    layer = tether.orthogonal(nn.Linear(N, N))
    before = snapshot(layer)
    key = "parametrizations.weight.original"
    out = functional_call(layer, {key: A}, (x,))
    Q = layer.parametrizations.weight[0](A)
    assert torch.allclose(Q.T @ Q, torch.eye(N), atol=1e-5)
    assert torch.allclose(out, linear(x, Q, layer.bias), atol=1e-6)
    assert untouched(layer, before)


def test_assignment_outside_functional_call_still_goes_through_right_inverse():
    layer = tether.register_parametrization(nn.Linear(N, N), "weight", Symmetric())
    functional_call(layer, {"weight": torch.randn(N, N)}, (torch.randn(1, N),))
    W = torch.randn(N, N)
    layer.weight = W
    assert torch.equal(layer.parametrizations.weight.original, W.triu())


def test_grad_and_vmap_over_the_plain_name():
    x = torch.randn(3, N)
    layer = tether.orthogonal(nn.Linear(N, N))
    before = snapshot(layer)

    def loss(W: torch.Tensor) -> torch.Tensor:
        return functional_call(layer, {"weight": W}, (x,)).pow(2).sum()

    W = torch.randn(N, N)
    expected = 2 * (linear(x, W, layer.bias)).mT @ x
    assert torch.allclose(grad(loss)(W), expected, atol=1e-5)
    Ws = torch.randn(5, N, N)
    outs = vmap(lambda W: functional_call(layer, {"weight": W}, (x,)))(Ws)
    assert torch.allclose(outs, linear(x, Ws, layer.bias), atol=1e-6)
    assert untouched(layer, before)


def test_grad_through_the_original_matches_autograd():
    x = torch.randn(3, N)
    layer = tether.orthogonal(nn.Linear(N, N))
    params = dict(layer.named_parameters())

    def loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(layer, params, (x,)).pow(2).sum()

    grads = grad(loss)(params)
    layer(x).pow(2).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None
        assert torch.allclose(grads[name], p.grad, atol=1e-6)


def test_ensemble_with_stack_module_state_where_torch_refuses():
    x = torch.randn(2, N)
    models = [
        nn.Sequential(tether.orthogonal(nn.Linear(N, N)), nn.Tanh(), nn.Linear(N, 2))
        for _ in range(3)
    ]
    params, buffers = stack_module_state(models)  # type: ignore[arg-type]
    base = models[0]

    def call(params: dict, buffers: dict) -> torch.Tensor:
        return functional_call(base, (params, buffers), (x,))

    outs = vmap(call)(params, buffers)
    for out, model in zip(outs, models, strict=True):
        assert torch.allclose(out, model(x), atol=1e-6)

    theirs = [
        torch_parametrize.register_parametrization(nn.Linear(N, N), "weight", Symmetric())
        for _ in range(2)
    ]
    with pytest.raises(RuntimeError, match="same class"):
        stack_module_state(theirs)  # type: ignore[arg-type]


def test_nested_calls_and_failed_swaps_leave_the_model_unchanged():
    x, W, V = torch.randn(2, N), torch.randn(N, N), torch.randn(N, N)
    layer = tether.orthogonal(nn.Linear(N, N))
    before = snapshot(layer)
    seen: list[torch.Tensor] = []

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = layer

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(self.inner.weight)
            y = functional_call(self.inner, {"weight": V}, (x,))
            seen.append(self.inner.weight)
            return y

    outer = Outer()
    assert torch.allclose(
        functional_call(outer, {"inner.weight": W}, (x,)), linear(x, V, layer.bias)
    )
    assert seen[0] is W and seen[1] is W
    assert untouched(layer, before)
    # torch swaps "inner.weight" in, fails on the missing module, and swaps it back.
    with pytest.raises(AttributeError):
        functional_call(outer, {"inner.weight": W, "missing.weight": W}, (x,))
    assert untouched(layer, before)
    try:
        raise ZeroDivisionError
    except ZeroDivisionError:  # a call made while an exception is being handled
        out = functional_call(layer, {"weight": W}, (x,))
    assert torch.allclose(out, linear(x, W, layer.bias))
    assert untouched(layer, before)


def test_served_value_replaces_a_cached_one():
    x, W = torch.randn(2, N), torch.randn(N, N)
    layer = tether.orthogonal(nn.Linear(N, N))
    with tether.cached():
        Q = layer.weight
        assert torch.allclose(functional_call(layer, {"weight": W}, (x,)), linear(x, W, layer.bias))
        assert torch.equal(layer.weight, Q)


def test_functional_call_matches_torch():
    def scenario(parametrize):
        layer = nn.Linear(4, 4)
        parametrize.register_parametrization(layer, "weight", UpperPlusLower())
        state = {name: 2 * tensor for name, tensor in layer.state_dict().items()}
        return torch.func.functional_call(layer, state, (torch.randn(3, 4),))

    expected, actual = twin(scenario)
    assert_same(expected, actual)

"""TorchScript: a clear error for parametrized modules, and the ways that work.

No parametrization runs in TorchScript: PyTorch's parametrized modules script, then raise
"Parametrization is not working with scripting" when called. tether refuses at
``torch.jit.script`` time, naming the alternatives (Note [TorchScript] in
``tether._parametrization_list``); these tests check that error, and that each alternative it
names gives the eager outputs.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

import tether


@contextlib.contextmanager
def jit_deprecation_allowed() -> Iterator[None]:
    """TorchScript is deprecated in recent PyTorch: its scripting and tracing warn."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated")
        yield


HELPERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "weight_norm": tether.weight_norm,
    "orthogonal": tether.orthogonal,
    "spectral_norm": tether.spectral_norm,
    "user": lambda layer: tether.register_parametrization(layer, "weight", torch.tril),
}
LAYERS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "linear": (lambda: nn.Linear(4, 4), (2, 4)),
    "conv1d": (lambda: nn.Conv1d(4, 4, 3), (2, 4, 5)),
}


def parametrized(helper: str, layer: str) -> tuple[nn.Module, torch.Tensor]:
    make, input_shape = LAYERS[layer]
    module = HELPERS[helper](make()).eval()
    return module, torch.randn(input_shape)


def tolerance(dtype: torch.dtype) -> float:
    return 10 * torch.finfo(dtype).eps


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("helper", HELPERS)
def test_scripting_a_parametrized_module_names_the_alternatives(helper, layer):
    module, _ = parametrized(helper, layer)
    with jit_deprecation_allowed(), pytest.raises(RuntimeError) as raised:
        torch.jit.script(module)
    message = str(raised.value)
    assert f"{type(module).__name__}: {type(module).__bases__[0].__name__}.weight" in message
    for alternative in ("torch.export", "torch.compile", "tether.remove_parametrizations"):
        assert alternative in message


def test_scripting_a_model_that_holds_a_parametrized_layer_names_the_layer():
    model = nn.Sequential(nn.ReLU(), tether.weight_norm(nn.Linear(4, 4)))
    with jit_deprecation_allowed(), pytest.raises(RuntimeError, match=r"Linear\.weight"):
        torch.jit.script(model)


def test_scripting_a_parametrization_list_names_the_tensor():
    layer = tether.orthogonal(nn.Linear(4, 4))
    with jit_deprecation_allowed(), pytest.raises(RuntimeError, match=r"Linear\.weight"):
        torch.jit.script(layer.parametrizations.weight)


def test_torchs_parametrizations_script_but_fail_when_called():
    # The behaviour tether's error replaces: PyTorch accepts the module and fails later.
    layer = torch.nn.utils.parametrizations.weight_norm(nn.Linear(4, 4))
    with jit_deprecation_allowed():
        scripted = torch.jit.script(layer)
    with pytest.raises(torch.jit.Error, match="not working with scripting"):
        scripted(torch.randn(2, 4))


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("helper", HELPERS)
def test_removing_the_parametrizations_lets_the_module_script(helper, layer):
    module, x = parametrized(helper, layer)
    with torch.no_grad():
        expected = module(x)
    tether.remove_parametrizations(module, "weight")
    with jit_deprecation_allowed():
        scripted = torch.jit.script(module)
    tol = tolerance(x.dtype)
    torch.testing.assert_close(scripted(x), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("helper", HELPERS)
def test_tracing_a_parametrized_module_gives_the_eager_outputs(helper, layer):
    module, x = parametrized(helper, layer)
    with jit_deprecation_allowed(), warnings.catch_warnings():
        # A trace fixes the branches on shapes (tall or wide) to the traced input's, and says so.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(module, x)
    tol = tolerance(x.dtype)
    torch.testing.assert_close(traced(x), module(x), rtol=tol, atol=tol)


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("helper", HELPERS)
def test_exporting_a_parametrized_module_gives_the_eager_outputs(helper, layer):
    module, x = parametrized(helper, layer)
    exported: Any = torch.export.export(module, (x,))
    tol = tolerance(x.dtype)
    torch.testing.assert_close(exported.module()(x), module(x), rtol=tol, atol=tol)


def test_a_module_whose_parametrizations_torch_removed_scripts():
    # torch's remove_parametrizations can leave a module on tether's shared class with no
    # parametrized tensor left: nothing stands in the way of scripting it then.
    layer = tether.register_parametrization(nn.Linear(4, 4), "weight", torch.tril)
    torch.nn.utils.parametrize.remove_parametrizations(layer, "weight")
    x = torch.randn(2, 4)
    with jit_deprecation_allowed():
        scripted = torch.jit.script(layer)
    tol = tolerance(x.dtype)
    torch.testing.assert_close(scripted(x), layer(x), rtol=tol, atol=tol)

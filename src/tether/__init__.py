"""tether: parametrizations for PyTorch.

A parametrization puts a function on a tensor of any ``nn.Module``: after
``tether.register_parametrization(layer, "weight", f)``, reading ``layer.weight`` returns
``f(original)`` while the optimizer trains the unconstrained ``original``. The mechanism is a
drop-in superset of ``torch.nn.utils.parametrize`` (see :mod:`tether.parametrize`).

Example:
    >>> import torch, tether
    >>> layer = tether.register_parametrization(torch.nn.Linear(4, 4), "weight", torch.triu)
    >>> torch.equal(layer.weight, layer.weight.triu())
    True
"""

from tether._state_dict import plain_state_dict as plain_state_dict
from tether.parametrize import FunctionParametrization as FunctionParametrization
from tether.parametrize import ParametrizationList as ParametrizationList
from tether.parametrize import cached as cached
from tether.parametrize import is_parametrized as is_parametrized
from tether.parametrize import register_parametrization as register_parametrization
from tether.parametrize import remove_parametrizations as remove_parametrizations
from tether.parametrize import (
    transfer_parametrizations_and_params as transfer_parametrizations_and_params,
)
from tether.parametrize import type_before_parametrizations as type_before_parametrizations

__version__ = "0.1.0"

__all__ = [
    "FunctionParametrization",
    "ParametrizationList",
    "cached",
    "is_parametrized",
    "plain_state_dict",
    "register_parametrization",
    "remove_parametrizations",
    "transfer_parametrizations_and_params",
    "type_before_parametrizations",
]

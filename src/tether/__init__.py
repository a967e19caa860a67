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

from tether import constraints as constraints
from tether import functional as functional
from tether import parametrizations as parametrizations
from tether import prune as prune
from tether import testing as testing
from tether._autocache import autocache as autocache
from tether._state_dict import plain_state_dict as plain_state_dict
from tether.constraints._elementwise import bounded as bounded
from tether.constraints._elementwise import positive as positive
from tether.constraints._elementwise import simplex as simplex
from tether.constraints._hurwitz import hurwitz as hurwitz
from tether.constraints._linear_groups import almost_orthogonal as almost_orthogonal
from tether.constraints._linear_groups import invertible as invertible
from tether.constraints._linear_groups import special_linear as special_linear
from tether.constraints._low_rank import fixed_rank as fixed_rank
from tether.constraints._low_rank import low_rank as low_rank
from tether.constraints._orthogonal import grassmannian as grassmannian
from tether.constraints._orthogonal import orthogonal as orthogonal
from tether.constraints._orthogonal import special_orthogonal as special_orthogonal
from tether.constraints._orthogonal import update_base as update_base
from tether.constraints._positive_definite import positive_definite as positive_definite
from tether.constraints._positive_definite import positive_semidefinite as positive_semidefinite
from tether.constraints._positive_definite import psd_fixed_rank as psd_fixed_rank
from tether.constraints._positive_definite import psd_low_rank as psd_low_rank
from tether.constraints._spectral_norm import spectral_norm as spectral_norm
from tether.constraints._sphere import poincare_ball as poincare_ball
from tether.constraints._sphere import sphere as sphere
from tether.constraints._symmetric import skew as skew
from tether.constraints._symmetric import symmetric as symmetric
from tether.constraints._weight_norm import weight_norm as weight_norm
from tether.parametrize import FunctionParametrization as FunctionParametrization
from tether.parametrize import ParametrizationList as ParametrizationList
from tether.parametrize import cached as cached
from tether.parametrize import chains as chains
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
    "almost_orthogonal",
    "autocache",
    "bounded",
    "cached",
    "chains",
    "constraints",
    "fixed_rank",
    "functional",
    "grassmannian",
    "hurwitz",
    "invertible",
    "is_parametrized",
    "low_rank",
    "orthogonal",
    "parametrizations",
    "plain_state_dict",
    "poincare_ball",
    "positive",
    "positive_definite",
    "positive_semidefinite",
    "prune",
    "psd_fixed_rank",
    "psd_low_rank",
    "register_parametrization",
    "remove_parametrizations",
    "simplex",
    "skew",
    "special_linear",
    "special_orthogonal",
    "spectral_norm",
    "sphere",
    "symmetric",
    "testing",
    "transfer_parametrizations_and_params",
    "type_before_parametrizations",
    "update_base",
    "weight_norm",
]

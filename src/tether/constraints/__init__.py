"""Ready-made parametrizations: each constrains a tensor to a set and can sample from it.

Each constraint is a class usable with :func:`tether.register_parametrization` (and in
chains), paired with a one-line registering function exported from :mod:`tether`.
"""

from tether.constraints._base import Constraint as Constraint
from tether.constraints._base import default_atol as default_atol
from tether.constraints._base import register_constraint as register_constraint
from tether.constraints._elementwise import Bounded as Bounded
from tether.constraints._elementwise import Positive as Positive
from tether.constraints._elementwise import Simplex as Simplex
from tether.constraints._hurwitz import Hurwitz as Hurwitz
from tether.constraints._linear_groups import AlmostOrthogonal as AlmostOrthogonal
from tether.constraints._linear_groups import Invertible as Invertible
from tether.constraints._linear_groups import SpecialLinear as SpecialLinear
from tether.constraints._low_rank import FixedRank as FixedRank
from tether.constraints._low_rank import LowRank as LowRank
from tether.constraints._orthogonal import Grassmannian as Grassmannian
from tether.constraints._orthogonal import Orthogonal as Orthogonal
from tether.constraints._orthogonal import SpecialOrthogonal as SpecialOrthogonal
from tether.constraints._positive_definite import PositiveDefinite as PositiveDefinite
from tether.constraints._positive_definite import PositiveSemidefinite as PositiveSemidefinite
from tether.constraints._positive_definite import PSDFixedRank as PSDFixedRank
from tether.constraints._positive_definite import PSDLowRank as PSDLowRank
from tether.constraints._spectral_norm import SpectralNorm as SpectralNorm
from tether.constraints._sphere import PoincareBall as PoincareBall
from tether.constraints._sphere import Sphere as Sphere
from tether.constraints._symmetric import Skew as Skew
from tether.constraints._symmetric import Symmetric as Symmetric
from tether.constraints._weight_norm import WeightNorm as WeightNorm

__all__ = [
    "AlmostOrthogonal",
    "Bounded",
    "Constraint",
    "FixedRank",
    "Grassmannian",
    "Hurwitz",
    "Invertible",
    "LowRank",
    "Orthogonal",
    "PSDFixedRank",
    "PSDLowRank",
    "PoincareBall",
    "Positive",
    "PositiveDefinite",
    "PositiveSemidefinite",
    "Simplex",
    "Skew",
    "SpecialLinear",
    "SpecialOrthogonal",
    "SpectralNorm",
    "Sphere",
    "Symmetric",
    "WeightNorm",
    "default_atol",
    "register_constraint",
]

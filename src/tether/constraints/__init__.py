"""Ready-made parametrizations: each constrains a tensor to a set and can sample from it.

Each constraint is a class usable with :func:`tether.register_parametrization` (and in
chains), paired with a one-line registering function exported from :mod:`tether`.
"""

from tether.constraints._base import Constraint as Constraint
from tether.constraints._base import default_atol as default_atol
from tether.constraints._base import register_constraint as register_constraint

__all__ = ["Constraint", "default_atol", "register_constraint"]

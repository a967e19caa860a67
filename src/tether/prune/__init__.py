"""Pruning as a parametrization: the functions of ``torch.nn.utils.prune``, as masks.

``from tether import prune`` replaces ``from torch.nn.utils import prune``: the same functions
with the same arguments, the same meaning of ``amount`` (an int counts entries or channels, a
float is a fraction of those still unpruned) and the same masks, random methods included
under the same seed. The difference is how the mask is applied: by a :class:`PruningMask`
parametrization instead of a forward pre-hook. So a pruned tensor composes with other
parametrizations (prune an orthogonal weight), is right even outside ``forward``, the model
pickles and compiles with ``torch.compile(fullgraph=True)``, and a pruned entry gets a zero
gradient, in or out of :func:`tether.cached`. The ``state_dict`` keeps the unpruned values as
``parametrizations.weight.original`` and the mask as ``parametrizations.weight.0.mask``;
checkpoints saved by ``torch.nn.utils.prune`` (``weight_orig``, ``weight_mask``) load into
tether-pruned models.

Example:
    >>> import torch
    >>> from tether import prune
    >>> layer = prune.l1_unstructured(torch.nn.Linear(10, 10), "weight", amount=0.3)
    >>> layer = prune.l1_unstructured(layer, "weight", amount=0.5)  # half of what is left
    >>> prune.sparsity(layer).total.fraction
    0.65
    >>> layer = prune.remove(layer, "weight")  # permanent: a plain Parameter again
    >>> type(layer).__name__
    'Linear'
"""

from tether.prune import _torch_names  # noqa: F401  # serves module.<name>_mask and _orig
from tether.prune._base import BasePruningMethod as BasePruningMethod
from tether.prune._base import PruningContainer as PruningContainer
from tether.prune._functions import custom_from_mask as custom_from_mask
from tether.prune._functions import global_unstructured as global_unstructured
from tether.prune._functions import identity as identity
from tether.prune._functions import l1_unstructured as l1_unstructured
from tether.prune._functions import ln_structured as ln_structured
from tether.prune._functions import random_structured as random_structured
from tether.prune._functions import random_unstructured as random_unstructured
from tether.prune._mask import PruningMask as PruningMask
from tether.prune._methods import CustomFromMask as CustomFromMask
from tether.prune._methods import Identity as Identity
from tether.prune._methods import L1Unstructured as L1Unstructured
from tether.prune._methods import LnStructured as LnStructured
from tether.prune._methods import RandomStructured as RandomStructured
from tether.prune._methods import RandomUnstructured as RandomUnstructured
from tether.prune._remove import is_pruned as is_pruned
from tether.prune._remove import remove as remove
from tether.prune._sparsity import Sparsity as Sparsity
from tether.prune._sparsity import TensorSparsity as TensorSparsity
from tether.prune._sparsity import sparsity as sparsity

__all__ = [
    "BasePruningMethod",
    "CustomFromMask",
    "Identity",
    "L1Unstructured",
    "LnStructured",
    "PruningContainer",
    "PruningMask",
    "RandomStructured",
    "RandomUnstructured",
    "Sparsity",
    "TensorSparsity",
    "custom_from_mask",
    "global_unstructured",
    "identity",
    "is_pruned",
    "l1_unstructured",
    "ln_structured",
    "random_structured",
    "random_unstructured",
    "remove",
    "sparsity",
]

"""Pure maps on tensors, the building blocks of tether's constraints.

Each map takes tensors of shape ``(*, m, n)``, batches over the leading dimensions, keeps
dtype and device and holds no state; each comes with its right inverse where one exists.
"""

from tether.functional._orthogonal import cayley as cayley
from tether.functional._orthogonal import householder as householder
from tether.functional._orthogonal import matrix_exp as matrix_exp
from tether.functional._orthogonal import orthonormalize as orthonormalize
from tether.functional._orthogonal import polar as polar

__all__ = ["cayley", "householder", "matrix_exp", "orthonormalize", "polar"]

"""Pure maps on tensors, the building blocks of tether's constraints.

Each map takes tensors of shape ``(*, m, n)``, batches over the leading dimensions, keeps
dtype and device and holds no state; each comes with its right inverse where one exists.
"""

from tether.functional._cayley import cayley as cayley
from tether.functional._elementwise import poincare_exp as poincare_exp
from tether.functional._elementwise import poincare_log as poincare_log
from tether.functional._elementwise import project_simplex as project_simplex
from tether.functional._elementwise import project_sphere as project_sphere
from tether.functional._elementwise import softplus_inverse as softplus_inverse
from tether.functional._householder import householder as householder
from tether.functional._linear import dissipative as dissipative
from tether.functional._linear import dissipative_inverse as dissipative_inverse
from tether.functional._linear import factored as factored
from tether.functional._linear import log_cholesky as log_cholesky
from tether.functional._linear import log_cholesky_inverse as log_cholesky_inverse
from tether.functional._linear import positive_triangular as positive_triangular
from tether.functional._linear import positive_triangular_inverse as positive_triangular_inverse
from tether.functional._linear import solve_lyapunov as solve_lyapunov
from tether.functional._linear import special_orthonormalize as special_orthonormalize
from tether.functional._linear import truncated_svd as truncated_svd
from tether.functional._norms import largest_singular_value as largest_singular_value
from tether.functional._norms import norm_except_dim as norm_except_dim
from tether.functional._norms import power_iteration as power_iteration
from tether.functional._norms import singular_value_estimate as singular_value_estimate
from tether.functional._norms import weight_normalize as weight_normalize
from tether.functional._orthogonal import matrix_exp as matrix_exp
from tether.functional._orthogonal import orthonormalize as orthonormalize
from tether.functional._orthogonal import polar as polar
from tether.functional._skew_exp import skew_matrix_exp as skew_matrix_exp
from tether.functional._symmetric import fixed_rank_psd as fixed_rank_psd
from tether.functional._symmetric import fixed_rank_psd_factors as fixed_rank_psd_factors
from tether.functional._symmetric import gram as gram
from tether.functional._symmetric import gram_factor as gram_factor
from tether.functional._symmetric import skew_part as skew_part
from tether.functional._symmetric import spd_exp as spd_exp
from tether.functional._symmetric import spd_log as spd_log
from tether.functional._symmetric import spd_softplus as spd_softplus
from tether.functional._symmetric import spd_softplus_inverse as spd_softplus_inverse
from tether.functional._symmetric import symmetric_part as symmetric_part

__all__ = [
    "cayley",
    "dissipative",
    "dissipative_inverse",
    "factored",
    "fixed_rank_psd",
    "fixed_rank_psd_factors",
    "gram",
    "gram_factor",
    "householder",
    "largest_singular_value",
    "log_cholesky",
    "log_cholesky_inverse",
    "matrix_exp",
    "norm_except_dim",
    "orthonormalize",
    "poincare_exp",
    "poincare_log",
    "polar",
    "positive_triangular",
    "positive_triangular_inverse",
    "power_iteration",
    "project_simplex",
    "project_sphere",
    "singular_value_estimate",
    "skew_matrix_exp",
    "skew_part",
    "softplus_inverse",
    "solve_lyapunov",
    "spd_exp",
    "spd_log",
    "spd_softplus",
    "spd_softplus_inverse",
    "special_orthonormalize",
    "symmetric_part",
    "truncated_svd",
    "weight_normalize",
]

"""Maps onto orthogonal matrices: matrix_exp, cayley, orthonormalize, polar."""

from __future__ import annotations

import math

import pytest
import torch

from tether.functional import cayley, matrix_exp, orthonormalize, polar

REAL = [torch.float32, torch.float64]


pytestmark = pytest.mark.usefixtures("one_thread")


def tolerance(dtype: torch.dtype, n: int) -> float:
    return 20 * math.sqrt(n) * torch.finfo(dtype).eps


def orthonormality_error(Q: torch.Tensor) -> float:
    Q = Q.double()
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype)
    return (Q.mT @ Q - eye).abs().max().item()


# matrix_exp and cayley


def test_matrix_exp_is_torchs_for_any_matrix():
    X = torch.randn(2, 5, 5, dtype=torch.float64)
    assert torch.equal(matrix_exp(X), torch.linalg.matrix_exp(X))


@pytest.mark.parametrize("dtype", [*REAL, torch.complex128])
def test_cayley_of_a_skew_matrix_is_orthogonal(dtype):
    X = torch.randn(3, 6, 6, dtype=dtype)
    Q = cayley(X - X.mH)
    eye = torch.eye(6, dtype=dtype)
    assert (Q.mH @ Q - eye).abs().max().item() <= 10 * tolerance(dtype, 6)


# orthonormalize and polar


@pytest.mark.parametrize("dtype", REAL)
def test_orthonormalize_is_the_identity_on_orthonormal_columns(dtype):
    Q = orthonormalize(torch.randn(2, 7, 3, dtype=dtype))
    assert orthonormality_error(Q) <= tolerance(dtype, 7)
    torch.testing.assert_close(orthonormalize(Q), Q)


@pytest.mark.parametrize("dtype", REAL)
def test_polar_is_the_nearest_orthonormal_matrix(dtype):
    X = torch.randn(7, 3, dtype=dtype)
    Q = polar(X)
    assert orthonormality_error(Q) <= tolerance(dtype, 7)
    torch.testing.assert_close(polar(Q), Q)
    other = orthonormalize(X)
    assert torch.linalg.matrix_norm(X - Q) <= torch.linalg.matrix_norm(X - other) + 1e-5

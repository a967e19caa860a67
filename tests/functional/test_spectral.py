"""The gradient of spectral maps (``tether.functional._spectral``) at nearly repeated
eigenvalues, through ``spd_exp``.

Note [Gradients of spectral functions]: the divided difference ``(f(λᵢ) - f(λⱼ)) / (λᵢ - λⱼ)``
loses digits to cancellation when the eigenvalues are close, and is replaced by ``f'`` at
their midpoint below a relative gap of ``cbrt(eps)``; both errors are then of order
``eps^(2/3)``. Equal and well-separated eigenvalues are tested with the maps; here the gap
runs from just inside that threshold down to a few ulps, where a quotient taken at face value
would be off in its leading digits.
"""

from __future__ import annotations

import pytest
import torch

from tether.functional import spd_exp, symmetric_part

DTYPE = torch.float64
N = 4
# Gaps between the two closest eigenvalues of a matrix with spectrum (1, 1 + gap, 2, 3):
# 1e-6 is below the threshold (the midpoint rule); the smaller ones leave the quotient fewer
# and fewer correct digits.
GAPS = [1e-6, 1e-7, 1e-10, 1e-13]


def with_spectrum(eigenvalues: list[float], seed: int = 0) -> torch.Tensor:
    """``Q diag(eigenvalues) Qᵀ`` with a random orthogonal ``Q``, in float64."""
    generator = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(N, N, generator=generator, dtype=DTYPE))
    X = Q @ torch.diag(torch.tensor(eigenvalues, dtype=DTYPE)) @ Q.mT
    return (X + X.mT) / 2


def cotangent(seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(N, N, generator=generator, dtype=DTYPE)


@pytest.mark.parametrize("gap", GAPS)
def test_spd_exp_gradient_at_nearly_repeated_eigenvalues_matches_matrix_exp(gap):
    X = with_spectrum([1.0, 1.0 + gap, 2.0, 3.0]).requires_grad_()
    G = cotangent()
    (got,) = torch.autograd.grad((spd_exp(X) * G).sum(), X)
    # torch.linalg.matrix_exp's backward exponentiates a block matrix: no eigenvalue gaps.
    (expected,) = torch.autograd.grad((torch.linalg.matrix_exp(symmetric_part(X)) * G).sum(), X)
    # The error of both terms is of order eps^(2/3) relative to the gradient (see above).
    eps = torch.finfo(DTYPE).eps
    tol = 16 * eps ** (2 / 3) * expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=0, atol=tol)


@pytest.mark.parametrize("gap", GAPS)
def test_spd_exp_passes_gradcheck_at_nearly_repeated_eigenvalues(gap):
    X = with_spectrum([1.0, 1.0 + gap, 2.0, 3.0]).requires_grad_()
    assert torch.autograd.gradcheck(spd_exp, (X,))


def test_spd_exp_gradient_at_two_nearly_repeated_pairs():
    X = with_spectrum([-1.0, -1.0 + 1e-9, 0.5, 0.5 + 1e-12], seed=2).requires_grad_()
    G = cotangent(seed=3)
    (got,) = torch.autograd.grad((spd_exp(X) * G).sum(), X)
    (expected,) = torch.autograd.grad((torch.linalg.matrix_exp(symmetric_part(X)) * G).sum(), X)
    eps = torch.finfo(DTYPE).eps
    tol = 16 * eps ** (2 / 3) * expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=0, atol=tol)

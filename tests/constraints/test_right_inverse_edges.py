"""``right_inverse`` at edge inputs: what assignment stores for them.

- The Householder map without a base point (``orthogonal_map="householder",
  use_trivialization=False``) at diagonal sign matrices such as ``diag(1, -1, 1)``, where
  LAPACK's QR skips every reflection (``tau == 0``), which flips the sign convention of those
  columns: the weight must come back exactly.
- ``Sphere``, whose ``right_inverse`` promises ``X / ‖X‖``: the original is of unit norm (slice
  by slice), whatever the radius and the norm of the assigned value. The map is
  scale-invariant, so a wrong norm would not show in the weight, only in the gradients, which
  scale as ``1 / ‖original‖``.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import tether
from tether.constraints import Sphere

REAL = [torch.float32, torch.float64]

# Every diagonal matrix of signs of size 3: no reflection at all in QR.
SIGNS = [
    pytest.param(signs, id=",".join(f"{x:+d}" for x in signs))
    for signs in itertools.product((1, -1), repeat=3)
]


def householder(n_in: int, n_out: int, dtype: torch.dtype) -> nn.Linear:
    layer = nn.Linear(n_in, n_out, dtype=dtype)
    return tether.orthogonal(layer, orthogonal_map="householder", use_trivialization=False)


@pytest.mark.parametrize("dtype", REAL, ids=str)
@pytest.mark.parametrize("signs", SIGNS)
def test_householder_without_base_gives_back_a_diagonal_sign_matrix_exactly(signs, dtype):
    layer = householder(3, 3, dtype)
    W = torch.diag(torch.tensor(signs, dtype=dtype))
    layer.weight = W
    assert torch.equal(layer.weight, W)


@pytest.mark.parametrize("dtype", REAL, ids=str)
@pytest.mark.parametrize(
    ("n_in", "n_out"), [pytest.param(2, 4, id="tall"), pytest.param(4, 2, id="wide")]
)
def test_householder_without_base_gives_back_signed_unit_columns_exactly(n_in, n_out, dtype):
    layer = householder(n_in, n_out, dtype)
    W = torch.zeros(n_out, n_in, dtype=dtype)
    W[0, 0], W[1, 1] = 1.0, -1.0  # orthonormal rows (wide) or columns (tall)
    layer.weight = W
    assert torch.equal(layer.weight, W)


@pytest.mark.parametrize("dtype", REAL, ids=str)
def test_householder_without_base_mixes_skipped_and_real_reflections(dtype):
    # A rotation in the first plane (reflections that LAPACK computes) next to -1 and 1
    # (reflections it skips).
    c, s = 0.6, 0.8
    rows = [[c, -s, 0.0, 0.0], [s, c, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    W = torch.tensor(rows, dtype=dtype)
    layer = householder(4, 4, dtype)
    layer.weight = W
    tol = 16 * torch.finfo(dtype).eps
    torch.testing.assert_close(layer.weight, W, rtol=0, atol=tol)


# (layer, dim): the whole tensor, every row, every filter of a kernel.
SPHERES = {
    "whole": (lambda: nn.Linear(4, 3), None),
    "rows": (lambda: nn.Linear(4, 3), -1),
    "filters": (lambda: nn.Conv2d(2, 3, 2), (1, 2, 3)),
}


@pytest.mark.parametrize("scale", [0.01, 2.0, 50.0])
@pytest.mark.parametrize("dtype", REAL, ids=str)
@pytest.mark.parametrize("kind", list(SPHERES))
def test_sphere_right_inverse_stores_a_unit_original(kind, dtype, scale):
    make, dim = SPHERES[kind]
    layer = tether.sphere(make().to(dtype), radius=2.0, dim=dim)
    X = scale * torch.randn(layer.weight.shape, dtype=dtype)
    layer.weight = X
    eps = torch.finfo(dtype).eps
    original = layer.parametrizations.weight.original
    norms = torch.linalg.vector_norm(original, dim=dim)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=8 * eps)
    expected = 2.0 * X / torch.linalg.vector_norm(X, dim=dim, keepdim=True)
    torch.testing.assert_close(layer.weight, expected, rtol=8 * eps, atol=8 * eps)


@pytest.mark.parametrize("dtype", REAL, ids=str)
def test_sphere_right_inverse_of_a_member_is_the_member_over_the_radius(dtype):
    sphere = Sphere(radius=3.0, dim=-1)
    X = sphere.sample((4, 5), dtype=dtype)
    original = sphere.right_inverse(X)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(original, X / 3.0, rtol=8 * eps, atol=8 * eps)
    torch.testing.assert_close(sphere(original), X, rtol=8 * eps, atol=8 * eps)

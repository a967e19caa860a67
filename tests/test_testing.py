"""tether.testing.check_parametrization: passes good parametrizations, names what is wrong."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tether
from tests.parametrizations import Cayley, Skew, Symmetric
from tether.constraints import Constraint
from tether.testing import check_parametrization


class CayleyWrongSign(Cayley):
    """The inverse with the sign flipped: (Q + I)⁻¹(I - Q) instead of (Q + I)⁻¹(Q - I)."""

    def right_inverse(self, Q):
        eye = torch.eye(Q.shape[-1], dtype=Q.dtype)
        return torch.linalg.solve(Q + eye, eye - Q, left=False)


class HalvesDtype(nn.Module):
    def forward(self, X):
        return X

    def right_inverse(self, X):
        return X.half()


class Detaches(nn.Module):
    def forward(self, X):
        return X.detach()


class RankOne(nn.Module):
    def forward(self, x, y):
        return x.unsqueeze(-1) * y.unsqueeze(-2)

    def right_inverse(self, Z):
        u, s, vh = torch.linalg.svd(Z)
        return u[:, 0] * s[0], vh[0]


class Leaky(Constraint):
    """Claims to be symmetric but forward does not symmetrize."""

    def forward(self, X):
        return X

    def right_inverse(self, X):
        return X

    def sample(self, shape, *, dtype=None, device=None, generator=None):
        G = torch.randn(tuple(shape), dtype=dtype, generator=generator)
        return G + G.mT

    def distance(self, X):
        return (X - X.mT).abs().amax()


def symmetric_matrix(n=4):
    A = torch.randn(n, n, dtype=torch.float64)
    return A + A.T


def rotation(n=4):
    Q = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64)).Q
    Q[:, 0] *= torch.linalg.det(Q).sign()
    return Q


@pytest.mark.parametrize(
    ("parametrization", "member"),
    [
        (Symmetric(), symmetric_matrix()),
        (Skew(), Skew()(torch.randn(4, 4, dtype=torch.float64))),
        (Cayley(), rotation()),
        (RankOne(), torch.outer(torch.randn(3), torch.randn(4))),
    ],
    ids=["symmetric", "skew", "cayley", "many-to-one"],
)
def test_passes_a_correct_parametrization(parametrization, member):
    check_parametrization(parametrization, member)


def test_passes_tether_constraints_on_their_samples():
    for constraint in [tether.constraints.Orthogonal(), tether.constraints.Symmetric()]:
        check_parametrization(constraint, constraint.sample((4, 4), dtype=torch.float64))


def test_catches_the_sign_error_in_a_cayley_inverse():
    with pytest.raises(AssertionError, match=r"CayleyWrongSign: forward\(right_inverse\(X\)\) "):
        check_parametrization(CayleyWrongSign(), rotation())


def test_reports_by_how_much_and_the_tolerance():
    with pytest.raises(AssertionError, match=r"differs from X by \d\.\d\de[+-]\d+ .*tolerance"):
        check_parametrization(Symmetric(), torch.randn(4, 4, dtype=torch.float64))


def test_catches_a_right_inverse_that_changes_dtype():
    with pytest.raises(AssertionError, match="HalvesDtype: right_inverse changed the dtype"):
        check_parametrization(HalvesDtype(), torch.randn(3, 3))


def test_catches_a_forward_that_blocks_gradients():
    with pytest.raises(AssertionError, match="Detaches: no finite gradient reaches original 0"):
        check_parametrization(Detaches(), torch.randn(3, 3))


def test_catches_a_constraint_whose_forward_leaves_the_set():
    with pytest.raises(
        AssertionError, match=r"Leaky: forward of a random tensor is .* from the set"
    ):
        check_parametrization(Leaky(), symmetric_matrix())


def test_respects_a_given_tolerance():
    X = symmetric_matrix()
    X[0, 1] += 1e-3  # slightly off the set
    check_parametrization(Symmetric(), X, atol=1e-2)
    with pytest.raises(AssertionError):
        check_parametrization(Symmetric(), X, atol=1e-6)

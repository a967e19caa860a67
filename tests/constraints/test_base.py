"""Constraint and register_constraint: the dtypes a constraint takes, checked at the boundary."""

from __future__ import annotations

import re
from collections.abc import Sequence

import pytest
import torch
from torch import Tensor, nn

import tether
from tether.constraints import (
    Bounded,
    Constraint,
    Hurwitz,
    Invertible,
    LowRank,
    Orthogonal,
    Positive,
    PositiveDefinite,
    Simplex,
    SpecialLinear,
    SpecialOrthogonal,
    Sphere,
    WeightNorm,
)

# Every registering function that takes a 4 x 4 tensor. spectral_norm is left out: it builds
# its power-iteration state from the tensor before any check runs.
HELPERS = {
    "orthogonal": tether.orthogonal,
    "special_orthogonal": tether.special_orthogonal,
    "grassmannian": tether.grassmannian,
    "low_rank": lambda m, name: tether.low_rank(m, name, rank=2),
    "fixed_rank": lambda m, name: tether.fixed_rank(m, name, rank=2),
    "almost_orthogonal": tether.almost_orthogonal,
    "positive_definite": tether.positive_definite,
    "positive_semidefinite": tether.positive_semidefinite,
    "psd_low_rank": lambda m, name: tether.psd_low_rank(m, name, rank=2),
    "psd_fixed_rank": lambda m, name: tether.psd_fixed_rank(m, name, rank=2),
    "invertible": tether.invertible,
    "special_linear": tether.special_linear,
    "hurwitz": tether.hurwitz,
    "symmetric": tether.symmetric,
    "skew": tether.skew,
    "positive": tether.positive,
    "bounded": lambda m, name: tether.bounded(m, name, low=0, high=1),
    "simplex": tether.simplex,
    "sphere": tether.sphere,
    "poincare_ball": tether.poincare_ball,
    "weight_norm": tether.weight_norm,
}
INTEGERS = [torch.int64, torch.int32, torch.uint8, torch.bool]
REAL_ONLY = [SpecialOrthogonal, Invertible, SpecialLinear, Hurwitz, Positive, Simplex]


def with_buffer(dtype: torch.dtype) -> nn.Linear:
    module = nn.Linear(4, 4)
    module.register_buffer("idx", torch.arange(16).view(4, 4).to(dtype))
    return module


def refusal(dtype: torch.dtype) -> str:
    """The start of the error for ``Linear.idx`` of ``dtype``, any constraint's name."""
    needs = f"needs a floating-point or complex tensor; got dtype {dtype}."
    return rf"^Cannot parametrize Linear\.idx: \w+ {re.escape(needs)} "


@pytest.mark.parametrize("dtype", INTEGERS)
@pytest.mark.parametrize("helper", HELPERS)
def test_registering_on_an_integer_tensor_says_what_is_needed(helper, dtype):
    module = with_buffer(dtype)
    with pytest.raises(TypeError, match=refusal(dtype)) as error:
        HELPERS[helper](module, "idx")
    assert str(error.value).count("Cannot parametrize") == 1  # raised once, not re-wrapped
    assert "finfo" not in str(error.value)
    assert not tether.is_parametrized(module)
    assert module.idx.dtype == dtype


@pytest.mark.parametrize(
    "constraint", [Orthogonal(), LowRank(2), PositiveDefinite(), Sphere(), WeightNorm()]
)
def test_a_constraint_registered_as_a_class_refuses_integers_alike(constraint):
    module = with_buffer(torch.int64)
    with pytest.raises(TypeError, match=refusal(torch.int64)) as error:
        tether.register_parametrization(module, "idx", constraint)
    assert str(error.value).count("Cannot parametrize") == 1
    assert not tether.is_parametrized(module)


@pytest.mark.parametrize("cls", REAL_ONLY)
@pytest.mark.parametrize("register", ["function", "class"])
@pytest.mark.filterwarnings("ignore:Complex modules are a new feature")
def test_real_only_constraints_refuse_complex_tensors(cls, register):
    module = nn.Linear(4, 4).to(torch.complex64)
    helper = {SpecialLinear: "special_linear", SpecialOrthogonal: "special_orthogonal"}.get(
        cls, cls.__name__.lower()
    )
    with pytest.raises(ValueError, match=r"needs a real.*complex64"):
        if register == "function":
            HELPERS[helper](module, "weight")
        else:
            tether.register_parametrization(module, "weight", cls())
    assert not tether.is_parametrized(module)


def test_bounded_refuses_complex_tensors():
    with pytest.raises(ValueError, match=r"Bounded needs a real .*complex128"):
        Bounded(0, 1).in_manifold(torch.zeros(2, dtype=torch.complex128))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_membership_and_samples_refuse_integer_dtypes(dtype):
    with pytest.raises(TypeError, match=f"Orthogonal needs a floating-point .*{dtype}"):
        Orthogonal().in_manifold(torch.zeros(3, 3, dtype=dtype))
    with pytest.raises(TypeError, match=f"Orthogonal needs a floating-point .*{dtype}"):
        Orthogonal().sample((3, 3), dtype=dtype)


class _Real(Constraint):
    """A user's constraint on real tensors: the real part."""

    supports_complex = False

    def forward(self, X: Tensor) -> Tensor:
        return X

    def right_inverse(self, X: Tensor) -> Tensor:
        return X

    def sample(
        self,
        shape: Sequence[int],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        return torch.randn(shape, dtype=dtype, device=device, generator=generator)

    def distance(self, X: Tensor) -> Tensor:
        return X.new_zeros(())


def test_a_user_subclass_declares_real_tensors_only():
    module = nn.Module()
    module.register_buffer("z", torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"Cannot parametrize Module.z: _Real needs a real"):
        tether.constraints.register_constraint(module, "z", _Real())


def test_a_user_subclass_computes_in_float32_for_bfloat16():
    seen = []

    class Recording(_Real):
        def forward(self, X: Tensor) -> Tensor:
            seen.append(X.dtype)
            return X

    X = torch.ones(2, dtype=torch.bfloat16)
    assert Recording()(X).dtype == torch.bfloat16
    assert seen == [torch.float32]

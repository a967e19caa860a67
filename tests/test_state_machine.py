"""Random sequences of register / chain / assign / remove / state_dict / pickle / cached, run
in lock-step on a module parametrized by tether and a twin parametrized by PyTorch's own
``parametrize``; after every step both must show the same classes, values, ``state_dict``
and Parameter objects. Pickling is tether's alone (torch cannot pickle parametrized modules):
after a round trip the tether module must still match its twin."""

from __future__ import annotations

import pickle

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from torch import nn
from torch.nn.utils import parametrize as torch_parametrize

import tether
from tests.parametrizations import Double, Symmetric

N = 3
TOL = 1e-12  # float64; every map here is exact up to a few roundings


class Transpose(nn.Module):
    """An orthogonal map on matrices, its own inverse."""

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X.mT

    def right_inverse(self, Y: torch.Tensor) -> torch.Tensor:
        return Y.mT


class Shift(nn.Module):
    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X + 1

    def right_inverse(self, Y: torch.Tensor) -> torch.Tensor:
        return Y - 1


KINDS = {"symmetric": Symmetric, "scale": Double, "transpose": Transpose, "shift": Shift}
MATRIX_ONLY = {"symmetric", "transpose"}
NAMES = ("weight", "bias")


def random_tensor(seed: int, shape: torch.Size) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=TOL, atol=TOL))


def roots(module: nn.Module) -> dict[str, int]:
    """The id of the Parameter behind each tensor: the original if parametrized."""
    ids = {}
    for name in NAMES:
        if torch_parametrize.is_parametrized(module, name):
            ids[name] = id(module.parametrizations[name].original)
        else:
            ids[name] = id(module._parameters[name])
    return ids


class Twins(RuleBasedStateMachine):
    @initialize(seed=st.integers(0, 2**16))
    def build(self, seed: int) -> None:
        torch.manual_seed(seed)
        self.theirs = nn.Linear(N, N, dtype=torch.float64)
        self.ours = nn.Linear(N, N, dtype=torch.float64)
        self.ours.load_state_dict(self.theirs.state_dict())
        self.their_ids = roots(self.theirs)
        self.our_ids = roots(self.ours)

    def both(self, action):  # type: ignore[no-untyped-def]
        action(self.theirs, torch_parametrize)
        action(self.ours, tether)

    def perturb(self, seed: int) -> None:
        """Move every parameter in place, the same way in both twins (an optimizer step)."""
        for module in (self.theirs, self.ours):
            with torch.no_grad():
                for i, parameter in enumerate(module.parameters()):
                    parameter.add_(random_tensor(seed + i, parameter.shape))

    # --- rules ------------------------------------------------------------------------------

    @rule(name=st.sampled_from(NAMES), kind=st.sampled_from(sorted(KINDS)))
    def register(self, name: str, kind: str) -> None:
        """Register, or chain onto what is there already."""
        if name == "bias" and kind in MATRIX_ONLY:
            kind = "scale"
        self.both(lambda m, p: p.register_parametrization(m, name, KINDS[kind]()))

    @precondition(lambda self: tether.is_parametrized(self.ours))
    @rule(data=st.data(), seed=st.integers(0, 2**16))
    def assign(self, data: st.DataObject, seed: int) -> None:
        name = data.draw(st.sampled_from(sorted(self.ours.parametrizations)))
        value = random_tensor(seed, getattr(self.ours, name).shape)
        self.both(lambda m, p: setattr(m, name, value))
        assert close(getattr(self.ours, name), getattr(self.theirs, name))

    @precondition(lambda self: tether.is_parametrized(self.ours))
    @rule(data=st.data(), leave_parametrized=st.booleans())
    def remove(self, data: st.DataObject, leave_parametrized: bool) -> None:
        name = data.draw(st.sampled_from(sorted(self.ours.parametrizations)))
        self.both(lambda m, p: p.remove_parametrizations(m, name, leave_parametrized))

    @rule(seed=st.integers(0, 2**16))
    def save_perturb_load(self, seed: int) -> None:
        """Save, move every tensor in place (as an optimizer step does), load back."""
        saved = [
            {k: v.clone() for k, v in m.state_dict().items()} for m in (self.theirs, self.ours)
        ]
        self.perturb(seed)
        self.theirs.load_state_dict(saved[0])
        self.ours.load_state_dict(saved[1])

    @rule(seed=st.integers(0, 2**16))
    def load_plain_checkpoint(self, seed: int) -> None:
        """tether alone loads a plain checkpoint, through right_inverse; torch's twin gets the
        same values by assignment."""
        plain = tether.plain_state_dict(self.ours)
        self.perturb(seed)
        self.ours.load_state_dict(plain)
        for name, value in plain.items():
            if torch_parametrize.is_parametrized(self.theirs, name):
                setattr(self.theirs, name, value)
            else:
                with torch.no_grad():
                    self.theirs._parameters[name].copy_(value)

    @rule()
    def pickle_round_trip(self) -> None:
        self.ours = pickle.loads(pickle.dumps(self.ours))
        self.our_ids = roots(self.ours)

    @rule(seed=st.integers(0, 2**16))
    def cached_reads(self, seed: int) -> None:
        """Reads inside cached() are computed once, and an assignment there is seen at once
        (torch's cached() would serve the old value: the twin is assigned outside it)."""
        names = list(getattr(self.ours, "parametrizations", {}))
        with tether.cached(), torch_parametrize.cached():
            for name in names:
                first = getattr(self.ours, name)
                assert getattr(self.ours, name) is first
                assert close(first, getattr(self.theirs, name))
        if names:
            name = names[0]
            with tether.cached():
                getattr(self.ours, name)
                value = random_tensor(seed, getattr(self.ours, name).shape)
                self.both(lambda m, p: setattr(m, name, value))
                assert close(getattr(self.ours, name), getattr(self.theirs, name))

    # --- what must hold after every step ----------------------------------------------------

    @invariant()
    def same_structure(self) -> None:
        assert type(self.ours).__name__ == type(self.theirs).__name__
        for name in NAMES:
            assert tether.is_parametrized(self.ours, name) == torch_parametrize.is_parametrized(
                self.theirs, name
            )
            if tether.is_parametrized(self.ours, name):
                ours = [type(p) for p in self.ours.parametrizations[name]]
                assert ours == [type(p) for p in self.theirs.parametrizations[name]]

    @invariant()
    def same_values(self) -> None:
        x = random_tensor(0, torch.Size([2, N]))
        for name in NAMES:
            assert close(getattr(self.ours, name), getattr(self.theirs, name)), name
        assert close(self.ours(x), self.theirs(x))

    @invariant()
    def same_state_dict(self) -> None:
        ours, theirs = self.ours.state_dict(), self.theirs.state_dict()
        assert list(ours) == list(theirs)
        for key in ours:
            assert close(ours[key], theirs[key]), key

    @invariant()
    def same_parameter_objects(self) -> None:
        """Registration, chaining, assignment, removal and loading keep the Parameters."""
        assert roots(self.theirs) == self.their_ids
        assert roots(self.ours) == self.our_ids


Twins.TestCase.settings = settings(max_examples=30, stateful_step_count=20, deadline=None)
test_twins_stay_in_lock_step = Twins.TestCase

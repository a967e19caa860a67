"""Shared test configuration: a seeded RNG per test and hypothesis profiles."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "dev", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "ci", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(autouse=True)
def _seeded_rng():
    """Each test draws from its own seeded generator, so failures reproduce."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield


@pytest.fixture
def one_thread():
    """One intra-op thread, for modules of small tensors (``pytestmark``) and the examples: for
    them thread start-up costs more than it saves, and on a busy machine OpenMP threads that
    wait for each other slow the tests tenfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

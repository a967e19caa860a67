"""Shared test configuration: a seeded RNG per test, hypothesis profiles, and the ``--device``
and ``--dtype`` options.

Tests that hold for any device or floating dtype take the ``device`` and ``dtype`` fixtures and
build their modules and tensors with them: ``pytest --device cuda`` runs them on a GPU, and
``pytest --dtype float64`` in double precision. Without the options the fixtures give the CPU and
the default dtype, so every test runs as it does without them; a test that needs a particular
dtype keeps its own.
"""

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

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tether")
    group.addoption(
        "--device",
        default=None,
        help="device for the tests that take the `device` fixture, e.g. cuda (default: cpu)",
    )
    group.addoption(
        "--dtype",
        default=None,
        choices=sorted(DTYPES),
        help="dtype for the tests that take the `dtype` fixture (default: torch's default dtype)",
    )


def pytest_configure(config: pytest.Config) -> None:
    name = config.getoption("device")
    if name is None:
        return
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise pytest.UsageError(f"--device {name}: not a torch device ({error})") from None
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and not (backend is not None and backend.is_available()):
        raise pytest.UsageError(f"--device {name}: torch sees no {device.type} device here")


@pytest.fixture
def device(pytestconfig: pytest.Config) -> torch.device:
    """The device of ``--device``, the CPU without it."""
    return torch.device(pytestconfig.getoption("device") or "cpu")


@pytest.fixture
def dtype(pytestconfig: pytest.Config) -> torch.dtype:
    """The dtype of ``--dtype``, torch's default dtype (float32) without it."""
    name = pytestconfig.getoption("dtype")
    return DTYPES[name] if name else torch.get_default_dtype()


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

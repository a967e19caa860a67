"""The conformance suite follows ``--device`` (``tests/conftest.py``): its layers are built on
that device (:data:`tests.conformance.table.DEVICE`) and its inputs moved there."""

from __future__ import annotations

import pytest
import torch

from tests.conformance import table


@pytest.hookimpl(trylast=True)  # after tests/conftest.py has checked the option
def pytest_configure(config: pytest.Config) -> None:
    name = config.getoption("device")
    table.DEVICE = None if name is None else torch.device(name)

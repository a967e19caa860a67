"""The runnable examples run and show what they claim."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_tour_runs_and_every_check_holds(capsys: pytest.CaptureFixture[str]) -> None:
    runpy.run_path(str(EXAMPLES / "tour.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "False" not in out
    calls = [line.split()[-1] for line in out.splitlines() if "forward calls" in line]
    assert calls == ["4", "1"]
    assert "ParametrizedLinear" in out

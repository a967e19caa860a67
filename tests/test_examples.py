"""The runnable examples run and show what they claim."""

from __future__ import annotations

import argparse
import math
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tether

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str) -> dict:
    """The namespace of ``examples/<name>.py``, without running its ``__main__`` block."""
    return runpy.run_path(str(EXAMPLES / name), run_name=f"example_{Path(name).stem}")


class Parsed(Exception):
    """Raised by the patched ``parse_args``: the command line was accepted, stop there."""


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.py")), ids=lambda p: p.name)
def test_every_example_takes_quick(example: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``python examples/<name>.py --quick`` parses (the README promises it), without training."""
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise Parsed(parse(self, *args, **kwargs))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [str(example), "--quick"])
    with pytest.raises(Parsed) as parsed:
        runpy.run_path(str(example), run_name="__main__")
    assert parsed.value.args[0].quick is True


def test_tour_runs_and_every_check_holds(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / "tour.py"), "--quick"])
    runpy.run_path(str(EXAMPLES / "tour.py"), run_name="__main__")  # so that its classes pickle
    out = capsys.readouterr().out
    assert "False" not in out
    calls = [line.split()[-1] for line in out.splitlines() if "forward calls" in line]
    assert calls == ["4", "1"]
    assert "ParametrizedLinear" in out


def test_copy_task_quick_prints_the_table_and_saves_the_figure(tmp_path, capsys, one_thread):
    results = load("copy_task.py")["main"](["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert [r.name for r in results] == ["orthogonal RNN", "unconstrained RNN", "LSTM"]
    for result in results:
        assert len(result.losses) == 120
        assert math.isfinite(result.losses[0]) and 0 <= result.accuracy <= 1
        assert re.search(rf"^{result.name}\s+[\d.]+\s+[\d.]+%\s+[\d.]+\s+\d+$", out, re.M)
    rnn, _, lstm = results
    assert abs(lstm.parameters - rnn.parameters) < 0.1 * rnn.parameters
    assert "memoryless baseline: loss 0.5199" in out  # 10 log 8 / (20 + 20)
    for result in results:  # a recall below the memoryless guess's 1 in 8 comes with a why
        assert (f"note: {result.name}'s recall" in out) == (result.accuracy < 1 / 8)
    assert (tmp_path / "copy_task.png").stat().st_size > 10_000


def test_copy_task_says_why_a_model_that_writes_blanks_recalls_nothing() -> None:
    example = load("copy_task.py")

    class Blanks(torch.nn.Module):
        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.one_hot(torch.zeros_like(inputs), 9).float()

    data = example["copy_batch"](4, 5, torch.Generator().manual_seed(0), "cpu")
    _, accuracy, blanks = example["evaluate"](Blanks(), data)
    assert (accuracy, blanks) == (0.0, 1.0)
    note = example["note"](example["Result"]("blanks", 0, accuracy=accuracy, blanks=blanks))
    assert "writes the blank at 100% of the recall steps" in " ".join(note.split())
    assert "not learned that the marker starts the recall" in " ".join(note.split())


def test_copy_task_help_shows_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        load("copy_task.py")["main"](["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 200)" in out and "(default: 0.002)" in out
    assert "(default: 400, --quick: 120)" in out and "None" not in out


def test_copy_task_data_and_baseline():
    example = load("copy_task.py")
    inputs, targets = example["copy_batch"](3, 200, torch.Generator().manual_seed(0), "cpu")
    assert inputs.shape == targets.shape == (220, 3)
    assert torch.equal(targets[-10:], inputs[:10])
    assert (inputs[10:209] == 0).all() and (inputs[209] == 9).all() and (inputs[210:] == 0).all()
    assert (targets[:-10] == 0).all() and ((inputs[:10] >= 1) & (inputs[:10] <= 8)).all()
    assert example["baseline"](200) == pytest.approx(10 * math.log(8) / 220)


def test_copy_task_kernel_is_orthogonal_and_starts_as_rotations():
    example = load("copy_task.py")
    constrained = example["RNN"](16, orthogonal=True)
    W = constrained.recurrent.weight
    assert torch.allclose(W.T @ W, torch.eye(16), atol=1e-5)
    assert torch.count_nonzero(W) == 32  # 2 x 2 blocks on the diagonal
    plain = example["RNN"](16, orthogonal=False, rotations=False)
    assert not tether.is_parametrized(plain)


def test_spd_covariance_reaches_the_sample_covariance(capsys, one_thread):
    gap = load("spd_covariance.py")["main"](["--quick"])
    assert gap < 0.05
    assert "positive definite at every step: True" in capsys.readouterr().out


def test_low_rank_adapter_recovers_the_update(capsys, one_thread):
    error = load("low_rank_adapter.py")["main"](["--quick"])
    out = capsys.readouterr().out
    assert error < 0.2
    assert "rank of the learned update: 4" in out
    assert "pretrained weight unchanged: True" in out


def test_lipschitz_classifier_bound_holds(one_thread):
    results = load("lipschitz_classifier.py")["main"](["--quick"])
    accuracy, bound, estimate = results["spectral norm"]
    assert accuracy > 0.9
    assert bound == pytest.approx(10.0, rel=1e-4)  # each layer has norm 1, times the scale
    assert estimate <= bound
    assert results["unconstrained"][1] > bound


def test_normalizing_flow_beats_a_gaussian_inverts_and_plots(capsys, one_thread, tmp_path):
    nll = load("normalizing_flow.py")["main"](["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "normalizing_flow.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    gaussian = float(re.search(r"the best Gaussian: ([\d.]+)", out)[1])
    assert nll < gaussian
    logdet = float(re.search(r"within ([\d.e+-]+) of slogdet", out)[1])
    inverse = float(re.search(r"within ([\d.e+-]+) of the data", out)[1])
    assert logdet < 1e-4 and inverse < 1e-3


def test_distributed_example_keeps_processes_in_sync():
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / "distributed.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[:4000] + "\n...\n" + run.stderr[-2000:]
    assert "2 processes hold identical state_dicts: True" in run.stdout
    assert "orthogonal layer still orthogonal: True" in run.stdout

"""examples/prune_steps.py runs with --quick and prints what it claims."""

from __future__ import annotations

import re
import runpy
import sys
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "prune_steps.py"
ROW = re.compile(r"^\s*(\d+)%\s+\|\s+([\d.]+)\s+([\d.]+)\s+\|\s+([\d.]+)\s+([\d.]+)$")


@pytest.fixture(scope="module")
def output() -> str:
    """The output of one --quick run, shared by the tests below (it takes a few seconds)."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch, redirect_stdout(StringIO()) as out:
        patch.setattr(sys, "argv", [str(EXAMPLE), "--quick"])
        runpy.run_path(str(EXAMPLE), run_name="__main__")
    assert torch.get_num_threads() == threads
    return out.getvalue()


def rows(output: str) -> list[tuple[int, float, float, float, float]]:
    found = [ROW.match(line) for line in output.splitlines()]
    return [(int(m[1]), *(float(m[i]) for i in range(2, 6))) for m in found if m]


def test_prints_one_row_per_sparsity_step(output):
    assert "sparsity | layer-wise l1: pruned  tuned | global l1: pruned  tuned" in output
    assert [row[0] for row in rows(output)] == [0, 50, 70, 80, 90, 95]


def test_the_dense_model_learns_the_spirals(output):
    dense = float(re.search(r"dense model: \d+ parameters, test accuracy ([\d.]+)", output)[1])
    assert dense > 0.9
    _, layerwise_pruned, _, global_pruned, _ = rows(output)[0]
    assert layerwise_pruned == global_pruned == dense  # 0%: nothing pruned yet


def test_fine_tuning_recovers_accuracy_at_half_sparsity(output):
    _, layerwise_pruned, layerwise_tuned, _, global_tuned = rows(output)[1]
    assert layerwise_tuned > 0.9
    assert global_tuned > 0.9
    assert layerwise_tuned >= layerwise_pruned - 0.05


def test_reports_the_final_sparsity_table_and_a_permanent_pruning(output):
    table = output[output.index("per tensor:") :]
    assert re.search(r"^total\s+\d+\s+\d+\s+95\.0%$", table, re.MULTILINE)
    for name in ("0.weight", "2.weight", "4.weight"):
        assert re.search(rf"^{re.escape(name)}\s+\d+\s+\d+\s+[\d.]+%$", table, re.MULTILINE)
    final = re.search(r"after prune.remove: plain Linear layers, (\d+) zero weights", output)
    zeros = re.search(r"^total\s+(\d+)", table, re.MULTILINE)
    assert final is not None and zeros is not None
    assert int(final[1]) >= int(zeros[1])
    after, before = re.search(r"test accuracy ([\d.]+) \(before: ([\d.]+)\)", output).groups()
    assert after == before

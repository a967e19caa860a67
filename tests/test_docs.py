"""Every Python block in the README and the docs runs, in order, one module per page."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def run_page(page: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the page's blocks in a registered module, so that its classes pickle."""
    module = types.ModuleType(f"docs_page_{page.stem.lower()}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for number, code in enumerate(BLOCK.findall(page.read_text())):
        exec(compile(code, f"{page.name}[block {number}]", "exec"), module.__dict__)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_code_runs(page: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_page(page, monkeypatch)


def test_how_it_works_shows_the_error_it_prints(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    page = ROOT / "docs" / "how_it_works.md"
    run_page(page, monkeypatch)
    printed = " ".join(capsys.readouterr().out.split())
    quoted = re.search(r"prints `(.*?)`", page.read_text(), re.DOTALL)
    assert quoted is not None
    assert " ".join(quoted.group(1).split()) == printed

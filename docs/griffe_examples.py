"""Griffe extension: read tether's ``Example:`` docstring sections as examples.

Griffe's Google-style parser knows the section as ``Examples:``; under the singular title it
renders the section as an admonition of plain Markdown, where ``>>>`` lines are not code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

TITLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = TITLE.sub(r"\1Examples:", obj.docstring.value)

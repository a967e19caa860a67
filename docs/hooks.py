"""mkdocs hook: render the Sphinx roles of tether's docstrings as plain code.

The docstrings cross-reference with Sphinx roles (``:class:`Orthogonal```), which Markdown
renders as ``:class:<code>Orthogonal</code>``; this hook drops the role and keeps the code.
"""

from __future__ import annotations

import re
from typing import Any

ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):(<code>)")


def on_page_content(html: str, **kwargs: Any) -> str:
    return ROLE.sub(r"\1", html)


# Links from a page to files outside docs/ (the benchmark scripts, the examples) work when the
# Markdown is read on the repository, not on the site: keep their text, drop the link.
OUTSIDE = re.compile(r"\[([^\]\n]+)\]\((?:\.\./)+(?!docs/)[^)\s]+\)")


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    return OUTSIDE.sub(r"\1", markdown)

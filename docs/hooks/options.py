"""The options reference, from the code: ``RefreshingWebDataset``'s signature and the webdataset
arguments it refuses, each with the code's own reason (``wdsrefresh/pipeline/compat.py``).

Markers: ``<!-- options: signature -->`` (the constructor, one parameter per line, defaults as
the code has them) and ``<!-- options: refused -->`` (a table: argument, what replaces it, the
webdataset default that is let through). The hand-written entries around them are checked
against the code by tests/test_docs_site.py.
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the tree being documented, first

MARKER = re.compile(r"^<!-- options: (\w+) -->$", re.MULTILINE)


def _default(value: object) -> str:
    return getattr(value, "__name__", None) or repr(value)


def signature() -> str:
    """``RefreshingWebDataset(...)`` as a Python block: each parameter with its annotation and default."""
    from wdsrefresh import RefreshingWebDataset

    lines = []
    for name, p in inspect.signature(RefreshingWebDataset.__init__).parameters.items():
        if name == "self":
            continue
        if p.kind is p.KEYWORD_ONLY and not any(line.strip() == "*," for line in lines):
            lines.append("    *,")
        text = f"**{name}" if p.kind is p.VAR_KEYWORD else name
        if p.annotation is not p.empty:
            text += f": {p.annotation}"
        if p.default is not p.empty:
            text += f" = {_default(p.default)}"
        lines.append(f"    {text},")
    return "```python\nRefreshingWebDataset(\n" + "\n".join(lines) + "\n)\n```\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;")


def refused() -> str:
    """The webdataset arguments refused, each row anchored ``wds-NAME``, with the code's reason."""
    from wdsrefresh.pipeline import compat

    rows = ["| argument | refused, because | accepted as |", "|---|---|---|"]
    for name, reason in compat._REPLACED.items():
        through = f"`{compat._DEFAULTS[name]!r}`" if name in compat._DEFAULTS else ""
        rows.append(f'| <span id="wds-{name}"></span>`{name}` | {_cell(reason)} | {through} |')
    return "\n".join(rows) + "\n"


RENDER = {"signature": signature, "refused": refused}


def on_page_markdown(markdown: str, page, config, files) -> str:
    return MARKER.sub(lambda m: RENDER[m.group(1)](), markdown)

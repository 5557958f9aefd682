"""The Python API reference, from ``wdsrefresh._EXPORTS`` (what ``__all__`` is made of).

A page groups the exported names with markers, ``<!-- api: RefreshingWebDataset make_source -->``;
each name becomes a mkdocstrings block for the object the package exports under it, headed by
that name. After the pages are read, every exported name must have been placed exactly once,
and no marker may name something the package does not export: otherwise a warning, which the
strict build turns into an error.
"""

from __future__ import annotations

import logging
import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the tree being documented, first

import wdsrefresh  # noqa: E402 - imports nothing heavy: its names are lazy

log = logging.getLogger("mkdocs.hooks.api")
MARKER = re.compile(r"^<!-- api: ([\w ]+) -->$", re.MULTILINE)
placed: Counter = Counter()


def block(name: str) -> str:
    """The mkdocstrings block documenting exported ``name``, headed ``name`` (anchor: ``name``)."""
    module, _, attr = wdsrefresh._EXPORTS[name].partition(":")
    path = f"wdsrefresh.{module}" if attr == "module" else f"wdsrefresh.{module}.{attr or name}"
    options = [f"heading: {name}", f"toc_label: {name}"]
    if attr == "module":
        options.append("members: false")
    lines = [f'<a id="{name}"></a>', "", f"::: {path}", "    options:"]
    return "\n".join(lines + [f"      {option}" for option in options]) + "\n"


def _expand(match: re.Match) -> str:
    names = match.group(1).split()
    placed.update(names)
    return "\n".join(block(name) for name in names if name in wdsrefresh._EXPORTS)


def on_pre_build(config) -> None:
    placed.clear()


def on_page_markdown(markdown: str, page, config, files) -> str:
    return MARKER.sub(_expand, markdown)


def on_env(env, config, files):
    exported = set(wdsrefresh._EXPORTS)
    for name in sorted(exported - set(placed)):
        log.warning("the API reference does not document wdsrefresh.%s: add it to an '<!-- api: ... -->' marker", name)
    for name in sorted(set(placed) - exported):
        log.warning("an '<!-- api: ... -->' marker names %s, which wdsrefresh does not export", name)
    for name, count in sorted(placed.items()):
        if count > 1:
            log.warning("the API reference documents wdsrefresh.%s %d times", name, count)
    return env

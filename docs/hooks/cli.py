"""The command-line reference: ``<!-- cli -->`` becomes the ``--help`` of ``wdsrefresh`` and of
each of its subcommands, as argparse prints it (``wdsrefresh/cli.py``'s ``build_parser``), each
under a heading anchored by the command's name (``#wdsrefresh``, ``#pack``, ...)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the tree being documented, first

MARKER = "<!-- cli -->"
# columns of the help text, as on an 80-column terminal: the same whatever terminal builds the
# page, and narrow enough for the page's column
WIDTH = 78


def commands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """(anchor, parser) for ``parser`` and every subcommand below it, depth first, aliases once."""
    yield parser.prog.split()[-1], parser
    seen = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if id(sub) not in seen:
                    seen.add(id(sub))
                    yield from commands(sub)


def _help(parser: argparse.ArgumentParser) -> str:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(WIDTH + 2)  # argparse leaves two columns free
    try:
        return parser.format_help()
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def render() -> str:
    from wdsrefresh.cli import build_parser

    sections = []
    for anchor, parser in commands(build_parser()):
        sections.append(f"## `{parser.prog}` {{#{anchor}}}\n\n```text\n{_help(parser).rstrip()}\n```\n")
    return "\n".join(sections)


def on_page_markdown(markdown: str, page, config, files) -> str:
    return markdown.replace(MARKER, render()) if MARKER in markdown else markdown

"""The fenced blocks of Markdown pages, as the example-running test sees them.

A block's kind comes from its fence's language: ``python`` runs in the interpreter,
``bash``/``sh``/``shell``/``console`` runs in bash, and a block whose lines start with ``$ ``
(with one of those languages, or none) is a transcript: its commands run, its output is shown,
never compared. Anything else (``text``, ``json``, a table of figures) is not an example.

The HTML comment right before a fence (blank lines aside) says how to run it:
``<!-- example: skip REASON -->`` (the reason is required) or ``<!-- example: s3 -->`` (it needs
the object store; so does a block that names ``s3://``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

PYTHON = {"python", "py", "python3"}
SHELL = {"bash", "sh", "shell", "console"}
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`]*)$")
_MARKER = re.compile(r"^\s*<!--\s*example:(?P<body>.*?)-->\s*$")


@dataclass(frozen=True)
class Block:
    name: str  # the page, as the test ids show it (relative to the repository when inside it)
    line: int  # the line of the opening fence, counted from 1
    lang: str  # the fence's language, lower-cased; "" when it names none
    text: str  # the block's lines, the fence's indentation removed
    marker: str | None  # what follows "example:" in the comment right before the fence

    @property
    def where(self) -> str:
        return f"{self.name}:{self.line}"

    @property
    def kind(self) -> str:
        """"python", "shell", "transcript" or "text" (not an example)."""
        if self.lang in PYTHON:
            return "python"
        if self.lang in SHELL or self.lang == "":
            if any(line.startswith("$ ") for line in self.text.splitlines()):
                return "transcript"
            return "shell" if self.lang else "text"
        return "text"

    def skip_reason(self) -> str | None:
        """The reason of ``<!-- example: skip REASON -->``; raises ValueError for a marker that
        gives none or that is not one of the two this collector knows."""
        if self.marker is None or self.marker == "s3":
            return None
        word, _, reason = self.marker.partition(" ")
        if word != "skip":
            raise ValueError(f"{self.where}: unknown example marker {self.marker!r}: "
                             "write <!-- example: skip REASON --> or <!-- example: s3 -->")
        if not reason.strip(" ()"):
            raise ValueError(f"{self.where}: <!-- example: skip --> needs a reason: <!-- example: skip REASON -->")
        return reason.strip()

    @property
    def needs_s3(self) -> bool:
        return self.marker == "s3" or "s3://" in self.text

    def transcript_commands(self) -> list[str]:
        """The commands of a transcript: each ``$ `` line with its ``\\`` continuations."""
        commands, going_on = [], False
        for line in self.text.splitlines():
            if going_on:
                commands[-1] += "\n" + line
            elif line.startswith("$ "):
                commands.append(line[2:])
            else:
                continue  # output
            going_on = line.rstrip().endswith("\\")
        return commands


def page_blocks(path: str, name: str) -> list[Block]:
    """Every fenced block of the Markdown file ``path``, in order."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        end = i + 1
        while end < len(lines) and not _closes(lines[end], fence):
            end += 1
        body = [line[indent:] if line[:indent].strip() == "" else line.lstrip() for line in lines[i + 1:end]]
        info = opening["info"].strip().split()
        blocks.append(Block(name, i + 1, info[0].lower() if info else "", "\n".join(body) + "\n",
                            _marker_before(lines, i)))
        i = end + 1
    return blocks


def _closes(line: str, fence: str) -> bool:
    stripped = line.strip()
    return stripped.startswith(fence) and set(stripped) == {fence[0]}


def _marker_before(lines: list[str], i: int) -> str | None:
    j = i - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    found = _MARKER.match(lines[j]) if j >= 0 else None
    return " ".join(found["body"].split()) if found else None


def markdown_files(root: str, given: str | None) -> list[tuple[str, str]]:
    """(path, name) of the pages to collect: ``given`` (files or directories, separated by
    os.pathsep) when set, else README.md and every .md under docs/."""
    targets = given.split(os.pathsep) if given else [os.path.join(root, "README.md"), os.path.join(root, "docs")]
    found = []
    for target in targets:
        if os.path.isdir(target):
            found += sorted(os.path.join(d, f) for d, _, files in os.walk(target) for f in files if f.endswith(".md"))
        else:
            found.append(target)
    return [(path, _name(root, path)) for path in found]


def _name(root: str, path: str) -> str:
    relative = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    return os.path.basename(path) if relative.startswith("..") else relative

"""Which file names are shards, which are still being written, and how members group into samples."""

from __future__ import annotations

import fnmatch
import os
import re

SHARD_PATTERNS = ("*.tar", "*.tar.gz", "*.tgz")
TEMPORARY_PATTERNS = (".*", "*.tmp", "*.part", "*~", "_tmp*", "*.partial")
_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


_TEMPORARY = re.compile("|".join(fnmatch.translate(p) for p in TEMPORARY_PATTERNS))
_SHARD = re.compile("|".join(fnmatch.translate(p) for p in SHARD_PATTERNS))


def is_temporary(name: str) -> bool:
    """Hidden files and the usual names of files still being written."""
    return _TEMPORARY.match(os.path.basename(name)) is not None


def is_shard_name(name: str) -> bool:
    base = os.path.basename(name)
    return _TEMPORARY.match(base) is None and _SHARD.match(base) is not None


def split_key(fname: str) -> tuple[str | None, str | None]:
    """webdataset's ``base_plus_ext``: ``"dir/a.b.c"`` -> ``("dir/a", "b.c")``."""
    if "/" not in fname:
        dot = fname.find(".")
        return (fname[:dot], fname[dot + 1 :]) if dot > 0 else (None, None)
    match = _KEY_RE.match(fname)
    return (match.group(1), match.group(2)) if match else (None, None)

"""Which file names are shards, which are still being written, how members group into samples,
and where a URL's scheme ends (the syntax only: ``storage.backend`` decides what a scheme reads)."""

from __future__ import annotations

import fnmatch
import os
import re

SHARD_PATTERNS = ("*.tar", "*.tar.gz", "*.tgz")
TEMPORARY_PATTERNS = (".*", "*.tmp", "*.part", "*~", "_tmp*", "*.partial")
_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


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


def split_url(name: str) -> tuple[str, str] | None:
    """(scheme, rest) of a URL: ``"s3://b/k"`` -> ``("s3", "b/k")``; None for a path."""
    match = _URL_RE.match(name)
    return (match.group(1), name[match.end():]) if match else None


def join_url(scheme: str, rest: str) -> str:
    """The URL of ``scheme`` and ``rest``: ``split_url``'s inverse."""
    return f"{scheme}://{rest}"

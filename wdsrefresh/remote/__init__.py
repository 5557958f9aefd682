"""Shards in object stores (``s3://bucket/prefix/``): the same invariants, other primitives.

- ``store.py``: one store's client (made lazily in each process, never pickled), listing,
  pinned ranged reads, retries with backoff, and the errors that name the URL.
- ``listing.py``: ListObjectsV2 pages read from their XML, not by botocore's generic parser.
- ``reader.py``: a pinned object read block by block, each block checked against its digest
  before the tar reader sees a byte of it, with read-ahead in a background thread.
- ``source.py``: ``ObjectSource``, the shard source of ``s3://`` URLs: a listing (or a
  manifest) per epoch, objects indexed once per (URL, ETag).

This module imports nothing: asking whether a source is remote costs no boto3 import.
"""

from __future__ import annotations

import re

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote(spec: object) -> bool:
    """Whether ``spec`` is a URL (``s3://...``, ``gs://...``), not a local path."""
    return isinstance(spec, str) and _SCHEME.match(spec) is not None

"""Shards in object stores (``s3://bucket/prefix/``) and on web servers (``https://``): the same
invariants, other primitives.

- ``retry.py``: the retry policy every store shares, and the errors that name the URL.
- ``store.py``: one S3 store's client (made lazily in each process, never pickled), listing,
  pinned ranged reads.
- ``http_store.py``: a web server read the same way: HEAD, ranged GETs pinned by ``If-Match``
  and checked against the ETag each response names; servers without a strong ETag or ranges
  are refused.
- ``listing.py``: ListObjectsV2 pages read from their XML, not by botocore's generic parser.
- ``reader.py``: a pinned object read block by block, each block checked against its digest
  before the tar reader sees a byte of it, with read-ahead in a background thread.
- ``source.py``: ``ObjectSource``, the shard source of ``s3://`` and ``https://`` URLs: a
  listing, HEADs or a manifest per epoch, objects indexed once per (URL, ETag).

This module imports nothing: asking whether a source is remote costs no boto3 import.
"""

from __future__ import annotations

import re

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote(spec: object) -> bool:
    """Whether ``spec`` is a URL (``s3://...``, ``gs://...``), not a local path."""
    return isinstance(spec, str) and _SCHEME.match(spec) is not None

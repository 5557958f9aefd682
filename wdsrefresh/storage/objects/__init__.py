"""Shards in object stores (``s3://bucket/prefix/``) and on web servers (``https://``): the same
invariants, other primitives.

- ``backend.py``: the Backend of every URL scheme (``storage.backend.backend_for`` picks it).
- ``retry.py``: the retry policy every store shares, and the errors that name the URL.
- ``s3.py``: one S3 store's client (made lazily in each process, never pickled), listing,
  pinned ranged reads; ``s3_listing.py``: ListObjectsV2 pages read from their XML, not by
  botocore's generic parser.
- ``http.py``: a web server read the same way: HEAD, ranged GETs pinned by ``If-Match`` and
  checked against the ETag each response names; servers without a strong ETag or ranges are
  refused.
- ``cache.py``: checked blocks kept on local disk, keyed by URL and version.
- ``blocks.py``: a pinned object read block by block, each block checked against its digest
  before the tar reader sees a byte of it, read ahead through ``window.py``: one consumer's
  GETs, several in flight, within its memory budget.
- ``source.py``: ``ObjectSource``, the shard source of ``s3://`` and ``https://`` URLs: a
  listing, HEADs or a manifest per epoch (``plans.py``), objects indexed once per (URL, ETag),
  new ones indexed between epochs (``ahead.py``).

The write side's S3 destination and ``verify`` of a prefix use ``s3.py`` and ``blocks.py``
through the names below; nothing else outside ``storage/`` imports this package.
"""

from ..face import lazy_names

_FACE = {
    "Store": "s3",
    "ObjectUrl": "s3",
    "same_etag": "s3",
    "ObjectChangedError": "retry",
    "ObjectVanishedError": "retry",
    "index_object": "blocks",
}


__getattr__ = lazy_names(__name__, _FACE)

"""The one place that maps a source argument to where its shards are: local files or objects.

``make_source`` turns what a user passes (a directory, glob, brace pattern, manifest, file, a
list of them, ``s3://`` or ``https://`` URLs, or a ShardSource) into a ShardSource. URLs make a
``remote.source.ObjectSource``, imported only then: a job that reads local files never loads
the object-store modules through here.
"""

from __future__ import annotations

from .objects import is_remote
from .local.sources import ListSource, ShardSource, local_source


def make_source(spec: object, storage_options: dict | None = None) -> ShardSource:
    """A ShardSource for ``spec``; ``storage_options`` go to the object source of ``s3://`` and
    ``https://`` URLs (a list of URLs makes one source), and are refused for anything else."""
    if is_remote(spec) or (isinstance(spec, (list, tuple)) and spec and all(map(is_remote, spec))):
        from .objects.source import ObjectSource

        return ObjectSource(spec, storage_options=storage_options)
    if storage_options is not None:
        raise TypeError(f"storage_options apply to s3:// and https:// URLs, not to {spec!r}")
    if isinstance(spec, (list, tuple)):
        return ListSource(make_source(s) for s in spec)
    return local_source(spec)

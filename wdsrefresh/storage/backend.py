"""The one place that reads a URL scheme: a source spec or a shard's URL to its Backend.

``backend_for`` maps a path (or a ``file://``-less string) to local files and a URL to the
object-store backend of its scheme, importing that backend only then: a job that reads local
files never loads the object-store modules. ``make_source`` turns what a user passes (a
directory, glob, brace pattern, manifest, file, a list of them, ``s3://`` or ``https://`` URLs,
or a ShardSource) into a ShardSource through it.
"""

from __future__ import annotations

import os

from ..format.names import split_url
from .interface import Backend
from .source import ListSource, ShardSource

def backend_for(spec: object) -> Backend:
    """The backend of ``spec``: a path or a shard's URL (a ``scheme://`` URL is an object's,
    even of a scheme no backend reads: that backend's source says why)."""
    url = split_url(spec) if isinstance(spec, str) and "://" in spec else None
    scheme = "" if url is None else url[0].lower()
    backend = _BY_SCHEME.get(scheme)
    if backend is None:  # asked once per scheme and process: a snapshot asks once per shard
        backend = _BY_SCHEME[scheme] = _load(scheme)
    return backend


_BY_SCHEME: dict[str, Backend] = {}


def _load(scheme: str) -> Backend:
    if not scheme:
        from .local.backend import LOCAL_FILES

        return LOCAL_FILES
    from .objects.backend import objects_backend

    return objects_backend(scheme)


def local_path(spec: str) -> str | None:
    """``spec`` as a local path: itself, or a ``file://`` URL's path; None for any other URL."""
    url = split_url(spec)
    if url is None:
        return spec
    return url[1] if url[0].lower() == "file" else None


def make_source(spec: object, storage_options: dict | None = None) -> ShardSource:
    """A ShardSource for ``spec``; ``storage_options`` go to the object source of ``s3://`` and
    ``https://`` URLs (a list of URLs makes one source), and are refused for anything else."""
    if isinstance(spec, ShardSource) and storage_options is None:
        return spec
    if isinstance(spec, (list, tuple)) and spec:
        backends = [backend_for(s) for s in spec]
        if not any(b.local for b in backends):  # URLs: listed together, by one source
            return backends[0].source(list(spec), storage_options)
    if isinstance(spec, (list, tuple)):
        if storage_options is not None:
            raise TypeError(f"storage_options apply to s3:// and https:// URLs, not to {spec!r}")
        return ListSource(make_source(s) for s in spec)
    return backend_for(os.fspath(spec) if isinstance(spec, os.PathLike) else spec).source(spec, storage_options)

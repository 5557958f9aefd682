"""Shards as local files: sources, the readiness rule, the index cache, a watched directory's
index, watchers and the inotify binding.

Reading goes through ``storage.backend`` like any backend's; the names below are what the rest
of the package uses of local files alone (watching a directory, leases, the index cache's
place), each imported from its module when first asked for. Nothing outside ``storage/``
imports a module of this package directly.
"""

from ..face import lazy_names

_FACE = {
    "DirectoryIndex": "directory",
    "DirectorySource": "sources",
    "cache_directory": "index_cache",
    "Change": "inotify",
    "open_for_writing": "lease",
    "WriterSignals": "probe",
    "WATCHERS": "watch",
    "Watcher": "watch",
    "new_watcher": "watch",
    "poll_interval": "watch",
    "watch_or_poll": "watch",
}


__getattr__ = lazy_names(__name__, _FACE)

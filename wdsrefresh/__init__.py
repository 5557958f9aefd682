"""wdsrefresh: a streaming WebDataset loader whose shards are re-resolved every epoch.

Names are imported lazily, so the command-line tools (pack, ingest, verify, ls) do not pay
for importing torch and webdataset.
"""

from importlib import import_module

_EXPORTS = {
    "RefreshingWebDataset": "dataset",
    "EpochStats": "stats",
    "TimedLoader": "stats",
    "log_stats": "stats",
    "timed": "stats",
    "ReadStats": "reading",
    "ShardVanishedError": "reading",
    "DigestMismatch": "reading",
    "CountMismatch": "reading",
    "TruncatedShard": "probe",
    "ShardInfo": "snapshot",
    "Snapshot": "snapshot",
    "NoShardsError": "sources",
    "ShardSource": "sources",
    "make_source": "backends",
    "ObjectSource": "remote.source",
    "ShardChangedError": "format.tario",
    "TarError": "format.tario",
    "NotEnoughShardsError": "index",
    "StreamStats": "stream",
    "collate_tensors": "tensors",
    "PackedBytes": "tensors",
    "AttachError": "segments",
    "WdsRefreshError": "errors",
    "ColumnsError": "snapshot_columns",
    "EpochLengthUnknown": "length",
    "ManifestError": "format.manifest",
    "ResumeError": "resume",
    "RankZeroError": "slot",
    "ObjectReadError": "remote.retry",
    "ObjectChangedError": "remote.retry",
    "ObjectVanishedError": "remote.retry",
    "ObjectCorruptError": "remote.reader",
    "RemoteTruncated": "remote.source",
    "UnpinnableError": "remote.http_store",
    "PlotUnavailable": "plot",
    "TarWriteError": "format.tarwriter",
    "PackError": "write.model",
    "DuplicateKeysError": "write.pack",
    "IngestError": "write.ingest",
    "DestinationError": "write.destination",
    "resume": None,
    "pack": "write.pack:run_pack",  # the write side: imported only when these are used
    "PackReport": "write.pack",
    "Writer": "write.writer",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'wdsrefresh' has no attribute {name!r}")
    module, _, attr = (_EXPORTS[name] or "").partition(":")
    value = import_module(f".{module or name}", __name__)
    if module:
        value = getattr(value, attr or name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

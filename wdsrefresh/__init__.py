"""wdsrefresh: a streaming WebDataset loader whose shards are re-resolved every epoch.

Names are imported lazily, so the command-line tools (pack, ingest, verify, ls) do not pay
for importing torch and webdataset.
"""

from importlib import import_module

_EXPORTS = {
    "RefreshingWebDataset": "pipeline.dataset",
    "EpochStats": "epoch.stats",
    "TimedLoader": "observe.timed",
    "log_stats": "observe.tensorboard",
    "timed": "observe.timed",
    "ReadStats": "epoch.reading",
    "ShardVanishedError": "epoch.reading",
    "DigestMismatch": "epoch.reading",
    "CountMismatch": "epoch.reading",
    "TruncatedShard": "storage.local.probe",
    "ShardInfo": "core.snapshot",
    "Snapshot": "core.snapshot",
    "NoShardsError": "storage.source",
    "ShardSource": "storage.source",
    "make_source": "storage.backend",
    "ObjectSource": "storage.objects.source",
    "ShardChangedError": "format.tario",
    "TarError": "format.tario",
    "NotEnoughShardsError": "storage.waiting",
    "StreamStats": "epoch.stream",
    "collate_tensors": "pipeline.tensors",
    "PackedBytes": "pipeline.tensors",
    "AttachError": "pipeline.segments",
    "WdsRefreshError": "errors",
    "ColumnsError": "core.columns",
    "EpochLengthUnknown": "pipeline.length",
    "ManifestError": "format.manifest",
    "ResumeError": "epoch.resume",
    "RankZeroError": "epoch.slot",
    "ObjectReadError": "storage.objects.retry",
    "ObjectChangedError": "storage.objects.retry",
    "ObjectVanishedError": "storage.objects.retry",
    "ObjectCorruptError": "storage.objects.blocks",
    "RemoteTruncated": "storage.objects.source",
    "UnpinnableError": "storage.objects.http",
    "PlotUnavailable": "observe.plot",
    "TarWriteError": "format.tarwriter",
    "PackError": "write.model",
    "DuplicateKeysError": "write.pack",
    "IngestError": "write.ingest",
    "DestinationError": "write.destination",
    "resume": "epoch.resume:module",  # the module itself
    "pack": "write.pack:run_pack",  # the write side: imported only when these are used
    "PackReport": "write.pack",
    "Writer": "write.writer",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'wdsrefresh' has no attribute {name!r}")
    module, _, attr = _EXPORTS[name].partition(":")
    value = import_module(f".{module}", __name__)
    if attr != "module":
        value = getattr(value, attr or name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

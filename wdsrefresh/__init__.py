"""wdsrefresh: a streaming WebDataset loader whose shards are re-resolved every epoch."""

from .dataset import EpochStats, RefreshingWebDataset
from .reading import ReadStats, ShardVanishedError
from .snapshot import ShardInfo, Snapshot
from .sources import NoShardsError, ShardSource, make_source
from .tario import ShardChangedError, TarError

__all__ = [
    "EpochStats",
    "NoShardsError",
    "ReadStats",
    "RefreshingWebDataset",
    "ShardChangedError",
    "ShardInfo",
    "ShardSource",
    "ShardVanishedError",
    "Snapshot",
    "TarError",
    "make_source",
]
__version__ = "0.1.0"

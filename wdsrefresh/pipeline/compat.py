"""Arguments of webdataset's ``WebDataset`` that users bring along when they port a pipeline.

Each is accepted where it means something here, and otherwise refused with an error that
says what replaces it: never ignored, never a bare TypeError. docs/from-webdataset.md says
the same for users, argument by argument.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("wdsrefresh")

# webdataset arguments that have no meaning here, and what to do instead
_REPLACED = {
    "cache_dir": "webdataset caches downloaded shards there. Local files are read in place here; s3:// and "
                 "https:// sources keep checked blocks in a cache of their own: pass "
                 "storage_options={\"cache_dir\": ..., \"cache_limit\": \"50GB\"} instead",
    "cache_size": "webdataset's shard cache size. Local files are read in place here; the cache of s3:// and "
                  "https:// sources is sized by storage_options={\"cache_dir\": ..., \"cache_limit\": \"50GB\"}",
    "url_to_name": "it names webdataset's cached shards; the cache of s3:// and https:// sources "
                   "(storage_options={\"cache_dir\": ...}) is keyed by URL and version: remove it",
    "repeat": "loop over epochs instead: for epoch in ...: ds.set_epoch(epoch); iterate the loader (in a mix of "
              "named sources, repeat={name: times} reads each source that many times per epoch)",
    "detshuffle": "the shard order here is always deterministic, a pure function of (snapshot, seed, epoch): "
                  "remove it",
    "select_files": "every member of a sample is read; drop members with .map(lambda s: {k: v for k, v in "
                    "s.items() if ...}) after the dataset",
    "rename_files": "rename members with .map() (or .rename()) after the dataset",
    "verbose": 'wdsrefresh logs instead: logging.getLogger("wdsrefresh").setLevel(logging.INFO)',
}
_PORTED = ("nodesplitter", "workersplitter", "resampled", "empty_check")
# webdataset's defaults of the arguments above: given as such, they ask for nothing
_DEFAULTS = {"cache_dir": None, "cache_size": -1, "repeat": False, "detshuffle": False, "select_files": None,
             "rename_files": None, "verbose": False}


def _webdataset_splitters() -> dict[str, set]:
    from webdataset import shardlists

    return {
        "nodesplitter": {shardlists.split_by_node, shardlists.single_node_only},
        "workersplitter": {shardlists.split_by_worker},
    }


def argument_names(function: Callable) -> tuple[str, ...]:
    """The named parameters of ``function`` (``self`` and ``**kwargs`` left out), in order."""
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(name for name, p in inspect.signature(function).parameters.items()
                 if p.kind in named and name != "self")


def check_ported(options: dict[str, Any], known: tuple[str, ...]) -> bool:
    """Checks webdataset arguments given to RefreshingWebDataset; returns ``empty_check``.

    ``options`` holds the keyword arguments RefreshingWebDataset does not take itself; ``known``
    its own (``argument_names`` of its constructor), for the message about a name that is neither.
    """
    empty_check = False
    for name, value in options.items():
        if name in ("nodesplitter", "workersplitter"):
            _check_splitter(name, value)
        elif name == "resampled":
            if value:
                raise ValueError(
                    "resampled=True: webdataset then draws shards with replacement, forever. Here every epoch "
                    "reads each sample of its snapshot exactly once; for a never-ending stream of shards as they "
                    'land use mode="stream", or loop over epochs (shardshuffle=True reshuffles each one)')
        elif name == "empty_check":
            if not isinstance(value, bool):
                raise ValueError(f"empty_check={value!r}: expected True or False")
            empty_check = value
        elif name in _REPLACED:
            if name in _DEFAULTS and value == _DEFAULTS[name]:  # webdataset's default asks for nothing
                continue
            raise ValueError(f"{name}={value!r}: {_REPLACED[name]}")
        else:
            raise TypeError(f"RefreshingWebDataset() got an unexpected keyword argument {name!r}; its arguments "
                            f"are: {', '.join(known + _PORTED)}")
    return empty_check


def _check_splitter(name: str, value: Any) -> None:
    if value in _webdataset_splitters()[name]:
        return  # the exact split does what it does, and more exactly
    what = "ranks" if name == "nodesplitter" else "DataLoader workers"
    raise ValueError(
        f"{name}={getattr(value, '__name__', value)!r}: wdsrefresh always splits each epoch's samples exactly and "
        f"equally across {what} (each sample once, equal counts per rank), so {name} has nothing to do; "
        f"remove it (webdataset's split_by_node / split_by_worker are accepted and mean the same)")


def shard_shuffle(value: Any) -> bool:
    """``shardshuffle`` as webdataset users write it: True/False, None (webdataset's default: no
    shuffle), or a number of shards (0: no shuffle; N > 0: webdataset's N-shard buffer, which
    here is a full seeded shuffle of the shard list every epoch)."""
    if value is None or value is False:
        return False
    if value is True:
        return True
    if isinstance(value, int) and value >= 0:
        if value > 0:
            log.info("shardshuffle=%d: wdsrefresh shuffles the whole shard list every epoch (seeded), "
                     "which a %d-shard buffer approximates in webdataset", value, value)
        return value > 0
    raise ValueError(f"shardshuffle={value!r}: expected True, False, None or a number of shards >= 0")

"""How a DataLoader worker's items cross to the main process: one packed object each.

A worker hands each item to the main process by pickling it through a pipe, after torch's
``default_convert`` walked it (``batch_size=None``, no ``collate_fn``: how a webdataset pipeline
is loaded). A batch of 64 samples of three members is a tuple of three lists of ``bytes``: the
walk visits each of the 192 and copies each list, 2.5 us per sample of the worker's time with
the pickling, against 0.3 us for pickling the lists as they are. Packed here, an item crosses
as one ``Packed`` holding its lists of ``bytes`` as they are and its other fields converted;
one whose payloads are large crosses with them back to back in a reused shared-memory segment
(segments.py), copied out on arrival. Either way the unpickling rebuilds exactly what
``default_convert`` would have returned, so the main process receives today's types and values
(``==`` today's batches). One ``bytes`` blob sliced on arrival is slower for small payloads
(0.6 us per sample to unpickle and slice, 0.15 us to unpickle 192 ``bytes``), so only a segment
gets one.

``packing(it, caller)`` packs only when ``caller`` (the frame that called ``iter(dataset)``) is
torch's iterable-dataset fetcher with ``auto_collation`` off and torch's own ``default_convert``
as its collation; with a ``collate_fn`` of the user's, or ``batch_size=N``, items go as they are.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import accumulate
from types import FrameType
from typing import Any

from . import segments
from ..format.heap import keep_freed_memory

_LIST, _TUPLE, _DICT = 0, 1, 2  # what the item is: a list or tuple of fields (both rebuilt as lists), a dict
_OTHER = -1  # a field that crosses as it is (already what default_convert makes of it)


def converts_by_default(caller: FrameType | None) -> bool:
    """Whether ``caller`` is the frame of torch's fetcher of an iterable dataset that hands each
    item to ``default_convert`` alone: the only case where packing changes nothing but speed."""
    try:
        from torch.utils.data import get_worker_info
        from torch.utils.data._utils.collate import default_convert
        from torch.utils.data._utils.fetch import _IterableDatasetFetcher
    except ImportError:  # a torch whose private layout moved: items cross as they are
        return False
    if get_worker_info() is None:  # the main process: nothing crosses
        return False
    fetcher = caller.f_locals.get("self") if caller is not None else None
    return (type(fetcher) is _IterableDatasetFetcher and getattr(fetcher, "auto_collation", None) is False
            and getattr(fetcher, "collate_fn", None) is default_convert)


def packing(items: Iterator, caller: FrameType | None) -> Iterator:
    """``items``, each packed when ``caller`` is a fetcher that only converts them (see above)."""
    return map(pack, items) if converts_by_default(caller) else items


class Packed:
    """An item on its way to the main process; unpickles as ``default_convert(item)``.

    ``fields``: each field as ``default_convert`` makes it, but a list of ``bytes`` as it is (the
    main process's unpickling builds it anew, as the conversion's copy would). A large item's
    lists of ``bytes`` are not in ``fields`` but back to back in a segment (``blob``, its
    ``Ref``), with their lengths (``sizes``) and each field's count of them (``counts``)."""

    __slots__ = ("kind", "keys", "fields", "blob", "sizes", "counts")

    def __init__(self, kind: int, keys: list | None, fields: list, blob: segments.Ref | None = None,
                 sizes: list[int] | None = None, counts: list[int] | None = None):
        self.kind, self.keys, self.fields = kind, keys, fields
        self.blob, self.sizes, self.counts = blob, sizes, counts

    def __reduce__(self):
        if self.blob is None:
            return rebuilt, (self.kind, self.keys, self.fields)
        return unpack, (self.kind, self.keys, self.fields, self.blob, self.sizes, self.counts)


def pack(item: Any) -> Any:
    """A ``Packed`` for a tuple, list or dict whose fields include lists of ``bytes``, the other
    fields carried as ``default_convert`` makes them; anything else is returned as is."""
    kind = type(item)
    if kind is tuple or kind is list:
        keys, fields, code = None, item, _TUPLE if kind is tuple else _LIST
    elif kind is dict:
        keys, fields, code = list(item), list(item.values()), _DICT
    else:
        return item
    from torch.utils.data._utils.collate import default_convert

    out: list = []
    counts: list[int] = []  # per field: how many payloads it has, or _OTHER when carried as converted
    nbytes = 0
    for field in fields:
        if type(field) is list and field and set(map(type, field)) == {bytes}:
            out.append(field)
            counts.append(len(field))
            nbytes += sum(map(len, field))
        else:
            out.append(default_convert(field))
            counts.append(_OTHER)
    if all(n == _OTHER for n in counts):  # no bytes to gain on
        return item
    if nbytes < segments.LARGE or not segments.available():
        return Packed(code, keys, out)
    chunks = [p for field, n in zip(out, counts) if n != _OTHER for p in field]
    carried = [n if n != _OTHER else f for f, n in zip(out, counts)]  # a count where payloads were
    return Packed(code, keys, carried, _in_segment(chunks, nbytes), list(map(len, chunks)), counts)


def _in_segment(chunks: list[bytes], nbytes: int) -> segments.Ref:
    """The chunks back to back in a segment of this worker's pool (segments.py)."""
    pool = segments.pool()
    segment = pool.take(nbytes)
    target, end = segment.map, segments.HEADER
    for chunk in chunks:
        target[end : end + len(chunk)] = chunk
        end += len(chunk)
    return pool.ref(segment, nbytes)


def rebuilt(kind: int, keys: list | None, fields: list) -> Any:
    """What ``default_convert`` made of the item: a list for a list or tuple, a dict for a dict."""
    return dict(zip(keys, fields)) if kind == _DICT else fields


def unpack(kind: int, keys: list | None, fields: list, blob: segments.Ref, sizes: list[int],
           counts: list[int]) -> Any:
    """A large item: its lists of ``bytes`` copied out of the segment, which is then the worker's again."""
    keep_freed_memory()  # large payloads, batch after batch: reuse their pages (format/heap.py)
    attached = segments.attach(blob)
    ends = [e + segments.HEADER for e in accumulate(sizes)]
    payloads = list(map(attached.map.__getitem__, map(slice, [segments.HEADER, *ends[:-1]], ends)))
    attached.release(blob.use)
    taken = 0
    for i, n in enumerate(counts):
        if n != _OTHER:
            fields[i] = payloads[taken : taken + n]
            taken += n
    return rebuilt(kind, keys, fields)


__all__ = ["Packed", "converts_by_default", "pack", "packing", "unpack"]

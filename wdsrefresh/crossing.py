"""How a DataLoader worker's items cross to the main process: one packed object each.

A worker hands each item to the main process by pickling it through a pipe, after torch's
``default_convert`` walked it (``batch_size=None``, no ``collate_fn``: how a webdataset pipeline
is loaded). A batch of 64 samples of three members is a tuple of three lists of ``bytes``: 192
objects walked, pickled and unpickled one by one. Packed here, it crosses as one ``Packed``:
its ``bytes`` back to back in one blob with their lengths, and the rest of the batch as is. On
arrival the unpickling rebuilds exactly what ``default_convert`` would have returned, so the
main process receives today's types and values (``==`` today's batches).

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
from .format.heap import keep_freed_memory

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
    """An item on its way to the main process; unpickles as ``default_convert(item)``."""

    __slots__ = ("kind", "keys", "layout", "blob", "sizes", "others")

    def __init__(self, kind: int, keys: list | None, layout: list[int], blob: bytes, sizes: list[int],
                 others: list):
        self.kind, self.keys, self.layout = kind, keys, layout
        self.blob, self.sizes, self.others = blob, sizes, others

    def __reduce__(self):
        return unpack, (self.kind, self.keys, self.layout, self.blob, self.sizes, self.others)


def pack(item: Any) -> Any:
    """A ``Packed`` for a tuple, list or dict whose fields are lists of ``bytes`` (or ``bytes``),
    other fields carried as ``default_convert`` makes them; anything else is returned as is."""
    kind = type(item)
    if kind is tuple or kind is list:
        keys, fields, code = None, item, _TUPLE if kind is tuple else _LIST
    elif kind is dict:
        keys, fields, code = list(item), list(item.values()), _DICT
    else:
        return item
    from torch.utils.data._utils.collate import default_convert

    layout: list[int] = []
    chunks: list[bytes] = []
    others: list = []
    for field in fields:
        if type(field) is list and field and set(map(type, field)) == {bytes}:
            layout.append(len(field))
            chunks += field
        else:
            layout.append(_OTHER)
            others.append(default_convert(field))
    if not chunks:
        return item
    sizes = list(map(len, chunks))
    return Packed(code, keys, layout, _blob(chunks, sum(sizes)), sizes, others)


def _blob(chunks: list[bytes], nbytes: int) -> bytes | segments.Ref:
    """The chunks back to back: in a segment when large (see segments.py), else one ``bytes``."""
    if nbytes < segments.LARGE or not segments.available():
        return b"".join(chunks)
    pool = segments.pool()
    segment = pool.take(nbytes)
    target, end = segment.map, segments.HEADER
    for chunk in chunks:
        target[end : end + len(chunk)] = chunk
        end += len(chunk)
    return pool.ref(segment, nbytes)


def unpack(kind: int, keys: list | None, layout: list[int], blob: bytes | segments.Ref, sizes: list[int],
           others: list) -> Any:
    """What ``default_convert`` made of the packed item: lists for lists and tuples, a dict for a dict."""
    ends = list(accumulate(sizes))
    if isinstance(blob, segments.Ref):  # copied out, then the segment is the worker's again
        keep_freed_memory()  # large payloads, batch after batch: reuse their pages (format/heap.py)
        attached = segments.attach(blob)
        base = segments.HEADER
        payloads = list(map(attached.map.__getitem__, map(slice, [base, *(e + base for e in ends[:-1])],
                                                           [e + base for e in ends])))
        attached.release(blob.use)
    else:
        payloads = list(map(blob.__getitem__, map(slice, [0, *ends[:-1]], ends)))
    fields, taken, rest = [], 0, iter(others)
    for n in layout:
        if n == _OTHER:
            fields.append(next(rest))
        else:
            fields.append(payloads[taken : taken + n])
            taken += n
    if kind == _DICT:
        return dict(zip(keys, fields))
    return fields


__all__ = ["Packed", "converts_by_default", "pack", "packing", "unpack"]

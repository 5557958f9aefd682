"""Batches whose payloads travel as one uint8 tensor plus offsets, not as lists of ``bytes``.

A DataLoader worker hands each batch to the main process by pickling it through a pipe: a
list of 64 payloads of 256 KiB is 16 MiB copied through the pipe and unpickled there.
``collate_tensors`` packs each column of ``bytes`` into one ``PackedBytes`` (the payloads back
to back in one uint8 tensor, plus their offsets). Made in a worker, a large column is a view of
one of the worker's reused shared-memory segments (segments.py) and crosses as a handle, so a
batch costs one copy of its payloads in the worker and none in the main process; a small one
crosses through the pipe, which is cheaper than torch's shared-memory handshake per tensor.
Use it as the collation of ``.batched()``:

    ds = wr.RefreshingWebDataset(...).to_tuple("jpg", "cls").batched(64, collation_fn=wr.collate_tensors)
    for jpgs, labels in DataLoader(ds, batch_size=None, num_workers=4):
        images = [decode(view) for view in jpgs.views()]    # zero-copy memoryviews
        raw = jpgs.tolist()                                 # or bytes again, one copy each
"""

from __future__ import annotations

import numbers
import weakref
from collections.abc import Sequence
from typing import Any

import numpy
import torch

from . import segments


class PackedBytes:
    """A column of byte strings packed into one uint8 tensor: item ``i`` is
    ``data[offsets[i]:offsets[i + 1]]``.

    Pickles (and crosses DataLoader workers) as its two tensors, so torch moves the payloads
    through shared memory. ``tolist()`` gives the ``bytes`` back, ``views()`` zero-copy
    memoryviews, ``[i]`` a uint8 tensor view of one item.
    """

    __slots__ = ("data", "offsets", "_crossing")

    def __init__(self, data: torch.Tensor, offsets: torch.Tensor):
        if data.dtype != torch.uint8 or data.dim() != 1:
            raise TypeError(f"PackedBytes data must be a 1-d uint8 tensor, not {data.dtype} of {data.dim()} dims")
        if offsets.dtype != torch.int64 or offsets.dim() != 1 or len(offsets) < 1:
            raise TypeError("PackedBytes offsets must be a 1-d int64 tensor holding at least the start, 0")
        self.data = data
        self.offsets = offsets
        self._crossing: Any = None  # made in a DataLoader worker: how it goes to the main process

    @classmethod
    def pack(cls, items: Sequence[bytes | bytearray | memoryview]) -> PackedBytes:
        """Copies ``items`` once, back to back, into a new tensor (in shared memory inside a
        DataLoader worker, where it is about to be sent to the main process)."""
        sizes = [len(item) for item in items]
        offsets = torch.zeros(len(sizes) + 1, dtype=torch.int64)
        if sizes:
            torch.cumsum(torch.tensor(sizes, dtype=torch.int64), 0, out=offsets[1:])
        data, crossing = _new_bytes(int(offsets[-1]))
        target = memoryview(data.numpy())
        end = 0
        for item, size in zip(items, sizes):
            target[end : end + size] = item
            end += size
        packed = cls(data, offsets)
        packed._crossing = crossing
        return packed

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def _bounds(self) -> list[int]:
        return self.offsets.tolist()

    def __getitem__(self, i: int) -> torch.Tensor:
        """Item ``i`` as a uint8 tensor sharing this one's memory."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"PackedBytes index {i} out of range for {n} items")
        i %= n
        start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.data[start:stop]

    def views(self) -> list[memoryview]:
        """Every item as a read-only memoryview into the tensor (no copy; valid while this lives)."""
        whole = memoryview(self.data.numpy()).toreadonly()
        bounds = self._bounds()
        return [whole[a:b] for a, b in zip(bounds, bounds[1:])]

    def tolist(self) -> list[bytes]:
        """Every item as ``bytes`` (one copy each)."""
        return [bytes(view) for view in self.views()]

    def __iter__(self):
        return iter(self.views())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PackedBytes):
            return NotImplemented
        return torch.equal(self.offsets, other.offsets) and torch.equal(self.data, other.data)

    def __repr__(self) -> str:
        return f"PackedBytes({len(self)} items, {self.data.numel()} bytes)"

    def pin_memory(self, device: Any = None) -> PackedBytes:
        """A copy in page-locked memory (what ``DataLoader(pin_memory=True)`` asks of a batch's
        parts): ``data`` pinned, ``offsets`` as they are."""
        return PackedBytes(self.data.pin_memory() if device is None else self.data.pin_memory(device), self.offsets)

    def __reduce__(self):
        crossing, self._crossing = self._crossing, None
        if isinstance(crossing, segments.Segment):  # made in a worker: one use of a reused segment
            return _attached, (segments.pool().ref(crossing, self.data.numel()), self.offsets.numpy().tobytes())
        if crossing is not None:  # made in a worker, small: through the pipe, no shared-memory handshake
            return _inline, (self.data.numpy().tobytes(), self.offsets.numpy().tobytes())
        return PackedBytes, (self.data, self.offsets)


def _new_bytes(size: int) -> tuple[torch.Tensor, Any]:
    """An uninitialized uint8 tensor, and how it will cross to the main process: in a DataLoader
    worker, a large one is a view of a reused shared-memory segment (segments.py), a small one
    goes through the pipe; elsewhere it is private memory and pickles as any tensor."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(size, dtype=torch.uint8), None
    if size < segments.LARGE or not segments.available():
        return torch.empty(size, dtype=torch.uint8), _INLINE
    segment = segments.pool().take(size)
    data = torch.frombuffer(segment.map, dtype=torch.uint8, count=size, offset=segments.HEADER)
    segment.views.append(weakref.ref(data))
    return data, segment


_INLINE = "inline"


def _offsets(raw: bytes) -> torch.Tensor:
    return torch.from_numpy(numpy.frombuffer(raw, dtype=numpy.int64).copy())


def _inline(data: bytes, offsets: bytes) -> PackedBytes:
    """A small PackedBytes arrived through the pipe."""
    return PackedBytes(torch.from_numpy(numpy.frombuffer(bytearray(data), dtype=numpy.uint8)), _offsets(offsets))


def _attached(ref: segments.Ref, offsets: bytes) -> PackedBytes:
    """A PackedBytes arrived in a worker's segment: a view of the main process's mapping of it,
    the use released once nothing views it any more."""
    attached = segments.attach(ref)
    array = numpy.frombuffer(attached.map, dtype=numpy.uint8, count=ref.nbytes, offset=segments.HEADER)
    segments.release_when_gone(array, attached, ref.use)
    return PackedBytes(torch.from_numpy(array), _offsets(offsets))


def collate_tensors(samples: Sequence[Any]) -> Any:
    """A batch of ``samples`` (tuples or dicts, as ``.batched()`` collects them), column by column:
    ``bytes`` become one ``PackedBytes``; tensors are stacked, numbers become a tensor, anything
    else (strings, ``__key__``) stays a list. A tuple batch is a tuple of columns, a dict batch a
    dict of them."""
    if not samples:
        raise ValueError("collate_tensors: an empty batch")
    first = samples[0]
    if isinstance(first, dict):
        keys = first.keys()
        for sample in samples:
            if sample.keys() != keys:
                raise ValueError(f"collate_tensors: samples with other keys in one batch: {sorted(keys)} and "
                                 f"{sorted(sample.keys())} ({sample.get('__key__', '?')!r})")
        return {key: _column([sample[key] for sample in samples]) for key in keys}
    if isinstance(first, (tuple, list)):
        width = len(first)
        if any(len(sample) != width for sample in samples):
            raise ValueError(f"collate_tensors: samples of different lengths in one batch (first has {width})")
        return tuple(_column(list(column)) for column in zip(*samples))
    return _column(list(samples))


def _column(values: list) -> Any:
    first = values[0]
    if isinstance(first, (bytes, bytearray, memoryview)) and all(
            isinstance(v, (bytes, bytearray, memoryview)) for v in values):
        return PackedBytes.pack(values)
    if isinstance(first, torch.Tensor):
        return torch.stack(values)
    if isinstance(first, numbers.Number) and not isinstance(first, bool) and all(
            isinstance(v, numbers.Number) and not isinstance(v, bool) for v in values):
        return torch.tensor(values)
    return values

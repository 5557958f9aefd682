"""A mix's plan for one epoch: how many samples each source gives (counts), and in which order
the sources take turns (the schedule), as pure functions of plain numbers.

Counts: the epoch's total is rounded down to a multiple of the world size (unless ``partial``),
then split among the sources by largest remainder, exactly, in rational arithmetic.

Schedule: source i's k-th sample is due at time (2k + 1) / (2 n_i) of the epoch; the epoch's
sequence is every source's samples in order of due time (ties go to the source named first).
The k-th sample of each source thus sits where a perfectly even spread would put it, so every
window of W consecutive positions holds n_i / N x W samples of source i, give or take less than
1 + w_i (S - 2) for S sources. The position of any (source, k) and the samples of each source
before any position are computed without building the sequence (``taken``), so a consumer
builds only its own range of it (``turns``).

Due times are compared as the float64 quotient of two integers, computed the same way in
Python (correctly rounded int division) and in numpy (exact int -> float64, then IEEE division):
every process and both code paths agree on the order, ties included.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fractions import Fraction

import numpy

MAX_COUNT = 1 << 52  # due times are exact quotients of integers below 2**53


def largest_remainder(total: int, weights: Sequence[Fraction]) -> list[int]:
    """``total`` split in proportion to ``weights`` (>= 0, not all 0): each part is the floor of
    its exact quota, and the parts with the largest remainders (the first on ties) get one more."""
    whole = sum(weights)
    if total <= 0 or whole <= 0:
        return [0] * len(weights)
    quotas = [Fraction(total) * w / whole for w in weights]
    parts = [q.numerator // q.denominator for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - parts[i]), i))
    for i in by_remainder[:total - sum(parts)]:
        parts[i] += 1
    return parts


def as_fraction(name: str, what: str, value: object) -> Fraction:
    """A weight or repeat factor as an exact fraction; ValueError naming the source otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Fraction)) or not value >= 0 \
            or value == float("inf"):
        raise ValueError(f"{what}[{name!r}]={value!r}: expected a finite number >= 0")
    return Fraction(value)


def epoch_counts(sizes: Mapping[str, int], *, weights: Mapping[str, Fraction] | None = None,
                 epoch_size: int | None = None, repeat: Mapping[str, Fraction] | None = None,
                 world_size: int = 1, partial: bool = False) -> tuple[dict[str, int], int]:
    """(samples of each source this epoch, samples left out to keep ranks equal).

    ``sizes``: the samples each source's snapshot holds. With ``weights`` and ``epoch_size``: the
    total is ``epoch_size``; with ``weights`` alone: the samples of all sources together; with
    ``repeat``: each source's size times its factor; with neither: each source once. The total
    less ``total % world_size`` (unless ``partial``) is split by largest remainder over the
    sources that hold samples (an empty source's share goes to the others in proportion).
    """
    names = list(sizes)
    if repeat is not None:
        quotas = [repeat[n] * sizes[n] for n in names]
        exact = sum(quotas)
        total = exact.numerator // exact.denominator
    else:
        quotas = [weights[n] if weights is not None else Fraction(sizes[n]) for n in names]
        total = epoch_size if epoch_size is not None else sum(sizes.values())
    quotas = [q if sizes[n] > 0 else Fraction(0) for q, n in zip(quotas, names)]
    if sum(quotas) == 0:
        total = 0
    left_out = 0 if partial else total % world_size
    parts = largest_remainder(total - left_out, quotas)
    if any(p > MAX_COUNT for p in parts):
        raise ValueError(f"a source's count of {max(parts)} samples per epoch is beyond {MAX_COUNT}")
    return dict(zip(names, parts)), left_out


def _due(k: int, n: int) -> float:
    return (2 * k + 1) / (2 * n)


def _before(counts: Sequence[int], j: int, due: float, first: bool) -> int:
    """How many samples of source ``j`` come before a sample due at ``due`` (``first``: that
    sample's source is named after ``j``, so ``j`` wins a tie)."""
    n = counts[j]
    lo, hi = 0, n  # the answer is the first m whose sample comes at or after it
    while lo < hi:
        m = (lo + hi) // 2
        d = _due(m, n)
        if d < due or (first and d == due):
            lo = m + 1
        else:
            hi = m
    return lo


def position(counts: Sequence[int], i: int, k: int) -> int:
    """Where the k-th sample of source ``i`` is in the epoch's sequence."""
    due = _due(k, counts[i])
    return k + sum(_before(counts, j, due, j < i) for j in range(len(counts)) if j != i)


def taken(counts: Sequence[int], i: int, p: int) -> int:
    """How many samples of source ``i`` the first ``p`` positions of the sequence hold."""
    lo, hi = 0, counts[i]
    while lo < hi:
        k = (lo + hi) // 2
        if position(counts, i, k) < p:
            lo = k + 1
        else:
            hi = k
    return lo


def turns(counts: Sequence[int], lo: int, hi: int) -> tuple[numpy.ndarray, list[tuple[int, int]]]:
    """Positions ``[lo, hi)`` of the sequence: the source of each (an int16 array), and for each
    source the range [a, b) of its samples they hold."""
    ranges = [(taken(counts, i, lo), taken(counts, i, hi)) for i in range(len(counts))]
    dues, sources = [], []
    for i, (a, b) in enumerate(ranges):
        ks = numpy.arange(a, b, dtype=numpy.int64)
        dues.append((2 * ks + 1).astype(numpy.float64) / numpy.float64(2 * counts[i]))
        sources.append(numpy.full(b - a, i, dtype=numpy.int16))
    due = numpy.concatenate(dues) if dues else numpy.zeros(0)
    source = numpy.concatenate(sources) if sources else numpy.zeros(0, dtype=numpy.int16)
    order = numpy.lexsort((source, due))
    return source[order], ranges

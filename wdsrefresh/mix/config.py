"""The public spelling of a mix: named sources (each a source or a dict of per-source options),
``weights`` with or without ``epoch_size``, or ``repeat``; checked once, at construction.

A source value is anything a single-source dataset takes, or plain data::

    {"source": "s3://b/new/", "verify": "strict", "on_change": "skip", "min_shards": 1,
     "storage_options": {...}}

so a YAML or JSON file of sources maps onto it; the dataset's own options are the defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from .plan import as_fraction

SOURCE_OPTIONS = ("source", "verify", "on_change", "min_shards", "storage_options")
MAX_SOURCES = 1000


@dataclass(frozen=True)
class Member:
    """One named source and the options it overrides."""

    name: str
    spec: Any
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MixConfig:
    members: tuple[Member, ...]
    weights: dict[str, Fraction] | None = None
    epoch_size: int | None = None
    repeat: dict[str, Fraction] | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.members)

    def share(self, name: str) -> float | None:
        """The share of the epoch ``weights`` ask for ``name`` (None without weights)."""
        if self.weights is None:
            return None
        whole = sum(self.weights.values())
        return float(self.weights[name] / whole) if whole else 0.0


def is_mix(source: object, weights: object, epoch_size: object, repeat: object) -> bool:
    """Whether the dataset's arguments ask for a mix (a mapping of sources, or any mix argument)."""
    return isinstance(source, Mapping) or weights is not None or epoch_size is not None or isinstance(repeat, Mapping)


def parse(sources: object, *, weights: object = None, epoch_size: object = None, repeat: object = None) -> MixConfig:
    """The checked configuration; ValueError or TypeError naming the argument and source at fault."""
    if not isinstance(sources, Mapping):
        raise TypeError(f"weights=, epoch_size= and repeat= mix named sources: give the source as a dict "
                        f"{{name: source}}, got {type(sources).__name__}")
    if not sources:
        raise ValueError("a mix needs at least one named source, got an empty dict")
    if len(sources) > MAX_SOURCES:
        raise ValueError(f"a mix of {len(sources)} sources: at most {MAX_SOURCES}")
    members = tuple(_member(name, value) for name, value in sources.items())
    names = [m.name for m in members]
    if weights is not None and repeat is not None:
        raise ValueError("weights= and repeat= both say how much of each source an epoch reads: give one")
    if epoch_size is not None:
        if weights is None:
            raise ValueError("epoch_size= needs weights= (the share of each source in the epoch); repeat= "
                             "sets each source's count by itself")
        if isinstance(epoch_size, bool) or not isinstance(epoch_size, int) or epoch_size < 0:
            raise ValueError(f"epoch_size={epoch_size!r}: expected a number of samples >= 0")
    parsed_weights = _per_source("weights", weights, names)
    if parsed_weights is not None and not any(parsed_weights.values()):
        raise ValueError(f"weights={weights!r}: at least one weight must be above 0")
    return MixConfig(members, parsed_weights, epoch_size, _per_source("repeat", repeat, names))


def _member(name: object, value: object) -> Member:
    if not isinstance(name, str) or not name or "\0" in name:
        raise ValueError(f"source name {name!r}: expected a non-empty string")
    if not isinstance(value, Mapping):
        return Member(name, value)
    unknown = sorted(set(value) - set(SOURCE_OPTIONS))
    if unknown:
        raise ValueError(f"source {name!r}: unknown option(s) {unknown}; a source's dict takes {list(SOURCE_OPTIONS)}")
    if "source" not in value:
        raise ValueError(f"source {name!r}: its dict has no 'source' key (what to read)")
    return Member(name, value["source"], {k: v for k, v in value.items() if k != "source"})


def _per_source(what: str, values: object, names: list[str]) -> dict[str, Fraction] | None:
    if values is None:
        return None
    if not isinstance(values, Mapping):
        raise TypeError(f"{what}= takes a dict {{source name: number}}, got {type(values).__name__} {values!r:.60}")
    missing = [n for n in names if n not in values]
    extra = [n for n in values if n not in names]
    if missing or extra:
        raise ValueError(f"{what}= must name every source of the mix exactly: "
                         + "; ".join(filter(None, [missing and f"missing {missing}", extra and f"unknown {extra}"]))
                         + f" (sources: {names})")
    return {n: as_fraction(n, what, values[n]) for n in names}

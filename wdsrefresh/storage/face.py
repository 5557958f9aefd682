"""A backend package's face: the names it lends the rest of the package, each imported from its
module when first asked for (so importing the package imports none of its modules)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import import_module


def lazy_names(package: str, table: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package`` that takes each name of ``table`` (name ->
    submodule) from its submodule on first use."""

    def __getattr__(name: str) -> object:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(f".{table[name]}", package), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__

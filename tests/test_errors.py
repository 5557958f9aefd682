"""Every error wdsrefresh raises to users has one base class, keeps its builtin base, and is exported."""

import ast
import builtins
import os

import wdsrefresh as wr

PACKAGE = os.path.dirname(wr.__file__)
# raised and caught inside the library, never reaching a user
INTERNAL = {"StopConsumer", "ShortBody", "PageError", "PlanBusy"}


def public_exception_names() -> set[str]:
    """Names of the classes defined in the package that derive, by their written bases, from an
    exception (read from the source, so a new module cannot be forgotten)."""
    classes: dict[str, list[str]] = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(root, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.ClassDef):
                        classes[node.name] = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "")
                                              for b in node.bases]
    builtin = {n for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException)}

    def is_exception(name: str, seen=()) -> bool:
        return name in builtin or any(b not in seen and is_exception(b, seen + (name,))
                                      for b in classes.get(name, ()))

    return {n for n in classes if is_exception(n) and not n.startswith("_") and n not in INTERNAL}


def test_every_public_error_is_exported_and_has_the_one_base_class():
    names = public_exception_names()
    assert "ObjectReadError" in names and "TarError" in names  # the scan finds them
    assert names <= set(wr.__all__), f"not exported: {sorted(names - set(wr.__all__))}"
    for name in names:
        assert issubclass(getattr(wr, name), wr.WdsRefreshError), name


def test_errors_keep_the_builtin_bases_code_relies_on():
    assert issubclass(wr.EpochLengthUnknown, TypeError)  # tqdm's len() probe catches TypeError
    assert issubclass(wr.NoShardsError, FileNotFoundError)
    assert issubclass(wr.TarError, ValueError) and issubclass(wr.DigestMismatch, wr.TarError)
    assert issubclass(wr.ObjectReadError, OSError) and issubclass(wr.NotEnoughShardsError, TimeoutError)
    assert issubclass(wr.ObjectVanishedError, FileNotFoundError) and issubclass(wr.ResumeError, ValueError)

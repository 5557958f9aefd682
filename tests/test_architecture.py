"""The import rules that keep the design visible, read from every module's source.

Every import counts, at module level or inside a function (a lazy import is still a
dependency); only imports under ``if TYPE_CHECKING:`` are left out (they never run). A name
imported from a package's face (``storage/local/__init__.py``'s ``_FACE``) counts as an import
of the module the face takes it from.
"""

import ast
import os
import re
import subprocess
import sys

import pytest

import wdsrefresh
from shardutil import write_shard

PACKAGE = os.path.dirname(wdsrefresh.__file__)
COMMAND_LINE = {"wdsrefresh.cli", "wdsrefresh.demo", "wdsrefresh.__main__"}
# bottom to top: a module imports modules of its own layer or of layers below it
LAYERS = ("wdsrefresh.errors", "wdsrefresh.format", "wdsrefresh.core", "wdsrefresh.storage", "wdsrefresh.epoch", "wdsrefresh.mix",
          "wdsrefresh.observe", "wdsrefresh.pipeline", "wdsrefresh.write", "command line")
BACKENDS = ("wdsrefresh.storage.local", "wdsrefresh.storage.objects")
# what the rest of the package may import of storage/: the shared modules and each backend's face
STORAGE_FACES = {"wdsrefresh.storage", "wdsrefresh.storage.backend", "wdsrefresh.storage.interface",
                 "wdsrefresh.storage.source", "wdsrefresh.storage.resolver", "wdsrefresh.storage.waiting", *BACKENDS}
URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://|(?<![A-Za-z0-9+.-])://")


def module_files() -> dict[str, str]:
    """Module name -> file, for every module of the package."""
    found = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                module = os.path.relpath(path[:-3], os.path.dirname(PACKAGE)).replace(os.sep, ".")
                found[module.removesuffix(".__init__")] = path
    return found


MODULES = module_files()
TREES = {m: ast.parse(open(p, encoding="utf-8").read()) for m, p in MODULES.items()}


def _face(module: str) -> dict[str, str]:
    """A package's lazily imported names: ``_FACE = {name: submodule}`` in its ``__init__.py``."""
    for node in TREES[module].body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_FACE" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


FACES = {m: _face(m) for m in MODULES if MODULES[m].endswith("__init__.py")}


def _runtime_imports(tree: ast.AST):
    """The import statements of ``tree`` that can run (not under ``if TYPE_CHECKING:``)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in _runtime_imports_of(child))
            continue
        yield from _runtime_imports_of(node)


def _runtime_imports_of(node: ast.AST):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    else:
        yield from _runtime_imports(node)


def _known(name: str) -> str:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def written_imports(module: str) -> list[tuple[str, str]]:
    """(module of the package, name) for every name ``module`` imports, as the statement names
    them: ``from ..storage.local import Change`` is (``wdsrefresh.storage.local``, ``Change``)."""
    path = MODULES[module]
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = []
    for node in _runtime_imports(TREES[module]):
        if isinstance(node, ast.Import):
            found += [(_known(a.name), "") for a in node.names]
            continue
        base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
        target = ".".join(base + ([node.module] if node.module else []))
        for a in node.names:
            full = f"{target}.{a.name}"
            found.append((full, "") if full in MODULES else (_known(target), a.name))
    return [(m, name) for m, name in found if m and m != module]


def imports_of(module: str) -> set[str]:
    """The package's modules that ``module`` depends on (a face's names: the modules they are from)."""
    targets = set()
    for target, name in written_imports(module):
        sub = FACES.get(target, {}).get(name)
        targets.add(f"{target}.{sub}" if sub else target)
    return targets - {"wdsrefresh", module}


GRAPH = {m: imports_of(m) for m in MODULES}


def layer(module: str) -> int:
    if module in COMMAND_LINE:
        return len(LAYERS) - 1
    return max((i for i, p in enumerate(LAYERS) if module == p or module.startswith(p + ".")), default=-1)


def outside_storage() -> list[str]:
    return [m for m in MODULES if not m.startswith("wdsrefresh.storage") and m != "wdsrefresh"]


def cycles() -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


def test_the_scan_sees_lazy_imports_and_faces():
    assert "wdsrefresh.storage.objects.backend" in GRAPH["wdsrefresh.storage.backend"]  # inside backend_for
    assert "wdsrefresh.write.verify_remote" in GRAPH["wdsrefresh.write.verify"]
    assert "wdsrefresh.storage.local.directory" in GRAPH["wdsrefresh.epoch.epochs"]  # through storage.local's face


def test_no_import_cycle():
    assert cycles() == []


def test_every_module_has_a_layer_and_imports_none_above_it():
    for module in MODULES.keys() - {"wdsrefresh"}:
        assert layer(module) >= 0, f"{module} is in no layer of {LAYERS}"
        above = {m for m in GRAPH[module] if layer(m) > layer(module)}
        assert not above, f"{module} imports {sorted(above)}, above its layer"


def test_format_package_imports_nothing_else_of_wdsrefresh():
    for module in MODULES:
        if module.startswith("wdsrefresh.format"):
            outside = {m for m in GRAPH[module] if not m.startswith("wdsrefresh.format")} - {"wdsrefresh.errors"}
            assert not outside, f"{module} imports {sorted(outside)}"


def test_errors_module_imports_nothing():
    assert GRAPH["wdsrefresh.errors"] == set()


def test_read_path_imports_no_write_side_module_nor_the_command_line():
    for module in MODULES:
        if not module.startswith("wdsrefresh.write") and module not in COMMAND_LINE:
            wrong = {m for m in GRAPH[module] if m.startswith("wdsrefresh.write") or m in COMMAND_LINE}
            assert not wrong, f"{module} imports {sorted(wrong)}"


def test_no_module_imports_the_command_line():
    for module in MODULES.keys() - COMMAND_LINE:
        assert "wdsrefresh.cli" not in GRAPH[module], module


def test_storage_backends_import_neither_each_other_nor_what_is_above_storage():
    for module in MODULES:
        for backend in BACKENDS:
            if module.startswith(backend):
                others = {m for m in GRAPH[module] for b in BACKENDS if b != backend and m.startswith(b)}
                assert not others, f"{module} imports {sorted(others)}: one backend never uses another"


def test_outside_storage_no_module_imports_a_backends_internals():
    for module in outside_storage():
        for target, name in written_imports(module):
            if target.startswith("wdsrefresh.storage"):
                assert target in STORAGE_FACES, (
                    f"{module} imports {target}: outside storage/, only {sorted(STORAGE_FACES)} are imported")


def _classes_of_backends(module: str) -> set[str]:
    """The names ``module`` binds to classes defined in a storage backend (local/, objects/)."""
    import importlib
    import inspect

    bound = set()
    for target, name in written_imports(module):
        if name and target.startswith("wdsrefresh.storage"):
            value = getattr(importlib.import_module(target), name, None)
            if inspect.isclass(value) and value.__module__.startswith(BACKENDS):
                bound.add(name)
    return bound


def _class_names(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Tuple):
        return {n for e in node.elts for n in _class_names(e)}
    if isinstance(node, ast.Name):
        return {node.id}
    if isinstance(node, ast.Attribute):
        return {node.attr}
    return set()


def test_outside_storage_no_isinstance_against_a_backends_classes():
    for module in outside_storage():
        classes = _classes_of_backends(module)
        for node in ast.walk(TREES[module]):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("isinstance", "issubclass")
                    and len(node.args) == 2):
                wrong = _class_names(node.args[1]) & classes
                assert not wrong, f"{MODULES[module]}:{node.lineno}: {ast.unparse(node)} tests a storage backend's class"


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def scheme_literals(module: str) -> list[str]:
    """The string constants of ``module`` (docstrings aside) that are URLs or scheme prefixes
    (``"s3://..."``, ``f"s3://{bucket}"``, ``"://"``): what a test of a URL's scheme is written with."""
    tree = TREES[module]
    skip = _docstrings(tree)
    return [f"{MODULES[module]}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
            and URL_SCHEME.search(node.value)]


def test_scheme_literals_are_found():
    tree = ast.parse('"""s3:// in a docstring"""\nx = f"s3://{b}/{k}"\ny = "://" in u\nz = "an s3:// URL"\n')
    MODULES["example"], TREES["example"] = "example.py", tree
    try:
        assert [s.split(": ", 1)[1] for s in scheme_literals("example")] == ["'s3://'", "'://'"]
    finally:
        del MODULES["example"], TREES["example"]


def test_outside_storage_no_url_scheme_literal():
    # format/names.py writes down where a scheme ends (split_url), as it does the other rules of
    # names at rest; storage.backend.backend_for is the one place that decides what a scheme reads
    syntax = {"wdsrefresh.format.names"}
    found = [s for module in outside_storage() if module not in syntax for s in scheme_literals(module)]
    assert not found, "a URL scheme is read by storage.backend.backend_for only:\n" + "\n".join(found)


def _loaded_after(code: str, cwd: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nprint('\\n'.join(sys.modules))"], capture_output=True,
                         text=True, check=True, timeout=120, cwd=cwd).stdout
    return set(out.split())


def test_importing_the_dataset_loads_no_write_side_module(tmp_path):
    loaded = _loaded_after("import sys, wdsrefresh, wdsrefresh.pipeline.dataset, wdsrefresh.epoch.stream, "
                           "wdsrefresh.epoch.resume", str(tmp_path))
    assert "wdsrefresh.pipeline.dataset" in loaded
    assert not {m for m in loaded if m.startswith("wdsrefresh.write") or m in COMMAND_LINE}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_reading_local_files_loads_no_object_store_module(tmp_path, num_workers):
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(2):
        write_shard(str(shards), f"shard-{i:03d}.tar", 5)
    code = f"""
import sys, torch, wdsrefresh as wr
ds = wr.RefreshingWebDataset({str(shards)!r})
ds.set_epoch(0)
loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers={num_workers})
assert len(list(loader)) == 10
ds.close()
"""
    loaded = _loaded_after(code, str(tmp_path))
    assert "wdsrefresh.pipeline.dataset" in loaded and "wdsrefresh.storage.local.backend" in loaded
    objects = {m for m in loaded if m.startswith(("wdsrefresh.storage.objects", "boto3", "botocore", "urllib3"))}
    assert not objects, f"reading local files loaded {sorted(objects)}"

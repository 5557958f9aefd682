"""The import rules that keep the design visible, read from every module's source.

Every import counts, at module level or inside a function (a lazy import is still a
dependency); only imports under ``if TYPE_CHECKING:`` are left out (they never run).
"""

import ast
import os
import subprocess
import sys

import wdsrefresh

PACKAGE = os.path.dirname(wdsrefresh.__file__)
COMMAND_LINE = {"wdsrefresh.cli", "wdsrefresh.demo", "wdsrefresh.__main__"}


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


def imports_of(module: str) -> set[str]:
    """The package's modules that ``module`` imports."""
    path = MODULES[module]
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    targets = set()
    for node in _runtime_imports(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name not in (module, "wdsrefresh"):
                targets.add(name)
    return targets


GRAPH = {m: imports_of(m) for m in MODULES}


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


def test_the_scan_sees_lazy_imports():
    assert "wdsrefresh.storage.objects.source" in GRAPH["wdsrefresh.storage.backend"]  # imported inside make_source
    assert "wdsrefresh.write.verify_remote" in GRAPH["wdsrefresh.write.verify"]


def test_no_import_cycle():
    assert cycles() == []


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


def test_importing_the_dataset_loads_no_write_side_module():
    code = ("import sys, wdsrefresh, wdsrefresh.pipeline.dataset, wdsrefresh.epoch.stream, wdsrefresh.epoch.resume; "
            "print('\\n'.join(m for m in sys.modules if m.startswith('wdsrefresh')))")
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True).stdout.split())
    assert "wdsrefresh.pipeline.dataset" in loaded
    assert not {m for m in loaded if m.startswith("wdsrefresh.write") or m in COMMAND_LINE}

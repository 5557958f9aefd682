"""The import rule that keeps the design visible: the read path never imports the write side."""

import subprocess
import sys

READ_PATH = "import wdsrefresh, wdsrefresh.dataset, wdsrefresh.stream, wdsrefresh.resume"


def modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(m for m in sys.modules if m.startswith('wdsrefresh')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_read_path_imports_no_write_side_module():
    loaded = modules_after(READ_PATH)
    assert "wdsrefresh.dataset" in loaded
    assert not {m for m in loaded if m.startswith("wdsrefresh.write") or m == "wdsrefresh.cli"}


def test_format_package_imports_nothing_else_of_wdsrefresh():
    loaded = modules_after("import wdsrefresh.format.tario, wdsrefresh.format.manifest, wdsrefresh.format.tarwriter")
    assert loaded <= {"wdsrefresh", "wdsrefresh.format"} | {m for m in loaded if m.startswith("wdsrefresh.format.")}
    assert "wdsrefresh.format.tario" in loaded

"""keep_freed_memory: set once per process on glibc, and never against the user's own malloc settings."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CALL = "from wdsrefresh.format.heap import keep_freed_memory as k; print(k(), k())"


def _run(env_extra: dict) -> str:
    env = dict(os.environ, PYTHONPATH=ROOT, **env_extra)
    return subprocess.run([sys.executable, "-c", CALL], env=env, capture_output=True, text=True, timeout=60,
                          check=True).stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_set_once_per_process_on_glibc():
    assert _run({}) == "True True"


@pytest.mark.parametrize("variable", ["MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"])
def test_the_users_malloc_settings_stand(variable):
    assert _run({variable: "1048576"}) == "False False"

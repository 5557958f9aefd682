"""Every example of README.md and docs/ runs as written: one test per fenced block, named by page
and line (tests/docs_blocks.py says which blocks are examples and how the markers work).

Each block runs in a subprocess, in a fresh working directory holding ``shards/`` (4 shards of 50
samples, ``jpg`` and ``cls``, written by ``wr.Writer``), with this interpreter's ``python`` and
``wdsrefresh`` first on PATH; a block that needs the object store (``<!-- example: s3 -->``, or
one that names ``s3://``) also gets ``AWS_ENDPOINT_URL`` pointing at the tests' moto server and a
bucket ``bucket`` holding the same samples under ``shards/`` (every block gets dummy credentials;
the others an endpoint where nothing listens). A block gets 30 s.

``WDSREFRESH_DOCS=PATH[:PATH...]`` (files or directories) collects other pages instead, e.g. an
older README: ``git show 842b066:README.md > /tmp/old.md; WDSREFRESH_DOCS=/tmp/old.md pytest
tests/test_docs_examples.py``.
"""

from __future__ import annotations

import io
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys

import pytest

from docs_blocks import markdown_files, page_blocks
from s3fixtures import aws_environment, moto_server  # noqa: F401 - fixture

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SECONDS = 30
BUCKET, PREFIX = "bucket", "shards/"
PAGES = markdown_files(ROOT, os.environ.get("WDSREFRESH_DOCS"))
BLOCKS = [block for path, name in PAGES for block in page_blocks(path, name)]
EXAMPLES = [block for block in BLOCKS if block.kind != "text"]


def _param(block):
    try:
        reason = block.skip_reason()
    except ValueError as bad:
        return pytest.param(block, str(bad), id=block.where)
    marks = [pytest.mark.skip(reason=f"{block.where}: {reason}")] if reason else []
    return pytest.param(block, None, id=block.where, marks=marks)


def samples(n: int = 200):
    """Small images with labels: what the docs' pipelines decode (``.decode("pil")``)."""
    from PIL import Image

    for i in range(n):
        jpeg = io.BytesIO()
        Image.new("RGB", (16, 16), (i % 256, 64, 128)).save(jpeg, format="JPEG")
        yield {"__key__": f"{i:06d}", "jpg": jpeg.getvalue(), "cls": i % 10}


@pytest.fixture(scope="session")
def shards_template(tmp_path_factory):
    import wdsrefresh as wr

    directory = tmp_path_factory.mktemp("docs") / "shards"
    with wr.Writer(str(directory), maxcount=50) as w:
        for sample in samples():
            w.write(sample)
    return directory


def fill_bucket(endpoint: str) -> None:
    """Bucket ``bucket`` on the server, emptied, then holding the samples under ``shards/``."""
    import boto3

    import wdsrefresh as wr

    client = boto3.client("s3", endpoint_url=endpoint)
    if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=BUCKET)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=BUCKET, Key=obj["Key"])
    with wr.Writer(f"s3://{BUCKET}/{PREFIX}", maxcount=50) as w:
        for sample in samples():
            w.write(sample)


def command(block, tmp_path) -> list[str]:
    if block.kind == "python":
        script = tmp_path / f"example_{block.line}.py"
        script.write_text(block.text)
        return [sys.executable, str(script)]
    script = tmp_path / f"example_{block.line}.sh"
    if block.kind == "transcript":  # each command shown above its output, as the page shows it
        body = "".join(f"printf '%s\\n' {shlex.quote('$ ' + c)}\n{c}\n" for c in block.transcript_commands())
    else:
        body = block.text
    # background jobs a block starts (`ingest ... &`) end with it
    script.write_text(f"trap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n{body}")
    return ["bash", "-e", str(script)]


def run(argv: list[str], cwd, env: dict) -> tuple[int | None, str]:
    """(exit status, output); the status is None when the block ran past SECONDS (then it and
    every process it started are killed)."""
    child = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, _ = child.communicate(timeout=SECONDS)
        return child.returncode, out.decode(errors="replace")
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # not reaped yet: its group is still its own
        out, _ = child.communicate()
        return None, out.decode(errors="replace")


@pytest.mark.timeout(SECONDS * 3)
@pytest.mark.parametrize("block,bad_marker", [_param(b) for b in EXAMPLES])
def test_example_runs_as_written(block, bad_marker, tmp_path, shards_template, request, monkeypatch, caplog):
    if bad_marker:
        pytest.fail(bad_marker, pytrace=False)
    caplog.set_level(logging.WARNING, logger="werkzeug")  # moto's request lines
    work = tmp_path / "work"
    shutil.copytree(shards_template, work / "shards")
    # dummy credentials always: an example that reaches for a store never reaches a real one
    endpoint = request.getfixturevalue("moto_server") if block.needs_s3 else "http://127.0.0.1:9"
    aws_environment(monkeypatch, endpoint)
    if block.needs_s3:
        fill_bucket(endpoint)
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
               PIP_DRY_RUN="1", PIP_NO_INDEX="1")  # an example's `pip install` never changes the tests' venv
    status, output = run(command(block, tmp_path), work, env)
    if status is None:
        pytest.fail(f"{block.where}: the {block.kind} example ran longer than {SECONDS} s\n{output[-3000:]}",
                    pytrace=False)
    if status != 0:
        pytest.fail(f"{block.where}: the {block.kind} example exited {status}\n{output[-3000:]}", pytrace=False)
    print(output)  # shown (pytest -rP), never compared: a transcript's output is an illustration


def test_every_fence_says_what_it_holds():
    """A fence without a language is neither run nor known to be text: name one (```text for output)."""
    unnamed = [b.where for b in BLOCKS if b.lang == "" and b.kind != "transcript"]
    if unnamed:
        pytest.fail(f"fences without a language (```python, ```sh, ```text...): {unnamed}", pytrace=False)

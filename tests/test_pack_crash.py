"""`wdsrefresh pack` killed or out of space at any moment: the rerun packs every input exactly once."""

import collections
import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from conftest import wait_for

from wdsrefresh.format import manifest
from wdsrefresh.format.tario import open_shard
from wdsrefresh.write.pack import PackError, pack_entries

CLI = [sys.executable, "-m", "wdsrefresh.cli"]
PAGE = 4096


def make_inputs(src, n, size, seed=0):
    """n samples of two files each: KEY.bin (``size`` bytes), KEY.cls."""
    rng = random.Random(seed)
    os.makedirs(src, exist_ok=True)
    for i in range(n):
        with open(os.path.join(src, f"s{i:03d}.bin"), "wb") as f:
            f.write(rng.randbytes(size))
        with open(os.path.join(src, f"s{i:03d}.cls"), "wb") as f:
            f.write(b"%d" % i)
    return {f"s{i:03d}" for i in range(n)}


def shard_files(out):
    """What a reader lists by name (shard patterns; hidden temporaries excluded)."""
    return sorted(n for n in os.listdir(out) if n.endswith(".tar") and not n.startswith("."))


def keys_in_shards(out):
    """Counter of sample keys over every shard file in ``out``."""
    keys = collections.Counter()
    for name in shard_files(out):
        reader, fd = open_shard(os.path.join(out, name))
        try:
            keys.update(s["__key__"] for s in reader.samples())
        finally:
            os.close(fd)
    return keys


def digests(out):
    """sha256 of every visible file in ``out``: shards, and manifest.json's entries less their
    mtime_ns (the time each shard was written, which differs from run to run)."""
    found = {}
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name)
        if name == "manifest.json":
            entries = [{k: v for k, v in e.to_json().items() if k != "mtime_ns"} for e in manifest.load(path)]
            found[name] = hashlib.sha256(json.dumps(entries).encode()).hexdigest()
        elif os.path.isfile(path) and not name.startswith("."):
            with open(path, "rb") as f:
                found[name] = hashlib.sha256(f.read()).hexdigest()
    return found


def assert_packed_exactly_once(out, keys):
    counts = keys_in_shards(out)
    assert set(counts) == keys and set(counts.values()) == {1}, counts
    urls = [e.url for e in manifest.load(os.path.join(out, "manifest.json"))]
    assert sorted(urls) == shard_files(out) and len(set(urls)) == len(urls)  # every shard listed, once
    assert sum(e.nsamples for e in manifest.load(os.path.join(out, "manifest.json"))) == len(keys)
    leftovers = [n for n in os.listdir(out) if n.startswith((".pack-", "_tmp"))]
    leftovers += os.listdir(os.path.join(out, "manifest.d"))
    leftovers += [n for n in os.listdir(os.path.join(out, ".wdsrefresh", "plans")) if not n.startswith("done-")]
    assert leftovers == []  # no temporary file, fragment or unfinished plan


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """16 inputs and the output of one uninterrupted pack of them (one shard per sample)."""
    root = tmp_path_factory.mktemp("inputs")
    src = str(root / "src")
    keys = make_inputs(src, 16, 150_000)
    reference = str(root / "reference" / "out")
    pack_entries([src], reference, maxcount=1)
    return src, keys, digests(reference)


def progress(out):
    """How far a pack into ``out`` got: shards renamed into place, fragments, a manifest."""
    if not os.path.isdir(out):
        return (0, 0, False)
    fragments = os.path.join(out, "manifest.d")
    return (len(shard_files(out)), len(os.listdir(fragments)) if os.path.isdir(fragments) else 0,
            os.path.exists(os.path.join(out, "manifest.json")))


@pytest.mark.parametrize("seed,jobs", [(1, 1), (2, 1), (3, 1), (4, 2), ("commit", 1)])
def test_kill_9_at_random_moments_then_rerun_packs_every_input_once(inputs, tmp_path, procs, seed, jobs):
    src, keys, reference = inputs
    out = str(tmp_path / "out")
    rng = random.Random(seed)
    for attempt in range(1 if seed == "commit" else 2):
        before = progress(out)
        proc = subprocess.Popen(CLI + ["pack", src, "-o", out, "--maxcount", "1", "--jobs", str(jobs)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        if seed == "commit":  # kill while it commits: right after it wrote the manifest
            wait_for(lambda: progress(out)[2] or proc.poll() is not None, 30, "the manifest")
        elif rng.random() < 0.8:  # most kills after it made progress; some while it starts or plans
            wait_for(lambda: progress(out) != before or proc.poll() is not None, 30, "progress")
            time.sleep(rng.uniform(0, 0.3))
        else:
            time.sleep(rng.uniform(0, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    rerun = subprocess.run(CLI + ["pack", src, "-o", out, "--maxcount", "1"], capture_output=True, text=True,
                           timeout=60)
    assert rerun.returncode == 0, rerun.stderr
    assert_packed_exactly_once(out, keys)
    assert digests(out) == reference  # same names, same bytes, same manifest as one uninterrupted pack


def kill_when_half_done(src, out, procs, maxcount="1"):
    """Starts `wdsrefresh pack`, kills it (-9) once some but not all shards have fragments."""
    proc = subprocess.Popen(CLI + ["pack", src, "-o", out, "--maxcount", maxcount], stderr=subprocess.DEVNULL)
    procs.append(proc)
    fragments = os.path.join(out, "manifest.d")
    wait_for(lambda: os.path.isdir(fragments) and len(os.listdir(fragments)) >= 2 or proc.poll() is not None,
             30, "two fragments")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    plans = os.listdir(os.path.join(out, ".wdsrefresh", "plans"))
    assert any(n.startswith("plan-") for n in plans), f"the pack finished before it was killed: {plans}"


def test_other_pack_into_a_directory_with_an_unfinished_pack_takes_numbers_after_its_reservation(
        tmp_path, procs):
    first, second, out = str(tmp_path / "first"), str(tmp_path / "second"), str(tmp_path / "out")
    keys = make_inputs(first, 12, 300_000)
    other = {f"x/{k}" for k in make_inputs(os.path.join(second, "x"), 3, 1000, seed=1)}
    kill_when_half_done(first, out, procs)
    entries = pack_entries([second], out, maxcount=1)
    assert [e.url for e in entries] == ["shard-000012.tar", "shard-000013.tar", "shard-000014.tar"]
    pack_entries([first], out, maxcount=1)  # finishes the first pack under the names it reserved
    assert_packed_exactly_once(out, keys | other)


def test_rerun_with_changed_inputs_is_refused_instead_of_packing_twice(tmp_path, procs):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    keys = make_inputs(src, 40, 300_000)  # more than a loaded machine packs between two polls and the kill
    kill_when_half_done(src, out, procs)
    with open(os.path.join(src, "s011.cls"), "ab") as f:
        f.write(b"changed")
    r = subprocess.run(CLI + ["pack", src, "-o", out, "--maxcount", "1"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1
    assert "unfinished pack" in r.stderr and "plan-" in r.stderr and "remove the plan file" in r.stderr
    assert len(keys_in_shards(out)) == sum(keys_in_shards(out).values()) < len(keys)  # nothing packed again


@pytest.fixture
def tmpfs(tmp_path):
    """A real file system of a chosen size (tmpfs; needs root), mounted at tmp_path/disk."""
    disk = str(tmp_path / "disk")
    os.makedirs(disk)
    mounted = []

    def mount(pages):
        options = f"size={pages * PAGE}"
        if mounted:
            options = "remount," + options
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", disk], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()})")
        mounted.append(True)
        return disk

    yield mount
    if mounted:
        subprocess.run(["umount", "-l", disk], check=True)


def test_out_of_space_at_every_step_then_rerun_packs_every_input_once(tmp_path, tmpfs):
    src = str(tmp_path / "src")
    keys = make_inputs(src, 12, 9000)  # 12 inputs: 4 shards of 3 samples, 9 pages each
    reference = str(tmp_path / "reference" / "out")
    pack_entries([src], reference, maxcount=3)
    expected = digests(reference)
    disk = tmpfs(1)
    outcomes = collections.Counter()
    for pages in range(1, 50):  # from nothing fits to everything fits: every step runs out of space once
        tmpfs(pages)
        out = os.path.join(disk, f"out{pages:02d}", "out")
        try:
            pack_entries([src], out, maxcount=3)
            outcomes["fits"] += 1
        except OSError as exn:
            assert exn.errno == errno.ENOSPC and disk in str(exn), exn  # the error names the file
            outcomes["out of space"] += 1
            tmpfs(4096)  # space freed
            pack_entries([src], out, maxcount=3)
        assert_packed_exactly_once(out, keys)
        assert digests(out) == expected
        subprocess.run(["rm", "-rf", os.path.dirname(out)], check=True)
    assert outcomes["fits"] >= 1 and outcomes["out of space"] >= 20, outcomes


def test_shard_renamed_before_its_fragment_is_indexed_not_rewritten_and_must_be_the_planned_one(
        inputs, tmp_path, procs):
    from shardutil import write_shard

    src, keys, reference = inputs
    out = str(tmp_path / "out")
    kill_when_half_done(src, out, procs)
    fragments = os.path.join(out, "manifest.d")
    last = sorted(os.listdir(fragments))[-1]
    os.unlink(os.path.join(fragments, last))  # the state a kill between rename and fragment leaves
    shard = os.path.join(out, f"shard-{int(last[-10:-5]):06d}.tar")
    with open(shard, "rb") as f:
        planned = f.read()
    os.replace(write_shard(str(tmp_path), "other.tar", 1), shard)  # something else under the reserved name
    with pytest.raises(PackError, match=f"{shard}: reserved for 1 samples .* but holds something else"):
        pack_entries([src], out, maxcount=1)
    with open(shard + ".restore", "wb") as f:
        f.write(planned)
    os.replace(shard + ".restore", shard)
    inode = os.stat(shard).st_ino
    pack_entries([src], out, maxcount=1)
    assert os.stat(shard).st_ino == inode  # indexed, not written again
    assert_packed_exactly_once(out, keys)
    assert digests(out) == reference

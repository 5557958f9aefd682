"""`wdsrefresh pack`: round trip, deterministic plain-tar shards, exact manifest, bad input."""

import logging
import os
import re
import subprocess
import sys
import tarfile

import pytest
import webdataset as wds
from tqdm import tqdm

import wdsrefresh as wr
from shardutil import write_shard
from wdsrefresh.cli import main
from wdsrefresh.format import manifest
from wdsrefresh.write.pack import PackError, group_samples, pack_entries
from wdsrefresh.format.tario import index_shard

LONG = "d" * 60 + "/" + "n" * 70  # a member name over 100 bytes needs a GNU long-name record
CLI = [sys.executable, "-m", "wdsrefresh.cli"]


def make_tree(root, n=23):
    """Files of n samples (some nested, some with long or multi-dot names); returns
    {key: {ext: bytes}} as webdataset should read them back."""
    expected = {}
    for i in range(n):
        key = f"{'sub/' if i % 3 else ''}{LONG if i == 5 else 's'}{i:04d}"
        files = {"jpg": os.urandom(100 + 37 * i), "cls": str(i).encode(), "seg.png": bytes([i]) * i}
        if i == 7:
            files["bin"] = os.urandom(5 << 20)  # spans two 4 MiB digest blocks
        for ext, data in files.items():
            path = os.path.join(root, f"{key}.{ext}")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        expected[key] = files
    return expected


def shard_files(out):
    return sorted(n for n in os.listdir(out) if n.endswith(".tar"))


def as_dicts(samples):
    return {s["__key__"]: {k: bytes(v) for k, v in s.items() if not k.startswith("__")} for s in samples}


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    return str(src), make_tree(str(src))


def test_round_trip_reads_back_identical_bytes_with_webdataset_and_refreshing(tree, tmp_path):
    src, expected = tree
    out = str(tmp_path / "out")
    entries = pack_entries([src], out, maxcount=7)
    assert [e.url for e in entries] == [f"shard-{i:06d}.tar" for i in range(4)]
    urls = [os.path.join(out, name) for name in shard_files(out)]
    assert as_dicts(wds.WebDataset(urls, shardshuffle=False)) == expected
    for source in (out, os.path.join(out, "manifest.json")):
        ds = wr.RefreshingWebDataset(source, verify="inline", shardshuffle=False, watch=False)
        ds.set_epoch(0)
        assert as_dicts(ds) == expected
    listed = subprocess.run(["tar", "tf", urls[0]], capture_output=True, text=True, check=True).stdout.split()
    assert listed == [n for s in wds.WebDataset(urls[:1], shardshuffle=False) for n in
                      sorted(f"{s['__key__']}.{e}" for e in s if not e.startswith("__"))]


def test_long_names_survive_gnu_tar_listing(tree, tmp_path):
    src, expected = tree
    out = str(tmp_path / "out")
    pack_entries([src], out)
    listed = subprocess.run(["tar", "tf", os.path.join(out, "shard-000000.tar")],
                            capture_output=True, text=True, check=True).stdout.split()
    assert f"sub/{LONG}0005.jpg" in listed and len(listed) == sum(len(f) for f in expected.values())


def test_shards_are_plain_tar_without_pax_headers(tree, tmp_path):
    src, _ = tree
    out = str(tmp_path / "out")
    pack_entries([src], out, maxcount=7)
    with tarfile.open(os.path.join(out, "shard-000000.tar")) as tar:
        members = tar.getmembers()
        assert tar.pax_headers == {}
    assert all(m.pax_headers == {} and m.mtime == 0 and m.isreg() for m in members)
    with open(os.path.join(out, "shard-000000.tar"), "rb") as f:
        data = f.read()
    kinds = {data[off + 156 : off + 157] for off in _header_offsets(data)}
    assert kinds <= {b"0", b"L"}


def _header_offsets(data):
    off = 0
    while data[off : off + 512] != bytes(512):
        yield off
        size = int(data[off + 124 : off + 136].rstrip(b"\0") or b"0", 8)
        off += 512 + size + (-size % 512)


def test_same_tree_packs_to_same_bytes(tree, tmp_path):
    src, _ = tree
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    pack_entries([src], a, maxcount=7)
    pack_entries([src], b, maxcount=7, jobs=2)
    for name in shard_files(a):
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            assert fa.read() == fb.read()


def test_manifest_counts_and_digests_are_exact(tree, tmp_path):
    src, expected = tree
    out = str(tmp_path / "out")
    pack_entries([src], out, maxcount=7)
    entries = manifest.load(os.path.join(out, "manifest.json"))
    assert sum(e.nsamples for e in entries) == len(expected)
    for e in entries:
        index = index_shard(os.path.join(out, e.url))
        assert (e.nsamples, e.digest, e.blocks, e.filesize) == (
            index.nsamples, index.digest, index.blocks, os.path.getsize(os.path.join(out, e.url)))
    assert any(len(e.blocks) == 16 for e in entries)  # the 5 MiB sample's shard has 2 blocks


def test_numbering_continues_after_highest_existing_shard(tree, tmp_path):
    src, _ = tree
    more = tmp_path / "more"
    make_tree(str(more / "extra"), n=30)  # other keys: the same ones would be refused as duplicates
    out = str(tmp_path / "out")
    os.makedirs(out)
    write_shard(out, "shard-000007.tar", 3)
    pack_entries([src], out, maxcount=20)
    pack_entries([str(more)], out, maxcount=20)
    assert shard_files(out) == ["shard-000007.tar"] + [f"shard-{i:06d}.tar" for i in range(8, 12)]
    urls = [e.url for e in manifest.load(os.path.join(out, "manifest.json"))]
    assert urls == shard_files(out)


def test_maxsize_bounds_shards_and_oversized_sample_gets_own_shard(tree, tmp_path, caplog):
    src, _ = tree
    out = str(tmp_path / "out")
    with caplog.at_level(logging.WARNING, logger="wdsrefresh"):
        entries = pack_entries([src], out, maxsize="64KB")
    big = [e for e in entries if e.filesize > 64_000]
    assert len(big) == 1 and big[0].nsamples == 1
    assert "more than maxsize" in caplog.text and "s0007" in caplog.text


def assert_nothing_published(out):
    assert not os.path.exists(out) or [n for n in os.listdir(out) if not n.startswith(".wdsrefresh")] == []


@pytest.mark.parametrize("name", ["../evil.jpg", "/abs/evil.jpg", "a/./b.jpg"])
def test_unsafe_member_names_are_refused(tmp_path, name):
    path = tmp_path / "x.jpg"
    path.write_bytes(b"x")
    with pytest.raises(PackError, match="member name"):
        group_samples([("src", name, str(path))])


def test_symlink_outside_source_is_refused_unless_followed(tree, tmp_path):
    src, expected = tree
    outside = tmp_path / "secret.txt"
    outside.write_bytes(b"secret")
    os.symlink(outside, os.path.join(src, "link.txt"))
    out = str(tmp_path / "out")
    with pytest.raises(PackError, match=r"link\.txt: symlink points outside"):
        pack_entries([src], out)
    assert_nothing_published(out)
    pack_entries([src], out, follow_symlinks=True)
    got = as_dicts(wds.WebDataset([os.path.join(out, "shard-000000.tar")], shardshuffle=False))
    assert got["link"] == {"txt": b"secret"}


@pytest.mark.parametrize("second", ["a.JPG", "other/a.cls"])
def test_duplicate_keys_are_refused(tmp_path, second):
    one, two = tmp_path / "one", tmp_path / "two"
    (one).mkdir()
    (one / "a.jpg").write_bytes(b"1")
    (two / os.path.dirname(second)).mkdir(parents=True)
    (two / second).write_bytes(b"2")
    sources = [str(one)] if "/" not in second else [str(one), str(two / "other")]
    if "/" not in second:
        (one / second).write_bytes(b"2")
    out = str(tmp_path / "out")
    with pytest.raises(PackError, match="duplicate key 'a'"):
        pack_entries(sources, out)
    assert_nothing_published(out)


def test_empty_source_and_name_without_extension_under_strict_are_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / ".hidden.jpg").write_bytes(b"skipped")
    out = str(tmp_path / "out")
    with pytest.raises(PackError, match="nothing to pack"):
        pack_entries([str(src)], out)
    (src / "README").write_bytes(b"x")
    with pytest.raises(PackError, match="nothing to pack"):  # a stray file alone is no sample
        pack_entries([str(src)], out)
    (src / "a.jpg").write_bytes(b"x")
    with pytest.raises(PackError, match="README.*no extension"):
        pack_entries([str(src)], out, strict=True)
    assert_nothing_published(out)


def test_cli_unreadable_file_fails_naming_it_and_publishes_nothing(tree, tmp_path):
    src, _ = tree
    bad = os.path.join(src, "sub", "s0001.jpg")
    os.chmod(bad, 0)
    out = tmp_path / "out"
    # root reads anything: drop the capabilities that let it (setpriv, util-linux)
    as_user = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    r = subprocess.run(as_user + CLI + ["pack", src, "-o", str(out)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert f"{bad}: cannot be read" in r.stderr
    assert_nothing_published(str(out))


def test_cli_pack_prints_summary_and_help_explains(tree, tmp_path):
    src, expected = tree
    out = str(tmp_path / "out")
    r = subprocess.run(CLI + ["pack", src, "-o", out, "--maxcount", "10", "--prefix", "part"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(rf"packed {len(expected)} samples into 3 shards in {out}: 5\.\d MB in \d+\.\d s "
                        r"\([\d,]+ samples/s, [\d,.]+ MB/s\)\n", r.stdout), r.stdout
    assert shard_files(out) == ["part-000000.tar", "part-000001.tar", "part-000002.tar"]
    assert r.stderr == ""  # no progress bar when stderr is not a terminal
    help_text = subprocess.run(CLI + ["pack", "--help"], capture_output=True, text=True, timeout=60).stdout
    assert "--maxsize" in help_text and "key" in help_text


def test_prefix_that_is_not_a_plain_name_is_refused_before_anything_is_written(tree, tmp_path):
    src, _ = tree
    out = tmp_path / "deep" / "out"
    r = subprocess.run(CLI + ["pack", src, "-o", str(out), "--prefix", "../escaped"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "prefix '../escaped' is not a plain name" in r.stderr
    for prefix in ("/abs/shard", "sub/dir", ".hidden", "", "a b"):
        with pytest.raises(PackError, match=f"prefix {re.escape(repr(prefix))} is not a plain name"):
            pack_entries([src], str(out), prefix=prefix)
    assert sorted(os.listdir(tmp_path)) == ["src"]  # nothing written, in OUT or beside it
    pack_entries([src], str(out), prefix="v2.train_part-A")
    assert shard_files(str(out))[0] == "v2.train_part-A-000000.tar"


def test_output_url_other_than_s3_is_refused_instead_of_becoming_a_local_folder(tree, tmp_path, monkeypatch, capsys):
    src, _ = tree
    monkeypatch.chdir(tmp_path)
    assert main(["pack", src, "-o", "gs://bucket/shards"]) == 1
    assert "gs://bucket/shards: only s3:// URLs and local directories can be written" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_jobs_below_one_is_refused(tree, tmp_path, capsys):
    src, _ = tree
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["pack", src, "-o", str(out), "--jobs", "0"])
    assert exit_.value.code == 2 and "--jobs: must be at least 1, got 0" in capsys.readouterr().err
    for jobs in (0, -2):
        with pytest.raises(ValueError, match=f"jobs must be at least 1 \\(got {jobs}\\)"):
            pack_entries([src], str(out), jobs=jobs)
    assert not out.exists()


def help_text(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_help_shows_the_defaults_the_code_uses(capsys):
    from wdsrefresh.write.ingest import IngestConfig
    from wdsrefresh.write.pack import DEFAULT_MAXCOUNT, DEFAULT_PREFIX

    text = help_text("pack", capsys)
    assert f"(default: {DEFAULT_MAXCOUNT})" in text and f"(default: {DEFAULT_PREFIX})" in text
    assert "(default: 1GB)" in text
    text = help_text("ingest", capsys)
    assert f"(default: {IngestConfig.settle})" in text and f"(default: {IngestConfig.flush})" in text


def test_running_a_finished_pack_again_does_nothing(tree, tmp_path, capsys, caplog):
    src, expected = tree
    out = str(tmp_path / "out")
    first = pack_entries([src], out, maxcount=7)
    with caplog.at_level(logging.WARNING, logger="wdsrefresh"):
        assert main(["pack", src, "-o", out, "--maxcount", "7"]) == 0
    assert capsys.readouterr().out == (f"nothing to do: these inputs were packed into {out} before "
                                       f"({len(expected)} samples in 4 shards)\n")
    assert "To pack them again, remove" in caplog.text and "done-" in caplog.text
    assert shard_files(out) == [e.url for e in first] == [e.url for e in manifest.load(os.path.join(out, "manifest.json"))]


# sha256 of each file packed from golden_tree(): the bytes `pack` wrote before the plan/task/commit
# rewrite; the same inputs must keep packing to the same bytes
GOLDEN = {
    "shard-000000.tar": "a600dfd1797a3a3ea59eb0fbd3ba0b36cdf42326e615b90610fca0b178f9af1c",
    "shard-000001.tar": "9bd491140ea0c34888a3ed92c447335b176373df12b7831f89754972af9cdc4f",
    "shard-000002.tar": "199696d3e58f3df547049ae5a888771724622426f7ce6fed08845a220cc54706",
}


def golden_tree(src):
    for i in range(12):
        key = f"{'sub/' if i % 3 else ''}s{i:04d}"
        for ext, data in {"jpg": bytes(range(256)) * (i + 1), "cls": str(i).encode(),
                          "seg.png": bytes([i]) * (700 * i)}.items():
            path = os.path.join(src, f"{key}.{ext}")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)


def test_output_bytes_are_unchanged_from_earlier_versions(tmp_path):
    import hashlib

    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    golden_tree(src)
    pack_entries([src], out, maxcount=5)  # and so with --jobs: test_same_tree_packs_to_same_bytes
    found = {}
    shards = (n for n in os.listdir(out) if n.endswith(".tar"))  # the manifest's format has its own version
    for name in sorted(shards):
        with open(os.path.join(out, name), "rb") as f:
            found[name] = hashlib.sha256(f.read()).hexdigest()
    assert found == GOLDEN


def on_a_terminal(args: list[str]) -> tuple[subprocess.CompletedProcess, bytes]:
    """Runs the command with stderr on a 100-column pseudo-terminal (so the bar shows);
    (the result, what the terminal showed)."""
    import fcntl
    import pty
    import struct
    import termios

    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns, like a terminal
    try:
        r = subprocess.run(CLI + args, stdout=subprocess.PIPE, stderr=terminal, text=True, timeout=120)
        os.close(terminal)
        shown = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the terminal is closed and drained
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(controller)
    return r, shown


def test_progress_bar_shows_on_a_terminal_and_summary_line_always(tree, tmp_path):
    src, expected = tree
    out = str(tmp_path / "out")
    r, shown = on_a_terminal(["pack", src, "-o", out])
    assert r.returncode == 0
    assert b"pack: 100%" in shown and b"MB/s" in shown and re.search(rb"23/23 samples, [\d,]+ samples/s", shown)
    assert r.stdout.startswith(f"packed {len(expected)} samples into 1 shards in {out}: ")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("jobs", ["1", "2"])
def test_the_bar_ends_at_the_shard_bytes_the_summary_reports(tmp_path, jobs):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for i in range(30):  # small members: headers and padding are most of a shard
        (src / f"{i:03d}.bin").write_bytes(bytes([i]) * 1000)
        (src / f"{i:03d}.cls").write_bytes(b"7")
    r, shown = on_a_terminal(["pack", str(src), "-o", str(out), "--maxcount", "10", "--jobs", jobs])
    assert r.returncode == 0, shown
    shard_bytes = sum(os.path.getsize(out / n) for n in os.listdir(out) if n.endswith(".tar"))
    payload = 30 * 1001
    assert shard_bytes > 2 * payload  # so the two cannot be mistaken for each other
    done = tqdm.format_sizeof(shard_bytes, divisor=1000)
    finished = [line for line in re.split(r"[\r\n]", shown.decode(errors="replace")) if "pack: 100%" in line]
    assert finished and f"| {done}/{done} " in finished[-1], shown
    assert f": {shard_bytes / 1e6:.1f} MB in " in r.stdout  # the summary: the same bytes

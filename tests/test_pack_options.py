"""`wdsrefresh pack` as packers expect it: --shuffle, --label-from-dir, --exclude, stray files, duplicate keys."""

import collections
import json
import os
import subprocess
import sys

import pytest
import webdataset as wds

import wdsrefresh as wr
from shardutil import write_shard
from wdsrefresh.write.pack import DuplicateKeysError, PackError, pack_entries

CLI = [sys.executable, "-m", "wdsrefresh.cli"]
CLASSES = ("zebra", "ant", "Bee", "cat")  # sorted: Bee, ant, cat, zebra (upper case first, as ImageFolder sorts)


def class_tree(root, classes=CLASSES, per_class=12, stem="img"):
    """A folder per class, ``per_class`` images in each (some nested one folder deeper)."""
    for c in classes:
        for i in range(per_class):
            path = os.path.join(root, c, "deep" if i % 4 == 0 else "", f"{stem}{i:03d}.jpg")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(f"{c}:{i}".encode() * (i + 1))
    return str(root)


def shard_paths(out):
    return [os.path.join(out, n) for n in sorted(os.listdir(out)) if n.endswith(".tar")]


def samples_by_shard(out):
    return [list(wds.WebDataset([path], shardshuffle=False)) for path in shard_paths(out)]


def shard_bytes(out):
    found = {}
    for path in shard_paths(out):
        with open(path, "rb") as f:
            found[os.path.basename(path)] = f.read()
    return found


def published(out):
    """What a reader of ``out`` can see: visible names, and the manifest's bytes."""
    names = sorted(n for n in os.listdir(out) if not n.startswith("."))
    path = os.path.join(out, "manifest.json")
    with open(path, "rb") as f:
        return names, f.read()


# ---- --shuffle ----------------------------------------------------------------------------


def test_class_per_folder_tree_packs_class_sorted_shards_without_shuffle(tmp_path):
    src, out = class_tree(tmp_path / "src"), str(tmp_path / "out")
    pack_entries([src], out, maxcount=12)
    classes = [{s["__key__"].split("/")[0] for s in shard} for shard in samples_by_shard(out)]
    assert classes == [{c} for c in sorted(CLASSES)]  # the problem --shuffle solves


def test_shuffle_mixes_classes_in_every_shard_and_same_seed_packs_same_bytes(tmp_path):
    src = class_tree(tmp_path / "src")
    a, b, c = (str(tmp_path / n) for n in "abc")
    pack_entries([src], a, maxcount=12, shuffle=7)
    pack_entries([src], b, maxcount=12, shuffle=7, jobs=2)
    pack_entries([src], c, maxcount=12, shuffle=8)
    shards = samples_by_shard(a)
    assert len(shards) == 4
    for shard in shards:
        counts = collections.Counter(s["__key__"].split("/")[0] for s in shard)
        assert len(counts) > 1 and max(counts.values()) < len(shard), counts
    keys = [s["__key__"] for shard in shards for s in shard]
    assert sorted(keys) == sorted(keys) and len(set(keys)) == len(keys) == 4 * 12  # each sample once
    assert keys != sorted(keys)
    assert shard_bytes(a) == shard_bytes(b)  # same seed: byte-identical shards, whatever --jobs
    assert shard_bytes(a) != shard_bytes(c)  # another seed: another order


# ---- --label-from-dir ---------------------------------------------------------------------


def test_label_from_dir_numbers_classes_in_sorted_folder_order_like_imagefolder(tmp_path):
    src, out = class_tree(tmp_path / "src"), str(tmp_path / "out")
    report = wr.pack(src, out, maxcount=10, label_from_dir=True, shuffle=3)
    expected_classes = sorted(os.listdir(src))  # torchvision.datasets.folder.find_classes does this
    assert report.nsamples == 48
    seen = 0
    for shard in samples_by_shard(out):
        for sample in shard:
            assert int(sample["cls"]) == expected_classes.index(sample["__key__"].split("/")[0]), sample["__key__"]
            seen += 1
    assert seen == 48
    with open(os.path.join(out, "classes.json")) as f:
        doc = json.load(f)
    assert doc["classes"] == expected_classes
    assert doc["class_to_idx"] == {name: i for i, name in enumerate(expected_classes)}


def test_a_subset_of_the_classes_keeps_the_numbering_of_out_and_an_unknown_class_is_refused(tmp_path):
    train, out = class_tree(tmp_path / "train"), str(tmp_path / "out")
    pack_entries([train], out, label_from_dir=True)
    val = class_tree(tmp_path / "val", classes=("cat", "zebra"), per_class=3, stem="val")
    pack_entries([val], out, label_from_dir=True)
    numbers = {s["__key__"].split("/")[0]: int(s["cls"]) for s in samples_by_shard(out)[-1]}
    train_numbers = {c: i for i, c in enumerate(sorted(CLASSES))}
    assert numbers == {"cat": train_numbers["cat"], "zebra": train_numbers["zebra"]}
    before = published(out)
    other = class_tree(tmp_path / "other", classes=("cat", "dog"), per_class=2, stem="other")
    with pytest.raises(PackError, match=r"classes\.json numbers 4 classes and lacks 1 .*'dog'"):
        pack_entries([other], out, label_from_dir=True)
    assert published(out) == before


def test_label_from_dir_refuses_samples_outside_class_folders_and_samples_with_a_cls(tmp_path):
    src, out = class_tree(tmp_path / "src", per_class=2), str(tmp_path / "out")
    (tmp_path / "src" / "loose.jpg").write_bytes(b"x")
    with pytest.raises(PackError, match="loose.jpg: sample 'loose' is not inside a class folder"):
        pack_entries([src], out, label_from_dir=True)
    os.unlink(tmp_path / "src" / "loose.jpg")
    (tmp_path / "src" / "cat" / "img001.cls").write_bytes(b"9")
    with pytest.raises(PackError, match="sample 'cat/img001' already has a .cls member"):
        pack_entries([src], out, label_from_dir=True)
    assert not os.path.exists(out) or not os.path.exists(os.path.join(out, "classes.json"))


# ---- --exclude, stray files ---------------------------------------------------------------


def test_exclude_globs_and_stray_files_are_skipped_and_counted_unless_strict(tmp_path):
    src, out = tmp_path / "src", str(tmp_path / "out")
    class_tree(src, classes=("cat",), per_class=3)
    (src / "README").write_bytes(b"about this data")
    (src / "cat" / "notes.txt").write_bytes(b"excluded by base name")
    (src / "scratch").mkdir()
    (src / "scratch" / "junk.jpg").write_bytes(b"excluded with its folder")
    r = subprocess.run(CLI + ["pack", str(src), "-o", out, "--exclude", "*.txt", "--exclude", "scratch"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "skipped 1 file that belongs to no sample" in r.stdout
    assert "README" in r.stderr and "no extension" in r.stderr  # the warning names it
    keys = sorted(s["__key__"] for shard in samples_by_shard(out) for s in shard)
    assert keys == ["cat/deep/img000", "cat/img001", "cat/img002"]
    strict = subprocess.run(CLI + ["pack", str(src), "-o", str(tmp_path / "strict"), "--strict"],
                            capture_output=True, text=True, timeout=60)
    assert strict.returncode == 1 and f"{src / 'README'}: name 'README' has no extension" in strict.stderr
    assert not os.path.exists(tmp_path / "strict" / "manifest.json")


def test_exclude_matches_relative_paths_and_single_file_sources(tmp_path):
    src = tmp_path / "src"
    class_tree(src, classes=("a", "b"), per_class=2)
    out = str(tmp_path / "out")
    pack_entries([str(src), str(src / "a" / "img001.jpg")], out, exclude=["b/*", "img001.jpg"])
    keys = sorted(s["__key__"] for shard in samples_by_shard(out) for s in shard)
    assert keys == ["a/deep/img000"]


# ---- duplicate keys -----------------------------------------------------------------------


def test_packing_keys_out_already_holds_is_refused_naming_them_and_writes_nothing(tmp_path):
    src, out = class_tree(tmp_path / "src"), str(tmp_path / "out")
    pack_entries([src], out, maxcount=10)
    before = published(out)
    r = subprocess.run(CLI + ["pack", src, "-o", out, "--maxcount", "20"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "48 of the keys being packed are in its shards already" in r.stderr
    assert "'Bee/deep/img000' (in shard-000000.tar)" in r.stderr and "--allow-duplicate-keys" in r.stderr
    assert published(out) == before
    again = subprocess.run(CLI + ["pack", src, "-o", out, "--maxcount", "10"], capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 0 and again.stdout.startswith("nothing to do")  # the same plan: a no-op
    entries = pack_entries([src], out, maxcount=20, allow_duplicate_keys=True)
    assert [e.url for e in entries] == ["shard-000005.tar", "shard-000006.tar", "shard-000007.tar"]


def write_made_samples(out, **options):
    """Three samples keyed made/0, made/1, made/2 through wr.Writer, two per shard."""
    with wr.Writer(out, maxcount=2, **options) as w:
        for i in range(3):
            w.write({"__key__": f"made/{i}", "txt": "x"})


def files_again(root, *names):
    """A source holding a file under each of ``names`` (keys packed before); returns its path."""
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"again")
    return str(root)


def test_duplicate_keys_are_found_in_shards_written_by_other_tools_and_by_the_writer(tmp_path):
    out = str(tmp_path / "out")
    os.makedirs(out)
    write_shard(out, "foreign-000000.tar", 3)  # keys foreign-000000/000000 ... (no record: its headers are read)
    write_made_samples(out)
    src = files_again(tmp_path / "src", "foreign-000000/000001.bin")
    with pytest.raises(DuplicateKeysError, match=r"1 of the keys .* 'foreign-000000/000001' \(in foreign-000000.tar\)"):
        pack_entries([str(src)], out)
    files_again(tmp_path / "src", "made/2.txt")
    with pytest.raises(DuplicateKeysError, match=r"2 of the keys .*'made/2' \(in shard-000001.tar\)"):
        pack_entries([str(src)], out)
    assert os.listdir(os.path.join(out, ".wdsrefresh", "keys"))  # what was read is recorded for next time


def test_keys_of_an_unfinished_pack_count_as_taken(tmp_path):
    from wdsrefresh.write.pack import collect, open_plan, plan_shards

    src, out = class_tree(tmp_path / "src", per_class=2), str(tmp_path / "out")
    os.makedirs(out)
    groups = plan_shards(collect([src]), 4, 10**9)
    with open_plan(out, [src], groups, "shard", 4, 10**9):
        pass  # planned, nothing written yet (as if killed)
    copy = tmp_path / "copy"
    class_tree(copy, classes=("ant",), per_class=1)
    with pytest.raises(DuplicateKeysError, match="'ant/deep/img000' \\(in shard-000000.tar\\)"):
        pack_entries([str(copy)], out)

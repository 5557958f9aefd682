"""Class labels from folders (``pack --label-from-dir``): numbering, ``.cls`` members, ``classes.json``.

A sample's class is its top folder under the source (``cat/x.jpg`` and ``cat/a/y.jpg`` are class
``cat``). Classes are numbered in sorted order of their folder names, as torchvision's
``ImageFolder`` numbers them, and each sample gets a ``.cls`` member holding its number in
decimal (what webdataset's writer makes of an ``int`` under ``cls``).

``OUT/classes.json`` (``{"classes": [...], "class_to_idx": {...}}``) records the numbering next to
the manifest (on an object store: an object beside it, created with a conditional PUT). An
output keeps one numbering: when it has a ``classes.json`` listing every class
being packed, that numbering is used (packing a subset of the classes, e.g. a validation split,
keeps the training numbers); when it lacks one of them, the pack is refused.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from .destination import Destination
from .model import Member, PackError, Sample

CLASSES_NAME = "classes.json"
LABEL_EXT = "cls"


def class_of(sample: Sample) -> str:
    """The top folder of ``sample``'s key; PackError for a sample at the top of its source."""
    folder, sep, _ = sample.key.partition("/")
    if not sep:
        path = sample.members[0].path
        raise PackError(f"{path}: sample {sample.key!r} is not inside a class folder; --label-from-dir takes "
                        "each sample's class from its top folder under SRC (SRC/CLASS/...)")
    return folder


def folder_classes(samples: Sequence[Sample]) -> list[str]:
    """The class folders of ``samples``, sorted (their numbering, unless OUT has one)."""
    return sorted({class_of(s) for s in samples})


def load_classes(dest: Destination) -> list[str] | None:
    """The class list of ``OUT/classes.json`` in index order, or None without one."""
    data = dest.read_record(CLASSES_NAME)
    if data is None:
        return None
    where = dest.location(CLASSES_NAME)
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exn:
        raise PackError(f"{where}: not valid JSON ({exn})") from None
    classes = doc.get("classes") if isinstance(doc, dict) else None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise PackError(f"{where}: expected {{\"classes\": [names in index order]}}")
    return classes


def numbering(dest: Destination, classes: Sequence[str]) -> list[str]:
    """The class list (index order) to label ``classes`` with in ``dest``: its ``classes.json``
    when that lists them all, else ``classes`` themselves (sorted). PackError when OUT's
    ``classes.json`` lacks some of them: their numbers would disagree with the shards there."""
    existing = load_classes(dest)
    if existing is None:
        return sorted(classes)
    missing = sorted(set(classes) - set(existing))
    if missing:
        raise PackError(
            f"{dest.location(CLASSES_NAME)} numbers {len(existing)} classes and lacks {len(missing)} of the class "
            f"folders being packed ({', '.join(map(repr, missing[:5]))}{', ...' if len(missing) > 5 else ''}): "
            "their numbers would disagree with the shards already there. Pack into another directory, or fix "
            "classes.json by hand if the shards there have no labels yet")
    return existing


def labelled(samples: Sequence[Sample], classes: Sequence[str]) -> list[Sample]:
    """``samples`` with a ``.cls`` member each: the index of its class folder in ``classes``."""
    index = {name: i for i, name in enumerate(classes)}
    result = []
    for sample in samples:
        if any(m.name[len(sample.key) + 1 :].lower() == LABEL_EXT for m in sample.members):
            raise PackError(f"{sample.members[0].path}: sample {sample.key!r} already has a .{LABEL_EXT} member; "
                            f"--label-from-dir would add a second one")
        data = str(index[class_of(sample)]).encode("ascii")
        label = Member(f"{sample.key}.{LABEL_EXT}", "", len(data), data=data)
        result.append(Sample(sample.key, tuple(sorted((*sample.members, label), key=lambda m: m.name))))
    return result


def save_classes(dest: Destination, classes: Sequence[str]) -> None:
    """Writes ``OUT/classes.json`` unless it is there already, saying the same (``numbering``
    chose it), with an exclusive create (a conditional PUT on an object store); PackError if
    one appeared meanwhile that numbers the classes otherwise."""
    doc = {"classes": list(classes), "class_to_idx": {c: i for i, c in enumerate(classes)}}
    if dest.write_record(CLASSES_NAME, json.dumps(doc, indent=1).encode(), create=True):
        return
    existing = load_classes(dest)
    if existing != list(classes):
        raise PackError(f"{dest.location(CLASSES_NAME)} appeared while packing and numbers the classes otherwise "
                        f"({len(existing or [])} classes); nothing was labelled")

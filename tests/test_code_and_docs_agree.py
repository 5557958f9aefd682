"""What the README and the docs say about the dataset's arguments and extras is what the code does:
the lists are read from the code (the constructor's signature, pyproject's extras). That the
reference names every argument is tests/test_docs_site.py's part."""

import inspect
import os
import pickle
import re
import tomllib

import pytest
import torch

import wdsrefresh as wr
from s3fixtures import moto_server, s3  # noqa: F401 - fixtures
from shardutil import write_shard

ROOT = os.path.join(os.path.dirname(__file__), "..")
PARAMETERS = [name for name in inspect.signature(wr.RefreshingWebDataset.__init__).parameters
              if name not in ("self", "webdataset_args")]


def section(page: str, title: str) -> str:
    """The text of the section ``## title`` of ``page`` (a path from the repository's root)."""
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        text = f.read()
    start = text.index(f"\n## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_an_unknown_argument_is_refused_listing_every_parameter_of_the_constructor(shard_dir):
    with pytest.raises(TypeError, match="unexpected keyword argument 'shard_shuffle'") as refused:
        wr.RefreshingWebDataset(shard_dir, shard_shuffle=True)
    listed = str(refused.value).split("its arguments are: ", 1)[1].split(", ")
    assert "max_sample_bytes" in listed and "storage_options" in listed
    assert listed[:len(PARAMETERS)] == PARAMETERS  # then webdataset's own, accepted where they mean something
    assert {"nodesplitter", "resampled", "empty_check"} <= set(listed[len(PARAMETERS):])


@pytest.mark.parametrize("name,value", [("cache_dir", "/tmp/cache"), ("cache_size", 10**9)])
def test_webdatasets_cache_arguments_point_to_the_object_stores_cache(shard_dir, name, value):
    with pytest.raises(ValueError) as refused:
        wr.RefreshingWebDataset(shard_dir, **{name: value})
    assert 'storage_options={"cache_dir": ..., "cache_limit"' in str(refused.value)
    assert "not supported" not in str(refused.value)
    with open(os.path.join(ROOT, "docs", "from-webdataset.md"), encoding="utf-8") as f:
        [row] = [line for line in f if line.startswith("| `cache_dir`")]
    assert "storage_options" in row and "not supported" not in row and "no remote" not in row


def test_getting_started_names_every_argument_of_the_dataset():
    arguments = section("docs/getting-started.md", "The dataset's arguments")
    missing = [name for name in PARAMETERS[1:] if not re.search(rf"`{name}[`=]", arguments)]
    assert not missing, f"getting started's list of arguments does not name {missing}"


def test_the_install_sections_name_every_extra():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    for page in ("README.md", "docs/getting-started.md"):
        install = section(page, "Install into your own environment")
        assert [name for name in extras if f"`{name}`" not in install] == [], page
    dependencies = section("docs/getting-started.md", "Dependencies")
    paragraphs = [p for p in dependencies.split("\n\n") if p.strip()]
    assert len(paragraphs) == len(set(paragraphs))
    for name in extras:
        if name != "test":
            assert f"extra `{name}`" in dependencies, name


@pytest.mark.timeout(120)
def test_storage_options_given_to_the_dataset_reach_its_object_sources(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: only the options work
    secret = "SECRET-marker-5f3a"
    s3.put_shard("d/a.tar", 5)
    s3.put_shard("d/b.tar", 3)
    cache = tmp_path / "cache"
    options = {"endpoint_url": s3.endpoint, "key": "testing", "secret": secret, "cache_dir": str(cache),
               "cache_limit": "64MB", "backoff": 0.01, "max_backoff": 0.05}
    ds = wr.RefreshingWebDataset(s3.url("d/"), storage_options=options)
    snapshot = ds.set_epoch(0)
    keys = [s["__key__"] for s in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)]
    assert sorted(keys) == sorted([f"a/{i:06d}" for i in range(5)] + [f"b/{i:06d}" for i in range(3)])
    cached = [f for _, _, files in os.walk(cache) for f in files]
    assert cached, "the blocks read were not cached under storage_options' cache_dir"
    for shown in (pickle.dumps(snapshot), pickle.dumps(ds.state_dict())):
        assert secret.encode() not in shown
    ds.close()


def test_storage_options_are_refused_where_they_cannot_apply(shard_dir):
    write_shard(shard_dir, "a.tar", 1)
    with pytest.raises(TypeError, match="storage_options apply to s3:// and https:// URLs"):
        wr.RefreshingWebDataset(shard_dir, storage_options={"cache_dir": "/tmp/x"})
    with pytest.raises(ValueError, match='mode="epoch"'):
        wr.RefreshingWebDataset(shard_dir, mode="stream", storage_options={})


@pytest.mark.parametrize("url", ["s3://bucket/shards/", "https://host.invalid/a.tar"])
def test_a_mistyped_storage_option_is_refused_listing_the_sources_own_options_too(url):
    with pytest.raises(TypeError, match="unknown option") as refused:
        wr.make_source(url, storage_options={"index_intervall": 60})
    known = str(refused.value).split("known: ", 1)[1].split(", ")
    assert "index_interval" in known and "index_intervall" not in known

"""A prefix listed before is listed again in key ranges at once: the same objects, in key order,
whatever was added or deleted in between (moto on 127.0.0.1, checked against boto3's own paginator)."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from s3fixtures import fault_proxy, moto_server, s3  # noqa: F401 - fixtures
from test_s3 import via
from wdsrefresh.storage.objects.s3 import Store

PAGE = 50


def boto3_listing(s3, prefix: str, delimiter: str | None) -> tuple[list[tuple[str, int, str]], list[str]]:
    kwargs = {"Bucket": s3.name, "Prefix": prefix, **({"Delimiter": delimiter} if delimiter else {})}
    objects, folders = [], []
    for page in s3.client.get_paginator("list_objects_v2").paginate(**kwargs):
        objects += [(o["Key"], o["Size"], o["ETag"]) for o in page.get("Contents", ())]
        folders += [p["Prefix"] for p in page.get("CommonPrefixes", ())]
    return objects, folders


def store_listing(store: Store, s3, prefix: str, delimiter: str | None) -> tuple[list[tuple[str, int, str]], list[str]]:
    folders: list[str] = []
    objects = [(st.url[len(f"s3://{s3.name}/"):], st.size, st.etag)
               for st in store.list(s3.name, prefix, delimiter, folders)]
    return objects, folders


def put_all(s3, keys) -> None:
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: s3.put(k, k.encode()), keys))


@pytest.mark.parametrize("delimiter", ["/", None])
def test_relisting_in_key_ranges_sees_every_change_in_key_order(s3, fault_proxy, delimiter):
    rng = random.Random(7)
    keys = [f"p/k-{i:05d}.tar" for i in range(0, 2000, 4)]  # gaps where keys can be inserted later
    put_all(s3, keys + ["p/sub/x.tar", "p/sub0.tar", "p/sub.tar", "p/zz/y.tar"])
    store = Store(via(s3, fault_proxy, page_size=PAGE))
    assert store_listing(store, s3, "p/", delimiter) == boto3_listing(s3, "p/", delimiter)
    pages_in_a_chain = len(fault_proxy.requests("GET", "list-type=2"))

    fault_proxy.clear()
    assert store_listing(store, s3, "p/", delimiter) == boto3_listing(s3, "p/", delimiter)
    ranged = [r for r in fault_proxy.requests("GET", "list-type=2") if "start-after" in r.path]
    assert ranged, "the second listing was not split into key ranges"
    assert len(fault_proxy.requests("GET", "list-type=2")) == pages_in_a_chain  # nothing changed: no extra page

    for key in rng.sample(keys, 60):
        s3.delete(key)
    put_all(s3, [f"p/k-{i:05d}.tar" for i in rng.sample(range(1, 2000, 4), 150)]
            + ["p/a-first.tar", "p/zzz-last.tar", "p/sub/z.tar"])
    assert store_listing(store, s3, "p/", delimiter) == boto3_listing(s3, "p/", delimiter)

"""ListObjectsV2 pages read from their XML here rather than by botocore.

botocore turns each page into dicts through its generic shape walker, in Python, key by key:
about a third of a 10,000-key listing's time against a loopback server. ``keep_page`` (a
``before-parse`` handler) keeps a successful page's body for ``parse_page`` and hands botocore
an empty result to walk instead; requests, signing, retries and error responses stay botocore's.
"""

from __future__ import annotations

from urllib.parse import unquote_plus
from xml.etree import ElementTree

RAW_PAGE = "WdsrefreshRawPage"  # where the kept body is found in the operation's result
_EMPTY = (b'<?xml version="1.0" encoding="UTF-8"?>'
          b'<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"></ListBucketResult>')


def keep_page(response_dict: dict, customized_response_dict: dict, **_) -> None:
    """botocore's ``before-parse.s3.ListObjectsV2`` event: keeps a 200 page's body."""
    body = response_dict.get("body")
    if response_dict.get("status_code") == 200 and isinstance(body, bytes):
        customized_response_dict[RAW_PAGE] = body
        response_dict["body"] = _EMPTY


class PageError(Exception):
    """A 200 response that is no whole listing page: cut short, or an error document (retried,
    as botocore retries them)."""


def parse_page(body: bytes, prefixes: list[str] | None = None) -> tuple[list[tuple[str, int, str, str]], str | None]:
    """The objects of one page as (key, size, etag, last-modified text), in the page's order,
    and the continuation token when the listing goes on; the "folders" a delimiter rolled up
    (``CommonPrefixes``) are appended to ``prefixes`` when given. Keys are decoded as botocore
    decodes them (``EncodingType=url``, which botocore asks for); ETags keep their quotes.
    PageError for a body that is not a whole page."""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError as exn:
        raise PageError(f"a listing page that is not whole XML ({exn})") from None
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    if root.tag != f"{ns}ListBucketResult":
        raise PageError(f"a 200 response with a <{root.tag[len(ns):]}> document instead of a listing page")
    encoded = root.findtext(f"{ns}EncodingType") == "url"
    key_tag, size_tag, etag_tag, modified_tag = (f"{ns}Key", f"{ns}Size", f"{ns}ETag", f"{ns}LastModified")
    objects = []
    for item in root.iterfind(f"{ns}Contents"):
        fields = {child.tag: child.text or "" for child in item}
        key = fields[key_tag]
        objects.append((unquote_plus(key) if encoded else key, int(fields[size_tag]), fields[etag_tag],
                        fields[modified_tag]))
    if prefixes is not None:
        for item in root.iterfind(f"{ns}CommonPrefixes"):
            prefix = item.findtext(f"{ns}Prefix") or ""
            prefixes.append(unquote_plus(prefix) if encoded else prefix)
    truncated = root.findtext(f"{ns}IsTruncated") == "true"
    return objects, (root.findtext(f"{ns}NextContinuationToken") if truncated else None)

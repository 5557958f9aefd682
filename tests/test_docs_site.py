"""The docs site builds with no warning, offline, and its reference (the built HTML) documents
everything the code accepts: each parameter of RefreshingWebDataset, each webdataset argument it
accepts or refuses, each key of a mix's sources and of storage_options, each exported name, and
each flag of each command. Each list is read from the code, never from the docs."""

import argparse
import html
import inspect
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import wdsrefresh as wr
from wdsrefresh.cli import build_parser
from wdsrefresh.mix.config import SOURCE_OPTIONS
from wdsrefresh.pipeline import compat
from wdsrefresh.storage.objects.source import SOURCE_STORAGE_OPTIONS

ROOT = Path(__file__).resolve().parent.parent
# one build per session, on one worker: it takes a core for a few seconds
pytestmark = [pytest.mark.xdist_group("docs-site"), pytest.mark.timeout(300)]


@dataclass(frozen=True)
class Site:
    returncode: int
    log: str
    root: Path

    def page(self, name: str) -> str:
        return (self.root / name).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Site:
    out = tmp_path_factory.mktemp("site")
    path = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path),
           "NO_MKDOCS_2_WARNING": "1"}  # Material's notice about MkDocs 2, not a warning of this build
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    return Site(build.returncode, build.stdout + build.stderr, out)


def ids(page: str) -> set[str]:
    return set(re.findall(r'\bid="([^"]+)"', page))


def prefixed(page: str, prefix: str) -> set[str]:
    return {i[len(prefix):] for i in ids(page) if i.startswith(prefix)}


def missing_and_extra(documented: set[str], accepted: set[str]) -> str:
    return f"missing from the page: {sorted(accepted - documented)}; documented but not accepted: " \
           f"{sorted(documented - accepted)}"


def text(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", fragment))


def refused_keys(url: str) -> set[str]:
    """The storage_options keys the store of ``url`` lists when it refuses an unknown one."""
    with pytest.raises(TypeError, match="unknown option") as refused:
        wr.make_source(url, storage_options={"no_such_option": 1})
    return set(str(refused.value).split("known: ", 1)[1].split(", "))


def storage_keys() -> dict[str, set[str]]:
    """Every key ``storage_options`` takes, by the store that takes it ("s3", "https")."""
    keys = {"s3": refused_keys("s3://bucket/shards/"), "https": refused_keys("https://host.invalid/a.tar")}
    assert {"endpoint_url", "cache_dir"} <= keys["s3"] and "headers" in keys["https"]  # the lists were read
    for key in SOURCE_STORAGE_OPTIONS:
        wr.make_source("s3://bucket/shards/", storage_options={key: 0})  # taken, not refused
        wr.make_source("https://host.invalid/a.tar", storage_options={key: 0})
    return keys


def storage_rows(page: str) -> dict[str, set[str]]:
    """Each key of the storage_options table, with the stores its "for" column names."""
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", page, re.S):
        cells = re.findall(r"<td>(.*?)</td>", row, re.S)
        for key in re.findall(r'id="storage-([^"]+)"', cells[0] if cells else ""):
            rows[key] = set(text(cells[1]).replace(",", " ").split())
    return rows


def test_the_site_builds_strictly_with_no_warning(site):
    assert site.returncode == 0, site.log
    assert "WARNING" not in site.log, site.log


def test_the_built_pages_load_nothing_from_the_network(site):
    external = re.compile(r'<(?:script|link|img)\b[^>]*\b(?:src|href)="(?:https?:)?//[^"]*"')
    pages = sorted(site.root.rglob("*.html"))
    assert pages
    loaded = {str(p.relative_to(site.root)): external.findall(p.read_text(encoding="utf-8")) for p in pages}
    assert {page: found for page, found in loaded.items() if found} == {}


def test_options_page_has_an_entry_for_each_parameter_of_the_dataset(site):
    parameters = inspect.signature(wr.RefreshingWebDataset.__init__).parameters
    accepted = {name for name, p in parameters.items() if name != "self" and p.kind is not p.VAR_KEYWORD}
    page = site.page("reference/options.html")
    entries = set(re.findall(r'<h3 id="([^"]+)"', page))
    assert entries == accepted, missing_and_extra(entries, accepted)


def test_options_page_has_an_entry_for_each_webdataset_argument_accepted_or_refused(site):
    accepted = set(compat._PORTED) | set(compat._REPLACED)
    documented = prefixed(site.page("reference/options.html"), "wds-")
    assert documented == accepted, missing_and_extra(documented, accepted)


def test_options_page_has_an_entry_for_each_option_of_a_mixed_source(site):
    documented = prefixed(site.page("reference/options.html"), "mix-")
    assert documented == set(SOURCE_OPTIONS), missing_and_extra(documented, set(SOURCE_OPTIONS))


def test_options_page_has_an_entry_for_each_storage_option_of_s3_and_https(site):
    accepted = set().union(*storage_keys().values())
    documented = prefixed(site.page("reference/options.html"), "storage-")
    assert documented == accepted, missing_and_extra(documented, accepted)


def test_options_page_says_which_stores_take_each_storage_option(site):
    keys = storage_keys()
    rows = storage_rows(site.page("reference/options.html"))
    wrong = {key: stores for key, stores in rows.items() if stores != {s for s in keys if key in keys[s]}}
    assert rows and wrong == {}, f"the 'for' column names the wrong stores for {wrong}"


def test_api_page_documents_every_exported_name(site):
    page = site.page("reference/index.html")
    missing = []
    for name in wr.__all__:
        anchor = page.find(f'<a id="{name}"></a>')
        heading = re.search(r'class="doc doc-heading">(.*?)</h\d>', page[anchor:], re.S) if anchor >= 0 else None
        if heading is None or text(heading.group(1)).split()[:1] != [name]:
            missing.append(name)
    assert missing == [], f"wdsrefresh exports these, and the API page does not document them: {missing}"


def commands(parser: argparse.ArgumentParser, anchor: str = "wdsrefresh"):
    """(anchor, parser) of the command and of each subcommand under it."""
    yield anchor, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, name)


def flags(parser: argparse.ArgumentParser) -> list[str]:
    """What a user types: each option string, each positional's name, each subcommand's name."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found += list(action.choices)
        elif action.option_strings:
            found += action.option_strings
        else:
            found.append(action.metavar or action.dest)
    return found


def section(page: str, anchor: str) -> str:
    """The text of the page from the heading ``anchor`` to the next heading of its level."""
    start = page.index(f'<h2 id="{anchor}"')
    end = page.find("<h2 ", start + 1)
    return text(page[start:end if end > 0 else None])


def test_cli_page_shows_every_flag_of_every_command(site):
    page = site.page("reference/cli.html")
    missing = []
    for anchor, parser in commands(build_parser()):
        if f'<h2 id="{anchor}"' not in page:
            missing.append(parser.prog)
            continue
        shown = section(page, anchor)
        missing += [f"{parser.prog} {flag}" for flag in flags(parser)
                    if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", shown)]
    assert missing == [], f"the command-line reference does not show: {missing}"

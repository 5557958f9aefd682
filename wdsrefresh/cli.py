"""The ``wdsrefresh`` command: pack | ingest | verify | ls | demo."""

from __future__ import annotations

import argparse
import logging
import sys


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train a tiny model on example shards while a producer adds shards between epochs",
        description="Copies example_shards/ into a temporary directory and trains a tiny model "
        "with a DataLoader of 2 workers for several epochs, while a producer adds a new shard "
        "between epochs. Prints one line per epoch.",
    )
    p.add_argument("--shards", default=None, help="directory of example shards (default: the repository's example_shards/)")
    p.add_argument("--epochs", type=int, default=4, help="number of epochs (default: 4)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (default: 2)")
    p.set_defaults(run=lambda args: __import__("wdsrefresh.demo", fromlist=["run"]).run(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wdsrefresh",
        description="Tools for WebDataset shard directories that change while training reads them.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more (INFO and DEBUG)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

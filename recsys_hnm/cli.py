"""The ``recsys-hnm`` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .data import DataError, copurchase_graph, describe_graph, load_dataset, load_table


def _describe(args) -> int:
    target = Path(args.dataset)
    if target.is_file():
        data = load_table(target, items_path=args.items, unknown_items=args.unknown_items)
    else:
        data = load_dataset(args.dataset, unknown_items=args.unknown_items)
    info = data.describe()
    source = args.copurchase_source or ("basket" if data.has_baskets else "session" if data.has_time else "history")
    graph = copurchase_graph(data.events, data.n_items, source=source, min_count=args.min_count)
    info["copurchase"] = {"source": source, "min_count": args.min_count, **describe_graph(graph)}
    print(json.dumps(info, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsys-hnm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    datasets = commands.add_parser("datasets", help="inspect datasets")
    dsub = datasets.add_subparsers(dest="datasets_command", required=True)
    describe = dsub.add_parser("describe", help="sizes, density, categories, time range, co-purchase statistics")
    describe.add_argument("dataset", help="a shipped dataset name (ml-latest-small), a MovieLens folder, or an events CSV/parquet")
    describe.add_argument("--items", help="item metadata file (item_id,category) for an events file")
    describe.add_argument("--unknown-items", default="error", choices=["error", "unknown_category"])
    describe.add_argument("--copurchase-source", choices=["basket", "session", "history"])
    describe.add_argument("--min-count", type=int, default=1)
    describe.set_defaults(func=_describe)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

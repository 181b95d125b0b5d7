"""`sd2 models list` and `sd2 models prepare ID`."""

from __future__ import annotations

import argparse

from . import models


def _format_table(rows: list[dict], columns: list[str]) -> str:
    cells = [[("" if row[c] is None else str(row[c])) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _list(args: argparse.Namespace) -> int:
    columns = ["model", "source", "installed", "prepared", "parameters", "vocab_size",
               "size_on_disk_mb", "license"]
    print(_format_table(models.list_models(), columns))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    targets = list(models.EMBEDDED_MODELS) if args.model == "all" else [args.model]
    for hub_id in targets:
        path = models.prepare(hub_id, force=args.force)
        print(f"{hub_id}: {path}")
    return 0


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser("models", help="list and prepare the embedded models")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="show each known model and whether it is prepared")
    listing.set_defaults(func=_list)
    prepare = actions.add_parser("prepare", help="convert an embedded GGUF model to safetensors once")
    prepare.add_argument("model", help="Hub id of an embedded model, or `all`")
    prepare.add_argument("--force", action="store_true", help="rebuild an existing cache")
    prepare.set_defaults(func=_prepare)

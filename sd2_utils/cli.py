"""The `sd2` command line: one subcommand per pipeline stage.

Each stage module defines ``register_cli(subparsers)``, which adds its subcommand and sets
``func`` to a callable taking the parsed arguments and returning an exit status.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules that add subcommands, in the order `sd2 --help` lists them.
STAGE_MODULES = (
    "sd2_utils.models_cli",
    "sd2_utils.notebooks",
    "sd2_utils.distill",
    "sd2_utils.finetune",
    "sd2_utils.prune",
    "sd2_utils.layer_prune",
    "sd2_utils.evaluate",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sd2",
        description="Self-distilled sparse drafters (SD²) for speculative decoding.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in STAGE_MODULES:
        importlib.import_module(module_name).register_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        # Input and environment errors carry their fix in the message: show it, not a traceback.
        logging.getLogger("sd2").debug("command failed", exc_info=True)
        print(f"sd2 {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

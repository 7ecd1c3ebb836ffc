"""The `emllm` command line. Entry points only: each command calls the engine's public API."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .models import DEFAULT_MODEL


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(model=args.model, max_new_tokens=args.max_new_tokens)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emllm",
        description="EM-LLM episodic memory for Hugging Face decoders: unbounded context on a small window.",
    )
    parser.add_argument("--version", action="version", version=f"emllm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="read a 20k-token novel excerpt with a planted fact and answer a question about it"
    )
    demo.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"model id, path or .gguf (default: {DEFAULT_MODEL})"
    )
    demo.add_argument("--max-new-tokens", type=int, default=24, help="answer length bound (default: 24)")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())

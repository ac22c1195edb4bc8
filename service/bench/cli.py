"""`kvserve bench ...`: the entry point `service.cli` hands everything after `bench` to.

Subcommands: `serve` (load-test an OpenAI-compatible server) and `variants` (the attention-variant
report). A bad option value is one line on stderr and exit status 2; a run that cannot go on (server
unreachable, every warm-up failed) is one line and exit status 1.
"""
from __future__ import annotations

import argparse
import sys

from service.bench import serve, variants


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage dump) so scripts can show it as is."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvserve bench", description="Measure a kvserve (or any OpenAI-compatible) server.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("serve", help="load-test a running server: TTFT, ITL, TPOT, throughput, goodput")
    serve.add_args(p)
    p.set_defaults(func=serve.run_from_args)
    p = sub.add_parser("variants", help="KV footprint, perplexity and throughput per attention variant")
    variants.add_args(p)
    p.set_defaults(func=variants.run_from_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"kvserve bench {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except serve.BenchmarkError as exc:
        print(f"kvserve bench {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

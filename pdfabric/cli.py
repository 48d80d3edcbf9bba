"""The ``pdfabric`` command line.

Each subcommand lives in ``pdfabric.commands.<name>`` and exposes
``register(subparsers) -> None``, which adds its parser and sets ``func`` to a callable
``(args) -> int`` (the exit code). Heavy imports happen inside ``func``, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pdfabric import __version__

__all__ = ["main", "COMMANDS"]

COMMANDS = ("config", "bench", "proxy", "launch", "status", "cache_server")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdfabric",
        description="Prefill/decode disaggregation transfer fabric for LLM serving.",
    )
    parser.add_argument("--version", action="version", version=f"pdfabric {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"pdfabric.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        code = int(func(args))
        sys.stdout.flush()  # a pipe's reader that left is noticed here, not at exit
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not _reader_gone():
            raise  # a socket's, not our output's
        import os  # `pdfabric ... | head`: the reader of our output left - say nothing more

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _reader_gone() -> bool:
    """Whether stdout is a pipe (or socket) whose reading end is closed."""
    import select

    try:
        p = select.poll()
        p.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in p.poll(0))
    except (OSError, ValueError):
        return False

if __name__ == "__main__":
    sys.exit(main())

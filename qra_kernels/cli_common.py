"""What every ``qra`` subcommand shares: the parser with one-line errors, the argument
types, and how an error is reported (``qra <command>: error: <one line>``, exit 2).

Torch-free on purpose: ``qra --help`` and every subcommand's ``--help`` import only this and
argparse (``qra_kernels`` resolves its heavy names lazily).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable, List

EXIT_BAD_INPUT = 2


class Parser(argparse.ArgumentParser):
    """``argparse`` whose usage errors are one line and exit with status 2."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def int_list(name: str = "value") -> Callable[[str], List[int]]:
    def parse(s: str) -> List[int]:
        try:
            out = [int(x) for x in s.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be comma-separated integers, "
                                             f"got {s!r}") from None
        if not out:
            raise argparse.ArgumentTypeError(f"{name} must not be empty")
        return out
    return parse


def str_list(name: str = "value") -> Callable[[str], List[str]]:
    def parse(s: str) -> List[str]:
        out = [v.strip() for v in s.split(",") if v.strip()]
        if not out:
            raise argparse.ArgumentTypeError(f"{name} must name at least one item")
        return out
    return parse


def positive(kind):
    def parse(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {s!r}") \
                from None
        if not (v > 0) or (isinstance(v, float) and not math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {s!r}")
        return v
    return parse


def run_command(command: str, handler, args) -> int:
    """Run ``handler(args)``; bad input → one line on stderr and exit status 2, any other
    failure → one line and 1 (``QRA_DEBUG=1`` re-raises, for the traceback)."""
    try:
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        print(f"qra {command}: interrupted; finished work is kept (rerun the same command, "
              "with --resume for `qra search`)", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError,
            IsADirectoryError, NotADirectoryError) as e:
        if os.environ.get("QRA_DEBUG"):
            raise
        print(f"qra {command}: error: {_one_line(e) or type(e).__name__}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:  # noqa: BLE001 — still one line; QRA_DEBUG=1 shows the traceback
        if os.environ.get("QRA_DEBUG"):
            raise
        print(f"qra {command}: internal error: {type(e).__name__}: {_one_line(e)} "
              "(set QRA_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""

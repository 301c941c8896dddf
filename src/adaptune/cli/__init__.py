"""``adaptune train | generate | eval | merge | inspect | export | serve``.

Each sub-command is a module here with ``add_parser(subparsers)`` and a handler: a thin layer over
the library that parses flags, calls one function and prints. Any ``AdaptuneError`` (bad file,
bad config, bad data...) is printed as one line, exit code 2, and no traceback unless ``--debug``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from ..errors import AdaptuneError
from . import evaluate, export, generate, inspect_model, merge, serve, train

EXIT_USER_ERROR = 2
COMMANDS = (train, generate, evaluate, merge, inspect_model, export, serve)

__all__ = ["EXIT_USER_ERROR", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adaptune", description="Parameter-efficient fine-tuning with peft-compatible adapters.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    """The error as one line, whatever a library put into the text it wraps."""
    return " ".join(part.strip() for part in str(exc).strip().splitlines() if part.strip())


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted before or after the command
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    with _quiet_libraries(enabled=not debug):
        try:
            return args.func(args)
        except AdaptuneError as exc:
            if debug:
                raise
            print(f"adaptune: error: {_one_line(exc)}", file=sys.stderr)
            return EXIT_USER_ERROR
        except KeyboardInterrupt:
            print("adaptune: interrupted", file=sys.stderr)
            return 130


@contextmanager
def _quiet_libraries(enabled: bool) -> Iterator[None]:
    """Hide library chatter (deprecation notes, info logs) for the command's duration only."""
    if not enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    bnb_logger = logging.getLogger("bitsandbytes")  # warns about an optional hub kernel on import
    old_bnb, old_hf = bnb_logger.level, hf_logging.get_verbosity()
    bnb_logger.setLevel(logging.ERROR)
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        bnb_logger.setLevel(old_bnb)
        hf_logging.set_verbosity(old_hf)

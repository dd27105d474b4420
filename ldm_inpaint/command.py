"""What every ``ldm-inpaint`` command shares at the edge: a parser whose errors are one line, and a runner
that turns Ctrl-C and a closed output pipe into one line and an exit status instead of a traceback."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from ldm_inpaint.checkpoint_files import checkpoint_path
from ldm_inpaint.errors import LdmInpaintError

# Exit statuses: 1 some items failed, 2 bad input (nothing done), 130 interrupted (128 + SIGINT).
EXIT_FAILED_ITEMS = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``PROG: error: MESSAGE (see PROG --help)``, exit status 2, instead
    of the usage block before the line that matters."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def checkpoint_argument(value: str) -> Path:
    """The ``type`` of a checkpoint option (:func:`~ldm_inpaint.checkpoint_files.checkpoint_path`), whose error
    argparse prints as it is."""
    try:
        return checkpoint_path(value)
    except LdmInpaintError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def run(prog: str, main: Callable[[Sequence[str]], int], argv: Sequence[str]) -> int:
    """``main(argv)``, with Ctrl-C as ``PROG: interrupted`` and exit status 130 (files being written are
    removed by their writers, :mod:`ldm_inpaint.files`), and a closed standard output (``| head``) as a
    quiet exit."""
    # Paths are printed as the file system has them, bytes that are not UTF-8 included; messages never fail.
    sys.stdout.reconfigure(errors="surrogateescape")
    sys.stderr.reconfigure(errors="backslashreplace")
    try:
        return main(argv)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Python would complain again when it flushes standard output at exit: point it at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED_ITEMS

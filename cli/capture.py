"""Keep libraries' output off the console: everything written to stdout and stderr goes to a log file.

Ray (its driver, its workers and their forwarded output), transformers, torch and
Python's warnings all write to the process's file descriptors 1 and 2, or to child
processes that inherit them. Pointing those descriptors at the log file catches all of
it, whoever writes; kubetune's own console keeps a copy of the original descriptors.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from rich.console import Console

# Captured output (CI, kubectl logs) has no width to fit: wide enough that tables do not wrap.
CAPTURED_WIDTH = 160


@dataclass(frozen=True)
class Consoles:
    """Where kubetune writes: its progress and results, and its error messages."""

    out: Console
    err: Console
    log_file: Path | None  # where the libraries' output went (None: it stays on the console)


def _console(stream: TextIO) -> Console:
    width = None if stream.isatty() or os.environ.get("COLUMNS") else CAPTURED_WIDTH
    return Console(file=stream, width=width)


def _console_on(descriptor: int) -> tuple[Console, TextIO]:
    stream = os.fdopen(descriptor, "w", buffering=1, encoding="utf-8", errors="replace")
    return _console(stream), stream


@contextmanager
def libraries_logged_to(log_file: Path | None) -> Iterator[Consoles]:
    """Send fds 1 and 2 (and Python logging) to `log_file` while inside; None leaves them alone (-v)."""
    if log_file is None:
        yield Consoles(_console(sys.stdout), _console(sys.stderr), None)
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    out, out_stream = _console_on(os.dup(saved_out))
    err, err_stream = _console_on(os.dup(saved_err))
    log = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield Consoles(out, err, log_file)
    finally:
        root.removeHandler(handler)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)
        out_stream.close()
        err_stream.close()

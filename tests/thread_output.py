"""What the calling thread writes to sys.stdout and sys.stderr, kept apart from other threads' output.

pytest's capsys keeps everything written to sys.stdout and sys.stderr, by any thread: a
library's thread printing meanwhile (Ray's driver prints its workers' logs from one) ends up
in what a test reads as the CLI's output. Tests that compare the CLI's whole output read it here.
"""

from __future__ import annotations

import io
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TextIO


class _ThreadStream(io.StringIO):
    """Keeps what the thread that made it writes; passes other threads' writes on to `others`."""

    def __init__(self, others: TextIO) -> None:
        super().__init__()
        self._thread = threading.get_ident()
        self._others = others

    def write(self, text: str) -> int:
        if threading.get_ident() != self._thread:
            return self._others.write(text)
        return super().write(text)

    def flush(self) -> None:
        if threading.get_ident() != self._thread:
            self._others.flush()


@dataclass
class ThreadOutput:
    out: str = ""
    err: str = ""


@contextmanager
def output_of_this_thread() -> Iterator[ThreadOutput]:
    """What this thread writes to sys.stdout and sys.stderr while inside, filled in on the way out."""
    output = ThreadOutput()
    saved = sys.stdout, sys.stderr
    out, err = _ThreadStream(sys.stdout), _ThreadStream(sys.stderr)
    sys.stdout, sys.stderr = out, err
    try:
        yield output
    finally:
        sys.stdout, sys.stderr = saved
        output.out, output.err = out.getvalue(), err.getvalue()

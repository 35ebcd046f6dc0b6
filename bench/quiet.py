"""Keep library chatter out of the run's output.

While a case runs, whatever is written to stdout or stderr (torch.compile / dynamo log lines, the
profiler's start/stop lines, C++ code writing to fd 1 or 2) goes to a temporary file instead, and
Python warnings are recorded; the runner stores both in the case's row ("output", "warnings").
So stdout carries only the results table and stderr only the progress lines.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings
from typing import Iterator

MAX_LINES = 40  # kept per case; the rest is counted


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


@contextlib.contextmanager
def captured_output(into: list[str]) -> Iterator[None]:
    """Send fds 1 and 2 to a temporary file for the block; its distinct lines go into ``into``.

    The file is kept (and named on stderr) only if reading it back fails.
    """
    _flush()
    try:
        saved = (os.dup(1), os.dup(2))
    except OSError:  # no real fds (an embedding host): nothing to capture at the fd level
        yield
        return
    tmp = tempfile.NamedTemporaryFile(prefix="bench-case-", suffix=".log", delete=False)
    try:
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        yield
    finally:
        _flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        tmp.close()
        try:
            with open(tmp.name, errors="replace") as f:
                lines = [line.rstrip() for line in f if line.strip()]
            os.unlink(tmp.name)
        except OSError as e:
            print(f"(library output of this case kept in {tmp.name}: {e})", file=sys.stderr)
            lines = []
        seen = set()
        for line in lines:
            if line not in seen:
                seen.add(line)
                into.append(line)
        if len(into) > MAX_LINES:
            into[MAX_LINES:] = [f"... {len(into) - MAX_LINES} more distinct lines"]


@contextlib.contextmanager
def collect_warnings(into: list[str]) -> Iterator[None]:
    """Record the block's warnings (deduplicated, as "Category: first line") into ``into``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        lines = str(w.message).strip().splitlines()
        text = f"{w.category.__name__}: {lines[0] if lines else ''}"
        if text not in into:
            into.append(text)

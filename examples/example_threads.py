"""The examples' thread rule: one intra-op thread unless asked otherwise.

The examples train and serve small models whose ops take microseconds; on a shared or small host
a parallel region per op costs more than it saves, and threads that outnumber the free cores
make timings swing with the load. One thread is the reproducible default; ``--threads N`` picks
another count, ``--threads 0`` keeps torch's.
"""
from __future__ import annotations

import argparse
import contextlib
import os

import torch


def add_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (default 1: reproducible timings on a shared host; 0: torch's default)")


@contextlib.contextmanager
def threads(requested: int):
    """Sets the intra-op thread count for the block (``requested`` 0 keeps torch's) and yields
    the count in use, restoring the previous count afterwards."""
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 0:
        raise ValueError(f"threads must be an int >= 0, got {requested!r}")
    before = torch.get_num_threads()
    if requested:
        torch.set_num_threads(requested)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def describe(count: int) -> str:
    cores = os.cpu_count() or 0
    return f"{count} intra-op thread(s) of {cores} core(s) (--threads to change)"

"""Block sizes of the Triton kernels, as data: one small table of configs per kernel.

On a GPU, ``triton.autotune`` times every config of a kernel's table once per shape key and
keeps the fastest. The interpreter (TRITON_INTERPRET=1, how the CPU tests run the kernels) would
time each config at interpreter speed, so there a kernel runs its one small fixed config. A
kernel's launcher asks :meth:`Tuned.on` for the right one and passes no block size itself.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
import triton


def config(num_warps: int = 4, num_stages: int = 2, **blocks: int) -> triton.Config:
    """One entry of a table: the kernel's BLOCK_* constexprs and its launch settings."""
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


def interpreting(t: torch.Tensor) -> bool:
    """True where the kernel runs on the interpreter: CPU tensors, or TRITON_INTERPRET=1."""
    return not t.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


class Tuned:
    """A jit kernel with its config table (autotuned on a GPU, keyed on ``key``, argument names
    of the kernel) and its fixed config for the interpreter. ``restore`` names the arguments a
    launch writes that may alias its inputs (an in-place edit): autotuning restores them after
    each timed run, so the kept result is the one of a single launch."""

    def __init__(self, kernel, table: Sequence[triton.Config], interpreter: triton.Config,
                 key: Sequence[str], restore: Sequence[str] = ()) -> None:
        if not table:
            raise ValueError("a kernel's config table must hold at least one config")
        self.table, self.interpreter = tuple(table), interpreter
        self._gpu = triton.autotune(configs=list(table), key=list(key), restore_value=list(restore))(kernel)
        self._fixed = triton.autotune(configs=[interpreter], key=list(key))(kernel)

    def on(self, t: torch.Tensor):
        """The kernel to launch for tensors like ``t`` (wrap it with torch.library.wrap_triton)."""
        return self._fixed if interpreting(t) else self._gpu

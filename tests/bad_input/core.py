"""What a case is and how its inputs are drawn (hypothesis draws, seeded random tensors)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from hypothesis import strategies as st


@dataclass
class Case:
    call: Callable
    ref: Optional[Callable]  # the reference's answer; None: the input has none (the call must raise)
    names: str = ""  # regex: the argument an error must name
    valid: bool = False  # the call must return
    tol: Optional[tuple] = None  # (atol, rtol); None: the shared table for the result's dtype


class Draw:
    """Hypothesis draws and seeded random tensors for one example."""

    def __init__(self, draw):
        self.draw = draw
        self.g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))

    def int(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, hi))

    def pick(self, seq):
        return self.draw(st.sampled_from(list(seq)))

    def rnd(self, *shape, dtype=torch.float32, scale: float = 1.0):
        return (torch.randn(*shape, generator=self.g, dtype=torch.float64) * scale).to(dtype)

    def index(self, n: int, bound: int):
        return torch.randint(0, bound, (n,), generator=self.g)

    def float_dtype(self, half: bool = False):
        return self.pick([torch.float32, torch.float64] + ([torch.float16, torch.bfloat16] if half else []))


def strided(t):
    """The same values as a non-contiguous view (every dimension's stride doubled or more)."""
    buf = t.new_zeros(*t.shape, 2)
    buf[..., 0] = t
    return buf[..., 0]


def poke(t, value, d: Draw):
    """A copy of t with one random element set to value."""
    t = t.clone()
    if t.numel():
        t.view(-1)[d.int(0, t.numel() - 1)] = value
    return t


BAD_FLOAT = [torch.int32, torch.int64, torch.bool, torch.complex64, torch.uint8, "list"]


def bad_dtype(t, dtype):
    """t in a dtype the op does not take ("list": not a tensor at all)."""
    if dtype == "list":
        return t.tolist()
    return t.real.to(dtype) if not t.is_complex() else t.to(dtype)

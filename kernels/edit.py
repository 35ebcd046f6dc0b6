"""Triton kernels for the clip-and-add edit (K = clamp(delta, -T, T) + theta) and its gradient.

One program handles a [BLOCK_R, BLOCK_C] tile of one sample; every operand is addressed
through its own strides, so non-contiguous and broadcast (stride-0) inputs need no copies.
Offsets are int64 so tensors past 2**31 elements stay addressable. Tile sizes: EDIT_CONFIGS
(autotuned on a GPU by shape; the first, small one under the interpreter).
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch.library import wrap_triton

from .configs import Tuned, config


@triton.jit
def _edit_tile(
    a_ptr, delta_ptr, out_ptr, thr_ptr, index_ptr,
    rows, cols, num_slots,
    a_ss, a_rs, a_cs, d_ss, d_rs, d_cs, o_ss, o_rs, o_cs, thr_stride,
    HAS_INDEX: tl.constexpr, GRAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    c = tl.program_id(2).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    mask = (r[:, None] < rows) & (c[None, :] < cols)
    if HAS_INDEX:
        slot = tl.load(index_ptr + b)
        ok = (slot >= 0) & (slot < num_slots)
        mask = mask & (tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.int1) | ok)
        slot = tl.where(ok, slot, 0)  # never read outside theta; the host checked the range
    else:
        slot = b
    t = tl.load(thr_ptr + b * thr_stride)  # float32, or float64 for float64 storage
    a = tl.load(a_ptr + slot * a_ss + r[:, None] * a_rs + c[None, :] * a_cs, mask=mask, other=0.0)
    d = tl.load(delta_ptr + b * d_ss + r[:, None] * d_rs + c[None, :] * d_cs, mask=mask, other=0.0)
    acc = t.dtype
    a = a.to(acc)
    d = d.to(acc)
    if GRAD:
        res = tl.where((d >= -t) & (d <= t), a, 0.0)
    else:
        # comparisons (not min/max) so NaN passes through like torch.clamp
        res = tl.where(d < -t, -t, tl.where(d > t, t, d)) + a
    tl.store(out_ptr + b * o_ss + r[:, None] * o_rs + c[None, :] * o_cs,
             res.to(out_ptr.dtype.element_ty), mask=mask)


# [BLOCK_R, BLOCK_C] tiles; wide rows favour long column blocks (coalesced loads)
EDIT_CONFIGS = (
    config(BLOCK_R=16, BLOCK_C=64),
    config(BLOCK_R=32, BLOCK_C=64),
    config(BLOCK_R=8, BLOCK_C=128),
    config(BLOCK_R=16, BLOCK_C=128, num_warps=8),
    config(BLOCK_R=32, BLOCK_C=128, num_warps=8),
    config(BLOCK_R=4, BLOCK_C=256),
)
# out may be theta or delta itself (apply_edit(out=...)): timed runs must not compound
_EDIT = Tuned(_edit_tile, EDIT_CONFIGS, EDIT_CONFIGS[0], key=["rows", "cols", "HAS_INDEX", "GRAD"],
              restore=["out_ptr"])


def launch(a, delta, out, threshold, proto_index, geometry, num_slots: int, grad: bool) -> None:
    """Runs the edit (grad=False, a = theta) or its gradient mask (grad=True, a = grad) into out."""
    g = geometry
    if out.numel() == 0:
        return
    # threshold and proto_index are read densely (thr_ptr + b * thr_stride, index_ptr + b)
    threshold = threshold.contiguous()
    if proto_index is not None:
        proto_index = proto_index.contiguous()
    def grid(meta):
        return g.samples, triton.cdiv(g.rows, meta["BLOCK_R"]), triton.cdiv(g.cols, meta["BLOCK_C"])

    o_ss = out.stride(0) if out.dim() == 3 else 0
    wrap_triton(_EDIT.on(out))[grid](
        a, delta, out, threshold, proto_index if proto_index is not None else threshold,
        g.rows, g.cols, num_slots,
        g.theta_sample_stride, a.stride(-2), a.stride(-1),
        g.delta_sample_stride, delta.stride(-2), delta.stride(-1),
        o_ss, out.stride(-2), out.stride(-1), g.thr_stride,
        HAS_INDEX=proto_index is not None, GRAD=grad,
    )

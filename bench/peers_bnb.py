"""bitsandbytes peers of the packed-linear rows (an optional bench extra: requirements-bench.txt).

Each builder returns the impl (a callable cycling over ``copies`` layers) or, when bitsandbytes is
absent or fails here, a string saying why, which the row records instead of a time.

- ``nf4``: ``bitsandbytes.matmul_4bit`` on an NF4 weight, block 64, fp32 x.
- ``w8a8``: ``bitsandbytes.nn.Linear8bitLt`` (LLM.int8() with threshold 0: int8 weight, int8
  activations, no fp16 outlier columns) as a user runs it: weight quantized by moving the layer to
  the CPU, fp16 x (the layer casts anything else to fp16 itself, logging a warning per call).

Which CPU kernel bitsandbytes dispatches to depends on the host (ISA, torch version): :func:`describe`
says, for the row's notes.
"""
from __future__ import annotations

import copy
import functools

import torch

from bench.cases_quant import _cycle

INSTALL = "pip install --no-deps -r requirements-bench.txt"
NF4_BLOCK = 64  # the NF4 peer's standard block size


def nf4_bytes(n: int, k: int) -> int:
    """Bytes of one n x k NF4 layer: 4-bit codes and one fp32 absmax per block."""
    return n * k // 2 + n * k // NF4_BLOCK * 4


def w8a8_bytes(n: int, k: int) -> int:
    """Bytes of one n x k Linear8bitLt layer: int8 codes and one fp32 scale per row."""
    return n * k + 4 * n


def _import():
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional  # noqa: F401  (bnb.functional below)
    except Exception as exc:  # noqa: BLE001  (any import failure: the peer is unavailable)
        return f"bitsandbytes unavailable ({type(exc).__name__}); {INSTALL}"
    return bnb


def nf4(w: torch.Tensor, x: torch.Tensor, copies: int):
    """y = x @ w.T through bitsandbytes' NF4 matmul (block NF4_BLOCK), over ``copies`` quantized layers."""
    bnb = _import()
    if isinstance(bnb, str):
        return bnb
    try:
        q, state = bnb.functional.quantize_4bit(w, blocksize=NF4_BLOCK, quant_type="nf4")
        packs = [(q, state)] + [(q.clone(), _state_copy(state)) for _ in range(copies - 1)]  # quantizing is slow
        fns = [functools.partial(bnb.matmul_4bit, x, c.t(), quant_state=s) for c, s in packs]
        fns[0]()
    except Exception as exc:  # noqa: BLE001
        return f"bitsandbytes NF4 failed on this host: {exc}"
    return _cycle(fns)


def _state_copy(state):
    """An NF4 QuantState of its own scales (the cycled copies must not share bytes)."""
    out = copy.copy(state)
    out.absmax = state.absmax.clone()
    return out


def w8a8(w: torch.Tensor, x: torch.Tensor, copies: int):
    """y = x @ w.T through bitsandbytes' Linear8bitLt (int8 weight and activations), fp16 x."""
    bnb = _import()
    if isinstance(bnb, str):
        return bnb
    n, k = w.shape
    try:
        layers = []
        for _ in range(copies):
            lin = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=0.0)
            lin.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
            layers.append(lin.to("cpu").eval())  # the move to a device is what quantizes the weight
        if layers[0].weight.dtype != torch.int8:
            return f"bitsandbytes Linear8bitLt kept a {layers[0].weight.dtype} weight on the CPU (no int8 weight)"
        xh = x.half()
        fns = [functools.partial(lin, xh) for lin in layers]
        fns[0]()
    except Exception as exc:  # noqa: BLE001
        return f"bitsandbytes W8A8 failed on this host: {exc}"
    return _cycle(fns)


def _has_cpu_kernel(op: str) -> bool:
    # bitsandbytes registers its CPU kernels for the CPU key only where the host supports them;
    # elsewhere its "default" (composite) implementation in torch ops runs
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"bitsandbytes::{op}", "CPU")


def describe(impl: str) -> str:
    """What bitsandbytes runs on this host for the peer ``impl`` ("bnb-nf4" or "bnb-w8a8"), for the
    row's notes, or why it does not run."""
    if impl not in ("bnb-nf4", "bnb-w8a8"):
        raise ValueError(f"describe: impl must be 'bnb-nf4' or 'bnb-w8a8', got {impl!r}")
    bnb = _import()
    if isinstance(bnb, str):
        return f"{impl}: {bnb}"
    if impl == "bnb-nf4":
        # matmul_4bit's path for a weight not repacked for the CPU (bnb.nn.Linear4bit repacks it in
        # eval mode on AVX512-BF16 hosts, for its fused kernel) is the gemm_4bit op
        path = ("its CPU gemm_4bit kernel" if _has_cpu_kernel("gemm_4bit") else
                "gemm_4bit's default path: a dequantize of the NF4 weight to fp32 ("
                + ("its C++ CPU kernel" if _has_cpu_kernel("dequantize_4bit") else "torch ops")
                + "), then torch F.linear")
        return f"bnb-nf4 (bitsandbytes {bnb.__version__} matmul_4bit, NF4 block {NF4_BLOCK}, fp32 x) runs {path}"
    path = ("its CPU int8 kernel (torch._int_mm, s8 x s8 -> s32)" if _has_cpu_kernel("int8_linear_matmul") else
            "NO int8 CPU kernel on this host (bitsandbytes registers torch._int_mm only on AVX-512 hosts with "
            "torch >= 2.6): its default path, an fp32 matmul of the int8 values, then the dequantize")
    return (f"bnb-w8a8 (bitsandbytes {bnb.__version__} Linear8bitLt, threshold 0, fp16 x; x quantized per row "
            f"each call) runs {path}")

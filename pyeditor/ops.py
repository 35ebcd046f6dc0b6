"""Every pyeditor op, declared once with the torch operator registry.

C++ ops (schemas in csrc/register.cpp) get their fake kernels and autograd here; Triton
variants are `triton_op`s with the same signature. Backward formulas call registered ops
only, so they trace under torch.compile and run on every backend.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _ext, backends
from ._geometry import EditGeometry, edit_geometry

HAS_CPP = _ext.load()


def _grad_geometry(grad: Tensor, delta: Tensor, threshold: Tensor) -> EditGeometry:
    batched = grad.dim() == 3
    return EditGeometry(
        samples=grad.shape[0] if batched else 1,
        rows=grad.shape[-2],
        cols=grad.shape[-1],
        out_shape=tuple(grad.shape),
        theta_sample_stride=grad.stride(0) if batched else 0,
        delta_sample_stride=delta.stride(0) if delta.dim() == 3 else 0,
        thr_stride=0 if threshold.numel() == 1 else 1,
    )


# ---------------------------------------------------------------- Triton variants
if backends.triton_available():
    from torch.library import triton_op

    from pyeditor.kernels import edit as _edit_kernels

    @triton_op("pyeditor::apply_edit_triton", mutates_args=())
    def apply_edit_triton(theta: Tensor, delta: Tensor, threshold: Tensor, proto_index: Optional[Tensor] = None) -> Tensor:
        g = edit_geometry(theta, delta, threshold, proto_index)
        out = torch.empty(g.out_shape, dtype=theta.dtype, device=theta.device)
        slots = theta.shape[0] if theta.dim() == 3 else 1
        _edit_kernels.launch(theta, delta, out, threshold, proto_index, g, slots, grad=False)
        return out

    @triton_op("pyeditor::apply_edit_out_triton", mutates_args=("out",))
    def apply_edit_out_triton(theta: Tensor, delta: Tensor, threshold: Tensor, proto_index: Optional[Tensor], out: Tensor) -> None:
        g = edit_geometry(theta, delta, threshold, proto_index)
        slots = theta.shape[0] if theta.dim() == 3 else 1
        _edit_kernels.launch(theta, delta, out, threshold, proto_index, g, slots, grad=False)

    @triton_op("pyeditor::apply_edit_backward_triton", mutates_args=())
    def apply_edit_backward_triton(grad: Tensor, delta: Tensor, threshold: Tensor) -> Tensor:
        g = _grad_geometry(grad, delta, threshold)
        out = torch.empty_like(grad, memory_format=torch.contiguous_format)
        _edit_kernels.launch(grad, delta, out, threshold, None, g, g.samples, grad=True)
        return out


# ---------------------------------------------------------------- the op table
def _op(name: str):
    return getattr(torch.ops.pyeditor, name)


def edit_ops(backend: str):
    """(forward, out=, backward) ops of apply_edit for a resolved backend other than reference."""
    if backend == "triton":
        return _op("apply_edit_triton"), _op("apply_edit_out_triton"), _op("apply_edit_backward_triton")
    return _op("apply_edit"), _op("apply_edit_out"), _op("apply_edit_backward")


# ---------------------------------------------------------------- fake kernels + autograd
def _fake_apply_edit(theta, delta, threshold, proto_index=None):
    g = edit_geometry(theta, delta, threshold, proto_index)
    return theta.new_empty(g.out_shape)


def _fake_apply_edit_out(theta, delta, threshold, proto_index, out):
    return None


def _fake_apply_edit_backward(grad, delta, threshold):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


def _edit_setup_context(ctx, inputs, output):
    theta, delta, threshold, proto_index = inputs
    ctx.save_for_backward(delta, threshold, proto_index)
    ctx.theta_shape = tuple(theta.shape)


def _make_edit_backward(backward_op):
    def backward(ctx, grad):
        delta, threshold, proto_index = ctx.saved_tensors
        grad_theta = grad_delta = None
        if ctx.needs_input_grad[1]:
            # delta shared by every sample (2-D, or a batch of one) receives their summed gradient
            masked = backward_op(grad, delta.expand(grad.shape), threshold)
            grad_delta = masked.sum_to_size(delta.shape)
        if ctx.needs_input_grad[0]:
            if proto_index is not None:
                grad_theta = grad.new_zeros(ctx.theta_shape).index_add_(0, proto_index, grad)
            else:
                grad_theta = grad.sum_to_size(ctx.theta_shape)
        return grad_theta, grad_delta, None, None

    return backward


def _register(forward: str, out_op: str, backward: str) -> None:
    torch.library.register_fake(f"pyeditor::{forward}", _fake_apply_edit)
    torch.library.register_fake(f"pyeditor::{out_op}", _fake_apply_edit_out)
    torch.library.register_fake(f"pyeditor::{backward}", _fake_apply_edit_backward)
    torch.library.register_autograd(
        f"pyeditor::{forward}", _make_edit_backward(_op(backward)), setup_context=_edit_setup_context
    )


if HAS_CPP:
    _register("apply_edit", "apply_edit_out", "apply_edit_backward")
if backends.triton_available():
    _register("apply_edit_triton", "apply_edit_out_triton", "apply_edit_backward_triton")


# ---------------------------------------------------------------- nearest-prototype search (issue 5)
_SEARCH_METRICS = ("l2", "ip", "cosine")


def _fake_nearest_prototype(x, prototypes, k=1, metric="l2"):
    return x.new_empty(x.shape[0], k), x.new_empty(x.shape[0], k, dtype=torch.long)


def _unit_rows64(v: Tensor) -> Tensor:
    n = v.norm(dim=1, keepdim=True)
    return torch.where(n == 0, torch.zeros_like(v), v / n)


def _gamma32(n: int) -> float:
    nu = n * 2.0 ** -24
    return 2.0 * nu / (1.0 - nu)


def _search_triton(x: Tensor, prototypes: Tensor, k: int, metric: str) -> tuple[Tensor, Tensor]:
    """Triton nearest-prototype search: k + 1 float32 passes, the error-bound acceptance of
    csrc/include/pyeditor/search_math.h, float64 passes for the queries it cannot accept."""
    from pyeditor.kernels import search as _sk

    B, d = x.shape
    N = prototypes.shape[0]
    dev = x.device
    l2 = metric == "l2"
    x64, p64 = x.to(torch.float64), prototypes.to(torch.float64)
    xe, pe = (_unit_rows64(x64), _unit_rows64(p64)) if metric == "cosine" else (x64, p64)
    wide = x.dtype == torch.float64 or prototypes.dtype == torch.float64
    p_valid = torch.isfinite(prototypes).all(1)
    any_inf = (~p_valid & ~torch.isnan(prototypes).any(1)).any()
    x_finite = torch.isfinite(x).all(1)
    fk = torch.empty(B, k, dtype=torch.float64, device=dev)
    fi = torch.full((B, k), -1, dtype=torch.long, device=dev)
    certain = torch.zeros(B, dtype=torch.bool, device=dev)
    if not wide:
        xf, pf = x.to(torch.float32), prototypes.to(torch.float32)
        if l2:
            cnt = p_valid.sum().clamp_min(1)
            mu = (torch.where(p_valid[:, None], p64, 0.0).sum(0) / cnt).to(torch.float32)
            xs, ps = xf - mu, pf - mu
        elif metric == "cosine":
            xs, ps = xf, pe.to(torch.float32)
        else:
            xs, ps = xf, pf
        ps = torch.where(p_valid[:, None], ps, 0.0).contiguous()
        pn2 = ps.to(torch.float64).square().sum(1)
        bias = (pn2.to(torch.float32) if l2 else torch.zeros(N, device=dev)).masked_fill(~p_valid, float("nan"))
        pmax = pn2.max().sqrt()
        nx = xs.to(torch.float64).square().sum(1).sqrt()
        xs = xs.contiguous()
        kk = min(k + 1, N)
        keys = torch.empty(B, kk, dtype=torch.float32, device=dev)
        ids = torch.empty(B, kk, dtype=torch.long, device=dev)
        for j in range(kk):
            prev_k = keys[:, j - 1] if j else keys[:, 0]
            prev_i = ids[:, j - 1] if j else ids[:, 0]
            out_k, out_i = torch.empty(B, dtype=torch.float32, device=dev), torch.empty(B, dtype=torch.long, device=dev)
            _sk.next_best(xs, ps, bias, bias, prev_k.contiguous(), prev_i.contiguous(), out_k, out_i,
                          l2=l2, scale=2.0 if l2 else 1.0, exact=False, first=j == 0)
            keys[:, j], ids[:, j] = out_k, out_i
        span = (nx + pmax).square() if l2 else nx * pmax
        bound = torch.where(span < 1e36, _gamma32(d + 8) * span, float("inf"))
        ak = keys[:, k - 1].to(torch.float64)
        ok = (ids[:, k - 1] == -1) | (ak.abs() < 1e36)
        if kk > k:
            ak1 = keys[:, k].to(torch.float64)
            ok = ok & ((ids[:, k] == -1) | (ak1 - bound > ak + bound))
        top = ids[:, :k]
        have = top >= 0
        pg = pe.index_select(0, top.clamp_min(0).flatten()).view(B, k, d)
        if l2:
            ex = (x64[:, None, :] - pg).square().sum(-1)
        else:
            ex = -(xe[:, None, :] * pg).sum(-1)
        ok = ok & ~(torch.isnan(ex) & have).any(1) & x_finite & ~any_inf
        ex = ex.masked_fill(~have, float("inf"))
        big = torch.iinfo(torch.long).max
        order_i = torch.where(have, top, big)
        o1 = torch.sort(order_i, dim=1, stable=True).indices
        ex, order_i = ex.gather(1, o1), order_i.gather(1, o1)
        o2 = torch.sort(ex, dim=1, stable=True).indices
        fk, fi = ex.gather(1, o2), torch.where(order_i == big, -1, order_i).gather(1, o2)
        certain = ok
    # float64 passes for every query the float32 pass could not settle
    need = (~certain).to(torch.int32).contiguous()
    xe_c, pe_c = xe.contiguous(), pe.contiguous()
    ek = torch.empty(B, k, dtype=torch.float64, device=dev)
    ei = torch.empty(B, k, dtype=torch.long, device=dev)
    dummy = torch.zeros(1, dtype=torch.float64, device=dev)
    for j in range(k):
        prev_k = ek[:, j - 1].contiguous() if j else dummy
        prev_i = ei[:, j - 1].contiguous() if j else ei[:, 0]
        out_k, out_i = torch.empty(B, dtype=torch.float64, device=dev), torch.empty(B, dtype=torch.long, device=dev)
        _sk.next_best(xe_c, pe_c, dummy, need, prev_k, prev_i, out_k, out_i,
                      l2=l2, scale=1.0, exact=True, first=j == 0)
        ek[:, j], ei[:, j] = out_k, out_i
    keys = torch.where(certain[:, None], fk, ek)
    idx = torch.where(certain[:, None], fi, ei)
    dist = keys if l2 else -keys
    dist = dist.masked_fill(idx == -1, float("inf") if l2 else float("-inf"))
    nanq = torch.isnan(x).any(1, keepdim=True)
    dist = dist.masked_fill(nanq, float("nan"))
    idx = idx.masked_fill(nanq, -1)
    return dist.to(x.dtype), idx


if backends.triton_available():
    @triton_op("pyeditor::nearest_prototype_triton", mutates_args=())
    def nearest_prototype_triton(x: Tensor, prototypes: Tensor, k: int = 1, metric: str = "l2") -> tuple[Tensor, Tensor]:
        if x.shape[0] == 0:
            return x.new_empty(0, k), x.new_empty(0, k, dtype=torch.long)
        return _search_triton(x, prototypes, k, metric)

    torch.library.register_fake("pyeditor::nearest_prototype_triton", _fake_nearest_prototype)

if HAS_CPP:
    torch.library.register_fake("pyeditor::nearest_prototype", _fake_nearest_prototype)


_SEARCH_OPS: dict = {}


def search_op(backend: str):
    """The nearest_prototype op (an OpOverload) for a resolved backend other than reference."""
    op = _SEARCH_OPS.get(backend)
    if op is None:
        op = _SEARCH_OPS[backend] = _op("nearest_prototype_triton" if backend == "triton" else "nearest_prototype").default
    return op

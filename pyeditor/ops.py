"""Every pyeditor op, declared once with the torch operator registry.

C++ ops (schemas in csrc/register.cpp) get their fake kernels and autograd here; Triton
variants are `triton_op`s with the same signature. Backward formulas call registered ops
only, so they trace under torch.compile and run on every backend.
"""
from __future__ import annotations

import itertools
import math
from typing import List, Optional

import torch
from torch import Tensor

from . import _ext, backends, validate

HAS_CPP = _ext.load()


# ---------------------------------------------------------------- Triton variants
if backends.triton_available():
    from torch.library import triton_op

    from pyeditor.kernels import edit as _edit_kernels

    # Every Triton op first runs validate's twin of its C++ op's checks (csrc/*_args.cpp): same
    # conditions, RuntimeError("pyeditor: ..."), index / threshold made contiguous. They run in
    # the op body, so under torch.compile (which traces into triton_ops) too.
    @triton_op("pyeditor::apply_edit_triton", mutates_args=())
    def apply_edit_triton(theta: Tensor, delta: Tensor, threshold: Tensor, proto_index: Optional[Tensor] = None) -> Tensor:
        g, thr, idx = validate.edit_args(theta, delta, threshold, proto_index)
        out = torch.empty(g.out_shape, dtype=theta.dtype, device=theta.device)
        slots = theta.shape[0] if theta.dim() == 3 else 1
        _edit_kernels.launch(theta, delta, out, thr, idx, g, slots, grad=False)
        return out

    @triton_op("pyeditor::apply_edit_out_triton", mutates_args=("out",))
    def apply_edit_out_triton(theta: Tensor, delta: Tensor, threshold: Tensor, proto_index: Optional[Tensor], out: Tensor) -> None:
        g, thr, idx = validate.edit_out_args(theta, delta, threshold, proto_index, out)
        slots = theta.shape[0] if theta.dim() == 3 else 1
        _edit_kernels.launch(theta, delta, out, thr, idx, g, slots, grad=False)

    @triton_op("pyeditor::apply_edit_backward_triton", mutates_args=())
    def apply_edit_backward_triton(grad: Tensor, delta: Tensor, threshold: Tensor) -> Tensor:
        g, thr = validate.edit_grad_args(grad, delta, threshold)
        out = torch.empty_like(grad, memory_format=torch.contiguous_format)
        _edit_kernels.launch(grad, delta, out, thr, None, g, g.samples, grad=True)
        return out


# ---------------------------------------------------------------- the op table
def _op(name: str):
    return getattr(torch.ops.pyeditor, name)


_edit_ops: dict = {}


def edit_ops(backend: str):
    """(forward, out=, backward) ops of apply_edit for a resolved backend other than reference."""
    found = _edit_ops.get(backend)
    if found is None:
        suffix = "_triton" if backend == "triton" else ""
        found = _edit_ops[backend] = tuple(
            _op(f"apply_edit{part}{suffix}") for part in ("", "_out", "_backward"))
    return found


def call_differentiable(op, *args):
    """Calls an op that has a Python autograd formula, skipping that Python layer (several
    microseconds a call, which matters for small serving calls) when no gradient is wanted."""
    wants_grad = torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args)
    if wants_grad or torch.compiler.is_compiling():
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


# ---------------------------------------------------------------- fake kernels + autograd
# The fake kernels run the shape half of the op's checks, so a bad call fails while tracing too.
def _fake_apply_edit(theta, delta, threshold, proto_index=None):
    g = validate.edit_args(theta, delta, threshold, proto_index, values=False)[0]
    return theta.new_empty(g.out_shape)


def _fake_apply_edit_out(theta, delta, threshold, proto_index, out):
    validate.edit_out_args(theta, delta, threshold, proto_index, out, values=False)
    return None


def _fake_apply_edit_backward(grad, delta, threshold):
    validate.edit_grad_args(grad, delta, threshold, values=False)
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


def _mask_setup_context(ctx, inputs, output):
    grad, delta, threshold = inputs
    ctx.save_for_backward(delta, threshold)


def _make_mask_backward(mask_op):
    """Autograd of apply_edit_backward(grad, delta, T) = grad * (|delta| <= T), so that double
    backward through every op whose backward uses it is exact: linear in grad (the same mask on
    the incoming gradient, through the op itself, so any order works), piecewise constant in
    delta (zero gradient almost everywhere), none for T."""
    def backward(ctx, gg):
        delta, threshold = ctx.saved_tensors
        g = mask_op(gg, delta, threshold) if ctx.needs_input_grad[0] else None
        return g, None, None

    return backward


def _register(forward: str, out_op: str, backward: str) -> None:
    torch.library.register_fake(f"pyeditor::{forward}", _fake_apply_edit)
    torch.library.register_fake(f"pyeditor::{out_op}", _fake_apply_edit_out)
    torch.library.register_fake(f"pyeditor::{backward}", _fake_apply_edit_backward)
    torch.library.register_autograd(
        f"pyeditor::{forward}", _make_edit_backward(_op(backward)), setup_context=_edit_setup_context
    )
    torch.library.register_autograd(
        f"pyeditor::{backward}", _make_mask_backward(_op(backward)), setup_context=_mask_setup_context
    )


if HAS_CPP:
    _register("apply_edit", "apply_edit_out", "apply_edit_backward")
if backends.triton_available():
    _register("apply_edit_triton", "apply_edit_out_triton", "apply_edit_backward_triton")


# ================================================================ packed low-bit weights (quant)
# Ops: quant_linear(x, data, scale, zero, perm, buckets, in_features, out_features, bias, fast, group_size,
# bf16) and
# quant_dequantize(data, scale, zero, perm, buckets, in_features, out_features, group_size)
# (group_size 0: scale/zero [rows] per channel; 32/64/128: [G, rows] per group); C++ on
# CPU/CUDA (csrc/cpu/quant_*.cpp, csrc/cuda/quant_linear_cuda.cu), triton_op twins here.
# Autograd flows to x (and bias): grad_x = grad_y @ W with W from the dequantize op.

if backends.triton_available():
    from pyeditor.kernels import quant as _quant_kernels

    @triton_op("pyeditor::quant_dequantize_triton", mutates_args=())
    def quant_dequantize_triton(data: Tensor, scale: Tensor, zero: Tensor, perm: Tensor, buckets: list[int],
                                in_features: int, out_features: int, group_size: int = 0) -> Tensor:
        validate.packed_args(data, scale, zero, perm, buckets, in_features, out_features, group_size)
        w = torch.zeros((out_features, in_features), dtype=torch.float32, device=data.device)
        _quant_kernels.dequantize(data, scale, zero, perm, buckets, in_features, out_features, w, group_size)
        return w

    @triton_op("pyeditor::quant_linear_triton", mutates_args=())
    def quant_linear_triton(x: Tensor, data: Tensor, scale: Tensor, zero: Tensor, perm: Tensor, buckets: list[int],
                            in_features: int, out_features: int, bias: Optional[Tensor] = None, fast: bool = False,
                            group_size: int = 0, bf16: bool = False) -> Tensor:
        validate.packed_args(data, scale, zero, perm, buckets, in_features, out_features, group_size)
        validate.packed_linear_args(x, in_features, out_features, bias, data)
        validate.packed_mode_flags(fast, bf16)
        k = in_features
        if bias is not None:
            bias = bias.contiguous()  # the kernel reads bias[col] densely
        if bf16 and x.dtype == torch.float64:  # the kernel rounds float32 x itself
            x = x.to(torch.bfloat16).to(x.dtype)
        if x.dtype == torch.float64:  # exact float32 weight in a float64 matmul (gradcheck)
            w = quant_dequantize_triton(data, scale, zero, perm, buckets, k, out_features, group_size)
            y = x @ w.to(torch.float64).T
            return y + bias.to(torch.float64) if bias is not None else y
        x2 = x.reshape(math.prod(x.shape[:-1]), k)
        y = torch.zeros((x2.shape[0], out_features), dtype=x.dtype, device=x.device)
        _quant_kernels.linear(x2, data, scale, zero, perm, buckets, out_features, bias, y, group_size, bf16)
        return y.reshape(*x.shape[:-1], out_features)


_quant_ops: dict = {}


def quant_ops(backend: str):
    """(linear, dequantize) ops of the packed weights for a resolved backend other than reference
    (looked up once: the namespace lookups cost ~1 us of a ~20 us small call)."""
    found = _quant_ops.get(backend)
    if found is None:
        suffix = "_triton" if backend == "triton" else ""
        found = _quant_ops[backend] = (_op("quant_linear" + suffix), _op("quant_dequantize" + suffix))
    return found


def _fake_quant_linear(x, data, scale, zero, perm, buckets, in_features, out_features, bias=None, fast=False,
                       group_size=0, bf16=False):
    return x.new_empty((*x.shape[:-1], out_features))


def _fake_quant_dequantize(data, scale, zero, perm, buckets, in_features, out_features, group_size=0):
    return data.new_empty((out_features, in_features), dtype=torch.float32)


def _quant_setup_context(ctx, inputs, output):
    x, data, scale, zero, perm, buckets, in_features, out_features, bias, fast, group_size, bf16 = inputs
    ctx.save_for_backward(data, scale, zero, perm)
    ctx.meta = (list(buckets), in_features, out_features, x.dtype, None if bias is None else bias.dtype, group_size)


def _make_quant_backward(dequantize_op):
    def backward(ctx, grad):
        data, scale, zero, perm = ctx.saved_tensors
        buckets, k, n, x_dtype, bias_dtype, group_size = ctx.meta
        grad_x = grad_bias = None
        acc = torch.float64 if x_dtype == torch.float64 else torch.float32
        if ctx.needs_input_grad[0]:
            w = dequantize_op(data, scale, zero, perm, buckets, k, n, group_size)
            grad_x = (grad.to(acc) @ w.to(acc)).to(x_dtype)
        if bias_dtype is not None and ctx.needs_input_grad[8]:
            grad_bias = grad.reshape(-1, n).to(acc).sum(0).to(bias_dtype)
        return grad_x, None, None, None, None, None, None, None, grad_bias, None, None, None

    return backward


def _register_quant(linear: str, dequantize: str, autograd: bool) -> None:
    torch.library.register_fake(f"pyeditor::{linear}", _fake_quant_linear)
    torch.library.register_fake(f"pyeditor::{dequantize}", _fake_quant_dequantize)
    if autograd:
        torch.library.register_autograd(f"pyeditor::{linear}", _make_quant_backward(_op(dequantize)),
                                        setup_context=_quant_setup_context)


if HAS_CPP:
    _register_quant("quant_linear", "quant_dequantize", autograd=False)

    # The C++ op's Autograd kernel (csrc/quant_autograd.cpp) calls the kernel directly when no
    # gradient is recorded, and this op when one is: the same kernel, with the one backward above.
    @torch.library.custom_op("pyeditor::quant_linear_autograd", mutates_args=())
    def quant_linear_autograd(x: Tensor, data: Tensor, scale: Tensor, zero: Tensor, perm: Tensor,
                              buckets: list[int], in_features: int, out_features: int,
                              bias: Optional[Tensor] = None, fast: bool = False, group_size: int = 0,
                              bf16: bool = False) -> Tensor:
        # runs below autograd: this reaches the device kernel, not the router again
        return _op("quant_linear")(x, data, scale, zero, perm, buckets, in_features, out_features, bias, fast,
                                   group_size, bf16)

    torch.library.register_fake("pyeditor::quant_linear_autograd", _fake_quant_linear)
    torch.library.register_autograd("pyeditor::quant_linear_autograd", _make_quant_backward(_op("quant_dequantize")),
                                    setup_context=_quant_setup_context)
if backends.triton_available():
    _register_quant("quant_linear_triton", "quant_dequantize_triton", autograd=True)

if HAS_CPP:  # the benchmarks' bandwidth probes (csrc/cpu/bandwidth_probe.cpp); reference.read_probe
    torch.library.register_fake("pyeditor::read_probe", lambda data, streams=4: data.new_empty((), dtype=torch.int32))
    torch.library.register_fake("pyeditor::copy_probe", lambda src, dst, streams=4: None)
    torch.library.register_fake("pyeditor::fma_probe", lambda x, a, b, rounds: x.new_empty(x.shape))

# ---------------------------------------------------------------- nearest-prototype search (issue 5)
# The Triton op's host algorithm (float32 passes, error-bound acceptance, float64 rescans) is
# kernels/search.py's search().
def _fake_nearest_prototype(x, prototypes, k=1, metric="l2"):
    return x.new_empty(x.shape[0], k), x.new_empty(x.shape[0], k, dtype=torch.long)


if backends.triton_available():
    from pyeditor.kernels import search as _search_kernels

    @triton_op("pyeditor::nearest_prototype_triton", mutates_args=())
    def nearest_prototype_triton(x: Tensor, prototypes: Tensor, k: int = 1, metric: str = "l2") -> tuple[Tensor, Tensor]:
        validate.search_args(x, prototypes, k, metric)
        if x.shape[0] == 0:
            return x.new_empty(0, k), x.new_empty(0, k, dtype=torch.long)
        return _search_kernels.search(x, prototypes, k, metric)

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

# ==================================================================== Persona serving (issue 4)
# edited_linear / hyper_matmul / edit_sumsq: C++ schemas in csrc/register.cpp, Triton twins here.
# Backwards call registered ops only: the forward op itself on transposed views (d x, d e),
# bmm / index_add (d theta, d weight, d bias), apply_edit_backward (the |delta| <= T mask) and
# hyper_weight_grad (gathered d weight, summed over each prototype's segment only).
if backends.triton_available():
    from pyeditor.kernels import hyper as _hyper_kernels

    @triton_op("pyeditor::edited_linear_triton", mutates_args=())
    def edited_linear_triton(x: Tensor, theta: Tensor, delta: Tensor, threshold: Tensor,
                             bias: Optional[Tensor] = None, proto_index: Optional[Tensor] = None) -> Tensor:
        thr, idx = validate.edited_linear_args(x, theta, delta, threshold, bias, proto_index)
        return _hyper_kernels.edited_linear(x, theta, delta, thr, bias, idx)

    @triton_op("pyeditor::hyper_matmul_triton", mutates_args=())
    def hyper_matmul_triton(e: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                            index: Optional[Tensor] = None) -> Tensor:
        return _hyper_kernels.hyper_matmul(e, weight, bias, validate.hyper_args(e, weight, bias, index))

    @triton_op("pyeditor::edit_sumsq_triton", mutates_args=())
    def edit_sumsq_triton(e: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                          threshold: Optional[Tensor] = None) -> Tensor:
        return _hyper_kernels.edit_sumsq(e, weight, bias, validate.sumsq_args(e, weight, bias, threshold))

    @triton_op("pyeditor::hyper_matmul_heads_triton", mutates_args=())
    def hyper_matmul_heads_triton(e: Tensor, weight: Tensor, sizes: List[int], bias: Optional[Tensor] = None,
                                  index: Optional[Tensor] = None) -> Tensor:
        index = validate.hyper_heads_args(e, weight, sizes, bias, index)
        return _hyper_kernels.hyper_matmul_heads(e, weight, sizes, bias, index)

    @triton_op("pyeditor::hyper_weight_grad_triton", mutates_args=())
    def hyper_weight_grad_triton(e: Tensor, grad: Tensor, sizes: List[int], index: Tensor, protos: int) -> Tensor:
        index = validate.weight_grad_args(e, grad, sizes, index, protos)
        return _hyper_kernels.weight_grad(e, grad, sizes, index, protos)


def hyper_ops(backend: str):
    """(edited_linear, hyper_matmul, edit_sumsq) ops for a resolved backend other than reference."""
    suffix = "_triton" if backend == "triton" else ""
    return _op("edited_linear" + suffix), _op("hyper_matmul" + suffix), _op("edit_sumsq" + suffix)


def _fake_edited_linear(x, theta, delta, threshold, bias=None, proto_index=None):
    validate.edited_linear_args(x, theta, delta, threshold, bias, proto_index, values=False)
    return x.new_empty((x.shape[0], x.shape[1], theta.shape[-1]))


def _fake_hyper_matmul(e, weight, bias=None, index=None):
    validate.hyper_args(e, weight, bias, index, values=False)
    if index is not None:
        return e.new_empty((e.shape[0], weight.shape[2]))
    return e.new_empty((weight.shape[0], e.shape[0], weight.shape[2]))


def _fake_edit_sumsq(e, weight, bias=None, threshold=None):
    validate.sumsq_args(e, weight, bias, threshold, values=False)
    return e.new_empty((e.shape[0], weight.shape[0]), dtype=torch.float64)


def heads_ops(backend: str):
    """(hyper_matmul_heads, hyper_weight_grad) ops for a resolved backend other than reference."""
    suffix = "_triton" if backend == "triton" else ""
    return _op("hyper_matmul_heads" + suffix), _op("hyper_weight_grad" + suffix)


def _fake_hyper_matmul_heads(e, weight, sizes, bias=None, index=None):
    validate.hyper_heads_args(e, weight, sizes, bias, index, values=False)
    if index is not None:
        return e.new_empty((e.shape[1], weight.shape[2]))
    return e.new_empty((weight.shape[0], e.shape[1], weight.shape[2]))


def _fake_hyper_weight_grad(e, grad, sizes, index, protos):
    validate.weight_grad_args(e, grad, sizes, index, protos, values=False)
    return grad.new_empty((protos, e.shape[2], grad.shape[1]))


def _acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _linear_setup_context(ctx, inputs, output):
    x, theta, delta, threshold, bias, proto_index = (tuple(inputs) + (None, None))[:6]
    ctx.save_for_backward(x, theta, delta, threshold, proto_index)
    ctx.bias_shape = None if bias is None else tuple(bias.shape)



def _sum_to_prototypes(per_sample: Tensor, shape, proto_index: Optional[Tensor]) -> Tensor:
    """A per-sample gradient [B, ...] summed onto the parameter of ``shape``: one shared copy
    (no prototype axis), one per prototype (index_add_ by proto_index), or per sample."""
    if len(shape) == per_sample.dim() - 1:
        return per_sample.sum(0)
    if proto_index is not None:
        return per_sample.new_zeros(shape).index_add_(0, proto_index, per_sample)
    return per_sample

def _make_linear_backward(forward_op, mask_op):
    def backward(ctx, grad):
        x, theta, delta, threshold, proto_index = ctx.saved_tensors
        need_x, need_theta, need_delta, _, need_bias = (tuple(ctx.needs_input_grad) + (False,) * 6)[:5]
        acc = _acc(x)
        gx = gtheta = gdelta = gbias = None
        if need_x:  # dy @ K^T: the same fused op on transposed views of theta and delta
            gx = forward_op(grad.to(x.dtype), theta.transpose(-1, -2), delta.transpose(-1, -2), threshold,
                            None, proto_index)
        if need_theta or need_delta:
            outer = torch.bmm(x.transpose(1, 2).to(acc), grad.to(acc))  # [B, in, out] = x_b^T dy_b
            if need_delta:
                gdelta = mask_op(outer, delta.to(acc), threshold).to(delta.dtype)
            if need_theta:
                gtheta = _sum_to_prototypes(outer, theta.shape, proto_index).to(theta.dtype)
        if need_bias:
            per_sample = grad.to(acc).sum(1)  # [B, out]
            gbias = _sum_to_prototypes(per_sample, ctx.bias_shape, proto_index).to(grad.dtype)
        return gx, gtheta, gdelta, None, gbias, None

    return backward


def _hyper_setup_context(ctx, inputs, output):
    e, weight, bias, index = (tuple(inputs) + (None, None))[:4]
    ctx.save_for_backward(e, weight, index)
    ctx.has_bias = bias is not None


def _make_hyper_backward(forward_op, weight_grad_op):
    def backward(ctx, grad):
        e, weight, index = ctx.saved_tensors
        need_e, need_w, need_b = (tuple(ctx.needs_input_grad) + (False,) * 4)[:3]
        acc = _acc(e)
        P = weight.shape[0]
        ge = gw = gb = None
        g = grad.to(acc)
        if index is None:  # grad [P, B, n]
            if need_e:
                ge = torch.bmm(g, weight.to(acc).transpose(1, 2)).sum(0).to(e.dtype)
            if need_w:
                gw = torch.matmul(e.to(acc).t(), g).to(weight.dtype)
            if need_b:
                gb = g.sum(1).to(weight.dtype)
        else:  # grad [B, n]
            if need_e:  # dy @ W[index]^T: the gathered op on the transposed weights
                ge = forward_op(grad.to(e.dtype), weight.transpose(1, 2), None, index)
            if need_w:  # per prototype e_seg^T dy_seg over its segment only (the segmented op)
                gw = weight_grad_op(e.unsqueeze(0), grad.to(e.dtype), [grad.shape[1]], index, P)
            if need_b:
                gb = g.new_zeros((P, g.shape[1])).index_add_(0, index, g).to(weight.dtype)
        return ge, gw, gb, None

    return backward


def _heads_setup_context(ctx, inputs, output):
    e, weight, sizes, bias, index = (tuple(inputs) + (None, None))[:5]
    ctx.save_for_backward(e, weight, index)
    ctx.sizes = list(sizes)
    ctx.has_bias = bias is not None


def _make_heads_backward(hyper_op, weight_grad_op):
    """Backward of hyper_matmul_heads: d weight in one segmented op over every head (gathered),
    d e per head (the gathered hyper_matmul op on the head's transposed columns), d bias by index."""
    def backward(ctx, grad):
        e, weight, index = ctx.saved_tensors
        need_e, need_w, _, need_b = (tuple(ctx.needs_input_grad) + (False,) * 5)[:4]
        acc = _acc(e)
        P = weight.shape[0]
        cols = [(c - n, n) for n, c in zip(ctx.sizes, itertools.accumulate(ctx.sizes))]
        ge = gw = gb = None
        g = grad.to(acc)
        if index is None:  # grad [P, B, N]
            if need_e:
                ge = torch.stack([torch.bmm(g.narrow(2, c, n), weight.narrow(2, c, n).to(acc).transpose(1, 2)).sum(0)
                                  for c, n in cols]).to(e.dtype)
            if need_w:
                gw = torch.cat([torch.matmul(e[l].to(acc).t(), g.narrow(2, c, n)) for l, (c, n) in enumerate(cols)],
                               2).to(weight.dtype)
            if need_b:
                gb = g.sum(1).to(weight.dtype)
        else:  # grad [B, N]
            dy = grad.to(e.dtype)
            if need_e:
                ge = torch.stack([hyper_op(dy.narrow(1, c, n), weight.narrow(2, c, n).transpose(1, 2), None, index)
                                  for c, n in cols])
            if need_w:
                gw = weight_grad_op(e, dy, ctx.sizes, index, P)
            if need_b:
                gb = g.new_zeros((P, g.shape[1])).index_add_(0, index, g).to(weight.dtype)
        return ge, gw, None, gb, None

    return backward


def _weight_grad_setup_context(ctx, inputs, output):
    e, grad, sizes, index, protos = inputs
    ctx.save_for_backward(e, grad, index)
    ctx.sizes = list(sizes)


def _make_weight_grad_backward(hyper_op, heads_op):
    """Autograd of hyper_weight_grad (dW[p, :, cols_l] = sum over p's rows b of e[l, b]^T grad[b, cols_l],
    bilinear), so double backward of the gathered hyper_matmul / hyper_matmul_heads is exact:
    d e[l, b] = grad[b, cols_l] @ gg[index[b], :, cols_l]^T (the gathered hyper_matmul on gg's
    transposed columns) and d grad[b, cols_l] = e[l, b] @ gg[index[b], :, cols_l] (the gathered
    hyper_matmul_heads on gg); both ops are differentiable, so every order works."""
    def backward(ctx, gg):
        e, grad, index = ctx.saved_tensors
        need_e, need_grad = (tuple(ctx.needs_input_grad) + (False, False))[:2]
        cols = [(c - n, n) for n, c in zip(ctx.sizes, itertools.accumulate(ctx.sizes))]
        ge = gdy = None
        gg = gg.to(grad.dtype)
        if need_e:
            ge = torch.stack([hyper_op(grad.narrow(1, c, n), gg.narrow(2, c, n).transpose(1, 2), None, index)
                              for c, n in cols])
        if need_grad:
            gdy = heads_op(e, gg, ctx.sizes, None, index)
        return ge, gdy, None, None, None

    return backward


def _register_hyper(linear: str, hyper: str, sumsq: str, mask: str, heads: str, weight_grad: str) -> None:
    torch.library.register_fake(f"pyeditor::{linear}", _fake_edited_linear)
    torch.library.register_fake(f"pyeditor::{hyper}", _fake_hyper_matmul)
    torch.library.register_fake(f"pyeditor::{sumsq}", _fake_edit_sumsq)
    torch.library.register_fake(f"pyeditor::{heads}", _fake_hyper_matmul_heads)
    torch.library.register_fake(f"pyeditor::{weight_grad}", _fake_hyper_weight_grad)
    torch.library.register_autograd(f"pyeditor::{linear}", _make_linear_backward(_op(linear), _op(mask)),
                                    setup_context=_linear_setup_context)
    torch.library.register_autograd(f"pyeditor::{hyper}", _make_hyper_backward(_op(hyper), _op(weight_grad)),
                                    setup_context=_hyper_setup_context)
    torch.library.register_autograd(f"pyeditor::{heads}", _make_heads_backward(_op(hyper), _op(weight_grad)),
                                    setup_context=_heads_setup_context)
    torch.library.register_autograd(f"pyeditor::{weight_grad}", _make_weight_grad_backward(_op(hyper), _op(heads)),
                                    setup_context=_weight_grad_setup_context)


if HAS_CPP:
    _register_hyper("edited_linear", "hyper_matmul", "edit_sumsq", "apply_edit_backward", "hyper_matmul_heads",
                    "hyper_weight_grad")
if backends.triton_available():
    _register_hyper("edited_linear_triton", "hyper_matmul_triton", "edit_sumsq_triton", "apply_edit_backward_triton",
                    "hyper_matmul_heads_triton", "hyper_weight_grad_triton")


# ==================================================================== all-layer edit norms (issue 27)
# edit_norms_layers(e [L, B, d], weights L x [P, d, n_l], biases L x None / [P, n_l], threshold,
# rule, layer_weights, gram) -> [B, P] float64: every layer's edit norm of every (sample,
# prototype) pair combined by the rule in one op (C++ CPU / CUDA in csrc/{cpu,cuda}/layer_norms_*,
# the Triton twin here; the CPU kernel evaluates cheap unclipped layers by their Gram form, the
# given gram [L, P, d+1, d+1] or its own). Not differentiable: assignment is an argmin.
if backends.triton_available():
    from pyeditor.kernels import layer_norms as _layer_norms_kernels

    @triton_op("pyeditor::edit_norms_layers_triton", mutates_args=())
    def edit_norms_layers_triton(e: Tensor, weights: List[Tensor], biases: List[Optional[Tensor]],
                                 threshold: Optional[Tensor] = None, rule: str = "sumsq",
                                 layer_weights: Optional[List[float]] = None, gram: Optional[Tensor] = None) -> Tensor:
        code, kept, lam, thr = validate.layer_norms_args(e, weights, biases, threshold, rule, layer_weights, gram)
        return _layer_norms_kernels.edit_norms_layers(e, weights, biases, thr, code, kept, lam)


def _fake_edit_norms_layers(e, weights, biases, threshold=None, rule="sumsq", layer_weights=None, gram=None):
    validate.layer_norms_args(e, weights, biases, threshold, rule, layer_weights, gram, values=False)
    return e.new_empty((e.shape[1], weights[0].shape[0]), dtype=torch.float64)


_LAYER_NORMS_OPS: dict = {}


def layer_norms_op(backend: str):
    """The edit_norms_layers op (an OpOverload) for a resolved backend other than reference."""
    op = _LAYER_NORMS_OPS.get(backend)
    if op is None:
        name = "edit_norms_layers_triton" if backend == "triton" else "edit_norms_layers"
        op = _LAYER_NORMS_OPS[backend] = _op(name).default
    return op


if HAS_CPP:
    torch.library.register_fake("pyeditor::edit_norms_layers", _fake_edit_norms_layers)
if backends.triton_available():
    torch.library.register_fake("pyeditor::edit_norms_layers_triton", _fake_edit_norms_layers)

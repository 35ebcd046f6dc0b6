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


# ==================================================================== Persona serving (issue 4)
# edited_linear / hyper_matmul / edit_sumsq: C++ schemas in csrc/register.cpp, Triton twins here.
# Backwards call registered ops only: the forward op itself on transposed views (d x, d e),
# bmm / index_add (d theta, d weight, d bias) and apply_edit_backward (the |delta| <= T mask).
if backends.triton_available():
    from pyeditor.kernels import hyper as _hyper_kernels

    @triton_op("pyeditor::edited_linear_triton", mutates_args=())
    def edited_linear_triton(x: Tensor, theta: Tensor, delta: Tensor, threshold: Tensor,
                             bias: Optional[Tensor] = None, proto_index: Optional[Tensor] = None) -> Tensor:
        return _hyper_kernels.edited_linear(x, theta, delta, threshold, bias, proto_index)

    @triton_op("pyeditor::hyper_matmul_triton", mutates_args=())
    def hyper_matmul_triton(e: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                            index: Optional[Tensor] = None) -> Tensor:
        return _hyper_kernels.hyper_matmul(e, weight, bias, index)

    @triton_op("pyeditor::edit_sumsq_triton", mutates_args=())
    def edit_sumsq_triton(e: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                          threshold: Optional[Tensor] = None) -> Tensor:
        return _hyper_kernels.edit_sumsq(e, weight, bias, threshold)


def hyper_ops(backend: str):
    """(edited_linear, hyper_matmul, edit_sumsq) ops for a resolved backend other than reference."""
    suffix = "_triton" if backend == "triton" else ""
    return _op("edited_linear" + suffix), _op("hyper_matmul" + suffix), _op("edit_sumsq" + suffix)


def _fake_edited_linear(x, theta, delta, threshold, bias=None, proto_index=None):
    return x.new_empty((x.shape[0], x.shape[1], theta.shape[-1]))


def _fake_hyper_matmul(e, weight, bias=None, index=None):
    if index is not None:
        return e.new_empty((e.shape[0], weight.shape[2]))
    return e.new_empty((weight.shape[0], e.shape[0], weight.shape[2]))


def _fake_edit_sumsq(e, weight, bias=None, threshold=None):
    return e.new_empty((e.shape[0], weight.shape[0]), dtype=torch.float64)


def _acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _linear_setup_context(ctx, inputs, output):
    x, theta, delta, threshold, bias, proto_index = (tuple(inputs) + (None, None))[:6]
    ctx.save_for_backward(x, theta, delta, threshold, proto_index)
    ctx.bias_shape = None if bias is None else tuple(bias.shape)


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
                if theta.dim() == 2:
                    gtheta = outer.sum(0)
                elif proto_index is not None:
                    gtheta = outer.new_zeros(theta.shape).index_add_(0, proto_index, outer)
                else:
                    gtheta = outer
                gtheta = gtheta.to(theta.dtype)
        if need_bias:
            per_sample = grad.to(acc).sum(1)  # [B, out]
            if len(ctx.bias_shape) == 1:
                gbias = per_sample.sum(0)
            elif proto_index is not None:
                gbias = per_sample.new_zeros(ctx.bias_shape).index_add_(0, proto_index, per_sample)
            else:
                gbias = per_sample
            gbias = gbias.to(grad.dtype)
        return gx, gtheta, gdelta, None, gbias, None

    return backward


def _hyper_setup_context(ctx, inputs, output):
    e, weight, bias, index = (tuple(inputs) + (None, None))[:4]
    ctx.save_for_backward(e, weight, index)
    ctx.has_bias = bias is not None


def _make_hyper_backward(forward_op):
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
            if need_w:  # per prototype e_seg^T dy_seg, as a masked batched product (no host sync)
                onehot = torch.nn.functional.one_hot(index, P).to(acc).t()  # [P, B]
                em = onehot[:, :, None] * e.to(acc)[None]  # [P, B, d]
                gw = torch.bmm(em.transpose(1, 2), g.expand(P, *g.shape)).to(weight.dtype)
            if need_b:
                gb = g.new_zeros((P, g.shape[1])).index_add_(0, index, g).to(weight.dtype)
        return ge, gw, gb, None

    return backward


def _register_hyper(linear: str, hyper: str, sumsq: str, mask: str) -> None:
    torch.library.register_fake(f"pyeditor::{linear}", _fake_edited_linear)
    torch.library.register_fake(f"pyeditor::{hyper}", _fake_hyper_matmul)
    torch.library.register_fake(f"pyeditor::{sumsq}", _fake_edit_sumsq)
    torch.library.register_autograd(f"pyeditor::{linear}", _make_linear_backward(_op(linear), _op(mask)),
                                    setup_context=_linear_setup_context)
    torch.library.register_autograd(f"pyeditor::{hyper}", _make_hyper_backward(_op(hyper)),
                                    setup_context=_hyper_setup_context)


if HAS_CPP:
    _register_hyper("edited_linear", "hyper_matmul", "edit_sumsq", "apply_edit_backward")
if backends.triton_available():
    _register_hyper("edited_linear_triton", "hyper_matmul_triton", "edit_sumsq_triton", "apply_edit_backward_triton")

"""Argument checks shared by the public API: clear Python errors that name the argument."""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from . import constants as _names
from . import quant_format as _qf
from ._geometry import EditGeometry, acc_dtype, edit_geometry

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def compiling() -> bool:
    return torch.compiler.is_compiling()


def tensor(x, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def float_tensor(x, name: str) -> Tensor:
    tensor(x, name)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {x.dtype}")
    return x


def same_dtype(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.dtype != b.dtype:
        raise TypeError(f"{name_b} dtype {b.dtype} does not match {name_a} dtype {a.dtype}")


def same_device(ref: Tensor, name_ref: str, **others: Optional[Tensor]) -> None:
    for name, t in others.items():
        if t is not None and not isinstance(t, Tensor):  # a list index, say: name it, not .device
            tensor(t, name)
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {name_ref} is on {ref.device}")


def index_tensor(index, name: str, bound: int) -> Tensor:
    """An integer [B] index whose values lie in [0, bound); returned as int64."""
    tensor(index, name)
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {index.dtype}")
    if index.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(index.shape)}")
    index = index.long()
    if index.numel() and not compiling():
        if index.device.type == "cpu":
            lo, hi = int(index.min()), int(index.max())
            if lo < 0 or hi >= bound:
                bad = lo if lo < 0 else hi
                raise IndexError(f"{name} value {bad} is out of range for {bound} entries")
        else:
            torch._assert_async(((index >= 0) & (index < bound)).all(), f"{name} out of range")
    return index


_scalar_thresholds: dict = {}
_ACC_MAX = {torch.float32: torch.finfo(torch.float32).max, torch.float64: torch.finfo(torch.float64).max}


def _saturated(t, acc: torch.dtype) -> float:
    """A Python number T >= 0 as a float of the accumulation dtype's range: beyond its maximum it
    becomes +inf, which clips exactly as T does (every finite value of that dtype lies inside
    [-T, T], so neither clips anything)."""
    try:
        v = float(t)
    except OverflowError:  # an int beyond float64
        return math.inf
    return math.inf if v > _ACC_MAX[acc] else v


def threshold(t, like: Tensor, name: str = "threshold") -> Tensor:
    """T as a tensor of the kernels' accumulation dtype on like's device; T >= 0, never NaN.
    A real number or a floating / integer tensor; bool and complex raise TypeError naming T.
    A T beyond the accumulation dtype's range saturates to +inf (see _saturated)."""
    acc = torch.float64 if like.dtype == torch.float64 else torch.float32
    if isinstance(t, bool) or not isinstance(t, (int, float, Tensor)):
        raise TypeError(f"{name} must be a number or a tensor, got {type(t).__name__}")
    if not isinstance(t, Tensor):
        if (isinstance(t, float) and math.isnan(t)) or t < 0:
            raise ValueError(f"{name} must be >= 0 and not NaN, got {t}")
        t = _saturated(t, acc)
        if compiling() or like.device.type != "cpu":
            return torch.full((), t, dtype=acc, device=like.device)
        # serving calls repeat the same T: keep its (read-only) 0-d CPU tensor
        key = (t, acc)
        cached = _scalar_thresholds.get(key)
        if cached is None:
            if len(_scalar_thresholds) > 256:
                _scalar_thresholds.clear()
            cached = _scalar_thresholds[key] = torch.full((), t, dtype=acc)
        return cached
    if t.dtype == torch.bool or t.dtype.is_complex:
        raise TypeError(f"{name} must be a real (floating or integer) tensor, got {t.dtype}")
    if not t.dtype.is_floating_point:
        t = t.to(acc)
    if t.dim() > 1:
        raise ValueError(f"{name} must be a number, a 0-d tensor or a 1-D per-sample tensor, got shape {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the edit is on {like.device}")
    if t.numel() and not compiling():
        bad = torch.isnan(t) | (t < 0)
        if t.device.type == "cpu":
            if bool(bad.any()):
                raise ValueError(f"{name} must be >= 0 and not NaN, got {t.detach().flatten()[bad.flatten()][:4].tolist()}")
        else:
            torch._assert_async(~bad.any(), f"{name} must be >= 0 and not NaN")
    return t.detach().to(acc)


def _version(t: Tensor):
    try:
        return t._version  # bumped by every in-place update
    except RuntimeError:  # inference tensors keep no version counter
        return None


def editor_fingerprint(weight: Tensor, bias: Optional[Tensor]) -> tuple:
    """What a cached Gram form was computed from: the editors' memory, layout and version."""
    return tuple(None if t is None else (t.data_ptr(), _version(t), tuple(t.shape), t.stride(), t.dtype, t.device)
                 for t in (weight, bias))


def gram_of(gram, e: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    """edit_norms / assign_prototypes(gram=...): a PrototypeGram that prototype_gram computed from
    these very editors, not updated since; another editor's or a stale Gram would assign silently
    wrong, so it is refused."""
    g, a = getattr(gram, "gram", None), getattr(gram, "abs_gram", None)
    if not (isinstance(g, Tensor) and isinstance(a, Tensor)):
        raise TypeError(f"gram must be a PrototypeGram from pyeditor.prototype_gram(weight, bias), "
                        f"got {type(gram).__name__}")
    P, d = weight.shape[0], weight.shape[1]
    if tuple(g.shape) != (P, d + 1, d + 1) or g.shape != a.shape or g.dtype != torch.float64:
        raise ValueError(f"gram holds {g.dtype} {tuple(g.shape)}, expected float64 {(P, d + 1, d + 1)} for "
                         f"weight of shape {tuple(weight.shape)}: it is the Gram form of other editors")
    if g.device != e.device or a.device != e.device:
        raise ValueError(f"gram is on {g.device} but e is on {e.device}")
    if not compiling() and getattr(gram, "source", None) != editor_fingerprint(weight, bias):
        raise ValueError("gram was not computed from these weight and bias tensors, or they changed since "
                         "(in place); compute it again with pyeditor.prototype_gram(weight, bias)")


def _extent(t: Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    span = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()) if n > 0)
    return start, start + (span + 1) * t.element_size()


def out_tensor(out, shape: tuple, like: Tensor, *inputs: Tensor) -> Tensor:
    """A caller's out= buffer: right shape, dtype and device, each element written once, and
    either identical to an input (in-place) or not overlapping it at all."""
    tensor(out, "out")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(shape)}")
    if out.dtype != like.dtype:
        raise TypeError(f"out dtype {out.dtype} does not match {like.dtype}")
    if out.device != like.device:
        raise ValueError(f"out is on {out.device} but the inputs are on {like.device}")
    if out.numel() == 0 or compiling():  # the C++ kernels re-check overlap on real tensors
        return out
    if any(st == 0 and n > 1 for n, st in zip(out.shape, out.stride())):
        raise ValueError("out has a broadcast (stride-0) dimension: it would be written more than once")
    lo, hi = _extent(out)
    for x in inputs:
        if x.numel() == 0 or x.untyped_storage().data_ptr() != out.untyped_storage().data_ptr():
            continue
        same = x.data_ptr() == out.data_ptr() and x.shape == out.shape and x.stride() == out.stride()
        xlo, xhi = _extent(x)
        if not same and xlo < hi and lo < xhi:
            raise ValueError("out partially overlaps an input; pass a separate buffer or the input itself")
    return out


# ============================================================================ op-level checks
# Every backend's op goes through one checking layer: the C++ ops through csrc/*_args.cpp, the
# Triton ops (pyeditor.ops, `*_triton`) through the functions below, which test the same
# conditions and raise RuntimeError("pyeditor: ...") naming the argument, like TORCH_CHECK. They
# run inside the triton_op bodies, so they hold under torch.compile too (where the public
# functions skip their own checks). Shape checks work on fake tensors; value checks (index
# ranges, thresholds, permutations) read real CPU tensors on the host, use torch._assert_async
# on CUDA tensors, and become a graph assert while tracing.

def _fail(*parts) -> None:
    raise RuntimeError("pyeditor: " + "".join(str(p) for p in parts))


def _shape(t: Tensor) -> list:
    return list(t.shape)


def concrete(t: Tensor) -> bool:
    """Whether t holds data this process can read (not fake, meta or a functorch wrapper)."""
    return (t.device.type != "meta" and not is_fake(t)
            and not torch._C._functorch.is_functorch_wrapped_tensor(t))


def _require(ok: Tensor, message, static: str, host: bool = False) -> None:
    """ok: a 0-d bool tensor computed from the inputs. On real CPU tensors (or with host=True, as
    the C++ ops copy a CUDA index to the host) a False raises RuntimeError(message()); on real
    CUDA tensors it is a device-side assert; while tracing, a graph assert."""
    if concrete(ok) and (ok.device.type == "cpu" or host):
        if not bool(ok):
            raise RuntimeError("pyeditor: " + message())
    else:
        torch._assert_async(ok, "pyeditor: " + static)


def _edit_dtype(dtype: torch.dtype) -> bool:
    return dtype in FLOAT_DTYPES


def check_index_values(idx: Tensor, bound: int, name: str, host: bool = False) -> None:
    """Every entry of the int64 index in [0, bound) (csrc/edit_args.cpp check_index_values)."""
    if idx.numel() == 0:
        return
    bad = (idx < 0) | (idx >= bound)

    def message():
        i = int(bad.nonzero()[0, 0])
        return f"{name}[{i}] = {int(idx[i])} is out of range for {bound} prototypes"

    _require(~bad.any(), message, f"{name} out of range for {bound} prototypes", host)


def check_threshold_values(t: Tensor, host: bool = False) -> None:
    """T >= 0 and not NaN everywhere (csrc/edit_args.cpp check_threshold_values)."""
    if t.numel() == 0:
        return
    bad = ~(t >= 0)  # NaN fails too

    def message():
        return f"threshold must be >= 0 and not NaN, got {t.reshape(-1)[bad.reshape(-1)][0].item()}"

    _require(~bad.any(), message, "threshold must be >= 0 and not NaN", host)


def edit_args(theta: Tensor, delta: Tensor, threshold: Tensor, proto_index: Optional[Tensor],
              values: bool = True):
    """csrc/edit_args.cpp prepare_edit: (geometry, threshold in the accumulation dtype and
    contiguous, proto_index contiguous or None). values=False: shapes only (fake kernels)."""
    if theta.dim() not in (2, 3):
        _fail("theta must be [R, C] or [P, R, C], got shape ", _shape(theta))
    if delta.dim() not in (2, 3):
        _fail("delta must be [R, C] or [B, R, C], got shape ", _shape(delta))
    if not _edit_dtype(theta.dtype):
        _fail("theta dtype must be float32, float64, float16 or bfloat16, got ", theta.dtype)
    if delta.dtype != theta.dtype:
        _fail("delta dtype ", delta.dtype, " does not match theta dtype ", theta.dtype)
    if delta.device != theta.device or threshold.device != theta.device:
        _fail("theta, delta and threshold must be on one device, got ", theta.device, ", ", delta.device, ", ",
              threshold.device)
    rows, cols = theta.shape[-2], theta.shape[-1]
    if delta.shape[-2] != rows or delta.shape[-1] != cols:
        _fail("delta matrices ", _shape(delta), " do not match theta's matrix shape [", rows, ", ", cols, "]")
    theta3, delta3 = theta.dim() == 3, delta.dim() == 3
    P = theta.shape[0] if theta3 else 1
    if proto_index is not None:
        if not theta3:
            _fail("proto_index needs theta as a [P, R, C] prototype stack, got shape ", _shape(theta))
        if proto_index.dtype != torch.int64:
            _fail("proto_index must be int64, got ", proto_index.dtype)
        if proto_index.dim() != 1:
            _fail("proto_index must be 1-D [B], got shape ", _shape(proto_index))
        if proto_index.device != theta.device:
            _fail("proto_index is on ", proto_index.device, ", theta on ", theta.device)
        samples = proto_index.shape[0]
        if delta3 and delta.shape[0] != samples:
            _fail("delta has ", delta.shape[0], " samples but proto_index has ", samples)
        if P == 0 and samples != 0:
            _fail("proto_index given but theta holds no prototypes")
        proto_index = proto_index.contiguous()
    else:
        B = delta.shape[0] if delta3 else 1
        if theta3 and delta3 and not (P == B or P == 1 or B == 1):
            _fail("theta has ", P, " matrices and delta ", B,
                  "; without proto_index they must match (or one of them be 1)")
        samples = (max(P, B) if delta3 else P) if theta3 else B
    thr = _edit_threshold(threshold, samples, theta3 or delta3, acc_dtype(theta.dtype))
    if values:
        check_threshold_values(thr)
        if proto_index is not None:
            check_index_values(proto_index, P, "proto_index")
    return edit_geometry(theta, delta, thr, proto_index), thr, proto_index


def _edit_threshold(threshold: Tensor, samples, batched: bool, acc: torch.dtype) -> Tensor:
    if not threshold.dtype.is_floating_point:
        _fail("threshold must be a floating tensor, got ", threshold.dtype)
    if not (threshold.numel() == 1 and threshold.dim() <= 1):
        if not (batched and threshold.dim() == 1 and threshold.shape[0] == samples):
            _fail("threshold must be a number, a 0-d tensor or one value per sample [", samples, "], got shape ",
                  _shape(threshold))
    return threshold.to(acc).contiguous()


def edit_grad_args(grad: Tensor, delta: Tensor, threshold: Tensor, values: bool = True):
    """csrc/edit_args.cpp prepare_edit_grad: (geometry, threshold acc-contiguous)."""
    if grad.dim() not in (2, 3):
        _fail("grad must be [R, C] or [B, R, C], got shape ", _shape(grad))
    fits = (delta.dim() in (2, grad.dim()) and delta.shape[-1] == grad.shape[-1]
            and delta.shape[-2] == grad.shape[-2] and (delta.dim() == 2 or delta.shape[0] == grad.shape[0]))
    if not fits:
        _fail("delta shape ", _shape(delta), " does not fit grad shape ", _shape(grad))
    if not _edit_dtype(grad.dtype) or delta.dtype != grad.dtype:
        _fail("grad and delta must share a floating dtype, got ", grad.dtype, " and ", delta.dtype)
    if delta.device != grad.device or threshold.device != grad.device:
        _fail("grad, delta and threshold must be on one device")
    batched = grad.dim() == 3
    samples = grad.shape[0] if batched else 1
    thr = _edit_threshold(threshold, samples, batched, acc_dtype(grad.dtype))
    if values:
        check_threshold_values(thr)
    g = EditGeometry(samples=samples, rows=grad.shape[-2], cols=grad.shape[-1], out_shape=tuple(grad.shape),
                     theta_sample_stride=grad.stride(0) if batched else 0,
                     delta_sample_stride=delta.stride(0) if delta.dim() == 3 else 0,
                     thr_stride=0 if thr.numel() == 1 else 1)
    return g, thr


def _overlaps(a: Tensor, b: Tensor) -> bool:
    """Whether a and b share any byte of memory (by extent: conservative for interleaved views)."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    alo, ahi = _extent(a)
    blo, bhi = _extent(b)
    return alo < bhi and blo < ahi


def _same_view(a: Tensor, b: Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape
            and a.stride() == b.stride())


def edit_out_aliasing(out: Tensor, theta: Tensor, delta: Tensor, threshold: Optional[Tensor],
                      proto_index: Optional[Tensor], error=ValueError) -> None:
    """apply_edit(out=)'s aliasing rule, on real tensors: out may be theta itself when each sample
    reads the matrix it writes (no proto_index) or delta itself (element-wise in place); any other
    overlap with theta or delta, and any overlap with threshold or proto_index, is refused: the
    kernels would read values they had already overwritten."""
    if out.numel() == 0 or not concrete(out):
        return
    if any(st == 0 and n > 1 for n, st in zip(out.shape, out.stride())):
        raise error("out has a broadcast (stride-0) dimension: it would be written more than once "
                    "(some of its elements refer to a single memory location)")
    for x, name in ((theta, "theta"), (delta, "delta")):
        if not concrete(x) or not _overlaps(out, x):
            continue
        if not _same_view(out, x):
            raise error(f"out partially overlaps {name}; pass a separate buffer or {name} itself")
        if name == "theta" and proto_index is not None:
            raise error("out is theta itself, but with proto_index a sample may read a prototype another "
                        "sample has already overwritten; pass a separate buffer")
    for x, name in ((threshold, "threshold"), (proto_index, "proto_index")):
        if x is not None and concrete(x) and _overlaps(out, x):
            raise error(f"out overlaps {name}: the kernel would read values it has already overwritten; "
                        "pass a separate buffer")


def edit_out_args(theta: Tensor, delta: Tensor, threshold: Tensor, proto_index: Optional[Tensor], out: Tensor,
                  values: bool = True):
    """csrc/edit_args.cpp prepare_edit_out, plus the aliasing rule of edit_out_aliasing."""
    g, thr, idx = edit_args(theta, delta, threshold, proto_index, values)
    if tuple(out.shape) != tuple(g.out_shape):
        _fail("out has shape ", _shape(out), ", expected ", list(g.out_shape))
    if out.dtype != theta.dtype:
        _fail("out dtype ", out.dtype, " does not match ", theta.dtype)
    if out.device != theta.device:
        _fail("out is on ", out.device, ", inputs on ", theta.device)
    # the caller's threshold / index (before .contiguous() may have copied them)
    edit_out_aliasing(out, theta, delta, threshold, proto_index, error=lambda m: RuntimeError("pyeditor: " + m))
    return g, thr, idx


# ---------------------------------------------------------------- Persona serving (hyper_args.cpp)
def _check_float(t: Tensor, name: str, like: Tensor) -> None:
    if not t.dtype.is_floating_point:
        _fail(name, " must be floating point, got ", t.dtype)
    if t.dtype != like.dtype:
        _fail(name, " dtype ", t.dtype, " does not match ", like.dtype)
    if t.device != like.device:
        _fail(name, " is on ", t.device, " but expected ", like.device)


def _prepare_index(idx: Tensor, batch, bound, name: str, values: bool, like: Tensor) -> Tensor:
    if idx.dtype != torch.int64:
        _fail(name, " must be int64, got ", idx.dtype)
    if idx.dim() != 1 or idx.shape[0] != batch:
        _fail(name, " must have shape [", batch, "], got ", _shape(idx))
    if idx.device != like.device:
        _fail(name, " is on ", idx.device, " but expected ", like.device)
    idx = idx.contiguous()
    if values:
        check_index_values(idx, bound, name, host=True)  # as the C++ ops: a CUDA index is copied once
    return idx


def _prepare_threshold(t: Tensor, like: Tensor, batch, values: bool) -> Tensor:
    acc = acc_dtype(like.dtype)
    if t.dtype != acc:
        _fail("threshold must be ", acc, " for ", like.dtype, " inputs, got ", t.dtype)
    if not (t.numel() == 1 or (t.dim() == 1 and t.shape[0] == batch)):
        _fail("threshold must hold 1 or ", batch, " values, got shape ", _shape(t))
    if t.device != like.device:
        _fail("threshold is on ", t.device, " but expected ", like.device)
    out = t.reshape(t.numel()).contiguous()
    if values:
        check_threshold_values(out, host=True)
    return out


def edited_linear_args(x: Tensor, theta: Tensor, delta: Tensor, threshold: Tensor, bias: Optional[Tensor],
                       proto_index: Optional[Tensor], values: bool = True):
    """csrc/hyper_args.cpp prepare_edited_linear: (threshold [1 or B] contiguous, proto_index
    contiguous or None)."""
    _check_float(x, "x", x)
    _check_float(theta, "theta", x)
    _check_float(delta, "delta", x)
    if x.dim() != 3:
        _fail("x must be [B, S, in], got ", _shape(x))
    if theta.dim() not in (2, 3):
        _fail("theta must be [in, out] or [P, in, out], got ", _shape(theta))
    batch, _, n_in = x.shape
    n_out = theta.shape[-1]
    slots = theta.shape[0] if theta.dim() == 3 else 1
    if theta.shape[-2] != n_in:
        _fail("theta has ", theta.shape[-2], " rows but x has ", n_in, " features")
    if not (delta.dim() == 3 and delta.shape[0] == batch and delta.shape[1] == n_in and delta.shape[2] == n_out):
        _fail("delta must be [", batch, ", ", n_in, ", ", n_out, "], got ", _shape(delta))
    if proto_index is not None:
        if theta.dim() != 3:
            _fail("proto_index needs theta as [P, in, out]")
        proto_index = _prepare_index(proto_index, batch, slots, "proto_index", values, x)
    elif theta.dim() == 3 and slots != batch:
        _fail("theta has ", slots, " matrices for batch ", batch, "; pass proto_index")
    if bias is not None:
        _check_float(bias, "bias", x)
        ok = bias.dim() in (1, 2) and bias.shape[-1] == n_out and (
            bias.dim() == 1 or (bias.shape[0] == slots and theta.dim() == 3))
        if not ok:
            _fail("bias must be [", n_out, "] or [", slots, ", ", n_out, "], got ", _shape(bias))
    return _prepare_threshold(threshold, x, batch, values), proto_index


def hyper_args(e: Tensor, weight: Tensor, bias: Optional[Tensor], index: Optional[Tensor],
               values: bool = True) -> Optional[Tensor]:
    """csrc/hyper_args.cpp prepare_hyper: index contiguous or None."""
    _check_float(e, "e", e)
    _check_float(weight, "weight", e)
    if e.dim() != 2:
        _fail("e must be [B, d], got ", _shape(e))
    if weight.dim() != 3 or weight.shape[1] != e.shape[1]:
        _fail("weight must be [P, ", e.shape[1], ", n], got ", _shape(weight))
    P, _, n = weight.shape
    if bias is not None:
        _check_float(bias, "bias", e)
        if not (bias.dim() == 2 and bias.shape[0] == P and bias.shape[1] == n):
            _fail("bias must be [", P, ", ", n, "], got ", _shape(bias))
    if index is not None:
        index = _prepare_index(index, e.shape[0], P, "index", values, e)
    return index


def _head_sizes(sizes, heads, width) -> list:
    if len(sizes) != heads:
        _fail("sizes has ", len(sizes), " entries but e holds ", heads, " heads")
    for l, n in enumerate(sizes):
        if n < 0:
            _fail("sizes[", l, "] = ", n, " is negative")
    if sum(sizes) != width:
        _fail("sizes sum to ", sum(sizes), " but the heads have ", width, " columns")
    return list(sizes)


def hyper_heads_args(e: Tensor, weight: Tensor, sizes, bias: Optional[Tensor], index: Optional[Tensor],
                     values: bool = True) -> Optional[Tensor]:
    """csrc/hyper_args.cpp prepare_hyper_heads: index contiguous or None."""
    if not (e.dim() == 3 and e.shape[0] >= 1):
        _fail("e must be [L >= 1, B, d] (one embedding per head), got ", _shape(e))
    index = hyper_args(e[0], weight, bias, index, values)
    _head_sizes(sizes, e.shape[0], weight.shape[2])
    return index


def weight_grad_args(e: Tensor, grad: Tensor, sizes, index: Tensor, protos: int, values: bool = True) -> Tensor:
    """csrc/hyper_args.cpp prepare_weight_grad: index contiguous."""
    _check_float(e, "e", e)
    _check_float(grad, "grad", e)
    if e.dim() != 3:
        _fail("e must be [L, B, d], got ", _shape(e))
    if not (grad.dim() == 2 and grad.shape[0] == e.shape[1]):
        _fail("grad must be [", e.shape[1], ", N], got ", _shape(grad))
    if protos < 0:
        _fail("protos must be >= 0, got ", protos)
    index = _prepare_index(index, e.shape[1], protos, "index", values, e)
    _head_sizes(sizes, e.shape[0], grad.shape[1])
    return index


def sumsq_args(e: Tensor, weight: Tensor, bias: Optional[Tensor], threshold: Optional[Tensor],
               values: bool = True) -> Optional[Tensor]:
    """csrc/hyper_args.cpp prepare_hyper + prepare_sumsq_threshold: threshold [1 or B] or None."""
    hyper_args(e, weight, bias, None, values)
    if threshold is None:
        return None
    return _prepare_threshold(threshold, e, e.shape[0], values)


LAYER_RULES = {"sumsq": 0, "sum": 1, "max": 2, "weighted": 3}  # csrc/include/pyeditor/layer_norms.h LayerRule


def layer_norms_args(e: Tensor, weights, biases, threshold: Optional[Tensor], rule: str, layer_weights,
                     gram: Optional[Tensor] = None, values: bool = True) -> tuple:
    """csrc/layer_norms_args.cpp prepare_layer_norms: (rule code, kept layers, lambda per layer,
    threshold float64 contiguous [1 or B] or None). gram is checked (the Triton kernel, like the
    CUDA one, evaluates every layer directly)."""
    if not e.dtype.is_floating_point:
        _fail("e must be floating point, got ", e.dtype)
    if e.dim() != 3:
        _fail("e must be [L, B, d] (one embedding per layer), got ", _shape(e))
    L = len(weights)
    if L < 1:
        _fail("weights must hold at least one layer")
    if e.shape[0] != L:
        _fail("e holds ", e.shape[0], " layer embeddings but weights has ", L, " layers")
    if len(biases) != L:
        _fail("biases has ", len(biases), " entries but weights has ", L, " layers")
    P, d = (weights[0].shape[0] if weights[0].dim() == 3 else 0), e.shape[2]
    for l, (w, b) in enumerate(zip(weights, biases)):
        for t, name in ((w, f"weights[{l}]"), (b, f"biases[{l}]")):
            if t is None:
                continue
            if t.dtype != e.dtype:
                _fail(name, " dtype ", t.dtype, " does not match e dtype ", e.dtype)
            if t.device != e.device:
                _fail(name, " is on ", t.device, " but e is on ", e.device)
        if not (w.dim() == 3 and w.shape[0] == P and w.shape[1] == d):
            _fail("weights[", l, "] must be [", P, ", ", d, ", n] (every layer: P of weights[0], d of e), got ",
                  _shape(w))
        if b is not None and not (b.dim() == 2 and b.shape[0] == P and b.shape[1] == w.shape[2]):
            _fail("biases[", l, "] must be [", P, ", ", w.shape[2], "], got ", _shape(b))
    code = LAYER_RULES.get(rule)
    if code is None:
        _fail("rule must be 'sumsq', 'sum', 'max' or 'weighted', got '", rule, "'")
    if (rule == "weighted") != (layer_weights is not None):
        _fail("layer_weights goes with rule 'weighted' and only with it")
    lam = [1.0] * L
    if layer_weights is not None:
        if len(layer_weights) != L:
            _fail("layer_weights has ", len(layer_weights), " values but weights has ", L, " layers")
        for l, x in enumerate(layer_weights):
            if not (math.isfinite(x) and x >= 0):
                _fail("layer_weights[", l, "] = ", x, " must be finite and >= 0")
        if not any(x > 0 for x in layer_weights):
            _fail("layer_weights must not all be 0")
        lam = [float(x) for x in layer_weights]
    kept = [l for l in range(L) if lam[l] > 0]
    if threshold is not None:
        if threshold.dtype != torch.float64:
            _fail("threshold must be float64 (the clip runs in double), got ", threshold.dtype)
        if not (threshold.numel() == 1 or (threshold.dim() == 1 and threshold.shape[0] == e.shape[1])):
            _fail("threshold must hold 1 or ", e.shape[1], " values, got shape ", _shape(threshold))
        if threshold.device != e.device:
            _fail("threshold is on ", threshold.device, " but e is on ", e.device)
        threshold = threshold.reshape(threshold.numel()).contiguous()
        if values:
            check_threshold_values(threshold, host=True)
    if gram is not None:
        if gram.dtype != torch.float64:
            _fail("gram must be float64, got ", gram.dtype)
        if _shape(gram) != [L, P, d + 1, d + 1]:
            _fail("gram must be [", L, ", ", P, ", ", d + 1, ", ", d + 1, "], got ", _shape(gram))
        if gram.device != e.device:
            _fail("gram is on ", gram.device, " but e is on ", e.device)
    return code, kept, lam, threshold


# ---------------------------------------------------------------- packed weights (quant_args.cpp)
_TILE_N, _MAX_DIM = _qf.TILE_N, 1 << 40


def packed_args(data: Tensor, scale: Tensor, zero: Tensor, perm: Tensor, buckets, in_features: int,
                out_features: int, group_size: int, values: bool = True) -> int:
    """csrc/quant_args.cpp check_packed (+ check_perm_values on CPU tensors, as the CPU op):
    the packed rows."""
    if not (data.dtype == torch.uint8 and data.dim() == 1 and data.is_contiguous()):
        _fail("packed data must be a contiguous 1-D uint8 tensor, got ", data.dtype, " ", _shape(data))
    if in_features < 0 or out_features < 0:
        _fail("in_features and out_features must be >= 0")
    if group_size != 0 and group_size not in _qf.GROUP_SIZES:
        _fail("group_size must be 0 (per channel), 32, 64 or 128, got ", group_size)
    if in_features > _MAX_DIM or out_features > _MAX_DIM:
        _fail("in_features and out_features must be at most 2^40")
    if len(buckets) % 4:
        _fail("buckets must hold (bits, row_start, rows, byte_offset) quadruples, got ", len(buckets), " values")
    groups = _qf.n_groups(in_features, group_size)
    rows = nbytes = 0
    tile_blocks = _qf.padded_k(in_features) // _qf.TILE_K
    for i in range(0, len(buckets), 4):
        bits, row_start, brows, offset = buckets[i:i + 4]
        if bits not in _qf.BIT_WIDTHS:
            _fail("bucket bits must be 2, 4, 6 or 8, got ", bits)
        if not (brows >= 0 and brows % _TILE_N == 0 and brows <= _MAX_DIM):
            _fail("bucket rows must be a multiple of ", _TILE_N, " (at most 2^40), got ", brows)
        if row_start != rows or offset != nbytes:
            _fail("buckets must be contiguous and in order (bucket ", i // 4, ")")
        tile = tile_blocks * _qf.block_bytes(bits)
        if tile and brows // _TILE_N > (data.numel() - nbytes) // tile:
            _fail("packed data holds ", data.numel(), " bytes, fewer than the buckets need (bucket ", i // 4, ")")
        rows += brows
        nbytes += brows // _TILE_N * tile
    if nbytes != data.numel():
        _fail("packed data holds ", data.numel(), " bytes, the buckets need ", nbytes)
    if rows < out_features:
        _fail(rows, " packed rows cannot hold ", out_features, " channels")
    perm_type = _qf.perm_dtype(out_features)
    for t, name, dtype in ((scale, "scale", torch.float32), (zero, "zero", torch.uint8), (perm, "perm", perm_type)):
        grouped = group_size > 0 and name != "perm"
        shape = [groups, rows] if grouped else [rows]
        if t.dtype != dtype or _shape(t) != shape or not t.is_contiguous():
            _fail("packed ", name, " must be a contiguous ", shape, " ", dtype, " tensor (group_size ", group_size,
                  "), got ", t.dtype, " ", _shape(t))
        if t.device != data.device:
            _fail("packed ", name, " is on ", t.device, " but data is on ", data.device)
    if values and perm.device.type == "cpu" and concrete(perm):
        check_perm_values(perm, out_features)
    return rows


def check_perm_values(perm: Tensor, n: int) -> None:
    """perm maps the packed rows onto [0, n) once each, -1 on padding rows (check_perm_values)."""
    p = perm.long()
    bad = (p < -1) | (p >= n)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        _fail("packed perm is not a permutation of [0, ", n, ") (entry ", i, " = ", int(p[i]), ")")
    hits = torch.bincount(p[p >= 0], minlength=n) if n else p.new_zeros(0)
    if bool((hits > 1).any()):
        col = int((hits > 1).nonzero()[0, 0])
        i = int((p == col).nonzero()[1, 0])
        _fail("packed perm is not a permutation of [0, ", n, ") (entry ", i, " = ", col, ")")
    if int((hits == 1).sum()) != n:
        _fail("packed perm covers ", int((hits == 1).sum()), " of ", n, " channels")


def packed_linear_args(x: Tensor, in_features: int, out_features: int, bias: Optional[Tensor], data: Tensor) -> None:
    """csrc/quant_args.cpp check_linear_inputs."""
    if x.dtype not in FLOAT_DTYPES:
        _fail("x must be float32, float64, float16 or bfloat16, got ", x.dtype)
    if x.dim() < 1 or x.shape[-1] != in_features:
        _fail("x has ", x.shape[-1] if x.dim() else 0, " input features but the packed weight has ", in_features)
    if x.device != data.device:
        _fail("x is on ", x.device, " but the packed weight is on ", data.device)
    if bias is not None:
        if not (bias.dtype.is_floating_point and bias.dim() == 1 and bias.shape[0] == out_features):
            _fail("bias must be a floating [", out_features, "] tensor, got ", bias.dtype, " ", _shape(bias))
        if bias.device != x.device:
            _fail("bias is on ", bias.device, " but x is on ", x.device)


# ---------------------------------------------------------------- nearest prototype (search_cpu.cpp)
def search_args(x: Tensor, prototypes: Tensor, k: int, metric: str) -> None:
    if x.device != prototypes.device:
        _fail("x and prototypes must be on one device, got ", x.device, " and ", prototypes.device)
    if x.dim() != 2:
        _fail("x must be [B, d], got shape ", _shape(x))
    if prototypes.dim() != 2:
        _fail("prototypes must be [N, d], got shape ", _shape(prototypes))
    if not (x.dtype.is_floating_point and prototypes.dtype.is_floating_point):
        _fail("x and prototypes must be floating, got ", x.dtype, " and ", prototypes.dtype)
    if x.shape[1] != prototypes.shape[1]:
        _fail("x has ", x.shape[1], " features but prototypes have ", prototypes.shape[1])
    if not (1 <= k <= prototypes.shape[0]):
        _fail("k must be in [1, N = ", prototypes.shape[0], "], got ", k)
    if metric not in _names.METRICS:
        _fail("metric must be 'l2', 'ip' or 'cosine', got '", metric, "'")


# ---------------------------------------------------------------- Python-only arguments (public functions)
# The format and names come from the shared modules the oracle uses too; these are the
# production side's checks (the oracle keeps its own, so a bad check cannot hide in both).
def group_size(g, name: str = "group_size") -> Optional[int]:
    """None (one scale per channel) or one of quant_format.GROUP_SIZES."""
    if g is None:
        return None
    if isinstance(g, bool) or not isinstance(g, int):
        raise TypeError(f"{name} must be None or an int in {_qf.GROUP_SIZES}, got {type(g).__name__}")
    if g not in _qf.GROUP_SIZES:
        raise ValueError(f"{name} must be None (per channel) or one of {_qf.GROUP_SIZES}, got {g}")
    return g


def bit_widths(bits, name: str, length: Optional[int] = None) -> Tensor:
    """Bit widths as int64 [C], each in quant_format.BIT_WIDTHS. An integer (Python, NumPy or a
    0-d tensor) is broadcast to length; a list or tuple of them is a [C] tensor."""
    if isinstance(bits, Tensor) and bits.dim() == 0 and length is not None and not bits.dtype.is_floating_point:
        bits = bits.item()
    if isinstance(bits, numbers.Integral) and not isinstance(bits, bool) and length is not None:
        bits = torch.full((length,), int(bits), dtype=torch.int64)
    if isinstance(bits, (list, tuple)) and all(isinstance(b, numbers.Integral) and not isinstance(b, bool)
                                               for b in bits):
        bits = torch.tensor([int(b) for b in bits], dtype=torch.int64)
    if not isinstance(bits, Tensor) or bits.dtype == torch.bool or bits.is_complex():
        got = bits.dtype if isinstance(bits, Tensor) else type(bits).__name__
        raise TypeError(f"{name} must be an integer (or integral float) tensor, got {got}")
    if bits.dim() != 1 or (length is not None and bits.shape[0] != length):
        want = f"[{length}]" if length is not None else "1-D"
        raise ValueError(f"{name} must have shape {want}, got {tuple(bits.shape)}")
    ok = torch.isin(bits, torch.tensor(_qf.BIT_WIDTHS, dtype=bits.dtype, device=bits.device))
    if not bool(ok.all()):
        raise ValueError(f"{name} must be in {{{', '.join(map(str, sorted(_qf.BIT_WIDTHS)))}}}, "
                         f"got {bits[~ok][0].item()}")
    return bits.to(torch.int64)


def _count(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def kmeans_args(x, n_clusters, n_iter, init, seed, metric, tol) -> tuple:
    """Checked (n_clusters, n_iter, seed) of a k-means fit of x [B, d] (finite)."""
    float_tensor(x, "x")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [B, d], got shape {tuple(x.shape)}")
    if metric not in _names.METRICS:
        raise ValueError(f"metric must be one of {_names.METRICS}, got {metric!r}")
    n_clusters = _count(n_clusters, "n_clusters", 1)
    if n_clusters > x.shape[0]:
        raise ValueError(f"n_clusters must be <= the number of points ({x.shape[0]}), got {n_clusters}")
    n_iter, seed = _count(n_iter, "n_iter", 0), _count(seed, "seed", 0)
    if init not in _names.KMEANS_INITS:
        raise ValueError(f"init must be one of {_names.KMEANS_INITS}, got {init!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    # each feature's min and max are finite exactly when every entry is (NaN propagates): one
    # pass, no mask, and the ranges the float32 checks below need
    if x.numel():
        lo, hi = torch.aminmax(x, dim=0)
        if not bool(torch.isfinite(lo).all() & torch.isfinite(hi).all()):
            raise ValueError("x must be finite (no NaN or inf)")
        if x.dtype != torch.float64:
            _float32_kmeans_range(lo.double(), hi.double(), x.shape[0], metric)
    return n_clusters, n_iter, seed


def _float32_kmeans_range(lo: Tensor, hi: Tensor, points: int, metric: str) -> None:
    """k-means below float64 runs in float32: refuse points whose cluster sums (at most
    points x max|x|), inner products (||x|| <= sqrt(d) max|x|, ip) or squared distances (at most
    the squared diagonal of their bounding box, l2) could overflow it."""
    limit = 2.0 ** 127
    top = float(torch.maximum(lo.abs(), hi.abs()).max())
    fix = "; pass x as float64 or rescale it"
    if metric != "cosine" and top * points >= limit:
        raise ValueError(f"x holds magnitudes up to {top:.3g}: the sum of its {points} points could overflow "
                         f"float32{fix}")
    if metric == "ip" and top * math.sqrt(lo.numel()) >= limit:
        raise ValueError(f"x holds magnitudes up to {top:.3g}: ip k-means would overflow its float32 inner "
                         f"products{fix}")
    if metric == "l2" and float((hi - lo).square().sum()) >= limit:
        raise ValueError(f"x spans {float((hi - lo).square().sum().sqrt()):.3g} (its bounding box's diagonal): "
                         f"l2 k-means would overflow its float32 squared distances{fix}")


def search_inputs(x, prototypes, k, metric) -> None:
    """pyeditor.nearest_prototype's arguments (TypeError / ValueError naming the argument)."""
    # the passing case reads a few attributes and calls nothing: a one-device search is that small
    if not (isinstance(x, Tensor) and isinstance(prototypes, Tensor)
            and x.dtype in FLOAT_DTYPES and prototypes.dtype in FLOAT_DTYPES):
        float_tensor(x, "x")
        float_tensor(prototypes, "prototypes")
    if not (x.is_cpu and prototypes.is_cpu) and x.device != prototypes.device:
        same_device(x, "x", prototypes=prototypes)
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D [B, d], got shape {tuple(x.shape)}")
    ps = prototypes.shape
    if len(ps) != 2:
        raise ValueError(f"prototypes must be 2-D [N, d], got shape {tuple(ps)}")
    n, d = ps
    if x.size(1) != d:
        raise ValueError(f"x has {x.shape[1]} features but prototypes have {d}")
    if metric not in _names.METRICS:
        raise ValueError(f"metric must be one of {_names.METRICS}, got {metric!r}")
    if type(k) is not int:
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if n == 0:
        raise ValueError("prototypes must hold at least one row (N >= 1)")
    if k < 1 or k > n:
        raise ValueError(f"k must be in [1, N = {n}], got {k}")


def packed_linear_inputs(x, packed, bias, fast) -> torch.device:
    """pyeditor.packed_linear's arguments past the packed weight's type (checked by its module);
    returns x's device. Written out (no helper calls, x.device read once): it runs on every
    layer of every token, where each Python step shows (bench/cases_quant.py, packed_linear/*/M1)."""
    p = packed
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension [..., in]")
    if x.size(-1) != p.in_features:
        raise ValueError(f"x has {x.size(-1)} input features but the packed weight has {p.in_features} "
                         f"(shape {p.shape})")
    device = x.device
    if device != p.data.device:
        raise ValueError(f"x is on {device} but packed is on {p.data.device}")
    if bias is not None:
        float_tensor(bias, "bias")
        if bias.device != device:
            raise ValueError(f"bias is on {bias.device} but packed is on {p.data.device}")
        if bias.dim() != 1 or bias.shape[0] != p.out_features:
            raise ValueError(f"bias must have shape [{p.out_features}], got {tuple(bias.shape)}")
    if not isinstance(fast, bool):
        raise TypeError(f"fast must be a bool, got {type(fast).__name__}")
    return device


def packed_mode_flags(fast, bf16) -> None:
    """quant_linear's mode flags: bools, at most one set (the C++ op's mode_activations check)."""
    if not isinstance(fast, bool):
        raise TypeError(f"fast must be a bool, got {type(fast).__name__}")
    if not isinstance(bf16, bool):
        raise TypeError(f"bf16 must be a bool, got {type(bf16).__name__}")
    if fast and bf16:
        raise ValueError("fast (int8 activations) and bf16 (bfloat16 activations) exclude each other: pass at most "
                         "one")

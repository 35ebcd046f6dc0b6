"""torch.nn modules built on pyeditor's ops: CHORD's packed layers and Persona's edited layers."""
from __future__ import annotations

import fnmatch
import itertools
import numbers
import os
import warnings
from collections.abc import Mapping
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import backends as _backends
from . import calibration as _calibration
from . import ops as _ops
from . import quant as _quant
from . import quant_format as _fmt
from . import validate as _validate
from .quantizers import CALIBRATED_METHODS as _CALIBRATED_METHODS


class PackedLinear(nn.Module):
    """A frozen nn.Linear whose weight is channel-wise 2/4/6/8-bit packed (CHORD).

    forward(x) = x @ W.T + bias with W the dequantized packed weight, computed by
    :func:`pyeditor.quant.packed_linear` (gradients flow to x and bias), returned in x's dtype
    (float32, float64, float16 or bfloat16).

    State: the packed tensors are buffers (``data`` uint8, ``scale`` float32, ``zero`` uint8,
    ``perm`` int16/int32, ``buckets`` and ``bits`` int64, ``group`` an int64 scalar: the inputs
    per scale, 0 for one scale per output channel), so ``state_dict`` / ``load_state_dict``
    (also through safetensors) round-trip bit for bit; loading checks that the tensors describe a
    valid packed weight of this layer's declared shape (see :func:`load_quantized` to rebuild
    the layers of a freshly constructed float model). Checkpoints saved before ``group`` existed
    still load (one scale per channel).

    dtype casts: ``.to(torch.bfloat16)`` / ``.half()`` / ``.double()`` on the layer or a model
    holding it cast the bias but leave the packed buffers exactly as they are (the scale stays
    float32); device moves move them.

    ``weight`` (read-only property): the dequantized weight [out, in] in the layer's floating
    dtype (the bias's, else that of the last dtype cast, float32 by default), so that modules
    reading ``.weight`` of their linears directly still work: ``nn.MultiheadAttention`` (its
    ``out_proj`` goes through ``F.multi_head_attention_forward`` or the native fast path) and
    the eval fast path of ``nn.TransformerEncoderLayer``. Each access dequantizes the whole
    weight (a transient float copy: those code paths use the float matmul, not the packed
    kernel, and save no memory traffic, and ``mode`` does not apply there), and it carries no
    gradient to the packed codes. After a cast to bfloat16 / float16 it is rounded to that dtype,
    while the kernel multiplies by the float32 weight: compare outputs with
    ``F.linear(x, layer.dequantize(), layer.bias)`` rather than with ``.weight``.

    ``mode`` (settable attribute; ``fast=True`` is its deprecated spelling of "int8act"), with
    W the dequantized weight (codes - zero) * scale, exactly representable in float32:

    * ``"exact"`` (default, the verification mode): y = x @ W.T + bias with float32
      accumulation (float64 for float64 x), within float32 rounding of the reference. Most
      kernels sum centred codes, (q - z) * x, as the reference's (q - z) * s does, or exact
      integer sums. The exceptions are C++ CPU kernels: at 1-2 rows, the one-row kernels on CPUs
      without AVX-512 VNNI (or over 65536 input features) and the 2-bit lookup tables on
      AVX-512 VNNI without AMX sum codes against x in float32 and subtract zero point times
      sum(x) after, and one-row calls on AVX-512 VNNI hold the row as a 46-bit fixed-point copy;
      per-channel calls of 9+ rows on AMX (bf16 GEMM) use the factored form too. A product of a
      huge input with a code at its zero point, which the reference does not form, is then
      rounded: about 2^-24 * scale * zero * |x_i| (10^-3-10^-2 of the row's sum of |x| |W| for
      an input 10^4-10^6 times the rest; the whole rest from about 10^10 times, as the fixed-point
      copy loses it too). So a call of 1-2 rows where a row is dominated by a few inputs (at most
      max(1, in_features / 64) of them within 2^8 of its largest) takes the centred kernels
      instead, at some cost in speed: outliers of that kind keep float32 rounding on every path
      but AMX's 9+ rows; rows with more inputs far above the rest may still show the error there.
    * ``"int8act"``: each row of x (as float32) is quantized to int8, symmetric, one scale per
      row: s = max_k |x[k]| / 127 (1 for an all-zero row), q = clamp(round half to even(x / s),
      -127, 127); y = s * (q @ W.T) with exact integer dot products of q with the codes, the
      scales applied in float32 / float64 after, + bias. Every input moves by at most s / 2, so

          |y[n] - (x @ W.T)[n]| <= (max_k |x[k]| / 254) * sum_k |W[n, k]|

      per row and output (:func:`pyeditor.quant.int8act_error_bound`), plus the float32
      rounding of exact mode; an outlier in a row widens that row's bound. Gradients are those
      of the exact layer. It is a kernel of the C++ CPU backend (in_features <= 65536); float64
      x, rows holding inf or NaN, and the other backends (reference, Triton, CUDA) get exact
      mode's result, which meets the same bound.
    * ``"bf16"``: x is rounded to bfloat16 (to nearest even; a bfloat16 x as it is), then
      multiplied as in exact mode: the codes are exact in bfloat16, so the products are exact
      and summed in float32, and only the activations' rounding is added:

          |y[n] - (x @ W.T)[n]| <= sum_k (2^-8 |x[k]| + 2^-134) |W[n, k]|

      (:func:`pyeditor.quant.bf16_error_bound`; inputs past bfloat16's largest finite value,
      about 3.396e38, round to +-inf) plus exact mode's float32 rounding (and its caveat). The
      output keeps x's dtype (a float16 x is rounded and summed in float32, as bfloat16 values
      can pass float16's range); gradients are those of the exact layer. Every backend rounds
      the same way. Speed: the Triton GEMM (16+ rows) multiplies in bf16 on the
      tensor cores; the C++ CPU and CUDA kernels run exact mode's kernels on the rounded x (about
      exact mode's speed on CPUs without bf16 instructions, the only ones measured so far). A
      bfloat16 or float16 x in exact mode also takes the Triton tensor-core dot: the same exact
      products, summed in the tensor cores' float32 accumulation.
    """

    _KEYS = ("data", "scale", "zero", "perm", "buckets", "bits")  # required in a state_dict
    _OPTIONAL_KEYS = ("group",)  # inferred when absent (state_dicts from before group-wise scales)

    def __init__(self, packed: _quant.PackedWeight, bias: Optional[Tensor] = None, *, mode: Optional[str] = None,
                 fast: Optional[bool] = None, backend: Optional[str] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if not isinstance(packed, _quant.PackedWeight):
            raise TypeError(f"packed must be a pyeditor.quant.PackedWeight, got {type(packed).__name__}")
        mode = _resolve_mode(mode, fast, "PackedLinear")
        if bias is not None:
            if not isinstance(bias, Tensor) or not bias.is_floating_point():
                raise TypeError(f"bias must be None or a floating tensor, got {_describe(bias)}")
            if tuple(bias.shape) != (packed.out_features,):
                raise ValueError(f"bias must have shape [{packed.out_features}], got {tuple(bias.shape)}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.mode, self.backend = mode, backend
        self._weight_dtype = dtype or (bias.dtype if bias is not None else torch.float32)
        self._set(packed)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)

    def _set(self, p: _quant.PackedWeight) -> None:
        for name, t in zip(("data", "scale", "zero", "perm"), p.tensors()):
            self.register_buffer(name, t)
        self.register_buffer("buckets", torch.tensor(p.buckets, dtype=torch.int64).reshape(-1, 4))
        self.register_buffer("bits", p.bits)
        self.register_buffer("group", torch.tensor(p.group_size or 0, dtype=torch.int64))
        self._bucket_list = p.buckets  # plain ints: no device sync or graph break per forward
        self.group_size = p.group_size
        # forward's call plan: the ops' int[] buckets and int group size, built once per packed
        # weight (set here at construction and by load_state_dict, never per call)
        self._flat_buckets = p.flat_buckets
        self._op_group_size = p.op_group_size
        self._backend_plan = None  # (device, backend or $PYEDITOR_BACKEND, resolved name) of the last call

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits, group_size: Optional[int] = None, *, mode: Optional[str] = None,
                    fast: Optional[bool] = None, backend: Optional[str] = None,
                    **quantize_kwargs) -> "PackedLinear":
        """Quantize linear.weight to ``bits`` (int or [out] in {2, 4, 6, 8}) with one scale per
        output channel (group_size None) or per group of 32, 64 or 128 inputs; extra keywords go
        to :func:`pyeditor.quant.quantize_channelwise`. The bias is copied (same dtype). ``mode``:
        see the class docstring (``fast`` its deprecated spelling)."""
        mode = _resolve_mode(mode, fast, "PackedLinear.from_linear")
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        if linear.weight.is_meta:
            raise ValueError("linear.weight is on the meta device: there is no weight to quantize "
                             "(materialize the model first, or use pyeditor.nn.load_quantized)")
        packed = _quant.quantize_channelwise(linear.weight.detach(), bits, group_size=group_size, **quantize_kwargs)
        return cls(packed, linear.bias, mode=mode, backend=backend, dtype=linear.weight.dtype)

    @property
    def mode(self) -> str:
        """"exact", "int8act" or "bf16" (see the class docstring); settable."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._mode = _quant.check_mode(value)
        self._fast, self._bf16 = _quant.mode_flags(value)  # the op's flags, read by forward

    @property
    def fast(self) -> bool:
        """mode == "int8act" (the earlier name; setting it is deprecated: set ``mode``)."""
        return self._fast

    @fast.setter
    def fast(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"fast must be a bool, got {type(value).__name__}")
        mode = "int8act" if value else "exact"
        warnings.warn(_FAST_DEPRECATED.format(where="PackedLinear.fast", value=value, mode=mode), FutureWarning,
                      stacklevel=3)  # past nn.Module.__setattr__
        self.mode = mode

    @property
    def packed(self) -> _quant.PackedWeight:
        return _quant.PackedWeight(self.data, self.scale, self.zero, self.perm,
                                   self._bucket_list, self.bits,
                                   self.in_features, self.out_features, self.group_size)

    @property
    def packed_bytes(self) -> int:
        """Bytes of the packed weight (codes + scale, zero point, permutation); bias not counted."""
        return self.packed.nbytes

    @property
    def weight(self) -> Tensor:
        """The dequantized weight [out, in] in the layer's floating dtype: one dequantize per
        access, no gradient (see the class docstring)."""
        dtype = self.bias.dtype if self.bias is not None else self._weight_dtype
        return self.dequantize().to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        # M = 1 decoding runs this once per layer and token. The packed buffers and the bias were
        # checked when set (construction, load_state_dict; the op checks them again), so only x
        # is checked here and the op is called directly on the buffers: no PackedWeight built
        # and no Module.__getattr__ lookups per call (they cost several times the checks).
        buffers = self._buffers
        data = buffers["data"]
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _validate.FLOAT_DTYPES:
            raise TypeError(f"x must be float32, float64, float16 or bfloat16, got {x.dtype}")
        if x.dim() < 1:
            raise ValueError("x must have at least 1 dimension [..., in_features]")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x has {x.shape[-1]} input features but the layer has in_features={self.in_features} "
                             f"(x shape {tuple(x.shape)})")
        device = x.device
        if device != data.device:
            raise ValueError(f"x is on {device} but the layer's packed weight is on {data.device}")
        bias = self._parameters.get("bias")  # None also when the bias is a plain None attribute
        # the backend as packed_linear picks it (self.backend, else $PYEDITOR_BACKEND read per
        # call, else the device's default), resolved again only when the device or choice changes
        choice = self.backend or _backends.env(_backends.ENV_VAR)
        plan = self._backend_plan
        if plan is None or plan[0] != device or plan[1] != choice:
            plan = self._backend_plan = (device, choice, _backends.resolve(self.backend, device))
        name = plan[2]
        if name == "reference":
            return _quant.packed_linear(x, self.packed, bias, mode=self._mode, backend=name)
        return _ops.quant_ops(name)[0](x, data, buffers["scale"], buffers["zero"], buffers["perm"],
                                       self._flat_buckets, self.in_features, self.out_features, bias, self._fast,
                                       self._op_group_size, self._bf16)

    def dequantize(self) -> Tensor:
        return self.packed.dequantize(backend=self.backend)

    def __setstate__(self, state):
        # a layer pickled whole (torch.save(model)) before forward's call plan existed
        super().__setstate__(state)
        if "_mode" not in self.__dict__:  # pickled before mode=: its fast flag
            self.mode = "int8act" if self.__dict__.pop("fast", False) else "exact"
        if "_bf16" not in self.__dict__:  # pickled before the bf16 mode
            self.mode = self._mode
        if "_flat_buckets" not in self.__dict__:
            self._flat_buckets = [v for b in self._bucket_list for v in b]
            self._op_group_size = self.group_size or 0
            self._backend_plan = None

    def _apply(self, fn, recurse=True):
        """Device moves move the packed buffers; dtype casts (``.half()``, ``.to(torch.bfloat16)``,
        ...) do not touch them: a buffer whose dtype ``fn`` changed is put back, bit for bit, on
        the device ``fn`` chose. The bias is cast as usual."""
        before = {name: self._buffers[name] for name in self._KEYS + self._OPTIONAL_KEYS}
        try:  # where fn sends this layer's floating dtype (.to(device) keeps it, .half() changes it)
            probe = fn(torch.empty(0, dtype=self._weight_dtype, device=before["scale"].device))
            if isinstance(probe, Tensor) and probe.is_floating_point():
                self._weight_dtype = probe.dtype
        except Exception:  # an fn that only handles particular tensors: keep the dtype
            pass
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def extra_repr(self) -> str:
        widths = {b: int((self.bits == b).sum()) for b in _quant.WIDTHS}
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}, mode={self.mode!r}, channels per width={widths}, "
                f"packed_bytes={self.packed_bytes}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        present = [k for k in self._KEYS if prefix + k in state_dict]
        if present and len(present) < len(self._KEYS):
            # a partial packed weight cannot be loaded (strict or not): its tensors depend on each other
            missing = [prefix + k for k in self._KEYS if k not in present]
            raise ValueError(f"state_dict for PackedLinear {prefix!r} holds {[prefix + k for k in present]} "
                             f"but misses {missing}")
        if present:
            packed = _validated_prefixed(state_dict, prefix, self.in_features, self.out_features)
            # what the base class copies (or assigns): the validated tensors (an int32 perm of an
            # older state_dict as int16; group inferred when absent). state_dict is load_state_dict's copy.
            for name, t in zip(("data", "scale", "zero", "perm"), packed.tensors()):
                state_dict[prefix + name] = t
            if prefix + "group" not in state_dict:
                state_dict[prefix + "group"] = torch.tensor(packed.group_size or 0, dtype=torch.int64)
            # the packed shapes depend on the widths: fresh buffers of the new shapes, which the
            # base class fills (copies, so the layer never aliases the caller's tensors) or replaces (assign)
            dev = self.data.device
            self._set(_quant.PackedWeight(*(torch.empty_like(t, device=dev) for t in packed.tensors()),
                                          packed.buckets, torch.empty_like(packed.bits, device=dev),
                                          packed.in_features, packed.out_features, packed.group_size))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def _describe(v) -> str:
    return f"a {v.dtype} tensor" if isinstance(v, Tensor) else type(v).__name__


_FAST_DEPRECATED = ("{where}: fast={value} is deprecated, pass mode={mode!r} instead (fast=True is "
                    "mode='int8act', fast=False mode='exact')")


def _resolve_mode(mode: Optional[str], fast: Optional[bool], where: str) -> str:
    """The mode from ``mode=`` and the deprecated ``fast=`` (a FutureWarning when fast is given;
    ValueError when both are given and disagree)."""
    if fast is not None and not isinstance(fast, bool):
        raise TypeError(f"fast must be a bool, got {type(fast).__name__}")
    if mode is not None:
        mode = _quant.check_mode(mode)
    if fast is None:
        return "exact" if mode is None else mode
    implied = "int8act" if fast else "exact"
    if mode is not None and mode != implied:
        raise ValueError(f"{where}: fast={fast} conflicts with mode={mode!r} (fast=True means mode='int8act'); "
                         "pass mode only")
    warnings.warn(_FAST_DEPRECATED.format(where=where, value=fast, mode=implied), FutureWarning, stacklevel=3)
    return implied


def _validated_prefixed(state_dict, prefix: str, k: int, n: int) -> _quant.PackedWeight:
    """_validated on the keys ``prefix + name`` of a state_dict; ValueError naming the key."""
    got = {name: state_dict[prefix + name] for name in PackedLinear._KEYS}
    if prefix + "group" in state_dict:
        got["group"] = state_dict[prefix + "group"]
    try:
        return _validated(got, k, n, prefix=prefix)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"state_dict for PackedLinear {prefix!r} (in_features={k}, out_features={n}) is not a "
                         f"valid packed weight: {exc}") from exc


def _group_size_of(t: dict, k: int, key) -> Optional[int]:
    """group_size from the ``group`` tensor, or (absent) from the shape of ``scale``: 1-D is one
    scale per channel; [G, rows] the group size with ceil(k / size) == G (any of them when
    G == 1: all give the same weight)."""
    g = t.get("group")
    if g is not None:
        if not isinstance(g, Tensor) or g.dtype != torch.int64 or g.numel() != 1:
            raise TypeError(f"{key('group')} must be an int64 tensor with one value, got "
                            f"{_describe(g) if not isinstance(g, Tensor) else f'{g.dtype} {tuple(g.shape)}'}")
        v = int(g.reshape(()).item())
        if v == 0:
            return None
        if v not in _fmt.GROUP_SIZES:
            raise ValueError(f"{key('group')} must be 0 (one scale per channel) or one of {_fmt.GROUP_SIZES}, "
                             f"got {v}")
        return v
    scale = t["scale"]
    if not isinstance(scale, Tensor) or scale.dim() != 2:
        return None
    fits = [s for s in _fmt.GROUP_SIZES if _fmt.n_groups(k, s) == scale.shape[0]]
    if not fits:
        raise ValueError(f"{key('scale')} has {scale.shape[0]} groups, which no group size in "
                         f"{_fmt.GROUP_SIZES} gives for {k} inputs")
    return fits[-1] if scale.shape[0] == 1 else fits[0]


def _validated(t: dict, k: int, n: int, *, prefix: str = "") -> _quant.PackedWeight:
    """A PackedWeight from state_dict tensors (data, scale, zero, perm, buckets, bits and,
    optionally, group) after checking they are consistent with each other and with a layer of
    ``k`` inputs and ``n`` outputs. Errors name the key (``prefix + name``)."""
    def key(name: str) -> str:
        return repr(prefix + name)

    want = {"data": torch.uint8, "scale": torch.float32, "zero": torch.uint8, "perm": _quant.perm_dtype(n),
            "buckets": torch.int64, "bits": torch.int64}
    t = dict(t)
    if isinstance(t["perm"], Tensor) and t["perm"].dtype == torch.int32 and want["perm"] == torch.int16:
        # saved before the permutation became int16 for layers of < 2^15 channels: same values
        if t["perm"].numel() and not (-1 <= int(t["perm"].min()) and int(t["perm"].max()) < n):
            raise ValueError(f"{key('perm')} must hold channels in [0, {n}) or -1")
        t["perm"] = t["perm"].to(torch.int16)
    for name, dtype in want.items():
        if not isinstance(t[name], Tensor) or t[name].dtype != dtype:
            raise TypeError(f"{key(name)} must be a {dtype} tensor, got {_describe(t[name])}")
    group_size = _group_size_of(t, k, key)
    buckets = t["buckets"].cpu()
    if buckets.dim() != 2 or buckets.shape[1] != 4:
        raise ValueError(f"{key('buckets')} must have shape [B, 4], got {tuple(buckets.shape)}")
    bits = t["bits"].cpu()
    if tuple(bits.shape) != (n,):
        raise ValueError(f"{key('bits')} must have shape [{n}] (out_features={n}), got {list(bits.shape)}")
    if not bool(torch.isin(bits, torch.tensor(_quant.WIDTHS)).all()):
        raise ValueError(f"{key('bits')} must hold values in {{2, 4, 6, 8}}")
    row = offset = 0
    kp = _quant.padded_k(k)
    perm = t["perm"].cpu().long()
    for b, start, rows, off in buckets.tolist():
        if b not in _quant.WIDTHS or start != row or off != offset or rows <= 0 or rows % _quant.TILE_N:
            raise ValueError(f"{key('buckets')}: bucket {(b, start, rows, off)} is not a contiguous tile-aligned "
                             f"bucket")
        chans = perm[start:start + rows]
        chans = chans[chans >= 0]
        if chans.numel() and not bool((chans < n).all() and (bits[chans.clamp(0, n - 1)] == b).all()):
            raise ValueError(f"the {b}-bit bucket of {key('perm')} holds channels whose {key('bits')} are not {b}")
        row += rows
        offset += rows // _quant.TILE_N * (kp // _quant.TILE_K) * _fmt.block_bytes(b)
    if t["data"].shape != (offset,):
        raise ValueError(f"{key('data')} must hold {offset} bytes for in_features={k} and these buckets, got "
                         f"{tuple(t['data'].shape)}")
    if t["perm"].shape != (row,):
        raise ValueError(f"{key('perm')} must have shape [{row}], got {tuple(t['perm'].shape)}")
    groups = _fmt.n_groups(k, group_size)
    per_row = (row,) if group_size is None else (groups, row)
    for name in ("scale", "zero"):
        if t[name].shape != per_row:
            what = "" if group_size is None else f" (group_size={group_size}: {groups} groups of in_features={k})"
            raise ValueError(f"{key(name)} must have shape {list(per_row)}{what}, got {list(t[name].shape)}")
    real = perm[perm >= 0]
    if real.numel() != n or (n and not torch.equal(torch.sort(real).values, torch.arange(n))):
        raise ValueError(f"{key('perm')} must map the packed rows onto the {n} channels exactly once")
    keep = perm >= 0
    g = 1 if group_size is None else groups
    scale = t["scale"].cpu().reshape(g, row)  # [G, rows] (G = 1 per channel)
    if not bool(torch.isfinite(scale).all()) or bool((scale[:, keep] <= 0).any()):
        raise ValueError(f"{key('scale')} must be finite and > 0")
    qmax = (1 << bits[real]) - 1  # per real packed row
    if bool((t["zero"].cpu().reshape(g, row)[:, keep].long() > qmax).any()):
        raise ValueError(f"{key('zero')} exceeds 2**bits - 1 for its channel")
    return _quant.PackedWeight(t["data"], t["scale"], t["zero"], t["perm"], [tuple(r) for r in buckets.tolist()],
                               bits, k, n, group_size)


# ---------------------------------------------------------------- quantize_model / load_quantized
_TIED = ("skip", "error", "untie")


def _linear_sites(model: nn.Module) -> dict:
    """{id(module): (module, [names])} for every nn.Linear, each module once with all the names
    it is registered under (a module shared by two parents keeps being shared)."""
    sites: dict = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, nn.Linear):
            sites.setdefault(id(m), (m, []))[1].append(name)
    return sites


def _tied_tensor_ids(model: nn.Module) -> set:
    """ids of the parameters and buffers that another module also holds: the same tensor object
    registered in two modules, or tensors whose memory overlaps (``nn.Parameter(other.weight)``,
    ``.data`` assignments)."""
    owners: dict = {}
    tensors: dict = {}
    for m in model.modules():
        for t in itertools.chain(m._parameters.values(), m._buffers.values()):
            if t is not None:
                owners.setdefault(id(t), set()).add(id(m))
                tensors[id(t)] = t
    tied = {i for i, mods in owners.items() if len(mods) > 1}
    spans: dict = {}
    for i, t in tensors.items():
        if t.is_meta or t.numel() == 0:
            continue
        try:
            storage = t.untyped_storage()
            base = storage.data_ptr()
        except (RuntimeError, NotImplementedError, TypeError):
            continue
        if base == 0:
            continue
        size = t.element_size()
        start = t.storage_offset() * size
        span = sum((s - 1) * st for s, st in zip(t.shape, t.stride())) * size + size
        spans.setdefault((t.device, base), []).append((start, start + span, i))
    for group in spans.values():
        if len(group) < 2:
            continue
        group.sort()
        for a, (start, end, i) in enumerate(group):
            for s2, _, j in group[a + 1:]:
                if s2 >= end:
                    break
                tied.update((i, j))
    return tied


def _skip_patterns(skip) -> Tuple[str, ...]:
    if isinstance(skip, str):
        skip = (skip,)
    try:
        patterns = tuple(skip)
    except TypeError:
        raise TypeError(f"skip must be an iterable of module names or fnmatch patterns, got "
                        f"{type(skip).__name__}") from None
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"skip must hold str module names or fnmatch patterns, got {type(p).__name__}")
    return patterns


def _skipped(name: str, patterns: Tuple[str, ...]) -> bool:
    """name matches a pattern, or lies inside a module the pattern names exactly."""
    return any(fnmatch.fnmatchcase(name, p) or name.startswith(p + ".") for p in patterns)


def quantize_model(model: nn.Module, bits=None, *, group_size: Optional[int] = None, skip=(),
                   mode: Optional[str] = None, fast: Optional[bool] = None,
                   backend: Optional[str] = None, tied: str = "skip", bits_for=None, calibration=None,
                   calibration_rows: int = 2048, sequential: bool = False, **quantize_kwargs) -> nn.Module:
    """Replace, in place, nn.Linear layers of ``model`` by PackedLinear; returns the model.

    bits: which layers, at which widths:
      * an int in {2, 4, 6, 8}: every nn.Linear (subclasses such as attention's ``out_proj``
        included);
      * a dict {module name: bits} (bits an int or an [out_features] tensor in {2, 4, 6, 8}, or
        None); layers it does not name stay float, and a name that is no nn.Linear of the
        model raises ValueError;
      * a callable (name, linear) -> bits or None (None keeps the layer float). The earlier
        ``quantize_model(model, bits_for)`` / ``bits_for=`` spelling still works.
    group_size: None (one scale per output channel) or 32, 64, 128 inputs per scale.
    skip: module names or fnmatch patterns (``"*.lm_head"``, ``"encoder.layers.0.*"``) to keep
      float, whatever ``bits`` says; a name also keeps every Linear inside that module.
    mode: every PackedLinear's compute mode, "exact" (default), "int8act" (int8 activations,
      one scale per row) or "bf16" (activations rounded to bfloat16); the error bounds are in
      PackedLinear's docstring. ``fast=True`` is the
      deprecated spelling of mode="int8act" (FutureWarning; ValueError if it contradicts mode).
    backend: passed to every PackedLinear. Other keywords go to
      :func:`pyeditor.quant.quantize_channelwise`.
    tied: a Linear whose weight (or bias) is shared with another module (the same Parameter,
      e.g. an lm_head tied to the token embedding, or overlapping memory) would be silently
      untied by quantization. "skip" (default): keep it float and warn naming it; "error":
      raise ValueError; "untie": quantize it anyway (the other module keeps the float tensor).
      A Linear *module* registered under several names is quantized once and stays shared.

    calibration: data for ``method="calibrated"`` (the default method when it is given) or
      ``method="gptq"`` (error feedback, usually the better of the two): a
      callable ``fn(model)`` that runs the model, a Tensor / tuple of positional arguments / dict
      of keyword arguments for ``model(...)``, or a list of those (batches); see
      :mod:`pyeditor.calibration`. Forward hooks collect every chosen layer's inputs while it
      runs (no_grad, in the model's current mode: call ``.eval()`` first so that dropout does not
      perturb them), and each layer is quantized with its own inputs. Memory: at most
      ``calibration_rows`` rows (a uniform sample beyond that) of float32 [in_features] per
      distinct layer input (layers reading the same tensor, like q/k/v, share them), all layers
      at once. A chosen layer the calibration never calls raises ValueError (skip it).
    sequential: with calibration, quantize layer by layer in the order the model first calls
      them (layers with one shared input together), each from the inputs the model produces with
      the layers before it already quantized (GPTQ's sequential order): the quantized layers
      then correct for the error upstream. Runs the calibration once per such step (plus once to
      find the order), and holds only one step's activations.

    Attention: nn.MultiheadAttention's ``out_proj`` (and the linears of
    nn.TransformerEncoderLayer, whose eval fast path reads ``.weight``) are quantized like any
    Linear; those code paths read PackedLinear.weight, which dequantizes on each access (see
    PackedLinear). Pass ``skip=("*.out_proj",)`` to keep them float instead. Separate q/k/v/o
    nn.Linear modules (Hugging Face style) go through the packed kernel.

    All layers are quantized before any is swapped: an error leaves the model unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Linear):
        raise ValueError("model itself is an nn.Linear; use PackedLinear.from_linear")
    if bits_for is not None:
        if bits is not None:
            raise TypeError("pass bits or bits_for (its earlier name), not both")
        if not callable(bits_for):
            raise TypeError("bits_for must be a callable (name, linear) -> bits or None")
        bits = bits_for
    if bits is None:
        raise TypeError("bits is required: an int, a dict {module name: bits} or a callable (name, linear) -> bits")
    if isinstance(bits, Tensor) and bits.dim() == 0 and not bits.dtype.is_floating_point and bits.dtype != torch.bool:
        bits = bits.item()  # a 0-d integer tensor, as an int
    if isinstance(bits, numbers.Integral) and not isinstance(bits, bool):
        bits = int(bits)  # NumPy integers too
    if isinstance(bits, bool) or not (isinstance(bits, (int, Mapping)) or callable(bits)):
        raise TypeError(f"bits must be an int in {{2, 4, 6, 8}}, a dict {{module name: bits}} or a callable "
                        f"(name, linear) -> bits or None, got {type(bits).__name__}")
    if isinstance(bits, int) and bits not in _quant.WIDTHS:
        raise ValueError(f"bits must be one of {_quant.WIDTHS}, got {bits}")
    group_size = _validate.group_size(group_size)
    patterns = _skip_patterns(skip)
    if tied not in _TIED:
        raise ValueError(f"tied must be one of {_TIED}, got {tied!r}")
    mode = _resolve_mode(mode, fast, "quantize_model")

    sites = _linear_sites(model)
    # an int asks for every linear: PackedLinear layers keep their codes (never re-quantized), so
    # say so rather than return as if they had the new width (a dict naming one raises below; a
    # second pass over the float layers left, by dict or callable, is quiet)
    packed = [n for n, m in model.named_modules() if isinstance(m, PackedLinear) and not _skipped(n, patterns)]
    if isinstance(bits, int) and packed:
        warnings.warn(f"quantize_model: {len(packed)} layer(s) are PackedLinear already ({packed[:3]}"
                      f"{' ...' if len(packed) > 3 else ''}) and keep their widths; quantize the float model "
                      "to choose other widths", UserWarning, stacklevel=2)
    if isinstance(bits, Mapping):
        names = {n for _, ns in sites.values() for n in ns}
        bad = [k for k in bits if not isinstance(k, str)]
        if bad:
            raise TypeError(f"bits dict keys must be module names (str), got {bad[0]!r}")
        unknown = sorted(k for k in bits if k not in names)
        if unknown:
            raise ValueError(f"bits names modules that are not nn.Linear layers of the model: {unknown}")

    def chosen(names: List[str], linear: nn.Linear):
        if any(_skipped(n, patterns) for n in names):
            return None
        if isinstance(bits, int):
            return bits
        if isinstance(bits, Mapping):
            return next((bits[n] for n in names if n in bits), None)
        return bits(names[0], linear)

    _check_calibration_args(calibration, calibration_rows, sequential, quantize_kwargs)

    tied_ids = _tied_tensor_ids(model) if tied != "untie" else set()
    todo, kept_tied = [], []
    for linear, names in sites.values():
        b = chosen(names, linear)
        if b is None:
            continue
        if id(linear.weight) in tied_ids or (linear.bias is not None and id(linear.bias) in tied_ids):
            kept_tied.append(names[0])
            continue
        todo.append((linear, names, b))
    if kept_tied:
        msg = (f"quantize_model: {kept_tied} share their weight (or bias) with another module (tied weights); "
               "quantizing would untie them")
        if tied == "error":
            raise ValueError(msg + "; pass tied='skip' to keep them float or tied='untie' to quantize them anyway")
        warnings.warn(msg + ", so they stay float (pass tied='untie' to quantize them anyway)", UserWarning,
                      stacklevel=2)

    def pack(linear: nn.Linear, names: List[str], b, **extra) -> Tuple[PackedLinear, List[str]]:
        try:
            layer = PackedLinear.from_linear(linear, b, group_size, mode=mode, backend=backend, **quantize_kwargs,
                                             **extra)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"quantize_model: layer {names[0]!r}: {exc}") from exc
        return layer, names

    if calibration is None:
        _swap_in(model, [pack(*t) for t in todo])
    elif not sequential:
        layers = {names[0]: linear for linear, names, _ in todo}
        acts, _ = _calibration.capture(model, layers, calibration, calibration_rows)
        _check_called(layers, acts)
        _swap_in(model, [pack(linear, names, b, activations=acts[names[0]]) for linear, names, b in todo])
    else:
        _quantize_sequential(model, todo, calibration, calibration_rows, pack)
    return model


def _check_calibration_args(calibration, rows, sequential, quantize_kwargs) -> None:
    """Checks calibration / calibration_rows / sequential against the quantizer keywords; sets
    method="calibrated" in quantize_kwargs when calibration is given without a method."""
    if not isinstance(sequential, bool):
        raise TypeError(f"sequential must be a bool, got {type(sequential).__name__}")
    if isinstance(rows, bool) or not isinstance(rows, int):
        raise TypeError(f"calibration_rows must be an int, got {type(rows).__name__}")
    if rows < 1:
        raise ValueError(f"calibration_rows must be >= 1, got {rows}")
    method = quantize_kwargs.get("method", "minmax")
    if calibration is None:
        if sequential:
            raise ValueError("sequential=True needs calibration= (it re-runs the calibration data layer by layer)")
        if method in _CALIBRATED_METHODS and quantize_kwargs.get("activations") is None:
            raise ValueError(f"method={method!r} needs calibration= (sample inputs for the model, or a callable "
                             "fn(model) that runs it) or activations= (one layer input shared by every layer)")
        return
    _calibration.check_calibration(calibration)
    if "activations" in quantize_kwargs:
        raise TypeError("pass calibration= (inputs of the model) or activations= (inputs of one layer), not both")
    if method not in _CALIBRATED_METHODS and "method" in quantize_kwargs:
        raise ValueError(f"calibration is only used by method in {_CALIBRATED_METHODS}, got method={method!r}")
    quantize_kwargs.setdefault("method", "calibrated")


def _check_called(layers: dict, acts: dict) -> None:
    silent = [name for name in layers if name not in acts]
    if silent:
        raise ValueError(f"quantize_model: calibration never called {silent}: no inputs to calibrate them on "
                         "(pass skip= to keep them float, or calibration data that reaches them)")


def _swap_in(model: nn.Module, plan) -> List[Tuple[nn.Module, List[str]]]:
    """Sets every (layer, names) of plan under all its names; returns what they replaced."""
    replaced = []
    for layer, names in plan:
        old = model.get_submodule(names[0])
        for name in names:
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, layer)
        replaced.append((old, names))
    return replaced


def _quantize_sequential(model: nn.Module, todo, calibration, rows: int, pack) -> None:
    """quantize_model's sequential=True: one step per group of layers sharing an input, in call
    order; each step captures its group's inputs from the model as quantized so far. An error
    puts the original layers back."""
    layers = {names[0]: linear for linear, names, _ in todo}
    entry = {names[0]: (linear, names, b) for linear, names, b in todo}
    groups = _calibration.input_groups(model, layers, calibration)
    _check_called(layers, {name: None for group in groups for name in group})
    done: List[Tuple[nn.Module, List[str]]] = []
    try:
        for group in groups:
            acts, _ = _calibration.capture(model, {name: layers[name] for name in group}, calibration, rows)
            _check_called({name: None for name in group}, acts)
            done += _swap_in(model, [pack(*entry[name], activations=acts[name]) for name in group])
    except BaseException:
        _swap_in(model, list(reversed(done)))
        raise


def _read_state_dict(src) -> dict:
    if isinstance(src, Mapping):
        sd = dict(src)
    elif isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not os.path.exists(path):
            raise FileNotFoundError(f"path_or_state_dict: no file {path!r}")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path, device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(sd, Mapping):
            raise TypeError(f"path_or_state_dict: {path!r} holds a {type(sd).__name__}, not a state_dict")
        sd = dict(sd)
    else:
        raise TypeError(f"path_or_state_dict must be a state_dict (a mapping of str to tensors) or a path, got "
                        f"{type(src).__name__}")
    for k, v in sd.items():
        if not isinstance(k, str):
            raise TypeError(f"state_dict keys must be str, got {k!r}")
        if not isinstance(v, Tensor):
            raise TypeError(f"state_dict[{k!r}] must be a tensor, got {type(v).__name__}")
    return sd


def load_quantized(model: nn.Module, path_or_state_dict, *, strict: bool = True, mode: Optional[str] = None,
                   fast: Optional[bool] = None, backend: Optional[str] = None) -> nn.Module:
    """Load a state_dict saved from a model after :func:`quantize_model` (``torch.save`` of its
    ``state_dict()``, or a ``.safetensors`` file) into ``model``, a freshly constructed float
    model of the same architecture; returns the model, changed in place.

    Every nn.Linear whose keys in the state_dict are packed (``data``, ``scale``, ``zero``,
    ``perm``, ``buckets``, ``bits`` and optionally ``group``) becomes a PackedLinear with the
    saved widths and group size (``mode`` and ``backend`` are given to it: the mode is not part
    of the saved state; ``fast`` is mode's deprecated spelling); the others load as
    float. The model may be built on the meta device (``with torch.device("meta"): model =
    Model()``): it is then materialized from the state_dict's tensors (on the CPU when read from
    a file) by ``load_state_dict(assign=True)``; parameters the meta model shared (the same
    Parameter in two modules, e.g. a tied lm_head) are shared again after loading, and a
    duplicate key of such a parameter may be absent. A tensor left on the meta device (a missing
    key with strict=False, a non-persistent buffer) raises ValueError naming it.

    Checked before anything changes, every error a ValueError naming the key: a partial packed
    layer; packed and float weights for one layer; each packed tensor against the layer's
    declared in/out features (and its dtype, scale > 0 and finite, zero <= 2**bits - 1); the
    shape of every other tensor; with strict (default), missing and unexpected keys (left to
    ``load_state_dict``, a RuntimeError, for models with load_state_dict pre-hooks, which may
    rename keys).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    mode = _resolve_mode(mode, fast, "load_quantized")
    sd = _read_state_dict(path_or_state_dict)
    modules = dict(model.named_modules(remove_duplicate=False))  # every name of a shared module

    def prefix_of(name: str) -> str:
        return name + "." if name else ""

    # 1. the packed layers: validate them and build their PackedLinear (not yet swapped in)
    replaced: dict = {}  # id(nn.Linear) -> PackedLinear
    for name, m in modules.items():
        if not isinstance(m, (nn.Linear, PackedLinear)):
            continue
        p = prefix_of(name)
        present = [k for k in PackedLinear._KEYS if p + k in sd]
        if not present:
            continue
        if len(present) < len(PackedLinear._KEYS):
            missing = [p + k for k in PackedLinear._KEYS if k not in present]
            raise ValueError(f"load_quantized: state_dict holds part of a packed weight for {name!r}: "
                             f"missing {missing}")
        if p + "weight" in sd:
            raise ValueError(f"load_quantized: state_dict holds both {p + 'weight'!r} and a packed weight for "
                             f"{name!r}")
        packed = _validated_prefixed(sd, p, m.in_features, m.out_features)
        if isinstance(m, PackedLinear) or id(m) in replaced:
            continue  # load_state_dict loads it (validated above)
        if m is model:
            raise ValueError("load_quantized: model itself is an nn.Linear; use PackedLinear.load_state_dict")
        bias = None
        if m.bias is not None:
            bias = sd.get(p + "bias", m.bias).detach()
            if tuple(bias.shape) != (m.out_features,):
                raise ValueError(f"load_quantized: state_dict[{p + 'bias'!r}] has shape {list(bias.shape)}, but "
                                 f"{name!r} declares out_features={m.out_features}")
            if not bias.is_meta:
                bias = bias.to(packed.device)
        layer = PackedLinear(packed, bias, mode=mode, backend=backend, dtype=m.weight.dtype)
        if layer.bias is not None:
            layer.bias.requires_grad_(m.bias.requires_grad)
        replaced[id(m)] = layer

    # 2. the keys and shapes the model will expect once swapped
    expected: dict = {}
    optional = set()
    for name, m in modules.items():
        m = replaced.get(id(m), m)
        local: dict = {}
        m._save_to_state_dict(local, "", True)
        for k, v in local.items():
            expected[prefix_of(name) + k] = v
        if isinstance(m, PackedLinear):
            optional.update(prefix_of(name) + k for k in PackedLinear._OPTIONAL_KEYS)
    ties = [sites for sites in _shared_parameters(model)  # those packing does not break up
            if not any(id(modules[n]) in replaced for n, _ in sites)]
    for sites in ties:  # a tied duplicate may be absent (safetensors' save_model drops them)
        keys = [prefix_of(n) + attr for n, attr in sites]
        have = [k for k in keys if k in sd]
        if have:
            for k in keys:
                sd.setdefault(k, sd[have[0]])
    # modules whose load pre-hooks rename keys (older checkpoint layouts) are left to load_state_dict
    renames = any(m._load_state_dict_pre_hooks for m in modules.values())
    if strict and not renames:
        missing = [k for k in expected if k not in sd and k not in optional]
        unexpected = [k for k in sd if k not in expected]
        if missing or unexpected:
            hint = ""
            if any(k.rpartition(".")[2] in PackedLinear._KEYS for k in unexpected):
                hint = " (packed weights load only into nn.Linear or PackedLinear modules)"
            raise ValueError(f"load_quantized: state_dict does not match the model: missing keys {missing}, "
                             f"unexpected keys {unexpected}{hint}")
    packed_leaves = set(PackedLinear._KEYS + PackedLinear._OPTIONAL_KEYS)
    for k, v in expected.items():
        if k not in sd or not isinstance(v, Tensor):
            continue
        owner, _, leaf = k.rpartition(".")
        m = modules.get(owner)
        if leaf in packed_leaves and (isinstance(m, PackedLinear) or id(m) in replaced):
            continue  # validated as a packed weight
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ValueError(f"load_quantized: state_dict[{k!r}] has shape {list(sd[k].shape)}, but the model's "
                             f"is {list(v.shape)}")

    # 3. swap, load (assigning when the model is on the meta device), re-tie
    for name, m in modules.items():
        if id(m) in replaced:
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, replaced[id(m)])
    has_meta = any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))
    model.load_state_dict(sd, strict=strict, assign=has_meta)
    for sites in ties:
        owners = [(model.get_submodule(n), attr) for n, attr in sites]
        params = [o._parameters.get(attr) for o, attr in owners]
        source = next((q for q in params if q is not None and not q.is_meta), None)
        if source is not None:
            for o, attr in owners:
                o._parameters[attr] = source
    left = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"load_quantized: {left} are still on the meta device (not in the state_dict, or "
                         "non-persistent buffers): construct them on a real device or load them separately")
    return model


def _shared_parameters(model: nn.Module) -> List[List[Tuple[str, str]]]:
    """[(module name, attribute), ...] of every Parameter object held in more than one place."""
    where: dict = {}
    for name, m in model.named_modules(remove_duplicate=False):
        for attr, q in m._parameters.items():
            if q is not None:
                where.setdefault(id(q), []).append((name, attr))
    return [sites for sites in where.values() if len(sites) > 1]
# ---------------------------------------------------------------- end packed low-bit layers

# ------------------------------------------------------------------ Persona (issue 4)
class EditedLinear(nn.Module):
    """A linear layer whose weight is edited per sample (Persona Eq. 6-7):
    ``y[b] = x[b] @ (theta[p_b] + clamp(delta[b], -T, T)) + bias[p_b]``, computed by
    :func:`pyeditor.edited_linear` without forming the edited weights.

    Holds ``prototypes`` weight matrices theta [P, in, out] (the Prototype Models' copies of
    this layer), an optional bias [P, out] and the threshold T. Call with x [B, S, in] (or
    [B, in]), per-sample edits delta [B, in, out] / [B, in*out] and, if P > 1, proto_index [B];
    or pass ``editor=`` (a callable mapping (embedding, proto_index) to delta) and ``embedding=``.
    """

    def __init__(self, in_features: int, out_features: int, prototypes: int = 1, threshold: float = 0.5,
                 bias: bool = True, backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        if prototypes < 1:
            raise ValueError(f"prototypes must be >= 1, got {prototypes}")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.threshold, self.backend = in_features, out_features, threshold, backend
        self.theta = nn.Parameter(torch.empty(prototypes, in_features, out_features, **kw))
        self.bias = nn.Parameter(torch.empty(prototypes, out_features, **kw)) if bias else None
        bound = in_features ** -0.5
        nn.init.uniform_(self.theta, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, prototypes: int = 1, threshold: float = 0.5, **kw) -> "EditedLinear":
        """Every prototype starts as a copy of ``linear`` (theta = linear.weight^T)."""
        m = cls(linear.in_features, linear.out_features, prototypes, threshold, linear.bias is not None,
                device=linear.weight.device, dtype=linear.weight.dtype, **kw)
        with torch.no_grad():
            m.theta.copy_(linear.weight.t().expand_as(m.theta))
            if m.bias is not None:
                m.bias.copy_(linear.bias.expand_as(m.bias))
        return m

    def forward(self, x: Tensor, delta: Optional[Tensor] = None, proto_index: Optional[Tensor] = None, *,
                editor=None, embedding: Optional[Tensor] = None) -> Tensor:
        from .hyper import edited_linear

        if delta is None:
            if editor is None or embedding is None:
                raise ValueError("pass delta, or editor= and embedding=")
            delta = editor(embedding, proto_index)
        squeeze = x.dim() == 2
        if squeeze:
            x = x.unsqueeze(1)
        P = self.theta.shape[0]
        n = self.in_features * self.out_features
        if P == 1 and proto_index is None and delta.dim() == 3 and delta.shape[0] == 1 and delta.shape[2] == n:
            delta = delta[0]  # a one-prototype ParameterEditor's [1, B, in*out] (no proto_index given)
        if proto_index is None:
            if P != 1:
                raise ValueError(f"this layer has {P} prototypes: pass proto_index")
            theta, bias = self.theta[0], None if self.bias is None else self.bias[0]
        else:
            theta, bias = self.theta, self.bias
        y = edited_linear(x, theta, delta, self.threshold, bias, proto_index, backend=self.backend)
        return y.squeeze(1) if squeeze else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"prototypes={self.theta.shape[0]}, threshold={self.threshold}, bias={self.bias is not None}")


class ParameterEditor(nn.Module):
    """Persona's Parameter Editor (Eq. 5-6, 11-13), one per prototype, trained jointly.

    embedding [B, embed_dim] -> shared neck (Linear + ReLU) -> per-layer encoders (one linear
    each, run as one batched matmul) -> optional cross-layer sequential module Omega_seq (a GRU
    over the layer axis, Eq. 13) -> per-layer heads, one generator per prototype, all run in one
    launch by :func:`pyeditor.hyper_matmul_heads` (gathered by ``proto_index`` when given, so each
    sample only pays for its own prototype's heads). Returns a list of edits, one per layer, each
    [B, in_l * out_l] (or [P, B, in_l * out_l] without proto_index), ready for EditedLinear.

    The heads are stored concatenated: ``head_weight`` [P, hidden, sum(in_l * out_l)] and
    ``head_bias`` [P, sum(in_l * out_l)], layer l owning the columns ``head_slices[l]``.
    Checkpoints with the earlier per-layer ``head_weights.l`` / ``head_biases.l`` keys still load.
    """

    def __init__(self, embed_dim: int, hidden: int, layer_shapes: Sequence[Tuple[int, int]], prototypes: int = 1,
                 sequential: bool = False, backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        if prototypes < 1:
            raise ValueError(f"prototypes must be >= 1, got {prototypes}")
        if not layer_shapes:
            raise ValueError("layer_shapes must name at least one layer")
        kw = {"device": device, "dtype": dtype}
        self.layer_shapes = [(int(i), int(o)) for i, o in layer_shapes]
        self.head_sizes = [i * o for i, o in self.layer_shapes]
        starts = [sum(self.head_sizes[:l]) for l in range(len(self.head_sizes))]
        self.head_slices = [slice(s, s + n) for s, n in zip(starts, self.head_sizes)]
        self.backend = backend
        self.neck = nn.Sequential(nn.Linear(embed_dim, hidden, **kw), nn.ReLU())
        L = len(self.layer_shapes)
        self.encoder_weight = nn.Parameter(torch.empty(L, hidden, hidden, **kw))
        self.encoder_bias = nn.Parameter(torch.zeros(L, hidden, **kw))
        self.sequential = nn.GRU(hidden, hidden, batch_first=True, **kw) if sequential else None
        # small init: edits start near zero, so every prototype starts at its own Theta
        total = sum(self.head_sizes)
        self.head_weight = nn.Parameter(torch.randn(prototypes, hidden, total, **kw) * (0.01 / hidden ** 0.5))
        self.head_bias = nn.Parameter(torch.zeros(prototypes, total, **kw))
        nn.init.uniform_(self.encoder_weight, -hidden ** -0.5, hidden ** -0.5)
        self.register_load_state_dict_pre_hook(ParameterEditor._concatenate_old_heads)

    @staticmethod
    def _concatenate_old_heads(module, state_dict, prefix, *args) -> None:
        """Turns the per-layer head_weights.l / head_biases.l keys of older checkpoints into the
        concatenated head_weight / head_bias."""
        for old, new in (("head_weights", "head_weight"), ("head_biases", "head_bias")):
            keys = [f"{prefix}{old}.{l}" for l in range(len(module.head_sizes))]
            if f"{prefix}{new}" not in state_dict and all(k in state_dict for k in keys):
                state_dict[f"{prefix}{new}"] = torch.cat([state_dict.pop(k) for k in keys], dim=-1)

    def layer_embeddings(self, embedding: Tensor) -> Tensor:
        """[L, B, hidden]: the per-layer embeddings e^n (after Omega_seq if enabled)."""
        from .hyper import hyper_matmul

        h = self.neck(embedding)
        e = torch.relu(hyper_matmul(h, self.encoder_weight, self.encoder_bias, backend=self.backend))  # [L, B, h]
        if self.sequential is not None:
            e = self.sequential(e.transpose(0, 1))[0].transpose(0, 1)
        return e

    def head(self, layer: int) -> Tuple[Tensor, Optional[Tensor]]:
        """Layer ``layer``'s generators: (weight [P, hidden, in*out], bias [P, in*out]) as views of
        the concatenated parameters (for assign_prototypes / prototype_gram / generate_edit)."""
        cols = self.head_slices[layer]
        return self.head_weight[:, :, cols], None if self.head_bias is None else self.head_bias[:, cols]

    def forward(self, embedding: Tensor, proto_index: Optional[Tensor] = None) -> List[Tensor]:
        from .hyper import hyper_matmul_heads

        e = self.layer_embeddings(embedding)
        return hyper_matmul_heads(e, self.head_weight, self.head_sizes, self.head_bias, proto_index,
                                  backend=self.backend)

"""torch.nn modules built on pyeditor's ops: CHORD's packed layers and Persona's edited layers."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import quant as _quant


class PackedLinear(nn.Module):
    """A frozen nn.Linear whose weight is channel-wise 2/4/6/8-bit packed (CHORD).

    forward(x) = x @ W.T + bias with W the dequantized packed weight, computed by
    :func:`pyeditor.quant.packed_linear` (gradients flow to x and bias). The packed tensors are
    buffers, so ``state_dict`` / ``load_state_dict`` (also through safetensors) round-trip bit
    for bit; loading checks that the tensors describe a valid packed weight of this layer's shape.
    """

    _KEYS = ("data", "scale", "zero", "perm", "buckets", "bits")

    def __init__(self, packed: _quant.PackedWeight, bias: Optional[Tensor] = None, *, fast: bool = False,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.fast, self.backend = fast, backend
        self._set(packed)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def _set(self, p: _quant.PackedWeight) -> None:
        for name, t in zip(("data", "scale", "zero", "perm"), p.tensors()):
            self.register_buffer(name, t)
        self.register_buffer("buckets", torch.tensor(p.buckets, dtype=torch.int64).reshape(-1, 4))
        self.register_buffer("bits", p.bits)
        self._bucket_list = p.buckets  # plain ints: no device sync or graph break per forward

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits, **kwargs) -> "PackedLinear":
        """Quantize linear.weight per output channel to ``bits`` (int or [out] in {2, 4, 6, 8})."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        packed = _quant.quantize_channelwise(linear.weight.detach(), bits)
        return cls(packed, linear.bias, **kwargs)

    @property
    def packed(self) -> _quant.PackedWeight:
        return _quant.PackedWeight(self.data, self.scale, self.zero, self.perm,
                                   self._bucket_list, self.bits,
                                   self.in_features, self.out_features)

    @property
    def packed_bytes(self) -> int:
        """Bytes of the packed weight (codes + scale, zero point, permutation); bias not counted."""
        return self.packed.nbytes

    def forward(self, x: Tensor) -> Tensor:
        return _quant.packed_linear(x, self.packed, self.bias, fast=self.fast, backend=self.backend)

    def dequantize(self) -> Tensor:
        return self.packed.dequantize(backend=self.backend)

    def extra_repr(self) -> str:
        widths = {b: int((self.bits == b).sum()) for b in _quant.WIDTHS}
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"channels per width={widths}, packed_bytes={self.packed_bytes}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        keys = [prefix + k for k in self._KEYS]
        if all(k in state_dict for k in keys):
            got = {k: state_dict[prefix + k] for k in self._KEYS}
            try:
                packed = _validated(got, self.in_features, self.out_features)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"state_dict for PackedLinear {prefix!r} is not a valid packed weight: {exc}") from exc
            self._set(packed.to(self.data.device))  # the packed shapes depend on the widths
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def _validated(t: dict, k: int, n: int) -> _quant.PackedWeight:
    """A PackedWeight from state_dict tensors, after checking they are consistent."""
    want = {"data": torch.uint8, "scale": torch.float32, "zero": torch.uint8, "perm": _quant.perm_dtype(n),
            "buckets": torch.int64, "bits": torch.int64}
    t = dict(t)
    if isinstance(t["perm"], Tensor) and t["perm"].dtype == torch.int32 and want["perm"] == torch.int16:
        # saved before the permutation became int16 for layers of < 2^15 channels: same values
        if t["perm"].numel() and not (-1 <= int(t["perm"].min()) and int(t["perm"].max()) < n):
            raise ValueError(f"perm must hold channels in [0, {n}) or -1")
        t["perm"] = t["perm"].to(torch.int16)
    for name, dtype in want.items():
        if not isinstance(t[name], Tensor) or t[name].dtype != dtype:
            raise TypeError(f"{name} must be a {dtype} tensor")
    buckets = t["buckets"].cpu()
    if buckets.dim() != 2 or buckets.shape[1] != 4:
        raise ValueError(f"buckets must have shape [B, 4], got {tuple(buckets.shape)}")
    bits = t["bits"].cpu()
    if tuple(bits.shape) != (n,) or not bool(torch.isin(bits, torch.tensor(_quant.WIDTHS)).all()):
        raise ValueError(f"bits must be [{n}] values in {{2, 4, 6, 8}}")
    row = offset = 0
    kp = _quant.padded_k(k)
    perm = t["perm"].cpu().long()
    for b, start, rows, off in buckets.tolist():
        if b not in _quant.WIDTHS or start != row or off != offset or rows <= 0 or rows % _quant.TILE_N:
            raise ValueError(f"bucket {(b, start, rows, off)} is not a contiguous tile-aligned bucket")
        chans = perm[start:start + rows]
        chans = chans[chans >= 0]
        if chans.numel() and not bool((chans < n).all() and (bits[chans.clamp(0, n - 1)] == b).all()):
            raise ValueError(f"the {b}-bit bucket holds channels whose bits are not {b}")
        row += rows
        offset += rows // _quant.TILE_N * (kp // _quant.TILE_K) * b * 32
    if t["data"].shape != (offset,):
        raise ValueError(f"data must hold {offset} bytes, got {tuple(t['data'].shape)}")
    for name in ("scale", "zero", "perm"):
        if t[name].shape != (row,):
            raise ValueError(f"{name} must have shape [{row}], got {tuple(t[name].shape)}")
    real = perm[perm >= 0]
    if real.numel() != n or (n and not torch.equal(torch.sort(real).values, torch.arange(n))):
        raise ValueError(f"perm must map the packed rows onto the {n} channels exactly once")
    if not bool(torch.isfinite(t["scale"]).all()) or bool((t["scale"][perm >= 0] <= 0).any()):
        raise ValueError("scale must be finite and > 0")
    qmax = (1 << bits[real]) - 1
    if bool((t["zero"].cpu()[perm >= 0].long() > qmax).any()):
        raise ValueError("zero exceeds 2**bits - 1 for its channel")
    return _quant.PackedWeight(t["data"], t["scale"], t["zero"], t["perm"], [tuple(r) for r in buckets.tolist()],
                               bits, k, n)


def quantize_model(model: nn.Module, bits_for: Callable[[str, nn.Linear], Optional[Tensor]], **kwargs) -> nn.Module:
    """Replace, in place, every nn.Linear of ``model`` for which ``bits_for(name, linear)`` returns
    a bits vector (or int) by a PackedLinear; None keeps the layer. Returns the model."""
    if not callable(bits_for):
        raise TypeError("bits_for must be a callable (name, linear) -> bits or None")
    if isinstance(model, nn.Linear):
        raise ValueError("model itself is an nn.Linear; use PackedLinear.from_linear")
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in targets:
        bits = bits_for(name, linear)
        if bits is None:
            continue
        packed = PackedLinear.from_linear(linear, bits, **kwargs)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, packed)
    return model
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

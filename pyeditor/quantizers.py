"""Weight quantizers for CHORD's packed layers: every one returns a plain
:class:`pyeditor.quant_format.QuantizedWeight` (codes, scale, integer zero point per output channel or
per group of 32/64/128 inputs), so the packing and the kernels are the same whichever made it.

minmax(w, bits, group_size)
    Exactly (bit for bit) :func:`pyeditor.reference.quantize_channelwise`: asymmetric min-max per
    channel or group. The ranges come from one float32 ``aminmax`` pass (exact: the min and max of
    float32 values); the codes from the reference's own float64 formula, round(w / scale) + zero
    clamped, evaluated a block of rows at a time in a reused buffer that stays in cache, so each
    in-place op is one pass over 2 MiB instead of a 128 MiB float64 matrix, and without the
    reference's gathered [out, in] scale / zero copies and scatter_reduce ranges (4096x4096 mixed
    widths, 1 thread, quiet moment on the 2-core dev host: reference 1.6 s, minmax 0.09 s per
    channel or with groups of 128, 0.15 s with groups of 32).
search(w, bits, group_size)
    No data. Per group, mild clipping ratios r (range [r*lo, r*hi], r = 0.96, 0.92: see
    NO_DATA_RATIOS for why not deeper) plus least-squares refits of the scale
    (s = <w, q - z> / |q - z|^2 for the chosen codes); keeps the candidate with the least
    ||w - deq||^2 per group, min-max included, so no group is ever worse than min-max (only a
    strictly smaller error replaces it).
calibrated(w, bits, group_size, activations)
    Calibration activations X [n_samples, in] (or [..., in]), split into fit rows (3/4) and
    held-out rows (every 4th). Candidates, fitted on the fit rows: min-max, the same search with
    each input's error weighted by E[x_k^2], and GPTQ (column-by-column quantization with the
    error spread over the columns not yet quantized, H = X^T X / n with 1% damping; per-group
    scales chosen by the weighted search when the column loop reaches each group; per channel
    in "act order", inputs by decreasing E[x^2]). Each output row keeps the candidate with
    the least output error ||X_val (w_o - deq_o)||^2 on the held-out rows if it also beats
    min-max on all of X, so no row is worse than min-max on the calibration data, and GPTQ
    fitting the noise of too few samples (X not much taller than wide) is caught. Work that
    depends only on X (the split, H and its factorizations) is cached on the activation tensor,
    so layers reading the same input (q, k, v) or one layer at several widths share it. The
    result has no per-input scaling: the kernels see an ordinary quantized weight.
gptq(w, bits, group_size, activations)
    Error-feedback quantization (GPTQ, pyeditor/gptq.py): inputs quantized in order, each
    one's error fed into the inputs not yet quantized through H = X^T X / n, per group a clip
    search when the loop reaches it; a row keeps min-max unless GPTQ's output error on X is
    smaller. Better than "calibrated" on both real models of the bench (all-MiniLM-L6-v2,
    SmolLM2-135M) and cheaper: one Cholesky factor of H per activation tensor, float32 blocks.
quantize(w, bits, group_size=None, method="minmax", activations=None)
    The dispatch, with errors that name the bad argument.
"""
from __future__ import annotations

import weakref
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import gptq as _gptq_alg
from . import validate
from .quant_format import QuantizedWeight, group_of_column, n_groups

METHODS = ("minmax", "search", "calibrated", "gptq")
CALIBRATED_METHODS = ("calibrated", "gptq")  # the methods that need activations
TINY = torch.finfo(torch.float32).tiny
# rows of the float64 working block of minmax: about this many elements (2 MiB float64) per block,
# so the block's in-place passes run from cache. 4096x4096 mixed widths, 1 thread, best of 5 on the
# (loaded) 2-core dev host, per channel / groups of 32: 64K 0.21 / 0.19 s, 256K 0.18 / 0.21 s,
# 1M 0.18 / 0.30 s, the whole matrix at once 0.39 / 0.52 s
_BLOCK_ELEMS = 1 << 18
# search: rows per block (float32 temporaries of about this many elements each)
_SEARCH_ELEMS = 1 << 20
CLIP_RATIOS = tuple(1.0 - 0.04 * i for i in range(1, 16))  # 0.96 ... 0.40
# the data-free search clips at most 8% of a group's range: deeper clipping (the grid above) lowers
# ||w - deq||^2 further but cuts the few largest weights of a group, and on the SmolLM2 decoder
# (bench/cases_realmodel_lm.py, 4 bits, groups of 64) that raised the perplexity above min-max's
# while this grid lowers it, and it also beats min-max's cosine on all-MiniLM-L6-v2
NO_DATA_RATIOS = (0.96, 0.92)
LS_STEPS = 2
# inside GPTQ's column loop (one search per group, on the error-updated columns): a coarser grid
LIGHT_RATIOS, LIGHT_LS_STEPS = CLIP_RATIOS[::3], 1
# a candidate replaces the best only if its error is smaller by this relative margin: errors are
# summed from float32 squares, so a margin well above their rounding keeps "never worse than
# min-max" true in exact arithmetic too
_MARGIN = 1e-6
# calibrated's per-row choice compares float32 output errors: a candidate must win by this much
_ROW_MARGIN = 1e-4
# gptq's per-row choice: its objective comes from float32 running sums, min-max's from a float32
# matmul; a row keeps min-max unless GPTQ wins by this much
_GPTQ_MARGIN = 1e-3
GPTQ_BLOCK = 32  # columns per lazy-update block (per group: at least the group)
GPTQ_DAMP = 0.01
VAL_EVERY = 4  # calibrated: every 4th activation row is held out to choose among the candidates


# ------------------------------------------------------------------------------ argument checks
def _check_weight(weight: object) -> Tensor:
    validate.float_tensor(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    return weight


def _check_method(method: object) -> str:
    if not isinstance(method, str):
        raise TypeError(f"method must be a str, one of {METHODS}, got {type(method).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method


def check_activations(activations: object, in_features: int) -> Tensor:
    """Calibration activations as float32 [n_samples, in_features] on the CPU: a floating tensor
    [n_samples, in] or [..., in] (flattened), finite (in float32), with at least one sample."""
    if not isinstance(activations, Tensor):
        raise TypeError(f"activations must be a torch.Tensor [n_samples, {in_features}], "
                        f"got {type(activations).__name__}")
    if not activations.is_floating_point():
        raise TypeError(f"activations must be a floating-point tensor, got {activations.dtype}")
    if activations.dim() < 1 or activations.shape[-1] != in_features:
        raise ValueError(f"activations must have shape [n_samples, {in_features}] (or [..., {in_features}]: the "
                         f"weight's in_features last), got {tuple(activations.shape)}")
    rows = activations.numel() // in_features if in_features else int(torch.Size(activations.shape[:-1]).numel())
    x = activations.detach().reshape(rows, in_features).to("cpu", torch.float32)
    if x.shape[0] == 0:
        raise ValueError("activations must hold at least one sample, got 0")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("activations must be finite (no NaN or inf)")
    return x


# ------------------------------------------------------------------------------ min-max, fast
def _group_minmax(w: Tensor, group_size: Optional[int]) -> Tuple[Tensor, Tensor]:
    """float32 [n, G] min and max of every channel (group); 0 for empty rows (in == 0)."""
    n, k = w.shape
    groups = n_groups(k, group_size)
    if k == 0:
        z = torch.zeros(n, groups, dtype=torch.float32)
        return z, z.clone()
    gs = k if group_size is None else group_size
    full = k // gs
    mins, maxs = [], []
    if full:
        lo, hi = torch.aminmax(w[:, :full * gs].reshape(n, full, gs), dim=2)
        mins.append(lo)
        maxs.append(hi)
    if full * gs < k:  # the ragged last group
        lo, hi = torch.aminmax(w[:, full * gs:], dim=1, keepdim=True)
        mins.append(lo)
        maxs.append(hi)
    return torch.cat(mins, 1), torch.cat(maxs, 1)


def _minmax_params(wmin: Tensor, wmax: Tensor, b: Tensor):
    """The reference's per-channel (group) scale, zero point and constant-group handling, on the
    [n, G] ranges: the same float64 ops in the same order, so bit-identical.
    Returns scale float32, zero float64 (integral), the zero used for encoding the non-constant
    groups (float64), constant mask and the constant groups' code (float64)."""
    q_max = ((2.0 ** b.to(torch.float64)) - 1.0)[:, None]
    wmin, wmax = wmin.to(torch.float64), wmax.to(torch.float64)
    lo, hi = wmin.clamp_max(0.0), wmax.clamp_min(0.0)
    scale = ((hi - lo) / q_max).to(torch.float32).clamp_min(TINY)
    if not bool(torch.isfinite(scale).all()):
        raise ValueError("weight's range per channel (or group) must fit float32 (max - min overflows)")
    s = scale.to(torch.float64)
    zero_enc = torch.round(-lo / s).clamp(min=0.0).minimum(q_max)
    const = wmax == wmin
    c = wmin
    c_zero = (c < 0).to(torch.float64)
    scale_out = torch.where(const, torch.where(c == 0, 1.0, c.abs()).to(torch.float32), scale)
    zero_out = torch.where(const, c_zero, zero_enc)
    const_code = c_zero + torch.sign(c)
    return scale, scale_out, zero_enc, zero_out, const, const_code, q_max


def _encode_exact(w: Tensor, scale: Tensor, zero: Tensor, q_max: Tensor, group_size: Optional[int]) -> Tensor:
    """uint8 codes clamp(round(w / scale) + zero, 0, q_max), in float64 like the reference, a
    block of rows at a time (in-place ops on a reused cache-sized buffer)."""
    n, k = w.shape
    codes = torch.empty(n, k, dtype=torch.uint8)
    if n == 0 or k == 0:
        return codes
    gs = k if group_size is None else group_size
    full = k // gs
    s64, z64 = scale.to(torch.float64), zero
    rows = max(1, _BLOCK_ELEMS // k)
    buf = torch.empty(min(rows, n) * k, dtype=torch.float64)

    def step(t: Tensor, s: Tensor, z: Tensor, q: Tensor) -> None:
        t.div_(s).round_().add_(z).clamp_min_(0.0)
        torch.minimum(t, q, out=t)

    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        t = buf[:(r1 - r0) * k].view(r1 - r0, k)
        t.copy_(w[r0:r1])
        q = q_max[r0:r1]
        if full:
            step(t[:, :full * gs].view(r1 - r0, full, gs), s64[r0:r1, :full, None], z64[r0:r1, :full, None],
                 q[:, :, None])
        if full * gs < k:
            step(t[:, full * gs:], s64[r0:r1, full:], z64[r0:r1, full:], q)
        codes[r0:r1].copy_(t)
    return codes


def _column_group(k: int, group_size: Optional[int]) -> Tensor:
    return group_of_column(k, group_size)


def _set_constant_groups(codes: Tensor, const: Tensor, const_code: Tensor, group_size: Optional[int]) -> None:
    if not bool(const.any()) or codes.shape[1] == 0:
        return
    rows = const.any(1).nonzero().flatten()
    gid = _column_group(codes.shape[1], group_size)
    sub = codes[rows]
    mask = const[rows][:, gid]
    val = const_code[rows][:, gid].to(torch.uint8)
    codes[rows] = torch.where(mask, val, sub)


def _keep_finite(codes: Tensor, scale: Tensor, zero: Tensor, q_max: Tensor, group_size: Optional[int]) -> None:
    """The reference's reach rule: codes stop at the last one whose (code - zero) * scale is finite
    in float32. Only scales above float32_max / q_max (|w| near 3e38) can bind, so the common case
    is one [n, G] comparison; clamping the [0, q_max]-clamped codes again equals the reference's
    single clamp, as its bounds lie inside [0, q_max]."""
    reach = torch.floor(torch.finfo(torch.float32).max / scale.to(torch.float64))
    near = reach < q_max
    if not bool(near.any()) or codes.shape[1] == 0:
        return
    rows = near.any(1).nonzero().flatten()
    gid = _column_group(codes.shape[1], group_size)
    lo = (zero[rows] - reach[rows]).clamp(min=0.0)[:, gid]
    hi = (zero[rows] + reach[rows]).minimum(q_max[rows])[:, gid]
    codes[rows] = codes[rows].to(torch.float64).maximum(lo).minimum(hi).to(torch.uint8)


def _finite_or_raise(weight: Tensor, wmin: Tensor, wmax: Tensor) -> None:
    # float32 weight: NaN / inf show in the (NaN-propagating) per-group min and max, so no
    # extra pass; other dtypes are checked as given, like the reference (a float64 value that
    # overflows float32 is finite here and refused by the range check instead)
    if weight.dtype == torch.float32:
        ok = bool(torch.isfinite(wmin).all()) and bool(torch.isfinite(wmax).all())
    else:
        ok = bool(torch.isfinite(weight).all())
    if not ok:
        raise ValueError("weight must be finite (no NaN or inf)")


def _prepare(weight: object, bits, group_size):
    _check_weight(weight)
    group_size = validate.group_size(group_size)
    n, k = weight.shape
    b = validate.bit_widths(bits.detach().cpu() if isinstance(bits, Tensor) else bits, "bits", n)
    w = weight.detach().to("cpu", torch.float32).contiguous()
    return w, b, group_size


def _minmax_full(weight, bits, group_size):
    """minmax plus what the other quantizers build on."""
    w, b, group_size = _prepare(weight, bits, group_size)
    wmin, wmax = _group_minmax(w, group_size)
    _finite_or_raise(weight, wmin, wmax)
    scale_enc, scale, zero_enc, zero, const, const_code, q_max = _minmax_params(wmin, wmax, b)
    codes = _encode_exact(w, scale_enc, zero_enc, q_max, group_size)
    _keep_finite(codes, scale_enc, zero_enc, q_max, group_size)
    _set_constant_groups(codes, const, const_code, group_size)
    zero = zero.to(torch.int32)
    qw = QuantizedWeight(codes, scale, zero, b, group_size)
    return qw, w, const, q_max


def _per_channel(qw: QuantizedWeight) -> QuantizedWeight:
    if qw.group_size is None and qw.scale.dim() == 2:
        return qw._replace(scale=qw.scale[:, 0].contiguous(), zero=qw.zero[:, 0].contiguous())
    return qw


def minmax(weight: Tensor, bits: Union[int, Tensor], group_size: Optional[int] = None) -> QuantizedWeight:
    """Bit-identical to :func:`pyeditor.reference.quantize_channelwise` (same arguments, same
    errors), computed on the CPU in cache-sized float64 blocks."""
    qw, _, _, _ = _minmax_full(weight, bits, group_size)
    return _per_channel(qw)


# ------------------------------------------------------------------------------ search
def _padded_groups(w: Tensor, group_size: Optional[int]) -> Tuple[Tensor, int]:
    """float32 [n, G, gs] with the ragged last group zero-padded (a zero input costs nothing:
    it quantizes to the zero point exactly and the range always holds 0)."""
    n, k = w.shape
    gs = k if group_size is None else group_size
    groups = n_groups(k, group_size)
    if groups * gs != k:
        w = torch.nn.functional.pad(w, (0, groups * gs - k))
    return w.reshape(n, groups, gs), gs


def _fit(w3: Tensor, s: Tensor, z: Tensor, qmax3: Tensor) -> Tuple[Tensor, Tensor]:
    """codes (float32) and dequantized values of w3 [r, G, gs] for float32 scale s [r, G] and
    integral zero z [r, G]: deq = (codes - zero) * scale, the kernels' formula."""
    sf, zf = s[..., None], z.to(torch.float32)[..., None]
    q = torch.div(w3, sf).round_().add_(zf).clamp_min_(0.0)
    q = torch.minimum(q, qmax3, out=q)
    deq = (q - zf).mul_(sf)
    return q, deq


def _err(deq: Tensor, w3: Tensor, wt: Optional[Tensor]) -> Tensor:
    d = deq.sub_(w3).square_()
    if wt is not None:
        d.mul_(wt)
    return d.sum(2, dtype=torch.float64)


def _search_block(w3: Tensor, qmax: Tensor, wt: Optional[Tensor], s0: Tensor, z0: Tensor, e0: Tensor,
                  lo: Tensor, hi: Tensor, light: bool = False, ratios: Optional[Tuple[float, ...]] = None):
    """The best (scale, zero) per group of w3 [r, G, gs] over the clipping grid and refits,
    starting from (s0, z0) with error e0. Returns scale float32, zero float64, error, changed."""
    qmax3 = qmax.to(torch.float32)[:, :, None]
    best_s, best_z, best_e = s0.clone(), z0.clone(), e0.clone()
    changed = torch.zeros_like(e0, dtype=torch.bool)

    def consider(s: Tensor, z: Tensor) -> None:
        s = s.clamp_min(TINY)
        _, deq = _fit(w3, s, z, qmax3)
        e = _err(deq, w3, wt)
        better = e < best_e * (1.0 - _MARGIN)
        if bool(better.any()):
            best_s.copy_(torch.where(better, s, best_s))
            best_z.copy_(torch.where(better, z, best_z))
            best_e.copy_(torch.where(better, e, best_e))
            changed.logical_or_(better)

    for r in (ratios if ratios is not None else LIGHT_RATIOS if light else CLIP_RATIOS):
        l, h = lo * r, hi * r
        s = ((h - l) / qmax).to(torch.float32).clamp_min(TINY)
        z = torch.round(-l / s.to(torch.float64)).clamp(min=0.0).minimum(qmax)
        consider(s, z)
    for _ in range(LIGHT_LS_STEPS if light else LS_STEPS):  # least-squares scale for the best codes, zero kept
        q, _ = _fit(w3, best_s, best_z, qmax3)
        m = q.sub_(best_z.to(torch.float32)[..., None])
        num = (w3 * m if wt is None else w3 * m * wt).sum(2, dtype=torch.float64)
        den = (m * m if wt is None else m * m * wt).sum(2, dtype=torch.float64)
        ok = (den > 0) & (num > 0)
        s = torch.where(ok, num / den.clamp_min(1e-300), best_s.to(torch.float64)).to(torch.float32)
        consider(s, best_z)
    # move the zero point one step, scale kept (not in the data-free search: a moved zero point
    # clips one end of the range, what NO_DATA_RATIOS keeps from happening)
    for dz in (() if light or ratios is not None else (-1.0, 1.0)):
        z = (best_z + dz).clamp(min=0.0).minimum(qmax)
        consider(best_s, z)
    return best_s, best_z, best_e, changed


def _search(w: Tensor, qw: QuantizedWeight, const: Tensor, q_max: Tensor,
            col_weight: Optional[Tensor], light: bool = False,
            ratios: Optional[Tuple[float, ...]] = None) -> QuantizedWeight:
    """Clip-grid / refit search per group, starting from the min-max result qw (its scale and
    zero as [n, G]); col_weight: per-input error weights [in] (None: plain squared error)."""
    n, k = w.shape
    group_size = qw.group_size
    if n == 0 or k == 0:
        return qw
    w3_all, gs = _padded_groups(w, group_size)
    groups = w3_all.shape[1]
    scale = qw.scale.reshape(n, groups).clone()
    zero = qw.zero.reshape(n, groups).to(torch.float64)
    codes = qw.codes.clone()
    wt = None
    if col_weight is not None:
        cw = col_weight.to(torch.float32)
        wt = torch.nn.functional.pad(cw, (0, groups * gs - k)).reshape(1, groups, gs)
    rows = max(1, _SEARCH_ELEMS // (groups * gs))
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        w3 = w3_all[r0:r1]
        qmax = q_max[r0:r1].expand(r1 - r0, groups)
        s0, z0 = scale[r0:r1], zero[r0:r1]
        # the min-max error, from its exact codes (not re-encoded)
        c3, _ = _padded_groups(qw.codes[r0:r1].to(torch.float32), group_size)
        deq0 = (c3 - z0.to(torch.float32)[..., None]).mul_(s0[..., None])
        deq0.view(r1 - r0, groups * gs)[:, k:] = 0.0  # the ragged group's padding, like w3's
        e0 = _err(deq0, w3, wt)
        lo = w3.amin(2).to(torch.float64).clamp_max(0.0)
        hi = w3.amax(2).to(torch.float64).clamp_min(0.0)
        bs, bz, _, changed = _search_block(w3, qmax, wt, s0, z0, e0, lo, hi, light, ratios)
        changed &= ~const[r0:r1]  # constant groups are exact already
        if not bool(changed.any()):
            continue
        q, _ = _fit(w3, bs, bz, qmax.to(torch.float32)[:, :, None])
        new_codes = q.reshape(r1 - r0, groups * gs)[:, :k].to(torch.uint8)
        colmask = changed[:, _column_group(k, group_size)]
        codes[r0:r1] = torch.where(colmask, new_codes, codes[r0:r1])
        scale[r0:r1] = torch.where(changed, bs, s0)
        zero[r0:r1] = torch.where(changed, bz, z0)
    zero = zero.to(torch.int32)
    if group_size is None:
        scale, zero = scale[:, 0].contiguous(), zero[:, 0].contiguous()
    return QuantizedWeight(codes, scale, zero, qw.bits, group_size)


def search(weight: Tensor, bits: Union[int, Tensor], group_size: Optional[int] = None) -> QuantizedWeight:
    """Data-free error-minimizing quantization: per group the least ||w - deq||^2 over a grid of
    clipping ratios, least-squares scale refits and zero-point moves, min-max included (a group
    keeps min-max unless a candidate is strictly better)."""
    qw, w, const, q_max = _minmax_full(weight, bits, group_size)
    return _search(w, qw, const, q_max, None, ratios=NO_DATA_RATIOS)


# ------------------------------------------------------------------------------ calibrated
class _Calib:
    """What calibrated() derives from one activation tensor, whatever the weight: the fit and
    validation rows (float64), the E[x^2] input weights and GPTQ's inverse-Hessian factor, all
    from the fit rows. Layers that read the same input (q, k and v; one layer at several bit
    widths) share it through a cache keyed by the activation tensor itself."""

    def __init__(self, x: Tensor):
        self.fit, self.val = _split(x)
        h = (self.fit.T @ self.fit).div_(self.fit.shape[0])  # float32 [in, in], like GPTQ's
        self.col_weight = h.diagonal().to(torch.float64)  # E[x_k^2] over the fit rows
        self.silent = not bool((self.col_weight > 0).any())
        # a floor of 1% of the mean keeps inputs that were silent in the calibration data from being
        # quantized arbitrarily by the weighted search (the choice uses the exact output error)
        self.col_weight += 0.01 * float(self.col_weight.mean())
        self._h = h
        self._factors = {}
        self._gram = {}

    def factor(self, act_order: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """(input order or None, GPTQ's inverse-Hessian factor in that order or None), built on
        first use. act_order: the inputs by decreasing E[x^2] (GPTQ's "act order")."""
        if act_order not in self._factors:
            if act_order:
                perm = torch.argsort(self._h.diagonal(), descending=True, stable=True)
                self._factors[act_order] = perm, _inverse_hessian_factor(self._h[perm][:, perm])
            else:
                self._factors[act_order] = None, _inverse_hessian_factor(self._h)
        return self._factors[act_order]

    def errors(self, e: Tensor) -> Tuple[Tensor, Tensor]:
        """Output errors ||X e_o||^2 per row o of e [out, in] (float32 products, float64 sums) on
        the validation rows and on all rows (fit + validation)."""
        val = self._error(self.val, e)
        return val, (val if self.fit is self.val else val + self._error(self.fit, e))

    def _error(self, part: Tensor, e: Tensor) -> Tensor:
        if part.shape[0] <= part.shape[1]:
            return (part @ e.T).square_().sum(0, dtype=torch.float64)
        g = self._gram.get(id(part))  # taller than wide: through the Gram matrix, built once per part
        if g is None:
            g = self._gram[id(part)] = part.T @ part
        return ((e @ g).mul_(e)).sum(1, dtype=torch.float64)


class _Hessian:
    """What gptq() derives from one activation tensor: GPTQ's factor (R, lambda) of
    X^T X / n + lambda I over all its rows, or None when X is all zero (see pyeditor.gptq)."""

    def __init__(self, x: Tensor):
        self.factor = _gptq_alg.factor((x.T @ x).div_(x.shape[0]))


# (id(activations), state class) -> (weakref to it, its _version, in_features, state)
_CALIB_CACHE: dict = {}


def _calib_state(activations: object, in_features: int, kind=_Calib):
    key = (id(activations), kind)
    hit = _CALIB_CACHE.get(key)
    if (hit is not None and hit[0]() is activations and hit[1] == activations._version
            and hit[2] == in_features):
        return hit[3]
    state = kind(check_activations(activations, in_features))
    try:
        ref = weakref.ref(activations, lambda _r, _k=key: _CALIB_CACHE.pop(_k, None))
    except TypeError:
        return state
    _CALIB_CACHE[key] = (ref, activations._version, in_features, state)
    return state


def _inverse_hessian_factor(h: Tensor) -> Optional[Tensor]:
    """GPTQ's upper Cholesky factor of (H + damping)^-1, float32 (float64 if float32 fails);
    None if H is not positive definite even damped."""
    hd = h.clone()
    diag = hd.diagonal()
    mean = float(diag.mean())
    diag.add_(GPTQ_DAMP * mean if mean > 0 else 1.0)
    diag[diag <= 0] = 1.0
    for dtype in (torch.float32, torch.float64):
        try:
            hx = hd.to(dtype)
            return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hx)),
                                         upper=True).to(torch.float32)
        except RuntimeError:
            continue
    return None


def _gptq(w: Tensor, qw_init: QuantizedWeight, q_max: Tensor, hinv: Tensor,
          col_weight: Tensor) -> QuantizedWeight:
    """GPTQ with lazy block updates. Per channel: the scales / zeros of qw_init (the weighted
    search on the original rows); per group: chosen by the weighted search on the
    error-updated columns when the loop reaches the group."""
    n, k = w.shape
    group_size = qw_init.group_size
    groups = n_groups(k, group_size)
    gs = k if group_size is None else group_size
    W = w.clone()
    codes = torch.empty(n, k, dtype=torch.float32)
    scale = qw_init.scale.reshape(n, groups).clone()
    zero = qw_init.zero.reshape(n, groups).to(torch.float64).clone()
    qmax_col = q_max[:, 0].to(torch.float32)
    lo_col = torch.zeros_like(qmax_col)
    # per-column work is a handful of [out]-vector ops and one rank-1 update of the rest of the
    # block; a block holds whole groups (its scales are chosen from the block's updated columns)
    block = max(GPTQ_BLOCK, gs) if group_size is not None else GPTQ_BLOCK
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = W[:, i1:i2].clone()
        err1 = torch.empty_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        d = h1.diagonal().tolist()
        for i in range(i2 - i1):
            col = i1 + i
            g = col // gs
            if col % gs == 0:
                if group_size is not None:
                    sub = w1[:, i:i + gs].contiguous()
                    mm_qw, _, mm_const, _ = _minmax_full(sub, qw_init.bits, None)
                    best = _search(sub, mm_qw, mm_const, q_max, col_weight[col:col + sub.shape[1]], light=True)
                    scale[:, g] = best.scale
                    zero[:, g] = best.zero.to(torch.float64)
                s, z = scale[:, g].contiguous(), zero[:, g].to(torch.float32)
            x = w1[:, i]
            q = torch.div(x, s).round_().add_(z)
            torch.clamp(q, lo_col, qmax_col, out=q)
            codes[:, col] = q
            e = x.sub(q.sub_(z).mul_(s)).div_(d[i])
            if i + 1 < i2 - i1:
                w1[:, i + 1:].addr_(e, h1[i, i + 1:], alpha=-1.0)
            err1[:, i] = e
        if i2 < k:
            W[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1.0)
    codes = codes.to(torch.uint8)
    zero = zero.to(torch.int32)
    if group_size is None:
        return QuantizedWeight(codes, scale[:, 0].contiguous(), zero[:, 0].contiguous(), qw_init.bits, None)
    return QuantizedWeight(codes, scale, zero, qw_init.bits, group_size)


def _pick_rows(cands, val_errs, all_errs) -> QuantizedWeight:
    """Row by row, the first candidate (min-max) unless a later one is better by the relative
    margin _ROW_MARGIN both on the validation rows and on all calibration rows."""
    best = cands[0]
    best_v, best_a = val_errs[0].clone(), all_errs[0].clone()
    codes, scale, zero = best.codes.clone(), best.scale.clone(), best.zero.clone()
    for c, ev, ea in zip(cands[1:], val_errs[1:], all_errs[1:]):
        better = (ev < best_v * (1.0 - _ROW_MARGIN)) & (ea <= best_a * (1.0 - _ROW_MARGIN))
        if not bool(better.any()):
            continue
        codes[better] = c.codes[better]
        scale[better] = c.scale[better]
        zero[better] = c.zero[better]
        best_v = torch.where(better, ev, best_v)
        best_a = torch.where(better, ea, best_a)
    return QuantizedWeight(codes, scale, zero, best.bits, best.group_size)


def _split(x: Tensor) -> Tuple[Tensor, Tensor]:
    """(fit, validation) rows of the calibration activations: every VAL_EVERY-th row validates
    (all rows do both when there are fewer than 2 * VAL_EVERY)."""
    if x.shape[0] < 2 * VAL_EVERY:
        return x, x
    val = torch.zeros(x.shape[0], dtype=torch.bool)
    val[VAL_EVERY - 1::VAL_EVERY] = True
    return x[~val], x[val]


def calibrated(weight: Tensor, bits: Union[int, Tensor], group_size: Optional[int] = None, *,
               activations: Tensor) -> QuantizedWeight:
    """Activation-aware quantization from calibration activations X [n_samples, in] (or [..., in]).

    Candidates, fitted on 3/4 of the rows of X: min-max, the search with each input's error
    weighted by E[x_k^2], and GPTQ (per channel in act order). Each output row keeps the
    candidate with the least output error ||X_val (w_o - deq_o)||^2 on the held-out quarter if
    it also beats min-max on all of X (both by a relative 1e-4), so it is never worse than
    min-max on the calibration data. The held-out choice matters: with few samples per input (X
    not much taller than wide) GPTQ fits the samples' noise and does worse than min-max on new
    inputs; the held-out rows catch that.
    A plain QuantizedWeight: no per-input scaling."""
    _check_weight(weight)
    st = _calib_state(activations, weight.shape[1])
    qw, w, const, q_max = _minmax_full(weight, bits, group_size)
    n, k = w.shape
    if n == 0 or k == 0 or st.silent:  # silent inputs: every quantization has zero output error
        return _per_channel(qw)
    weighted = _search(w, qw, const, q_max, st.col_weight)
    cands = [_per_channel(qw), weighted]
    # GPTQ: per channel in act order (inputs by decreasing E[x^2]: on all-MiniLM-L6-v2 at 4 bits as
    # good as natural order and act order together, at half the time); per group in natural
    # order (a group's inputs must stay together)
    perm, hinv = st.factor(act_order=group_size is None)
    if hinv is not None and perm is None:
        cands.append(_gptq(w, weighted, q_max, hinv, st.col_weight))
    elif hinv is not None:
        g = _gptq(w[:, perm].contiguous(), weighted, q_max, hinv, st.col_weight[perm])
        codes = torch.empty_like(g.codes)
        codes[:, perm] = g.codes
        cands.append(g._replace(codes=codes))
    errs = [st.errors(w - c.dequantize()) for c in cands]
    return _pick_rows(cands, [e[0] for e in errs], [e[1] for e in errs])


# ------------------------------------------------------------------------------ GPTQ
def gptq(weight: Tensor, bits: Union[int, Tensor], group_size: Optional[int] = None, *,
         activations: Tensor) -> QuantizedWeight:
    """Error-feedback quantization (GPTQ, see :mod:`pyeditor.gptq`) from calibration activations
    X [n_samples, in] (or [..., in]): inputs quantized in order, each one's error fed into the
    inputs not yet quantized through H = X^T X / n (1% damping); per group the scale and zero
    chosen by a clip search (errors weighted by H_ii) when the loop reaches the group. Each
    output row keeps min-max instead unless GPTQ's output error on X is smaller (by a relative
    1e-3), so no row is worse than min-max on the calibration data. The H factorization is
    cached on the activation tensor (q, k and v, or one layer at several widths, share it).
    A plain QuantizedWeight: no per-input scaling."""
    _check_weight(weight)
    st = _calib_state(activations, weight.shape[1], _Hessian)
    qw, w, _, q_max = _minmax_full(weight, bits, group_size)
    n, k = w.shape
    if n == 0 or k == 0 or st.factor is None:  # silent inputs: any quantization has zero output error
        return _per_channel(qw)
    r, lam = st.factor
    codes, scale, zero, obj = _gptq_alg.run(w, q_max[:, 0].to(torch.float32), group_size, r, lam)
    mm_obj = _gptq_alg.objective(w - qw.dequantize(), r, lam)
    better = obj < mm_obj * (1.0 - _GPTQ_MARGIN)
    codes = torch.where(better[:, None], codes, qw.codes)
    scale = torch.where(better[:, None], scale, qw.scale.reshape(n, -1))
    zero = torch.where(better[:, None], zero.to(torch.int32), qw.zero.reshape(n, -1))
    return _per_channel(QuantizedWeight(codes, scale, zero, qw.bits, group_size))


# ------------------------------------------------------------------------------ dispatch
def quantize(weight: Tensor, bits: Union[int, Tensor], group_size: Optional[int] = None,
             method: str = "minmax", activations: Optional[Tensor] = None) -> QuantizedWeight:
    """Quantize an [out, in] weight per output channel (or group) with ``method``: "minmax" (the
    reference, bit for bit), "search" (data-free error minimization), "calibrated" or "gptq"
    (both need ``activations`` [n_samples, in])."""
    method = _check_method(method)
    if method in CALIBRATED_METHODS:
        if activations is None:
            raise ValueError(f"method={method!r} needs activations= (calibration inputs [n_samples, in] "
                             "of this layer)")
        fn = calibrated if method == "calibrated" else gptq
        return fn(weight, bits, group_size, activations=activations)
    if activations is not None:
        raise ValueError(f"activations is only used by method in {CALIBRATED_METHODS}, got method={method!r}")
    return minmax(weight, bits, group_size) if method == "minmax" else search(weight, bits, group_size)

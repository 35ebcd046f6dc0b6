"""CHORD's strategy functions (Liu et al., MM '25, Sec. 3.4): a bit width per output channel from
channel sensitivity (Gamma, Eq. 12) and layer importance (Lambda, Eq. 13), held to an
average-bits budget, with a straight-through estimator that carries the loss's gradient to both.
The plain-PyTorch oracle it is tested against is :func:`pyeditor.reference.allocate_bits`."""
from __future__ import annotations

import math
from fractions import Fraction
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .strategy_message import WIDTHS, check_widths

TOP, MID = 3, 1  # Gamma's tiers as ladder levels: top beta -> 8 (level 3), next beta -> 4 (level 1)


class _AllocationSTE(torch.autograd.Function):
    """Forward: the discrete bits. Backward: d bits[c] / d sensitivity[c] = 1 and
    d bits[c] / d shift = 1 for the layer's centred importance (summed over its channels)."""

    @staticmethod
    def forward(ctx, sensitivity: Tensor, shift: Optional[Tensor], bits: Tensor) -> Tensor:  # type: ignore[override]
        ctx.shift_dtype = None if shift is None else shift.dtype
        return bits.to(sensitivity.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        g_shift = None
        if ctx.shift_dtype is not None and ctx.needs_input_grad[1]:
            g_shift = grad.sum(-1, keepdim=True).to(ctx.shift_dtype)
        return grad, g_shift, None


def _check_sensitivity(sensitivity: object) -> Tuple[bool, List[Tensor], tuple]:
    single = isinstance(sensitivity, Tensor)
    if not single and (isinstance(sensitivity, (str, bytes)) or not isinstance(sensitivity, Sequence)):
        raise TypeError(f"sensitivity must be a tensor or a list of tensors (one per layer), "
                        f"got {type(sensitivity).__name__}")
    layers = [sensitivity] if single else list(sensitivity)  # type: ignore[list-item]
    if not layers:
        raise ValueError("sensitivity must hold at least one layer")
    lead = None
    for i, s in enumerate(layers):
        name = "sensitivity" if single else f"sensitivity[{i}]"
        if not isinstance(s, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(s).__name__}")
        if not s.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {s.dtype}")
        if s.dim() not in (1, 2):
            raise ValueError(f"{name} must be 1-D [C] or 2-D [B, C] (a batch of users), got shape {tuple(s.shape)}")
        if bool(torch.isnan(s).any()):
            raise ValueError(f"{name} must not contain NaN")
        if lead is None:
            lead = tuple(s.shape[:-1])
        elif tuple(s.shape[:-1]) != lead:
            raise ValueError(f"{name} has batch shape {tuple(s.shape[:-1])} but sensitivity[0] has {lead}")
        if s.device != layers[0].device:
            raise ValueError(f"{name} is on {s.device} but sensitivity[0] is on {layers[0].device}")
    return single, layers, lead  # type: ignore[return-value]


def _check_importance(lam: object, n_layers: int, lead: tuple, device: torch.device) -> Optional[Tensor]:
    if lam is None:
        return None
    if not isinstance(lam, Tensor) or not lam.is_floating_point():
        got = lam.dtype if isinstance(lam, Tensor) else type(lam).__name__
        raise TypeError(f"layer_importance must be a floating-point tensor, got {got}")
    if tuple(lam.shape) not in ((n_layers,), lead + (n_layers,)):
        want = f"[{n_layers}]" + (f" or [{lead[0]}, {n_layers}]" if lead else "")
        raise ValueError(f"layer_importance must have shape {want} (one per layer), got {tuple(lam.shape)}")
    if bool(torch.isnan(lam).any()):
        raise ValueError("layer_importance must not contain NaN")
    if not bool(torch.isfinite(lam).all()):
        raise ValueError("layer_importance must be finite")
    if lam.device != device:
        raise ValueError(f"layer_importance is on {lam.device} but sensitivity is on {device}")
    return lam


def _check_beta(beta: object) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta <= 0.5:
        raise ValueError(f"beta must be a number in [0, 0.5], got {beta!r}")
    return float(beta)


def _check_budget(budget: object, widths: Tuple[int, ...]) -> Optional[Fraction]:
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"budget must be a number (average bits per channel), got {type(budget).__name__}")
    if not math.isfinite(budget) or not widths[0] <= budget <= widths[-1]:
        raise ValueError(f"budget must be in [{widths[0]}, {widths[-1]}] (every channel holds one of "
                         f"{', '.join(map(str, widths))} bits), got {budget}")
    return Fraction(budget)


def budget_total(budget: float, channels: int, widths: Sequence[int] = WIDTHS) -> int:
    """The total bits an allocation of ``channels`` channels aims at for an average ``budget``:
    floor(budget * channels) (exact arithmetic), lowered to the largest total the ladder reaches
    when its steps are even (2-4-6-8: the largest even total <= budget * channels)."""
    widths = check_widths(widths)
    b = _check_budget(budget, widths)
    total = math.floor(b * channels)  # type: ignore[operator]
    steps = {hi - lo for lo, hi in zip(widths, widths[1:])}
    if len(steps) == 1:
        step, low = steps.pop(), widths[0] * channels
        total = low + step * ((total - low) // step)
    return total


def _gamma(s: Tensor, beta: float) -> Tuple[Tensor, Tensor]:
    """Eq. 12 on [R, C]: ladder levels and each channel's rank (0 = most sensitive; ties: lower index)."""
    rows, c = s.shape
    n_top, n_mid = math.floor(beta * c + 0.5), math.floor(2 * beta * c + 0.5)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(c, device=s.device).expand(rows, c))
    levels = torch.zeros_like(rank)
    levels[rank < n_mid] = MID
    levels[rank < n_top] = TOP
    return levels, rank


def _boost_cut(lam: Tensor) -> Tensor:
    """Eq. 13 for every layer: +1 level above the mean importance, -1 below, 0 at it (exact)."""
    signs = []
    for row in lam.tolist():
        fr = [Fraction(v) for v in row]
        total, n = sum(fr), len(fr)
        signs.append([(n * f > total) - (n * f < total) for f in fr])
    return torch.tensor(signs, dtype=torch.int64, device=lam.device)


def _fill(levels: Tensor, order: Tensor, need: Tensor, widths: Tuple[int, ...]) -> Tuple[Tensor, Tensor]:
    """Add ``need`` bits per row: channels in ``order`` go up as far as the bits left allow
    (the first ones to the top, then each to the highest level that still fits). Returns the
    levels and the bits that did not fit (0 for evenly spaced ladders)."""
    wt = torch.tensor(widths, dtype=torch.int64, device=levels.device)
    lv = levels.gather(1, order)
    cap = wt[TOP] - wt[lv]
    full = cap.cumsum(1) <= need[:, None]
    lv = torch.where(full, torch.full_like(lv, TOP), lv)
    left = need - (cap * full).sum(1)
    pos = full.sum(1)
    ladder = torch.arange(4, device=levels.device)
    n = lv.shape[1]
    cols = torch.arange(n, device=levels.device)
    # the smallest move up from each rung (none from the top): a channel whose smallest move does
    # not fit now never will (the bits left only shrink), so the scan jumps to the next that fits
    step = torch.cat([wt[1:] - wt[:-1], wt.new_full((1,), torch.iinfo(torch.int64).max)])
    while True:
        active = ((left > 0) & (pos < n)).nonzero().flatten()
        if active.numel() == 0:
            break
        fits = (step[lv[active]] <= left[active, None]) & (cols >= pos[active, None])
        p = torch.where(fits.any(1), fits.to(torch.int8).argmax(1), n)
        pos[active] = p
        done = p >= n
        if bool(done.all()):
            break
        active, p = active[~done], p[~done]
        gain = wt[None, :] - wt[lv[active, p]][:, None]
        best = torch.where((gain >= 0) & (gain <= left[active, None]), ladder, -1).amax(1)
        lv[active, p] = best
        left[active] -= gain.gather(1, best[:, None]).squeeze(1)
        pos[active] += 1
    return levels.scatter(1, order, lv), left


def _meet(levels: Tensor, order: Tensor, need: Tensor, widths: Tuple[int, ...]) -> Tensor:
    """Move levels by ``need`` bits per row: up from the most important channel, down from the least."""
    levels = levels.clone()
    up, down = need > 0, need < 0
    if bool(up.any()):
        levels[up] = _fill(levels[up], order[up], need[up], widths)[0]
    if bool(down.any()):
        # going down the ladder is going up the mirrored one (widths -8, -6, -4, -2)
        mirrored = tuple(-w for w in reversed(widths))
        rev = order[down].flip(1)
        lv, left = _fill(TOP - levels[down], rev, -need[down], mirrored)
        over = (left > 0).nonzero().flatten()
        if over.numel():  # uneven ladder: still above budget; one more level off the least important
            m = lv[over].gather(1, rev[over])
            first = (m < TOP).to(torch.int8).argmax(1)
            ch = rev[over].gather(1, first[:, None]).squeeze(1)
            lv[over, ch] += 1
        levels[down] = TOP - lv
    return levels


def _importance_order(q: Tensor, lam_rank: Optional[Tensor]) -> Tensor:
    """Channels by (in-layer sensitivity rank / C asc, layer importance desc, layer, channel):
    stable sorts from the least significant key up."""
    rows, n = q.shape
    order = torch.arange(n, device=q.device).expand(rows, n)  # layer-major: (layer, channel) ascending
    if lam_rank is not None:
        order = order.gather(1, torch.sort(lam_rank, dim=1, descending=True, stable=True).indices)
    return order.gather(1, torch.sort(q.gather(1, order), dim=1, stable=True).indices)


def allocate_bits(
    sensitivity: Union[Tensor, Sequence[Tensor]],
    beta: float,
    layer_importance: Optional[Tensor] = None,
    straight_through: bool = False,
    *,
    budget: Optional[float] = None,
    widths: Sequence[int] = WIDTHS,
) -> Union[Tensor, List[Tensor]]:
    """CHORD's Gamma (Eq. 12) and Lambda (Eq. 13) on the ladder ``widths`` (default 2-4-6-8;
    Table 4's other configuration is 2-5-6-7), held to an average-bits budget.

    sensitivity: one layer's channel sensitivity alpha^W, [C] or [B, C] (B users, each
        allocated on its own), or a list with one such tensor per layer (same B, C may differ).
        Floating, no NaN.
    beta: tier fraction in [0, 0.5].
    layer_importance: alpha^L, [L] or [B, L] (L = number of layers), finite; optional.
    budget: average bits per channel (every output channel of every layer counts once), in
        [widths[0], widths[3]]; optional.

    Per user:
    1. Gamma, per layer of C channels ranked by descending sensitivity (ties: lower index first):
       the first floor(beta*C + 1/2) get widths[3] (8), the next floor(2*beta*C + 1/2) minus those
       get widths[1] (4), the rest widths[0] (2).
    2. Lambda, for every layer l: importance above the mean of the L importances moves each of its
       channels one rung up the ladder (2->4->6->8, 8 stays), below the mean one rung down
       (8->6->4->2, 2 stays), equal to it (always when L == 1) no change (exact comparison).
    3. Budget. The target total is floor(budget * N) bits over the N channels (exact arithmetic),
       lowered to the nearest total the ladder can reach when its steps are even (2-4-6-8: the
       largest even total). Without a budget but with layer_importance, the target is Gamma's own
       total, so Lambda only moves bits between layers. Without either, nothing is moved. To meet
       the target, channels are taken in importance order -- rank / C within their layer
       ascending (every layer's most sensitive channels first, its least sensitive last, whatever
       its size), then layer importance descending, then layer, then channel index -- and bits
       are added from the most important channel (each to the top before the next) or removed
       from the least important (each to the bottom before the previous). The correction is thus
       spread over the layers' least (or most) sensitive channels rather than undoing Lambda.
       With evenly spaced widths this meets the target exactly: the average is the nearest
       achievable one at or below the budget. With uneven widths (2-5-6-7) each channel takes the
       largest move that still fits and the scan goes on; when no move fits any more the total is
       below the target by less than the largest one-rung step (raising), or one more rung comes
       off the least important channel that can give one, leaving it below the target by less
       than that step (lowering). No allocation ever exceeds the budget.
    A budget outside [widths[0], widths[3]] cannot be met by any allocation and raises ValueError.

    Returns the structure of sensitivity: int64 bits, or with straight_through=True bits in
    sensitivity's dtype carrying a straight-through gradient. What is differentiated: the
    surrogate
        bits~[l, c] = bits[l, c] + (s[l, c] - s0[l, c]) + (lam_l - mean(lam)) - (lam0_l - mean(lam0))
    at the current point (s0, lam0); its value is the discrete bits and its derivatives are
    d bits~[l, c] / d s[l, c] = 1 (other channels 0) and d bits~[l, c] / d lam_m = [l == m] - 1/L.
    So sensitivity receives the bits' gradient unchanged and layer l's importance receives the
    sum of its channels' gradients minus the mean of that sum over the layers (Lambda depends
    only on each importance's offset from the mean; with L == 1 the gradient is zero).
    """
    widths = check_widths(widths)
    single, layers, lead = _check_sensitivity(sensitivity)
    beta = _check_beta(beta)
    if not isinstance(straight_through, bool):
        raise TypeError(f"straight_through must be a bool, got {type(straight_through).__name__}")
    device = layers[0].device
    lam = _check_importance(layer_importance, len(layers), lead, device)
    target_budget = _check_budget(budget, widths)
    rows = lead[0] if lead else 1
    sizes = [s.shape[-1] for s in layers]
    n = sum(sizes)
    levels, fractions = [], []
    for s, c in zip(layers, sizes):
        lv, rank = _gamma(s.detach().reshape(rows, c), beta)
        levels.append(lv)
        fractions.append(rank.to(torch.float64) / max(c, 1))
    lv = torch.cat(levels, 1)
    wt = torch.tensor(widths, dtype=torch.int64, device=device)
    gamma_total = wt[lv].sum(1)
    lam_rank = None
    if lam is not None:
        lam2 = lam.detach().expand(rows, len(layers))
        layer_of = torch.repeat_interleave(torch.arange(len(layers), device=device),
                                           torch.tensor(sizes, device=device))
        lv = (lv + _boost_cut(lam2)[:, layer_of]).clamp(0, TOP)
        lam_rank = (lam2[:, None, :] < lam2[:, :, None]).sum(-1)[:, layer_of]
    target = None
    if target_budget is not None:
        target = torch.full((rows,), budget_total(budget, n, widths), dtype=torch.int64, device=device)
    elif lam is not None:
        target = gamma_total
    if target is not None and n:
        lv = _meet(lv, _importance_order(torch.cat(fractions, 1), lam_rank), target - wt[lv].sum(1), widths)
    bits = [b.reshape(s.shape) for b, s in zip(wt[lv].split(sizes, 1), layers)]
    if straight_through:
        centred = None if lam is None else lam - lam.mean(-1, keepdim=True)
        out = []
        for i, (s, b) in enumerate(zip(layers, bits)):
            shift = None if centred is None else centred[..., i:i + 1].expand(*lead, 1)
            out.append(_AllocationSTE.apply(s, shift, b))
        bits = out
    return bits[0] if single else bits

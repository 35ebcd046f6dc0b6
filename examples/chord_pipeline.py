"""CHORD end to end on pyeditor: per-device 2/4/6/8-bit strategies for a frozen random model.

    .venv/bin/python examples/chord_pipeline.py             # small config, < 1 minute on 2 cores
    .venv/bin/python examples/chord_pipeline.py --hidden 512 --users 512 --steps 600

Method (CHORD Sec. 3.2-3.4), every quantization, strategy code and packed layer through pyeditor:
  * a frozen, random-initialised backbone shared by every device (the layers CHORD quantizes) and a
    linear readout fitted once on the cloud history at full precision;
  * a GRU on the device turns recent interactions into a user embedding z (Eq. 6);
  * cloud hypernetworks give filter-level (Eq. 7) and element-level (Eq. 8) sensitivity per layer,
    run as pyeditor.hyper_matmul heads; alpha^W = softmax(alpha^F) * sum_k |alpha^E| (Eq. 10-11);
  * pyeditor.allocate_bits (Eq. 12, straight-through) turns it into 8/4/2 bits per channel; the
    training loss sees exactly the quantized weights of those widths, and the gradient reaches the
    bits through a surrogate whose error shrinks by 2^-db per extra bit;
  * the 2-bit code (pyeditor.encode_strategy) goes to the device, which decodes it, builds
    PackedLinear layers from its copy of the frozen weights (pyeditor.nn.quantize_model) and serves.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pyeditor  # noqa: E402
from pyeditor.nn import PackedLinear, quantize_model  # noqa: E402

LAYERS = ("0", "2")  # the backbone's Linear layers, by their names in the Sequential


class Users:
    """Users in interest regions: each user's interactions are feature vectors near its own centre
    (its group's centre plus a personal offset); the item clicked is a fixed linear rule of them.
    Different regions light up different random features, so which channels need precision is
    a per-user question."""

    def __init__(self, users: int, groups: int, features: int, classes: int, seed: int, spread: float = 0.6):
        g = torch.Generator().manual_seed(seed)
        self.centres = torch.randn(groups, features, generator=g) * 3.0
        self.group = torch.randint(0, groups, (users,), generator=g)
        self.home = self.centres[self.group] + torch.randn(users, features, generator=g) * 0.5
        self.rule = torch.randn(features, classes, generator=g)
        self.spread, self.gen = spread, g

    def interactions(self, n: int):
        x = self.home.unsqueeze(1) + self.spread * torch.randn(self.home.shape[0], n, self.home.shape[1],
                                                               generator=self.gen)
        return x, (x @ self.rule).argmax(-1)


class SensitivityHypernet(nn.Module):
    """z -> per-layer channel sensitivity alpha^W (Eq. 7, 8, 10, 11); heads run on pyeditor.hyper_matmul."""

    def __init__(self, features: int, embed: int, shapes: List[tuple]):
        super().__init__()
        self.gru = nn.GRU(features, embed, batch_first=True)          # device-side G_d (Eq. 6)
        self.shapes = shapes
        self.filter_w = nn.ParameterList([nn.Parameter(torch.randn(1, embed, o) * embed ** -0.5) for o, _ in shapes])
        self.filter_b = nn.ParameterList([nn.Parameter(torch.zeros(1, o)) for o, _ in shapes])
        self.elem_w = nn.ParameterList([nn.Parameter(torch.randn(1, embed, o * i) * embed ** -0.5) for o, i in shapes])
        self.elem_b = nn.ParameterList([nn.Parameter(torch.zeros(1, o * i)) for o, i in shapes])

    def embed(self, recent: Tensor) -> Tensor:
        return self.gru(recent)[1][-1]

    def forward(self, recent: Tensor) -> List[Tensor]:
        """[L] of [B, out_l]: weighted channel sensitivity per layer and user."""
        z = self.embed(recent)
        out = []
        for (o, i), fw, fb, ew, eb in zip(self.shapes, self.filter_w, self.filter_b, self.elem_w, self.elem_b):
            a_f = pyeditor.hyper_matmul(z, fw, fb)[0]                            # [B, out]   Eq. 7
            a_e = pyeditor.hyper_matmul(z, ew, eb)[0].view(-1, o, i)             # [B, out, in] Eq. 8
            out.append(torch.softmax(a_f, -1) * a_e.abs().sum(-1))               # Eq. 10-11
        return out


def allocate(sens: List[Tensor], beta: float, straight_through: bool) -> List[Tensor]:
    """Per user, pyeditor.allocate_bits over its layers: [L] of [B, out_l] bits."""
    per_user = [pyeditor.allocate_bits([s[u] for s in sens], beta, straight_through=straight_through)
                for u in range(sens[0].shape[0])]
    return [torch.stack([bits[layer] for bits in per_user]) for layer in range(len(sens))]


class QuantLevels:
    """One layer's frozen weight quantized at every width with pyeditor (per channel, so a mixed
    strategy's weight is these rows picked by each channel's width)."""

    def __init__(self, linear: nn.Linear):
        w = linear.weight.detach()
        self.w, self.bias = w, linear.bias.detach()
        self.levels = torch.stack([pyeditor.quantize_channelwise(w, b).dequantize() for b in pyeditor.quant.WIDTHS])

    def weights(self, bits: Tensor) -> Tensor:
        """[B, out, in] quantized weights for float bits [B, out] (values in {2,4,6,8}); forward
        exact, gradient to the bits through err * 2^-(bits - bits.detach())."""
        idx = (bits.detach() / 2 - 1).long()
        rows = torch.arange(self.w.shape[0])
        err = self.levels[idx, rows] - self.w
        return self.w + err * torch.exp2(-(bits - bits.detach())).unsqueeze(-1)


def quantized_forward(levels: List[QuantLevels], readout: nn.Linear, x: Tensor, bits: List[Tensor]) -> Tensor:
    h = x
    for q, b in zip(levels, bits):
        h = torch.relu(torch.einsum("bsi,boi->bso", h, q.weights(b)) + q.bias)
    return readout(h)


def serve(backbone: nn.Sequential, readout: nn.Linear, codes: Dict[str, Tensor], x: Tensor) -> Tensor:
    """The device: decode the strategy, pack its own copy of the frozen weights, run."""
    outs = {name: backbone.get_submodule(name).out_features for name in LAYERS}
    bits = {name: pyeditor.decode_strategy(codes[name], outs[name]) for name in LAYERS}
    local = quantize_model(copy.deepcopy(backbone), lambda name, lin: bits.get(name))
    if not all(isinstance(local.get_submodule(n), PackedLinear) for n in LAYERS):
        raise RuntimeError("quantize_model left a backbone layer unpacked")
    with torch.no_grad():
        return readout(local(x))


def avg_bits(bits: Dict[str, Tensor], backbone: nn.Sequential) -> float:
    """Bits per weight of the quantized layers (each channel's width times its row length)."""
    total = sum(float(bits[n].float().sum()) * backbone.get_submodule(n).in_features for n in LAYERS)
    return total / sum(backbone.get_submodule(n).weight.numel() for n in LAYERS)


def main(argv=None) -> Dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=96, help="devices (train on their history, test on new data)")
    p.add_argument("--test-users", type=int, default=32, help="devices served with packed layers")
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--features", type=int, default=16)
    p.add_argument("--classes", type=int, default=32, help="items to choose from")
    p.add_argument("--hidden", type=int, default=128, help="width of the frozen backbone")
    p.add_argument("--embed", type=int, default=16, help="user embedding z")
    p.add_argument("--recent", type=int, default=16, help="real-time interactions summarised into z")
    p.add_argument("--samples", type=int, default=64, help="interactions per user and split")
    p.add_argument("--spread", type=float, default=0.6, help="spread of a user's interactions around its centre")
    p.add_argument("--beta", type=float, default=0.125, help="tier fraction (8-bit top beta, 4-bit next beta)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)

    world = Users(args.users, args.groups, args.features, args.classes, args.seed, args.spread)
    hist_x, hist_y = world.interactions(args.samples)
    recent_x, _ = world.interactions(args.recent)       # the real-time window the device summarises
    test_x, test_y = world.interactions(args.samples)   # what the device must then predict

    # the shared frozen random backbone; the readout is fitted once, full precision, on the history
    backbone = nn.Sequential(nn.Linear(args.features, args.hidden), nn.ReLU(),
                             nn.Linear(args.hidden, args.hidden), nn.ReLU()).requires_grad_(False)
    readout = nn.Linear(args.hidden, args.classes)
    feats = backbone(hist_x)
    opt = torch.optim.Adam(readout.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(readout(feats).flatten(0, 1), hist_y.flatten()).backward()
        opt.step()
    readout.requires_grad_(False)

    levels = [QuantLevels(backbone.get_submodule(n)) for n in LAYERS]
    shapes = [tuple(q.w.shape) for q in levels]
    hyper = SensitivityHypernet(args.features, args.embed, shapes)
    opt = torch.optim.Adam(hyper.parameters(), lr=args.lr)
    for _ in range(args.steps):
        u = torch.randint(0, args.users, (args.batch,), generator=gen)
        bits = allocate(hyper(hist_x[u, :args.recent]), args.beta, straight_through=True)
        loss = F.cross_entropy(quantized_forward(levels, readout, hist_x[u, args.recent:], bits).flatten(0, 1),
                               hist_y[u, args.recent:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()

    # cloud -> device for the test users: one strategy per user, 2 bits per channel on the wire
    served = torch.arange(min(args.test_users, args.users))
    with torch.no_grad():
        sens = hyper(recent_x[served])
        user_bits = allocate(sens, args.beta, straight_through=False)
        # the non-personalised strategy at the same budget: the mean sensitivity over all users
        global_bits = [pyeditor.allocate_bits(s.mean(0), args.beta) for s in hyper(hist_x[:, :args.recent])]
    res = {}
    fp = readout(backbone(test_x[served]))
    res["acc_fp32"] = _acc(fp, test_y[served])
    for b in (8, 4, 2):
        bits = {n: torch.full((q.w.shape[0],), b) for n, q in zip(LAYERS, levels)}
        codes = {n: pyeditor.encode_strategy(v) for n, v in bits.items()}
        res[f"acc_uniform{b}"] = _acc(serve(backbone, readout, codes, test_x[served]), test_y[served])
    codes_g = {n: pyeditor.encode_strategy(v) for n, v in zip(LAYERS, global_bits)}
    res["acc_global_mixed"] = _acc(serve(backbone, readout, codes_g, test_x[served]), test_y[served])
    res["avg_bits_global_mixed"] = avg_bits(dict(zip(LAYERS, global_bits)), backbone)

    hits, wire, bit_sum = 0, 0, 0.0
    for k, u in enumerate(served.tolist()):
        codes = {n: pyeditor.encode_strategy(user_bits[i][k]) for i, n in enumerate(LAYERS)}
        wire += sum(c.numel() for c in codes.values())
        logits = serve(backbone, readout, codes, test_x[u:u + 1])
        hits += int((logits.argmax(-1) == test_y[u:u + 1]).sum())
        bit_sum += avg_bits({n: user_bits[i][k] for i, n in enumerate(LAYERS)}, backbone)
    res["acc_chord"] = hits / test_y[served].numel()
    res["avg_bits_chord"] = bit_sum / len(served)
    res["wire_bytes_per_user"] = wire / len(served)
    fp32_bytes = sum(backbone.get_submodule(n).weight.numel() * 4 for n in LAYERS)
    packed = quantize_model(copy.deepcopy(backbone), lambda n, lin: user_bits[LAYERS.index(n)][0]
                            if n in LAYERS else None)
    res["fp32_weight_bytes"] = fp32_bytes
    res["packed_weight_bytes"] = sum(packed.get_submodule(n).packed_bytes for n in LAYERS)
    res["seconds"] = time.perf_counter() - t0
    _print(args, res)
    return res


def _acc(logits: Tensor, y: Tensor) -> float:
    return float((logits.argmax(-1) == y).float().mean())


def _print(args, r: Dict[str, float]) -> None:
    print(f"CHORD pipeline: frozen random backbone {args.features}->{args.hidden}->{args.hidden}, "
          f"{args.test_users} served devices, beta={args.beta}, seed={args.seed}")
    print(f"{'strategy':<34}{'avg bits':>10}{'accuracy':>10}")
    rows = [("full precision (fp32)", 32.0, r["acc_fp32"]), ("uniform 8-bit", 8.0, r["acc_uniform8"]),
            ("uniform 4-bit", 4.0, r["acc_uniform4"]), ("uniform 2-bit", 2.0, r["acc_uniform2"]),
            ("mixed, one strategy for all", r["avg_bits_global_mixed"], r["acc_global_mixed"]),
            ("CHORD, per-device strategy", r["avg_bits_chord"], r["acc_chord"])]
    for name, bits, acc in rows:
        print(f"{name:<34}{bits:>10.2f}{acc:>10.4f}")
    ratio = r["fp32_weight_bytes"] / r["wire_bytes_per_user"]
    print(f"on the wire per device: {r['wire_bytes_per_user']:.0f} B strategy code vs "
          f"{r['fp32_weight_bytes']} B fp32 weights ({ratio:.0f}x less) or {r['packed_weight_bytes']} B packed "
          f"weights ({r['packed_weight_bytes'] / r['wire_bytes_per_user']:.0f}x less); {r['seconds']:.1f} s")


if __name__ == "__main__":
    main()

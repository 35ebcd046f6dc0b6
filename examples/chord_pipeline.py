"""CHORD end to end on pyeditor: per-device mixed-precision strategies for a frozen random model.

    .venv/bin/python examples/chord_pipeline.py                          # both bit configs, Lambda on
    .venv/bin/python examples/chord_pipeline.py --no-layer-importance    # CHORD rows without Lambda
    .venv/bin/python examples/chord_pipeline.py --bit-configs 2-4-6-8 --steps 60 --users 48   # quick

Method (CHORD, Liu et al., MM '25, Sec. 3.2-3.4), every strategy, code and quantization through pyeditor:
  * a frozen, random-initialised backbone shared by every device: a float input layer, then --depth
    hidden x hidden Linear layers (the layers CHORD quantizes; equal widths, so the average bits per
    channel the allocation holds is also the average bits per weight, as the paper reports it), and
    a linear readout fitted once on the cloud history at full precision;
  * a GRU on the device turns recent interactions into a user embedding z (Eq. 6);
  * cloud hypernetworks (pyeditor.hyper_matmul) give filter-level (Eq. 7), element-level (Eq. 8) and
    layer-level (Eq. 9) sensitivity; alpha^W = softmax(alpha^F) * sum_k |alpha^E| (Eq. 10-11), or
    softmax(alpha^F) alone for Table 3's +Customization row;
  * pyeditor.allocate_bits turns alpha^W into tiers (Eq. 12) and, with Lambda on, moves every layer
    one rung up or down by alpha^L (Eq. 13) while holding Gamma's average bits; its straight-through
    estimator carries the loss's gradient to alpha^W and alpha^L through pyeditor.fake_quantize,
    which trains on exactly the weights the device will serve;
  * one checksummed message per device (pyeditor.encode_strategy_message: every layer's 2-bit code)
    goes to the device, which decodes it, packs its own copy of the frozen weights into PackedLinear
    layers (pyeditor.nn.quantize_model) and serves. 2-5-6-7 has no packed kernel (the kernels pack
    2, 4, 6 and 8 bits): that configuration is evaluated on the fake-quantized weights, which for
    2-4-6-8 equal the packed layers' weights bit for bit.
The tables have the shape of the paper's Tables 3 and 4; the data are synthetic users (interest
regions in feature space), so the values are not comparable with the paper's datasets: the paper's
figures (SASRec on ML-100K) are printed beside ours for the shape of the comparison; the wire cost
is computed by the paper's own definition.
The example runs with one intra-op thread unless --threads says otherwise (examples/example_threads.py),
so that its timing on a shared host is reproducible; it prints the count.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pyeditor  # noqa: E402
from pyeditor.nn import PackedLinear, quantize_model  # noqa: E402
import example_threads  # noqa: E402

BIT_CONFIGS = {"2-4-6-8": (2, 4, 6, 8), "2-5-6-7": (2, 5, 6, 7)}  # the paper's Table 4
TOP_K = 10
# CHORD with SASRec on ML-100K: (Avg Bits, NDCG@10, HR@10) -- Table 2 (Base), Table 3 (ablation), Table 4
PAPER_TABLE3 = {"Base (fp32)": (32, 0.0515, 0.1092), "Quant (uniform 3-bit)": (3, 0.0479, 0.1029),
                "+Customization (filter only)": (3, 0.0687, 0.1432),
                "+Weighted Channel (Lambda off)": (3, 0.0699, 0.1421), "CHORD (Lambda on)": (3, 0.0707, 0.1463)}
PAPER_TABLE4 = {"2-4-6-8": (3, 0.0707, 0.1463), "2-5-6-7": (3, 0.0672, 0.1368)}  # CHORD, Lambda on


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
    """z -> per-layer channel sensitivity alpha^W (Eq. 7, 8, 10, 11) and layer importance alpha^L
    (Eq. 9); every head runs on pyeditor.hyper_matmul."""

    def __init__(self, features: int, embed: int, shapes: List[Tuple[int, int]], weighted: bool = True):
        super().__init__()
        self.weighted = weighted  # False: filter-level sensitivity alone (Table 3's +Customization)
        self.gru = nn.GRU(features, embed, batch_first=True)          # device-side G_d (Eq. 6)
        self.shapes = shapes
        scale = embed ** -0.5
        self.filter_w = nn.ParameterList([nn.Parameter(torch.randn(1, embed, o) * scale) for o, _ in shapes])
        self.filter_b = nn.ParameterList([nn.Parameter(torch.zeros(1, o)) for o, _ in shapes])
        elems = shapes if weighted else []
        self.elem_w = nn.ParameterList([nn.Parameter(torch.randn(1, embed, o * i) * scale) for o, i in elems])
        self.elem_b = nn.ParameterList([nn.Parameter(torch.zeros(1, o * i)) for o, i in elems])
        self.layer_w = nn.Parameter(torch.randn(1, embed, len(shapes)) * scale)
        self.layer_b = nn.Parameter(torch.zeros(1, len(shapes)))

    def forward(self, recent: Tensor) -> Tuple[List[Tensor], Tensor]:
        """([L] of [B, out_l] weighted channel sensitivity, [B, L] layer importance)."""
        z = self.gru(recent)[1][-1]
        sens = []
        for k, ((o, i), fw, fb) in enumerate(zip(self.shapes, self.filter_w, self.filter_b)):
            a_f = torch.softmax(pyeditor.hyper_matmul(z, fw, fb)[0], -1)        # [B, out]   Eq. 7, 10
            if self.weighted:
                a_e = pyeditor.hyper_matmul(z, self.elem_w[k], self.elem_b[k])[0].view(-1, o, i)  # Eq. 8
                a_f = a_f * a_e.abs().sum(-1)                                    # Eq. 11
            sens.append(a_f)
        return sens, pyeditor.hyper_matmul(z, self.layer_w, self.layer_b)[0]    # Eq. 9


class Model:
    """The frozen backbone (float input layer + quantized hidden layers) and the fitted readout."""

    def __init__(self, features: int, hidden: int, depth: int, classes: int):
        layers: List[nn.Module] = [nn.Linear(features, hidden), nn.ReLU()]
        for _ in range(depth):
            layers += [nn.Linear(hidden, hidden), nn.ReLU()]
        self.backbone = nn.Sequential(*layers).requires_grad_(False)
        self.names = [str(2 * (k + 1)) for k in range(depth)]  # the quantized Linear layers
        self.readout = nn.Linear(hidden, classes)

    def quantized(self) -> List[nn.Linear]:
        return [self.backbone.get_submodule(n) for n in self.names]

    def n_parameters(self) -> int:
        return sum(p.numel() for m in (self.backbone, self.readout) for p in m.parameters())

    def forward(self, x: Tensor, bits: Optional[List[Tensor]] = None) -> Tensor:
        """Logits with every quantized layer fake-quantized at bits[l] ([B, out] per user, or an
        int for all), or at full precision (bits None)."""
        h = self.backbone[1](self.backbone[0](x))
        for k, lin in enumerate(self.quantized()):
            if bits is None:
                h = F.linear(h, lin.weight, lin.bias)
            else:
                w = pyeditor.fake_quantize(lin.weight, bits[k])
                h = torch.einsum("bsi,boi->bso", h, w) + lin.bias if w.dim() == 3 else F.linear(h, w, lin.bias)
            h = torch.relu(h)
        return self.readout(h)


def train_strategy(model: Model, world_x: Tensor, world_y: Tensor, widths, use_lambda: bool,
                   args, seed: int, weighted: bool = True) -> SensitivityHypernet:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    shapes = [tuple(lin.weight.shape) for lin in model.quantized()]
    hyper = SensitivityHypernet(args.features, args.embed, shapes, weighted)
    opt = torch.optim.Adam(hyper.parameters(), lr=args.lr)
    for _ in range(args.steps):
        u = torch.randint(0, world_x.shape[0], (args.batch,), generator=gen)
        sens, lam = hyper(world_x[u, :args.recent])
        bits = pyeditor.allocate_bits(sens, args.beta, lam if use_lambda else None, True, widths=widths)
        logits = model.forward(world_x[u, args.recent:], bits)
        loss = F.cross_entropy(logits.flatten(0, 1), world_y[u, args.recent:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return hyper


def strategies(hyper: SensitivityHypernet, recent: Tensor, beta: float, widths, use_lambda: bool) -> List[Tensor]:
    with torch.no_grad():
        sens, lam = hyper(recent)
        return pyeditor.allocate_bits(sens, beta, lam if use_lambda else None, widths=widths)


def metrics(logits: Tensor, y: Tensor) -> Dict[str, float]:
    """Acc@1, HR@10 and NDCG@10 of the clicked item among all items (one relevant item)."""
    rank = (logits > logits.gather(-1, y.unsqueeze(-1))).sum(-1).double()
    hit = (rank < TOP_K).double()
    return {"acc": float((rank == 0).double().mean()), "hr10": float(hit.mean()),
            "ndcg10": float((hit / torch.log2(rank + 2)).mean())}


def avg_bits(bits: List[Tensor]) -> float:
    """Average bits per channel, which is per weight too (the quantized layers share one width)."""
    return float(torch.cat([b.flatten() for b in bits]).double().mean())


def width_shares(bits: List[Tensor], widths) -> Dict[int, float]:
    """Share of all served channels at each width of the ladder (Lambda's boost/cut shows here)."""
    flat = torch.cat([b.flatten() for b in bits])
    return {int(w): float((flat == w).double().mean()) for w in widths}


def serve(model: Model, message: bytes, x: Tensor) -> Tensor:
    """The device: decode the message, pack its own copy of the frozen weights, run."""
    layers = pyeditor.decode_strategy_message(message)
    if [(int(s.bits.numel()), s.in_features) for s in layers] != [tuple(lin.weight.shape) for lin in model.quantized()]:
        raise RuntimeError("the strategy message does not fit this device's model")
    bits = dict(zip(model.names, (s.bits for s in layers)))
    local = quantize_model(copy.deepcopy(model.backbone), lambda name, lin: bits.get(name))
    if not all(isinstance(local.get_submodule(n), PackedLinear) for n in model.names):
        raise RuntimeError("quantize_model left a backbone layer unpacked")
    with torch.no_grad():
        return model.readout(local(x))


def main(argv=None) -> Dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=96, help="devices (train on their history, test on new data)")
    p.add_argument("--test-users", type=int, default=32, help="devices served")
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--features", type=int, default=16)
    p.add_argument("--classes", type=int, default=32, help="items to choose from")
    p.add_argument("--hidden", type=int, default=128, help="width of the frozen backbone")
    p.add_argument("--depth", type=int, default=3, help="quantized hidden x hidden layers")
    p.add_argument("--embed", type=int, default=16, help="user embedding z")
    p.add_argument("--recent", type=int, default=16, help="real-time interactions summarised into z")
    p.add_argument("--samples", type=int, default=64, help="interactions per user and split")
    p.add_argument("--spread", type=float, default=0.6, help="spread of a user's interactions around its centre")
    p.add_argument("--beta", type=float, default=0.125, help="tier fraction (top beta, next beta)")
    p.add_argument("--bit-configs", default="2-4-6-8,2-5-6-7", help="comma-separated, of " + ", ".join(BIT_CONFIGS))
    p.add_argument("--no-layer-importance", action="store_true", help="CHORD rows without Lambda (Eq. 13)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    example_threads.add_argument(p)
    args = p.parse_args(argv)
    configs = [c.strip() for c in args.bit_configs.split(",") if c.strip()]
    if not configs or any(c not in BIT_CONFIGS for c in configs):
        p.error(f"--bit-configs must name some of {', '.join(BIT_CONFIGS)}, got {args.bit_configs!r}")
    with example_threads.threads(args.threads) as n_threads:
        return _run(args, configs, n_threads)


def _run(args, configs: List[str], n_threads: int) -> Dict[str, object]:
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    world = Users(args.users, args.groups, args.features, args.classes, args.seed, args.spread)
    hist_x, hist_y = world.interactions(args.samples)
    recent_x, _ = world.interactions(args.recent)       # the real-time window the device summarises
    test_x, test_y = world.interactions(args.samples)   # what the device must then predict
    served = torch.arange(min(args.test_users, args.users))
    tx, ty = test_x[served], test_y[served]

    model = Model(args.features, args.hidden, args.depth, args.classes)
    feats = model.backbone(hist_x)
    opt = torch.optim.Adam(model.readout.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(model.readout(feats).flatten(0, 1), hist_y.flatten()).backward()
        opt.step()
    model.readout.requires_grad_(False)

    use_lambda = not args.no_layer_importance
    res: Dict[str, object] = {"rows": {}, "threads": n_threads}
    rows: Dict[str, Dict[str, float]] = res["rows"]  # type: ignore[assignment]
    with torch.no_grad():
        rows["Base (fp32)"] = dict(metrics(model.forward(tx), ty), bits=32.0)
        rows["Quant (uniform 3-bit)"] = dict(metrics(model.forward(tx, [3] * args.depth), ty), bits=3.0)
        rows["Quant (uniform 2-bit)"] = dict(metrics(model.forward(tx, [2] * args.depth), ty), bits=2.0)
    trained = {}
    for name in configs:
        trained[(name, use_lambda)] = train_strategy(model, hist_x, hist_y, BIT_CONFIGS[name], use_lambda,
                                                     args, args.seed)
    if "2-4-6-8" in configs:  # Table 3's rows below CHORD: filter-level only, then without Lambda
        trained[("2-4-6-8", "filter")] = train_strategy(model, hist_x, hist_y, BIT_CONFIGS["2-4-6-8"], False,
                                                        args, args.seed, weighted=False)
        if use_lambda:
            trained[("2-4-6-8", False)] = train_strategy(model, hist_x, hist_y, BIT_CONFIGS["2-4-6-8"], False,
                                                         args, args.seed)
    per_config = {}
    for (name, lam_on), hyper in trained.items():
        bits = strategies(hyper, recent_x[served], args.beta, BIT_CONFIGS[name], lam_on is True)
        with torch.no_grad():
            per_config[(name, lam_on)] = dict(metrics(model.forward(tx, bits), ty), bits=avg_bits(bits),
                                              shares=width_shares(bits, BIT_CONFIGS[name]))
        if (name, lam_on) == (configs[0], use_lambda):
            main_bits = bits
    for key, label in (("filter", "+Customization (filter only)"), (False, "+Weighted Channel (Lambda off)"),
                       (True, "CHORD (Lambda on)")):  # the paper's order
        if ("2-4-6-8", key) in per_config:
            rows[label] = per_config[("2-4-6-8", key)]
    res["table4"] = {name: per_config[(name, use_lambda)] for name in configs}

    # cloud -> device, main configuration: one message per device; 2-4-6-8 is served packed
    widths = BIT_CONFIGS[configs[0]]
    in_features = [lin.in_features for lin in model.quantized()]
    messages = [pyeditor.encode_strategy_message([(b[k], n) for b, n in zip(main_bits, in_features)], widths)
                for k in range(len(served))]
    if configs[0] == "2-4-6-8":
        served_logits = torch.cat([serve(model, m, tx[k:k + 1]) for k, m in enumerate(messages)])
        with torch.no_grad():
            res["served_vs_fake_quant_max_abs"] = float((served_logits - model.forward(tx, main_bits)).abs().max())
        res["served"] = metrics(served_logits, ty)
    report = pyeditor.wire_report(messages[0], model.n_parameters())
    res["wire"] = report._asdict()
    res["seconds"] = time.perf_counter() - t0
    _print(args, configs, use_lambda, res, report)
    return res


def _print(args, configs, use_lambda, res, report) -> None:
    print(f"CHORD pipeline: frozen random backbone {args.features}->{args.hidden} + {args.depth} quantized "
          f"{args.hidden}x{args.hidden} layers, {args.test_users} served devices, beta={args.beta}, "
          f"seed={args.seed}; {example_threads.describe(res['threads'])}; synthetic users (not the paper's "
          f"datasets: the paper's SASRec / ML-100K figures are beside ours for the shape, not the values)")
    head = (f"{'Avg Bits':>9}{'NDCG@10':>9}{'HR@10':>8}{'Acc@1':>8} |{'paper bits':>11}{'NDCG@10':>9}{'HR@10':>8} | "
            f"channels per width")

    def line(name, r, paper):
        fig = f"{paper[0]:>11d}{paper[1]:>9.4f}{paper[2]:>8.4f}" if paper else f"{'-':>11}{'-':>9}{'-':>8}"
        shares = " | " + " ".join(f"{w}:{100 * v:.0f}%" for w, v in r["shares"].items()) if "shares" in r else ""
        print(f"{name:<32}{r['bits']:>9.2f}{r['ndcg10']:>9.4f}{r['hr10']:>8.4f}{r['acc']:>8.4f} |{fig}{shares}")
    print(f"\nTable 3 shape (ablation, 2-4-6-8)\n{'Method':<32}{head}")
    for name, r in res["rows"].items():
        line(name, r, PAPER_TABLE3.get(name))
    lam = "on" if use_lambda else "off"
    print(f"\nTable 4 shape (bit configurations, CHORD with Lambda {lam})\n{'Bit Config':<32}{head}")
    for name, r in res["table4"].items():
        line(name, r, PAPER_TABLE4.get(name) if use_lambda else None)
    if "served" in res:
        s = res["served"]
        print(f"\nserved on the device (decoded message -> PackedLinear): NDCG@10 {s['ndcg10']:.4f}, HR@10 "
              f"{s['hr10']:.4f}, Acc@1 {s['acc']:.4f}; max |served - trained forward| "
              f"{res['served_vs_fake_quant_max_abs']:.1e}")
    print(f"on the wire per device: {report.message_bits // 8} B message ({report.code_bits // 8} B of 2-bit "
          f"codes for {report.channels} channels, header and CRC-32 the rest)")
    print(f"  paper's accounting (Sec. 4.1.3, Table 2: Param = Mbit transmitted; Base = the whole model at "
          f"32 bits): {report.base_param_mbit:.4f} / {report.chord_param_mbit:.4f} Mbit = "
          f"x{report.paper_ratio:.1f} (the paper, on its models: x61.20 SASRec, x173.8 Caser)")
    print(f"  raw: fp32 bytes of the quantized weights per code byte = x{report.raw_ratio:.0f}; "
          f"{res['seconds']:.1f} s")


if __name__ == "__main__":
    main()

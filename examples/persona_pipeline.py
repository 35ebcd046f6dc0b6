"""Persona end to end on pyeditor: static vs single-prototype vs multi-prototype editing.

    .venv/bin/python examples/persona_pipeline.py            # small config, < 1 minute on 2 cores
    .venv/bin/python examples/persona_pipeline.py --devices 512 --steps 800 --latency-size 1024

Steps (Persona Sec. 3), every edit, assignment and clustering through pyeditor:
  1. static device model: shared layers (plain torch) + adaptive layers Theta (EditedLinear), no edits;
  2. single-prototype Persona: a ParameterEditor with the cross-layer GRU (Eq. 5, 13) trained
     through edited_linear with Theta fixed (Eq. 4-7);
  3. its edits for the history, clustered with pyeditor.kmeans into N_M groups (Eq. 9);
  4. group prototypes and editors fine-tuned on their clusters (Eq. 10);
  5. inference: assign_prototypes picks each device's prototype from its real-time embedding
     (Eq. 11-12), generate_edit + apply_edit give the device its adaptive weights K;
  6. accuracy of the three on later, shifted sessions, and the adaptation latency
     (embedding in, adaptive weights out) for 256 devices at once and for one.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pyeditor  # noqa: E402
from pyeditor.nn import EditedLinear, ParameterEditor  # noqa: E402
from persona_data import Sessions, ShiftingDevices  # noqa: E402

PAPER_LATENCY_MS = 10.78  # Persona Table 1, time consumption of Persona (s) / (m)


class DeviceModel(nn.Module):
    """Shared layers Omega (fixed after stage 1) + adaptive layers edited per device."""

    def __init__(self, features: int, hidden: int, classes: int, prototypes: int, threshold: float):
        super().__init__()
        self.shared = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.adaptive = nn.ModuleList([EditedLinear(hidden, hidden, prototypes, threshold),
                                       EditedLinear(hidden, classes, prototypes, threshold)])

    @property
    def layer_shapes(self):
        return [(m.in_features, m.out_features) for m in self.adaptive]

    def forward(self, x: Tensor, edits: Optional[List[Tensor]] = None, proto: Optional[Tensor] = None) -> Tensor:
        h = self.shared(x)
        for n, layer in enumerate(self.adaptive):
            if edits is None:  # the static model: Theta^(0) as plain weights
                h = h @ layer.theta[0] + layer.bias[0]
            else:
                h = layer(h, edits[n], proto)
            if n + 1 < len(self.adaptive):
                h = torch.relu(h)
        return h

    def expand_prototypes(self, prototypes: int) -> None:
        """Every group prototype Theta^(j) starts as a copy of the global Theta^(0) (Eq. 10)."""
        for layer in self.adaptive:
            layer.theta = nn.Parameter(layer.theta.detach()[:1].repeat(prototypes, 1, 1))
            layer.bias = nn.Parameter(layer.bias.detach()[:1].repeat(prototypes, 1))


def expand_editor(single: ParameterEditor, prototypes: int, embed_dim: int, hidden: int) -> ParameterEditor:
    """Group editors M_G^(j) start from the trained global editor M_G^(0) (Eq. 10)."""
    multi = ParameterEditor(embed_dim, hidden, single.layer_shapes, prototypes, sequential=True)
    state = {k: v for k, v in single.state_dict().items() if not k.startswith("head_")}
    multi.load_state_dict(state, strict=False)
    with torch.no_grad():
        multi.head_weight.copy_(single.head_weight.expand_as(multi.head_weight))
        multi.head_bias.copy_(single.head_bias.expand_as(multi.head_bias))
    return multi


def batches(n: int, size: int, steps: int, gen: torch.Generator):
    for _ in range(steps):
        yield torch.randint(0, n, (size,), generator=gen)


def accuracy(logits: Tensor, y: Tensor) -> float:
    return float((logits.argmax(-1) == y).float().mean())


def assign(editor: ParameterEditor, emb: Tensor) -> Tensor:
    """Eq. 11-12: the prototype needing the smallest edit over every adaptive layer (the whole
    edit's Frobenius norm, unclipped; ties to the lowest index), in one call."""
    return pyeditor.assign_prototypes_layers(editor.layer_embeddings(emb), editor.head_weight, editor.head_bias,
                                             sizes=editor.head_sizes).chosen


def train(params, loss_fn, steps: int, lr: float, n: int, batch: int, gen: torch.Generator) -> None:
    opt = torch.optim.Adam(params, lr=lr)
    for idx in batches(n, batch, steps, gen):
        opt.zero_grad(set_to_none=True)
        loss_fn(idx).backward()
        opt.step()


def run_pipeline(args) -> Dict[str, float]:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    world = ShiftingDevices(args.devices, args.groups, args.features, args.classes, args.seed,
                            switch=args.switch, drift=args.drift)
    hist = world.sessions(0, args.history)
    test = world.sessions(args.history, args.future)       # later sessions: drifted rules, moved groups
    emb_h, emb_t = hist.embedding(args.classes), test.embedding(args.classes)
    mu, sd = emb_h.mean(0), emb_h.std(0) + 1e-6
    emb_h, emb_t = (emb_h - mu) / sd, (emb_t - mu) / sd
    E = emb_h.shape[1]
    qx, qy = hist.query_x, hist.query_y

    model = DeviceModel(args.features, args.hidden, args.classes, 1, args.threshold)

    # 1. static model: shared layers + Theta^(0), trained on the whole history
    def static_loss(i):
        return F.cross_entropy(model(qx[i]).flatten(0, 1), qy[i].flatten())
    train(model.parameters(), static_loss, args.steps, args.lr, len(hist), args.batch, gen)
    for p in model.shared.parameters():
        p.requires_grad_(False)

    # 2. single-prototype Persona: Theta_c := G(x_H; Theta_Gs) + Theta_c, minimise over Theta_Gs (Eq. 7)
    single = ParameterEditor(E, args.editor_hidden, model.layer_shapes, 1, sequential=True)

    def single_loss(i):
        zero = torch.zeros_like(i)  # the one prototype
        return F.cross_entropy(model(qx[i], single(emb_h[i], zero), zero).flatten(0, 1), qy[i].flatten())
    train(single.parameters(), single_loss, args.steps, args.lr, len(hist), args.batch, gen)

    # 3. initial partition (Eq. 9): cluster the history's edit matrices
    with torch.no_grad():
        g_hist = torch.cat(single(emb_h, torch.zeros(len(hist), dtype=torch.long)), 1)
    _, clusters, _ = pyeditor.kmeans(g_hist, args.prototypes, n_iter=50, seed=args.seed)

    # 4. group models (Eq. 10): prototypes and editors fine-tuned on their clusters; an assignment
    #    term keeps each cluster's own editor the one with the smallest edit (what Eq. 12 relies on)
    static = copy.deepcopy(model)  # Theta^(0) unedited, for the static row
    model.expand_prototypes(args.prototypes)
    multi = expand_editor(single, args.prototypes, E, args.editor_hidden)

    def multi_loss(i):
        c = clusters[i]
        task = F.cross_entropy(model(qx[i], multi(emb_h[i], c), c).flatten(0, 1), qy[i].flatten())
        sq = sum(g.square().sum(-1) for g in multi(emb_h[i])).t()          # [B, P] edit sizes, all groups
        return task + args.assign_weight * F.cross_entropy(-sq / sq.detach().mean(), c)
    theta = [p for layer in model.adaptive for p in layer.parameters()]
    train(list(multi.parameters()) + theta, multi_loss, args.steps, args.lr, len(hist), args.batch, gen)

    # the single-prototype model gets the same extra training (editor and Theta^(0), whole history),
    # so the comparison isolates the prototypes
    base = copy.deepcopy(static)
    base_theta = [p for layer in base.adaptive for p in layer.parameters()]

    def single_ft_loss(i):
        zero = torch.zeros_like(i)
        return F.cross_entropy(base(qx[i], single(emb_h[i], zero), zero).flatten(0, 1), qy[i].flatten())
    train(list(single.parameters()) + base_theta, single_ft_loss, args.steps, args.lr, len(hist), args.batch, gen)

    # 5-6. inference on the shifted sessions
    with torch.no_grad():
        tx, ty = test.query_x, test.query_y
        proto = assign(multi, emb_t)
        edits = [pyeditor.generate_edit(e, *multi.head(n), index=proto, threshold=args.threshold)
                 for n, e in enumerate(multi.layer_embeddings(emb_t))]
        weights = [pyeditor.apply_edit(layer.theta, g, args.threshold, proto)   # what each device receives
                   for layer, g in zip(model.adaptive, edits)]
        multi_logits = model.shared(tx)
        for n, (layer, k) in enumerate(zip(model.adaptive, weights)):      # the device's own forward with K
            multi_logits = torch.bmm(multi_logits, k) + layer.bias[proto].unsqueeze(1)
            if n + 1 < len(weights):
                multi_logits = torch.relu(multi_logits)
        # the device's forward with its received K equals the cloud's fused edited_linear forward
        fused_gap = float((model(tx, edits, proto) - multi_logits).abs().max())
        zero = torch.zeros(len(test), dtype=torch.long)
        single_logits = base(tx, single(emb_t, zero), zero)
        static_logits = static(tx)
        purity = cluster_purity(clusters, hist.group, args.prototypes)
        # does Eq. 12 on the history reproduce the k-means partition the groups were trained on?
        agree = pyeditor.assignment_agreement(assign(multi, emb_h), clusters, args.prototypes, args.prototypes)
    return {
        "static_acc": accuracy(static_logits, ty),
        "single_acc": accuracy(single_logits, ty),
        "multi_acc": accuracy(multi_logits, ty),
        "served_vs_fused_max_abs": fused_gap,
        "history_sessions": len(hist),
        "test_sessions": len(test),
        "cluster_purity": purity,
        "test_assignment_purity": cluster_purity(proto, test.group, args.prototypes),
        "history_assignment_agreement": agree.rate,
    }


def cluster_purity(labels: Tensor, groups: Tensor, k: int) -> float:
    """Fraction of samples whose cluster's majority group is their own group (reporting only)."""
    hit = 0
    for c in range(k):
        g = groups[labels == c]
        if g.numel():
            hit += int(torch.bincount(g).max())
    return hit / max(1, labels.numel())


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def adaptation_latency(size: int, embed_dim: int, hidden: int, prototypes: int, batch: int, threshold: float,
                       repeats: int) -> Dict[str, float]:
    """Median ms for embedding -> per-layer embedding -> assign_prototypes -> generate_edit ->
    apply_edit (adaptive weights K [size, size] per device), for `batch` devices and for one.
    Frozen editors serve, so the Gram form of every head is cached (prototype_gram)."""
    torch.manual_seed(0)
    editor = ParameterEditor(embed_dim, hidden, [(size, size)], prototypes, sequential=True).eval()
    theta = torch.randn(prototypes, size, size) / size ** 0.5
    w, b = (t.detach() for t in editor.head(0))
    gram = pyeditor.prototype_gram(w, b)
    out = torch.empty(batch, size, size)

    def adapt(emb: Tensor, dest: Tensor) -> Tensor:
        e = editor.layer_embeddings(emb)[0]
        chosen = pyeditor.assign_prototypes(e, w, b, gram=gram).chosen
        delta = pyeditor.generate_edit(e, w, b, index=chosen)
        return pyeditor.apply_edit(theta, delta, threshold, chosen, out=dest)

    emb_b, emb_1 = torch.randn(batch, embed_dim), torch.randn(1, embed_dim)
    with torch.no_grad():
        batch_ms = median_ms(lambda: adapt(emb_b, out), repeats)
        one_ms = median_ms(lambda: adapt(emb_1, out[:1]), repeats * 4)
    return {"latency_batch_ms": batch_ms, "latency_per_device_ms": batch_ms / batch, "latency_single_ms": one_ms}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=64, help="devices per session")
    p.add_argument("--history", type=int, default=8, help="history sessions (training)")
    p.add_argument("--future", type=int, default=3, help="later, shifted sessions (test)")
    p.add_argument("--groups", type=int, default=4, help="interest groups in the synthetic world")
    p.add_argument("--prototypes", type=int, default=4, help="N_M, prototype models")
    p.add_argument("--features", type=int, default=8)
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--hidden", type=int, default=32, help="width of the shared and adaptive layers")
    p.add_argument("--editor-hidden", type=int, default=32)
    p.add_argument("--threshold", type=float, default=0.1, help="edit clip T")
    p.add_argument("--switch", type=float, default=0.3, help="chance a device changes group per session")
    p.add_argument("--drift", type=float, default=0.5, help="rule drift per session")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per training stage")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--assign-weight", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latency-size", type=int, default=512, help="adaptive layer is size x size in the timing")
    p.add_argument("--latency-batch", type=int, default=256)
    p.add_argument("--latency-hidden", type=int, default=64, help="editor width (embedding and layer features)")
    p.add_argument("--latency-repeats", type=int, default=5)
    p.add_argument("--no-latency", action="store_true", help="skip the timing")
    return p.parse_args(argv)


def main(argv=None) -> Dict[str, float]:
    args = parse_args(argv)
    t0 = time.perf_counter()
    res = run_pipeline(args)
    res["train_eval_s"] = time.perf_counter() - t0
    print(f"Persona pipeline: {args.devices} devices, {args.groups} groups, {res['history_sessions']} history / "
          f"{res['test_sessions']} shifted test sessions, N_M={args.prototypes}, T={args.threshold}, seed={args.seed}")
    print(f"{'model':<28}{'accuracy on shifted sessions':>30}")
    for name, key in (("static", "static_acc"), ("Persona single-prototype", "single_acc"),
                      ("Persona multi-prototype", "multi_acc")):
        print(f"{name:<28}{res[key]:>30.4f}")
    print(f"history cluster purity {res['cluster_purity']:.3f}, test assignment purity "
          f"{res['test_assignment_purity']:.3f}; history assignment agrees with k-means on "
          f"{res['history_assignment_agreement']:.3f} (best matching of labels); "
          f"train + eval {res['train_eval_s']:.1f} s")
    if not args.no_latency:
        lat = adaptation_latency(args.latency_size, args.latency_hidden, args.latency_hidden, args.prototypes,
                                 args.latency_batch, args.threshold, args.latency_repeats)
        res.update(lat)
        print(f"adaptation latency (embedding in, {args.latency_size}x{args.latency_size} adaptive weights out, "
              f"editor width {args.latency_hidden}, N_M={args.prototypes}, median of {args.latency_repeats}):")
        print(f"  {args.latency_batch} devices: {lat['latency_batch_ms']:.2f} ms = "
              f"{lat['latency_per_device_ms']:.3f} ms per device")
        print(f"  1 device:   {lat['latency_single_ms']:.3f} ms   (paper, Persona Table 1: {PAPER_LATENCY_MS} ms)")
    return res


if __name__ == "__main__":
    main()

"""Persona end to end on pyeditor: static vs single-prototype vs multi-prototype editing, with and
without cross-layer knowledge transfer, in the shape of the paper's Table 4.

    .venv/bin/python examples/persona_pipeline.py                      # every row: ~2 CPU-minutes, 1 thread
    .venv/bin/python examples/persona_pipeline.py --no-cross-layer     # only the w/o. CLKT rows (Eq. 13 off)
    .venv/bin/python examples/persona_pipeline.py --group-numbers 4 --assign-weights 0   # N_M=4, paper's loss only

Steps (Persona Sec. 3), every edit, assignment and clustering through pyeditor:
  1. static device model: shared layers (plain torch) + adaptive layers Theta (EditedLinear), no edits;
  2. single-prototype Persona: a ParameterEditor trained through edited_linear with Theta fixed
     (Eq. 4-7); with cross-layer knowledge transfer (CLKT) its per-layer embeddings pass through
     the sequential module Omega_seq (Eq. 13), without it every layer's branch is independent;
  3. its edits for the history, clustered with pyeditor.kmeans into N_M groups (Eq. 9);
  4. group prototypes and editors fine-tuned on their clusters (Eq. 10), with the paper's task loss
     alone or with an extra assignment loss (--assign-weights; not in the paper) that keeps each
     cluster's own editor the one with the smallest edit, which is what Eq. 12 relies on;
  5. inference: pyeditor.assign_prototypes_layers picks each device's prototype by the smallest
     edit over every adaptive layer (Eq. 11-12), generate_edit + apply_edit give the device its
     adaptive weights K; pyeditor.assignment_agreement says how often that choice reproduces the
     k-means partition on the history;
  6. AUC / NDCG / HR / accuracy on later, shifted sessions, and the adaptation latency (embedding
     in, adaptive weights out) for 256 devices at once and for one.
The data are synthetic devices (persona_data.py), so the paper's figures (SASRec on Amazon
Beauty, Tables 1 and 4) are printed beside ours for the shape of the comparison, not its values.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import zlib
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pyeditor  # noqa: E402
from pyeditor.nn import EditedLinear, ParameterEditor  # noqa: E402
import example_threads  # noqa: E402
from persona_data import Sessions, ShiftingDevices  # noqa: E402

PAPER_LATENCY_MS = 10.78  # Persona Table 1, time consumption of Persona (s) / (m)
# Persona, SASRec on Amazon Beauty: (AUC, NDCG@5, HR@5, NDCG@10, HR@10)
PAPER_BEAUTY = {
    "static": (0.6588, 0.1672, 0.2681, 0.2060, 0.3892),   # Table 1, row "-"
    "single": (0.6729, 0.2029, 0.2999, 0.2331, 0.3976),   # Table 1, Persona (s)
    (False, 2): (0.6654, 0.1756, 0.2754, 0.2162, 0.4016),  # Table 4, w/o. CLKT
    (False, 3): (0.6647, 0.1735, 0.2734, 0.2149, 0.4013),
    (False, 5): (0.6638, 0.1705, 0.2694, 0.2116, 0.3963),
    (False, 10): (0.6639, 0.1702, 0.2664, 0.2115, 0.3956),
    (True, 2): (0.6685, 0.2184, 0.3193, 0.2499, 0.4153),   # Table 4, w. CLKT
    (True, 3): (0.6690, 0.2225, 0.3216, 0.2511, 0.4160),
    (True, 5): (0.6688, 0.2231, 0.3266, 0.2520, 0.4207),
    (True, 10): (0.6677, 0.2228, 0.3243, 0.2527, 0.4173),
}


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
    multi = ParameterEditor(embed_dim, hidden, single.layer_shapes, prototypes,
                            sequential=single.sequential is not None)
    state = {k: v for k, v in single.state_dict().items() if not k.startswith("head_")}
    multi.load_state_dict(state, strict=False)
    with torch.no_grad():
        multi.head_weight.copy_(single.head_weight.expand_as(multi.head_weight))
        multi.head_bias.copy_(single.head_bias.expand_as(multi.head_bias))
    return multi


def stage_seed(seed: int, *tags) -> int:
    """A seed per training stage from its settings, so a row does not depend on which other rows
    run (--no-cross-layer gives the same w/o. CLKT rows as the full table)."""
    return seed * 1_000_003 + zlib.crc32(repr(tags).encode())


def train(params, loss_fn, steps: int, lr: float, n: int, batch: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        idx = torch.randint(0, n, (batch,), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss_fn(idx).backward()
        opt.step()


def ranking(logits: Tensor, y: Tensor, k: int) -> Dict[str, float]:
    """AUC (the label against every other class, ties count half), NDCG@k and HR@k of the label's
    rank among the classes, and accuracy (argmax), averaged over every query interaction."""
    score = logits.gather(-1, y.unsqueeze(-1))
    above = (logits > score).sum(-1).double()
    ties = (logits == score).sum(-1).double() - 1
    hit = (above < k).double()
    return {"auc": float((1 - (above + 0.5 * ties) / (logits.shape[-1] - 1)).mean()),
            "ndcg": float((hit / torch.log2(above + 2)).mean()), "hr": float(hit.mean()),
            "acc": float((logits.argmax(-1) == y).double().mean())}


def cluster_purity(labels: Tensor, groups: Tensor, k: int) -> float:
    """Fraction of samples whose cluster's majority group is their own group (reporting only)."""
    hit = 0
    for c in range(k):
        g = groups[labels == c]
        if g.numel():
            hit += int(torch.bincount(g).max())
    return hit / max(1, labels.numel())


def assign(editor: ParameterEditor, emb: Tensor) -> Tensor:
    """Eq. 11-12: the prototype needing the smallest edit over every adaptive layer (the whole
    edit's Frobenius norm, unclipped; ties to the lowest index), in one call."""
    return pyeditor.assign_prototypes_layers(editor.layer_embeddings(emb), editor.head_weight, editor.head_bias,
                                             sizes=editor.head_sizes).chosen


class Pipeline:
    """The world, the embeddings and the static model (stage 1), shared by every row."""

    def __init__(self, args):
        self.args = args
        world = ShiftingDevices(args.devices, args.groups, args.features, args.classes, args.seed,
                                switch=args.switch, drift=args.drift)
        self.hist: Sessions = world.sessions(0, args.history)
        self.test: Sessions = world.sessions(args.history, args.future)  # later: drifted rules, moved groups
        emb_h, emb_t = self.hist.embedding(args.classes), self.test.embedding(args.classes)
        mu, sd = emb_h.mean(0), emb_h.std(0) + 1e-6
        self.emb_h, self.emb_t = (emb_h - mu) / sd, (emb_t - mu) / sd
        torch.manual_seed(stage_seed(args.seed, "static"))
        self.static = DeviceModel(args.features, args.hidden, args.classes, 1, args.threshold)
        qx, qy = self.hist.query_x, self.hist.query_y

        def static_loss(i):
            return F.cross_entropy(self.static(qx[i]).flatten(0, 1), qy[i].flatten())
        self._train(self.static.parameters(), static_loss, "static")
        self.static.requires_grad_(False)

    def _train(self, params, loss_fn, *tags) -> None:
        a = self.args
        train(params, loss_fn, a.steps, a.lr, len(self.hist), a.batch, stage_seed(a.seed, *tags))

    def _adaptive_copy(self) -> DeviceModel:
        """Theta^(0) and its bias, trainable again; the shared layers stay fixed."""
        model = copy.deepcopy(self.static)
        model.adaptive.requires_grad_(True)
        return model

    def _task_loss(self, model: DeviceModel, editor: ParameterEditor, i: Tensor, proto: Tensor) -> Tensor:
        qx, qy = self.hist.query_x, self.hist.query_y
        return F.cross_entropy(model(qx[i], editor(self.emb_h[i], proto), proto).flatten(0, 1), qy[i].flatten())

    def metrics(self, logits: Tensor) -> Dict[str, float]:
        return ranking(logits, self.test.query_y, self.args.top_k)

    def static_row(self) -> Dict[str, object]:
        with torch.no_grad():
            return dict(self.metrics(self.static(self.test.query_x)), kind="static", cross_layer=None,
                        prototypes=None, assign_weight=None)

    def single(self, cross_layer: bool):
        """Stage 2 (Eq. 7): the global editor over Theta^(0) fixed; then the history's edits (for
        Eq. 9) and the single-prototype row, whose editor and Theta^(0) get the same extra
        training as the group models (whole history), so the rows isolate the prototypes."""
        a = self.args
        torch.manual_seed(stage_seed(a.seed, "single", cross_layer))
        editor = ParameterEditor(self.emb_h.shape[1], a.editor_hidden, self.static.layer_shapes, 1,
                                 sequential=cross_layer)
        self._train(editor.parameters(), lambda i: self._task_loss(self.static, editor, i, torch.zeros_like(i)),
                    "single", cross_layer)
        with torch.no_grad():
            g_hist = torch.cat(editor(self.emb_h, torch.zeros(len(self.hist), dtype=torch.long)), 1)
        tuned, base = copy.deepcopy(editor), self._adaptive_copy()
        self._train(list(tuned.parameters()) + list(base.adaptive.parameters()),
                    lambda i: self._task_loss(base, tuned, i, torch.zeros_like(i)), "single-ft", cross_layer)
        with torch.no_grad():
            zero = torch.zeros(len(self.test), dtype=torch.long)
            row = dict(self.metrics(base(self.test.query_x, tuned(self.emb_t, zero), zero)), kind="single",
                       cross_layer=cross_layer, prototypes=1, assign_weight=None)
        return editor, g_hist, row

    def multi(self, editor: ParameterEditor, g_hist: Tensor, cross_layer: bool, prototypes: int,
              assign_weight: float) -> Dict[str, object]:
        """Stages 3-5 for N_M = prototypes: partition, group models, assignment, serving."""
        a = self.args
        _, clusters, _ = pyeditor.kmeans(g_hist, prototypes, n_iter=50, seed=a.seed)
        torch.manual_seed(stage_seed(a.seed, "multi", cross_layer, prototypes, assign_weight))
        model = self._adaptive_copy()
        model.expand_prototypes(prototypes)
        multi = expand_editor(editor, prototypes, self.emb_h.shape[1], a.editor_hidden)

        def multi_loss(i):
            c = clusters[i]
            loss = self._task_loss(model, multi, i, c)
            if assign_weight:  # the extra assignment loss: own cluster's edit the smallest
                sq = sum(g.square().sum(-1) for g in multi(self.emb_h[i])).t()  # [B, P] edit sizes
                loss = loss + assign_weight * F.cross_entropy(-sq / sq.detach().mean(), c)
            return loss
        self._train(list(multi.parameters()) + list(model.adaptive.parameters()), multi_loss,
                    "multi", cross_layer, prototypes, assign_weight)

        with torch.no_grad():
            tx = self.test.query_x
            proto = assign(multi, self.emb_t)
            edits = [pyeditor.generate_edit(e, *multi.head(n), index=proto, threshold=a.threshold)
                     for n, e in enumerate(multi.layer_embeddings(self.emb_t))]
            weights = [pyeditor.apply_edit(layer.theta, g, a.threshold, proto)  # what each device receives
                       for layer, g in zip(model.adaptive, edits)]
            logits = model.shared(tx)
            for n, (layer, k) in enumerate(zip(model.adaptive, weights)):  # the device's own forward with K
                logits = torch.bmm(logits, k) + layer.bias[proto].unsqueeze(1)
                if n + 1 < len(weights):
                    logits = torch.relu(logits)
            # the device's forward with its received K equals the cloud's fused edited_linear forward
            gap = float((model(tx, edits, proto) - logits).abs().max())
            # does Eq. 12 on the history reproduce the k-means partition the groups were trained on?
            agree = pyeditor.assignment_agreement(assign(multi, self.emb_h), clusters, prototypes, prototypes)
        return dict(self.metrics(logits), kind="multi", cross_layer=cross_layer, prototypes=prototypes,
                    assign_weight=assign_weight, purity=cluster_purity(proto, self.test.group, prototypes),
                    cluster_purity=cluster_purity(clusters, self.hist.group, prototypes),
                    agreement=agree.rate, served_vs_fused_max_abs=gap)


def run_pipeline(args) -> Dict[str, object]:
    pipe = Pipeline(args)
    rows = [pipe.static_row()]
    for cross_layer in args.cross_layer_modes:
        editor, g_hist, single_row = pipe.single(cross_layer)
        rows.append(single_row)
        for n_m in args.group_numbers:
            for w in args.assign_weights:
                rows.append(pipe.multi(editor, g_hist, cross_layer, n_m, w))
    return {"rows": rows, "history_sessions": len(pipe.hist), "test_sessions": len(pipe.test)}


def paper_figures(row: Dict[str, object]) -> Optional[tuple]:
    """The paper's (AUC, HR@10) for the row's setting, where the paper has that setting."""
    if row["kind"] == "static":
        fig = PAPER_BEAUTY["static"]
    elif row["kind"] == "single":
        fig = PAPER_BEAUTY["single"] if row["cross_layer"] else None
    else:
        fig = None if row["assign_weight"] else PAPER_BEAUTY.get((row["cross_layer"], row["prototypes"]))
    return None if fig is None else (fig[0], fig[4])


def print_table(args, res: Dict[str, object]) -> None:
    k = args.top_k
    print(f"\nTable 4 shape (Persona Tables 1 and 4): later, shifted sessions; ours on synthetic devices with "
          f"{args.classes} classes, the paper's SASRec on Amazon Beauty beside ours where it has the setting")
    head = (f"{'Partition':<11}{'N_M':>4}{'assign loss':>12} |{'AUC':>7}{f'NDCG@{k}':>8}{f'HR@{k}':>7}{'Acc':>7} |"
            f"{'purity':>7}{'agree':>7} |{'paper AUC':>10}{'HR@10':>7}")
    print(head)
    print("-" * len(head))
    for r in res["rows"]:
        if r["kind"] == "static":
            name, n_m, loss = "static", "-", "-"
        else:
            name = ("w. CLKT" if r["cross_layer"] else "w/o. CLKT") if r["kind"] == "multi" else \
                   ("single w." if r["cross_layer"] else "single w/o.")
            n_m = str(r["prototypes"])
            loss = "-" if r["kind"] == "single" else ("off" if not r["assign_weight"] else f"{r['assign_weight']:g}")
        diag = f"{r['purity']:>7.3f}{r['agreement']:>7.3f}" if r["kind"] == "multi" else f"{'-':>7}{'-':>7}"
        fig = paper_figures(r)
        paper = f"{fig[0]:>10.4f}{fig[1]:>7.4f}" if fig else f"{'-':>10}{'-':>7}"
        print(f"{name:<11}{n_m:>4}{loss:>12} |{r['auc']:>7.4f}{r['ndcg']:>8.4f}{r['hr']:>7.4f}{r['acc']:>7.4f} |"
              f"{diag} |{paper}")
    for note in ("CLKT: cross-layer knowledge transfer (Eq. 13, the editor's Omega_seq); single w./w/o.: the "
                 "single-prototype editor with/without it.",
                 "assign loss: weight of the extra loss (not in the paper) that makes each cluster's own editor "
                 "give the smallest edit; 'off' is the paper's training.",
                 "purity: share of test sessions whose assigned prototype's majority group is their own; agree: "
                 "share of history sessions whose Eq. 12 choice is their k-means cluster (assignment_agreement).",
                 "paper: Table 4 for the 'off' rows at its N_M (2, 3, 5, 10), Table 1's '-' and Persona (s) for "
                 "static and single w."):
        print("  " + note)


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


def _int_list(text: str) -> List[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated ints >= 1, got {text!r}")
    return values


def _weight_list(text: str) -> List[float]:
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or any(not v >= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated weights >= 0, got {text!r}")
    return values


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=64, help="devices per session")
    p.add_argument("--history", type=int, default=8, help="history sessions (training)")
    p.add_argument("--future", type=int, default=3, help="later, shifted sessions (test)")
    p.add_argument("--groups", type=int, default=4, help="interest groups in the synthetic world")
    p.add_argument("--group-numbers", type=_int_list, default=[2, 3, 4, 5, 10],
                   help="N_M values, comma-separated (the paper's Table 4: 2,3,5,10)")
    cross = p.add_mutually_exclusive_group()
    cross.add_argument("--no-cross-layer", action="store_true", help="only the rows without CLKT (Eq. 13 off)")
    cross.add_argument("--cross-layer-only", action="store_true", help="only the rows with CLKT (Eq. 13 on)")
    p.add_argument("--assign-weights", type=_weight_list, default=[0.0, 0.1],
                   help="weights of the extra assignment loss, comma-separated (0: the paper's loss alone)")
    p.add_argument("--features", type=int, default=8)
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--top-k", type=int, default=3, help="k of NDCG@k / HR@k (the label's rank among the classes)")
    p.add_argument("--hidden", type=int, default=32, help="width of the shared and adaptive layers")
    p.add_argument("--editor-hidden", type=int, default=32)
    p.add_argument("--threshold", type=float, default=0.1, help="edit clip T")
    p.add_argument("--switch", type=float, default=0.3, help="chance a device changes group per session")
    p.add_argument("--drift", type=float, default=0.5, help="rule drift per session")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per training stage")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latency-size", type=int, default=512, help="adaptive layer is size x size in the timing")
    p.add_argument("--latency-batch", type=int, default=256)
    p.add_argument("--latency-hidden", type=int, default=64, help="editor width (embedding and layer features)")
    p.add_argument("--latency-prototypes", type=int, default=4, help="N_M in the timing")
    p.add_argument("--latency-repeats", type=int, default=5)
    p.add_argument("--no-latency", action="store_true", help="skip the timing")
    example_threads.add_argument(p)
    args = p.parse_args(argv)
    if not 1 <= args.top_k < args.classes:
        p.error(f"--top-k must be in [1, classes), got {args.top_k} with {args.classes} classes")
    if any(n > args.devices * args.history for n in args.group_numbers):
        p.error("--group-numbers must not exceed the history's sessions (devices x history)")
    args.cross_layer_modes = [False] if args.no_cross_layer else [True] if args.cross_layer_only else [False, True]
    return args


def main(argv=None) -> Dict[str, object]:
    args = parse_args(argv)
    with example_threads.threads(args.threads) as n_threads:
        t0 = time.perf_counter()
        res = run_pipeline(args)
        res["train_eval_s"] = time.perf_counter() - t0
        res["threads"] = n_threads
        print(f"Persona pipeline: {args.devices} devices, {args.groups} groups, {res['history_sessions']} history / "
              f"{res['test_sessions']} shifted test sessions, T={args.threshold}, {args.steps} steps per stage, "
              f"seed={args.seed}; {example_threads.describe(n_threads)}")
        print_table(args, res)
        print(f"train + eval of every row: {res['train_eval_s']:.1f} s")
        if not args.no_latency:
            lat = adaptation_latency(args.latency_size, args.latency_hidden, args.latency_hidden,
                                     args.latency_prototypes, args.latency_batch, args.threshold, args.latency_repeats)
            res.update(lat)
            print(f"\nadaptation latency (embedding in, {args.latency_size}x{args.latency_size} adaptive weights out, "
                  f"editor width {args.latency_hidden}, N_M={args.latency_prototypes}, median of "
                  f"{args.latency_repeats}, {n_threads} thread(s)):")
            print(f"  {args.latency_batch} devices: {lat['latency_batch_ms']:.2f} ms = "
                  f"{lat['latency_per_device_ms']:.3f} ms per device")
            print(f"  1 device:   {lat['latency_single_ms']:.3f} ms   (paper, Persona Table 1: {PAPER_LATENCY_MS} ms)")
    return res


if __name__ == "__main__":
    main()

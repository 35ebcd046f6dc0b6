"""A Llama-architecture decoder in plain torch (RMSNorm, rotary positions, grouped-query attention,
SwiGLU MLP, tied or separate LM head) with a KV cache, loaded from a GGUF file by bench/gguf.py:
the pretrained LM of the real-model bench (bench/cases_realmodel_lm.py). Every projection is an
nn.Linear with Hugging Face's names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
down_proj, lm_head), so pyeditor.nn.quantize_model swaps them like in a transformers model.

GGUF stores q / k of Llama models with each head's rows reordered for llama.cpp's rotary
convention (adjacent pairs (x[2i], x[2i+1]) rotate together), so this model rotates adjacent
pairs too, on the weights as stored.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.gguf import GGUFFile


@dataclass(frozen=True)
class Config:
    vocab: int
    dim: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    rope_base: float
    eps: float
    tied: bool


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [b, h, t, d] with adjacent pairs rotated by the angles of cos / sin [t, d / 2]."""
    return _rotate_by(x, torch.complex(cos, sin))


def _rotate_by(x: Tensor, rot: Tensor) -> Tensor:
    """x [b, h, t, d] with each adjacent pair (x[2i], x[2i+1]) read as x[2i] + i x[2i+1] and
    multiplied by rot [t, d / 2] (complex, |rot| = 1): (x1 cos - x2 sin, x1 sin + x2 cos). One
    kernel instead of seven for the slice-and-stack form: decoding calls it twice per layer and
    token, where the projections are small."""
    return torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * rot).flatten(-2)


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.heads, self.kv_heads, self.hd = cfg.heads, cfg.kv_heads, cfg.dim // cfg.heads
        self.q_proj = nn.Linear(cfg.dim, cfg.heads * self.hd, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.kv_heads * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.kv_heads * self.hd, bias=False)
        self.o_proj = nn.Linear(cfg.heads * self.hd, cfg.dim, bias=False)

    def forward(self, x: Tensor, rot: Tensor, cache: Optional[List[Tensor]]) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.hd).transpose(1, 2)
        q, k = _rotate_by(q, rot), _rotate_by(k, rot)
        past = 0
        if cache is not None:
            if cache:
                past = cache[0].shape[2]
                k, v = torch.cat((cache[0], k), 2), torch.cat((cache[1], v), 2)
            cache[:] = [k, v]
        # new tokens see every cached one and the earlier new ones; kv heads shared by groups of q heads
        mask = None if past == 0 or t == 1 else _causal_after(past, t, x.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=past == 0 and t > 1, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


def _causal_after(past: int, t: int, device) -> Tensor:
    i = torch.arange(t, device=device)[:, None] + past
    return torch.arange(past + t, device=device)[None, :] <= i


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn, bias=False)
        self.down_proj = nn.Linear(cfg.ffn, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.eps)
        self.mlp = MLP(cfg)

    def forward(self, x, rot, cache):
        x = x + self.self_attn(self.input_layernorm(x), rot, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaLM(nn.Module):
    """forward(ids [b, t], cache=None) -> logits [b, t, vocab]; with ``cache`` (a list from
    :meth:`new_cache`, filled in place) the ids continue the cached sequence; ``last_only``: the
    logits of the last position only, [b, 1, vocab] (the LM head, the largest matrix, then runs
    on one row instead of t)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim, cfg.eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        if cfg.tied:
            self.lm_head.weight = self.embed_tokens.weight
        hd = cfg.dim // cfg.heads
        self.register_buffer("inv_freq", cfg.rope_base ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd),
                             persistent=False)

    def new_cache(self) -> List[List[Tensor]]:
        return [[] for _ in self.layers]

    def forward(self, ids: Tensor, cache: Optional[List[List[Tensor]]] = None, last_only: bool = False) -> Tensor:
        past = cache[0][0].shape[2] if cache and cache[0] else 0
        pos = torch.arange(past, past + ids.shape[1], device=ids.device, dtype=torch.float32)
        ang = pos[:, None] * self.inv_freq[None, :]
        rot = torch.complex(ang.cos(), ang.sin())  # once per forward, shared by every layer
        x = self.embed_tokens(ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, rot, None if cache is None else cache[i])
        return self.lm_head(self.norm(x[:, -1:] if last_only else x))


def config_of(g: GGUFFile) -> Config:
    m = g.meta
    if m.get("general.architecture") != "llama":
        raise ValueError(f"{g.path.name}: architecture {m.get('general.architecture')!r}, expected 'llama'")
    a = "llama."
    return Config(vocab=len(m["tokenizer.ggml.tokens"]), dim=m[a + "embedding_length"], layers=m[a + "block_count"],
                  heads=m[a + "attention.head_count"], kv_heads=m[a + "attention.head_count_kv"],
                  ffn=m[a + "feed_forward_length"], rope_base=float(m.get(a + "rope.freq_base", 10000.0)),
                  eps=float(m[a + "attention.layer_norm_rms_epsilon"]), tied="output.weight" not in g.infos)


_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
          "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def load(path: Path) -> Tuple[LlamaLM, GGUFFile]:
    """The model (float32, eval, no grad) with every weight dequantized from the GGUF file."""
    g = GGUFFile(path)
    cfg = config_of(g)
    state = {"embed_tokens.weight": g.tensor("token_embd.weight"), "norm.weight": g.tensor("output_norm.weight")}
    if not cfg.tied:
        state["lm_head.weight"] = g.tensor("output.weight")
    for i in range(cfg.layers):
        for src, dst in _NAMES.items():
            state[f"layers.{i}.{dst}.weight"] = g.tensor(f"blk.{i}.{src}.weight")
    with torch.device("meta"):
        model = LlamaLM(cfg)
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tied:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = cfg.rope_base ** (-torch.arange(0, cfg.dim // cfg.heads, 2, dtype=torch.float32)
                                       / (cfg.dim // cfg.heads))
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ValueError(f"{path}: no weights for {left}")
    return model.eval().requires_grad_(False), g


@torch.inference_mode()
def generate(model: LlamaLM, prompt: Tensor, new_tokens: int) -> Tensor:
    """Greedy decoding with the KV cache: the prompt [1, t] in one forward, then one token per
    forward (M = 1 for every projection). Returns the new ids [new_tokens]. Inference mode, not
    just no_grad: no version counters or view tracking on the ~40 small ops per layer and token
    that run besides the projections (a fixed cost that hides a faster matmul)."""
    cache = model.new_cache()
    logits = model(prompt, cache, last_only=True)
    out = []
    for i in range(new_tokens):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        if i + 1 < new_tokens:
            logits = model(nxt, cache)
    return torch.cat(out, 1)[0]


@torch.no_grad()
def perplexity(model: LlamaLM, ids: Tensor) -> float:
    """exp(mean next-token cross entropy) of ids [1, t] in one forward (no cache)."""
    logits = model(ids)
    return float(torch.exp(F.cross_entropy(logits[0, :-1].float(), ids[0, 1:])))

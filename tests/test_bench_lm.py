"""The real-model LM bench's own pieces (bench/gguf.py, bench/llama.py, bench/bpe.py) on a tiny
GGUF file written here: the reader's dequantization, the Llama network and its KV cache, the
byte-level BPE. The packaged model itself is not needed."""
import struct

import pytest
import torch

from bench import bpe, gguf, llama

F32, F16, Q4_1, Q8_0 = 0, 1, 3, 8


def _str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _value(v) -> bytes:
    if isinstance(v, bool):
        return struct.pack("<I?", 7, v)
    if isinstance(v, int):
        return struct.pack("<Ii", 5, v)
    if isinstance(v, float):
        return struct.pack("<If", 6, v)
    if isinstance(v, str):
        return struct.pack("<I", 8) + _str(v)
    if all(isinstance(x, str) for x in v):
        return struct.pack("<IIQ", 9, 8, len(v)) + b"".join(_str(x) for x in v)
    return struct.pack("<IIQ", 9, 5, len(v)) + struct.pack(f"<{len(v)}i", *v)


def write_gguf(path, meta: dict, tensors: dict) -> None:
    """tensors: name -> (ggml type, torch shape, raw bytes)."""
    out = bytearray(b"GGUF") + struct.pack("<IQQ", 3, len(tensors), len(meta))
    for k, v in meta.items():
        out += _str(k) + _value(v)
    blobs, offset = [], 0
    for name, (ttype, shape, raw) in tensors.items():
        out += _str(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in reversed(shape))
        out += struct.pack("<IQ", ttype, offset)
        blob = raw + b"\0" * (-len(raw) % 32)
        blobs.append(blob)
        offset += len(blob)
    out += b"\0" * (-len(out) % 32)
    path.write_bytes(bytes(out) + b"".join(blobs))


def q4_1(n: int, gen) -> tuple:
    """n / 32 random Q4_1 blocks: (raw bytes, their float32 values)."""
    nb = n // 32
    d = (torch.rand(nb, generator=gen) * 0.1 + 0.01).half()
    m = (torch.rand(nb, generator=gen) * -0.5).half()
    q = torch.randint(0, 16, (nb, 32), generator=gen, dtype=torch.uint8)
    packed = q[:, :16] | (q[:, 16:] << 4)
    raw = torch.cat([d.view(torch.uint8).reshape(nb, 2), m.view(torch.uint8).reshape(nb, 2), packed], 1)
    return raw.numpy().tobytes(), (d.float()[:, None] * q.float() + m.float()[:, None]).reshape(-1)


def q8_0(n: int, gen) -> tuple:
    nb = n // 32
    d = (torch.rand(nb, generator=gen) * 0.05 + 0.001).half()
    q = torch.randint(-127, 128, (nb, 32), generator=gen, dtype=torch.int8)
    raw = torch.cat([d.view(torch.uint8).reshape(nb, 2), q.view(torch.uint8)], 1)
    return raw.numpy().tobytes(), (d.float()[:, None] * q.float()).reshape(-1)


def test_gguf_reader_dequantizes_each_type_and_reads_metadata(tmp_path):
    gen = torch.Generator().manual_seed(0)
    a_raw, a = q4_1(4 * 64, gen)
    b_raw, b = q8_0(2 * 96, gen)
    c = torch.randn(3, 5, generator=gen)
    h = torch.randn(7, generator=gen).half()
    write_gguf(tmp_path / "t.gguf", {"general.architecture": "llama", "x.n": 7, "x.eps": 0.5, "x.ok": True,
                                     "x.words": ["a", "bc"], "x.ids": [3, -1]},
               {"a": (Q4_1, (4, 64), a_raw), "b": (Q8_0, (2, 96), b_raw),
                "c": (F32, (3, 5), c.numpy().tobytes()), "h": (F16, (7,), h.numpy().tobytes()),
                "bad": (12, (32,), b"\0" * 144)})
    g = gguf.GGUFFile(tmp_path / "t.gguf")
    assert g.meta == {"general.architecture": "llama", "x.n": 7, "x.eps": 0.5, "x.ok": True, "x.words": ["a", "bc"],
                      "x.ids": [3, -1]}
    assert torch.equal(g.tensor("a"), a.reshape(4, 64))
    assert torch.equal(g.tensor("b"), b.reshape(2, 96))
    assert torch.equal(g.tensor("c"), c)
    assert torch.equal(g.tensor("h"), h.float())
    assert g.type_name("a") == "Q4_1" and g.type_name("bad") == "ggml type 12"
    with pytest.raises(ValueError, match="'bad'"):
        g.tensor("bad")
    with pytest.raises(KeyError, match="nope"):
        g.tensor("nope")
    (tmp_path / "x.gguf").write_bytes(b"GGML" + b"\0" * 60)
    with pytest.raises(ValueError, match="not a GGUF"):
        gguf.GGUFFile(tmp_path / "x.gguf")


def tiny_vocab():
    tokens = [bpe._byte_to_unicode()[i] for i in range(256)]
    merges = ["t h", "Ġ th", "th e", "Ġth e", "e r", "Ġ 4"]
    return tokens + [m.replace(" ", "") for m in merges], merges


def tiny_llama(tmp_path, dim=32, heads=4, kv_heads=2, ffn=64, layers=2):
    gen = torch.Generator().manual_seed(1)
    tokens, merges = tiny_vocab()
    hd = dim // heads
    meta = {"general.architecture": "llama", "llama.block_count": layers, "llama.embedding_length": dim,
            "llama.feed_forward_length": ffn, "llama.attention.head_count": heads,
            "llama.attention.head_count_kv": kv_heads, "llama.rope.freq_base": 10000.0,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": merges}
    tensors, values = {}, {}

    def add(name, shape, kind):
        n = 1
        for s in shape:
            n *= s
        if kind == F32:
            v = torch.rand(shape, generator=gen) + 0.5
            raw = v.numpy().tobytes()
        else:
            raw, v = (q4_1 if kind == Q4_1 else q8_0)(n, gen)
        tensors[name], values[name] = (kind, shape, raw), v.reshape(shape)

    add("token_embd.weight", (len(tokens), dim), Q8_0)
    add("output_norm.weight", (dim,), F32)
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", (dim,), F32)
        add(f"blk.{i}.ffn_norm.weight", (dim,), F32)
        for name, shape in (("attn_q", (dim, dim)), ("attn_k", (kv_heads * hd, dim)), ("attn_v", (kv_heads * hd, dim)),
                            ("attn_output", (dim, dim)), ("ffn_gate", (ffn, dim)), ("ffn_up", (ffn, dim)),
                            ("ffn_down", (dim, ffn))):
            add(f"blk.{i}.{name}.weight", shape, Q4_1)
    write_gguf(tmp_path / "tiny.gguf", meta, tensors)
    return tmp_path / "tiny.gguf", values


def test_llama_loads_the_gguf_weights_and_ties_the_head(tmp_path):
    path, values = tiny_llama(tmp_path)
    model, g = llama.load(path)
    assert model.cfg.tied and model.lm_head.weight is model.embed_tokens.weight
    assert torch.equal(model.embed_tokens.weight, values["token_embd.weight"])
    assert torch.equal(model.layers[1].mlp.down_proj.weight, values["blk.1.ffn_down.weight"])
    assert torch.equal(model.layers[0].self_attn.k_proj.weight, values["blk.0.attn_k.weight"])
    assert torch.equal(model.layers[0].post_attention_layernorm.weight, values["blk.0.ffn_norm.weight"])
    assert not any(p.requires_grad for p in model.parameters())
    meta_bad = dict(g.meta, **{"general.architecture": "gpt2"})
    g.meta = meta_bad
    with pytest.raises(ValueError, match="gpt2"):
        llama.config_of(g)


def test_kv_cache_matches_full_forwards_and_greedy_decoding(tmp_path):
    model, _ = llama.load(tiny_llama(tmp_path)[0])
    ids = torch.randint(0, 262, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        parts = torch.cat([model(ids[:, :5], cache), model(ids[:, 5:9], cache), model(ids[:, 9:10], cache),
                           model(ids[:, 10:], cache)], 1)
    torch.testing.assert_close(parts, full, rtol=1e-4, atol=1e-4)
    got = llama.generate(model, ids[:, :6], 5)
    seq = ids[:, :6]
    with torch.no_grad():  # the same tokens without the cache: argmax of a full forward each step
        for _ in range(5):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, seq[0, 6:])
    ppl = llama.perplexity(model, ids)
    assert 1.0 < ppl < float("inf")


def test_rotary_scores_depend_on_relative_position_only():
    hd = 8
    inv = 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    a, b = torch.randn(1, 1, 1, hd), torch.randn(1, 1, 1, hd)

    def rot(x, pos):
        ang = torch.tensor([[float(pos)]]) * inv[None]
        return llama._rotate(x, ang.cos(), ang.sin())

    s1 = (rot(a, 3) * rot(b, 1)).sum()
    s2 = (rot(a, 10) * rot(b, 8)).sum()
    torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(s1, (rot(a, 3) * rot(b, 2)).sum())


def test_byte_level_bpe_merges_by_rank_and_round_trips():
    tokens, merges = tiny_vocab()
    tok = bpe.ByteLevelBPE(tokens, merges)
    ids = tok.encode("the theme 42")
    assert [tok.tokens[i] for i in ids] == ["the", "Ġthe", "m", "e", "Ġ", "4", "2"]  # digits alone, no "Ġ4"
    for text in ("the theme 42", "  two  spaces\nand café's 1999!", ""):
        assert tok.decode(tok.encode(text)) == text
    with pytest.raises(ValueError, match="vocabulary"):
        bpe.ByteLevelBPE(tokens[:100], []).encode("zz")

"""Byte-level BPE (GPT-2 style) from a GGUF file's ``tokenizer.ggml.tokens`` / ``merges``, for the
real-model LM bench: text -> token ids and back, no tokenizers / transformers package.

Pre-tokenization is llama.cpp's "smollm" rule (also StarCoder's): every digit alone, then GPT-2's
pattern ('s 't 're 've 'm 'll 'd, an optional space + letters, an optional space + digits, an
optional space + other symbols, whitespace). Python's ``re`` has no \\p{L}: letters are
``[^\\W\\d_]`` (str.isalpha-like); the bench text is ASCII, where that is exact.
"""
from __future__ import annotations

import functools
import re
from typing import Dict, List, Sequence

_L = r"[^\W\d_]"  # a letter
_N = r"\d"
_PRETOKEN = re.compile(
    rf"'s|'t|'re|'ve|'m|'ll|'d| ?{_L}+| ?{_N}+| ?(?:(?!{_L}|{_N})\S)+|\s+(?!\S)|\s+")


@functools.lru_cache(maxsize=1)
def _byte_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible map of the 256 bytes to printable characters (the printable Latin-1
    ones map to themselves, the rest to 256 + n in order)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


class ByteLevelBPE:
    def __init__(self, tokens: Sequence[str], merges: Sequence[str]):
        self.tokens = list(tokens)
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(merges)}
        self.enc = _byte_to_unicode()
        self.dec = {c: b for b, c in self.enc.items()}
        self._cache: Dict[str, List[int]] = {}

    def _bpe(self, word: str) -> List[int]:
        hit = self._cache.get(word)
        if hit is not None:
            return hit
        parts = list(word)
        while len(parts) > 1:
            pairs = [(self.ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best = min((p for p in pairs if p[0] is not None), default=None)
            if best is None:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        try:
            out = [self.ids[p] for p in parts]
        except KeyError as e:
            raise ValueError(f"BPE: the piece {e.args[0]!r} of {word!r} is not in the vocabulary") from None
        self._cache[word] = out
        return out

    def encode(self, text: str) -> List[int]:
        ids: List[int] = []
        for chunk in re.split(r"(\d)", text):  # every digit its own pre-token first
            for piece in _PRETOKEN.findall(chunk):
                ids.extend(self._bpe("".join(self.enc[b] for b in piece.encode("utf-8"))))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(self.dec[c] for i in ids for c in self.tokens[i])
        return data.decode("utf-8", errors="replace")

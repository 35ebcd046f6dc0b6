"""A minimal reader of GGUF files (llama.cpp's model format): metadata, and tensors dequantized to
float32 with torch. Enough for the small pretrained LM a pip package ships for the real-model
bench (bench/cases_realmodel_lm.py); no llama.cpp, no gguf package.

Layout (GGUF v2/v3, little-endian): magic "GGUF", version u32, tensor count u64, metadata count
u64; metadata key/value pairs (string key, u32 type, value); tensor infos (name, n_dims u32, dims
u64 each, innermost first, ggml type u32, offset u64 from the data section); the data section at
the next multiple of ``general.alignment`` (32 by default).
Tensor types read: F32, F16, Q8_0 and Q4_1 (blocks of 32 along the innermost dimension), those of
the packaged model; another type raises ValueError naming the tensor.
"""
from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# ggml type -> (name, elements per block, bytes per block)
_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 8: ("Q8_0", 32, 34), 3: ("Q4_1", 32, 20)}


class _Cursor:
    def __init__(self, buf, pos: int = 0):
        self.buf, self.pos = buf, pos

    def take(self, fmt: str):
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.take("<Q")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, n = self.take("<I"), self.take("<Q")
            if etype in _SCALARS and etype != 7:  # numeric arrays in one unpack
                fmt = _SCALARS[etype]
                size = struct.calcsize(fmt)
                out = list(struct.unpack_from(f"<{n}{fmt[1]}", self.buf, self.pos))
                self.pos += n * size
                return out
            return [self.value(etype) for _ in range(n)]
        raise ValueError(f"GGUF: unknown metadata value type {vtype}")


class GGUFFile:
    """Metadata (``meta``: key -> value) and tensor infos of a GGUF file; ``tensor(name)``
    reads and dequantizes one tensor to float32 in PyTorch's shape (outermost dimension first)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        c = _Cursor(self._buf)
        if bytes(self._buf[:4]) != b"GGUF":
            raise ValueError(f"{self.path} is not a GGUF file (magic {bytes(self._buf[:4])!r})")
        c.pos = 4
        self.version = c.take("<I")
        if self.version not in (2, 3):
            raise ValueError(f"{self.path}: GGUF version {self.version} is not supported (2 or 3)")
        n_tensors, n_kv = c.take("<Q"), c.take("<Q")
        self.meta: Dict[str, Any] = {}
        for _ in range(n_kv):
            key = c.string()
            self.meta[key] = c.value(c.take("<I"))
        self.infos: Dict[str, Tuple[Tuple[int, ...], int, int]] = {}  # name -> (torch shape, type, offset)
        for _ in range(n_tensors):
            name = c.string()
            dims = [c.take("<Q") for _ in range(c.take("<I"))]
            ttype, offset = c.take("<I"), c.take("<Q")
            self.infos[name] = (tuple(reversed(dims)), ttype, offset)
        align = int(self.meta.get("general.alignment", 32))
        self._data = (c.pos + align - 1) // align * align

    def type_name(self, name: str) -> str:
        t = self.infos[name][1]
        return _TYPES[t][0] if t in _TYPES else f"ggml type {t}"

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.infos:
            raise KeyError(f"GGUF {self.path.name}: no tensor {name!r}")
        shape, ttype, offset = self.infos[name]
        if ttype not in _TYPES:
            raise ValueError(f"GGUF tensor {name!r}: ggml type {ttype} is not supported by this reader")
        kind, per_block, block_bytes = _TYPES[ttype]
        n = 1
        for d in shape:
            n *= d
        if n % per_block:
            raise ValueError(f"GGUF tensor {name!r}: {n} elements are not whole {kind} blocks of {per_block}")
        nbytes = n // per_block * block_bytes
        start = self._data + offset
        raw = torch.frombuffer(bytearray(self._buf[start:start + nbytes]), dtype=torch.uint8)
        return _DEQUANT[kind](raw, n // per_block).reshape(shape)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 little-endian half floats -> float32 [...]."""
    return b.contiguous().view(torch.float16).squeeze(-1).to(torch.float32)


def _low_high(q: torch.Tensor) -> torch.Tensor:
    """[nb, 16] packed nibbles -> [nb, 32] (the 16 low nibbles first, then the 16 high ones)."""
    return torch.cat([q & 0x0F, q >> 4], dim=1).to(torch.float32)


def _q8_0(raw, nb):
    b = raw.reshape(nb, 34)
    return (_f16(b[:, :2])[:, None] * b[:, 2:].contiguous().view(torch.int8).to(torch.float32)).reshape(-1)


def _q4_1(raw, nb):
    b = raw.reshape(nb, 20)
    return (_f16(b[:, :2])[:, None] * _low_high(b[:, 4:]) + _f16(b[:, 2:4])[:, None]).reshape(-1)


def _plain(dtype):
    return lambda raw, nb: raw.view(dtype).to(torch.float32)


_DEQUANT = {"F32": _plain(torch.float32), "F16": _plain(torch.float16), "Q8_0": _q8_0, "Q4_1": _q4_1}

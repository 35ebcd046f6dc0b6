"""pyeditor.quant_format is the one description of the packed layout: csrc/include/pyeditor/pack.h
(the C++ kernels' copy, which cannot import Python) must state the same constants and formulas,
and the Python packer must put every code where the format says."""
import pathlib
import re

import pytest
import torch

from pyeditor import ops, quant
from pyeditor import quant_format as fmt

PACK_H = pathlib.Path(__file__).resolve().parents[2] / "csrc" / "include" / "pyeditor" / "pack.h"


@pytest.fixture(scope="module")
def header() -> str:
    return PACK_H.read_text()


def _constexpr(src: str, name: str) -> int:
    return int(re.search(rf"constexpr\s+\w+\s+{name}\s*=\s*(\d+)\s*;", src).group(1))


def _c_function(src: str, name: str, scope: dict = None):
    """A PE_HD integer function of pack.h as a Python function: its declarations and its return
    expression, with C's / (non-negative integers here) as // and a ?: as a conditional. Functions
    it calls come from ``scope``."""
    m = re.search(rf"PE_HD\s+\w+\s+{name}\(([^)]*)\)\s*\{{(.*?)\}}", src, re.S)
    assert m, f"pack.h has no {name}()"
    params = [p.split()[-1] for p in m.group(1).split(",")]
    body = []
    for stmt in (s.strip() for s in m.group(2).split(";") if s.strip()):
        stmt = stmt.replace("/", "//")
        if stmt.startswith("const int"):
            body += [part.strip() for part in stmt.removeprefix("const int").split(",")]
        else:
            expr = stmt.removeprefix("return").strip()
            cond = re.fullmatch(r"(.+?)\?(.+):(.+)", expr)
            if cond:
                expr = f"({cond.group(2)}) if ({cond.group(1)}) else ({cond.group(3)})"
            body.append("return " + expr)
    scope = {} if scope is None else scope
    exec(f"def {name}({', '.join(params)}):\n" + "".join(f"    {line}\n" for line in body), scope)  # noqa: S102
    return scope[name]


def test_constants_match_pack_h(header):
    assert _constexpr(header, "kTileN") == fmt.TILE_N
    assert _constexpr(header, "kTileK") == fmt.TILE_K
    assert _constexpr(header, "kPermInt16Channels") == fmt.PERM_INT16_CHANNELS


def test_valid_widths_and_group_sizes_match_pack_h(header):
    def accepted(fn):
        body = re.search(rf"bool {fn}\(int64_t (\w+)\)\s*\{{\s*return ([^;]*);", header)
        return {int(v) for v in re.findall(rf"{body.group(1)} == (\d+)", body.group(2))}

    assert accepted("valid_bits") == set(fmt.BIT_WIDTHS)
    assert accepted("valid_group_size") == {0, *fmt.GROUP_SIZES}


def test_size_formulas_match_pack_h(header):
    # the header's own constants, and tile_bytes calls the two functions before it
    c = {n: _constexpr(header, n) for n in re.findall(r"constexpr\s+\w+\s+(\w+)\s*=", header)}
    for n in ("block_bytes", "padded_k", "tile_bytes", "scale_groups"):
        _c_function(header, n, c)
    for bits in fmt.BIT_WIDTHS:
        assert c["block_bytes"](bits) == fmt.block_bytes(bits)
        for k in (0, 1, 15, 16, 17, 40, 4096):
            assert c["tile_bytes"](bits, k) == fmt.tile_bytes(bits, k)
    for k in (0, 1, 15, 16, 17, 40, 129, 4096):
        assert c["padded_k"](k) == fmt.padded_k(k)
        for g in (0, *fmt.GROUP_SIZES):
            assert c["scale_groups"](k, g) == fmt.n_groups(k, g)


def test_field_position_matches_pack_h(header):
    byte, shift = _c_function(header, "field_byte"), _c_function(header, "field_shift")
    for w in (2, 4, 8):
        for c in range(fmt.TILE_N):
            for kk in range(fmt.TILE_K):
                assert byte(w, c, kk) == fmt.field_byte(w, c, kk)
                assert shift(w, kk) == fmt.field_shift(w, kk)


def test_six_bit_planes_match_pack_h(header):
    m = re.search(r"if \(bits == 6\) return get_field\(block, (\d+), c, kk\) \| "
                  r"\(get_field\(block \+ (\d+), (\d+), c, kk\) << (\d+)\)", header)
    low, offset, high, high_shift = map(int, m.groups())
    assert (low, high) == fmt.SIX_BIT_PLANES
    assert offset == fmt.SIX_BIT_HIGH_OFFSET and high_shift == low


@pytest.mark.parametrize("bits", fmt.BIT_WIDTHS)
def test_python_packer_follows_the_format(bits):
    # every code of a packed tile sits at the format's byte and shift (planes for 6 bits)
    g = torch.Generator().manual_seed(bits)
    k = 2 * fmt.TILE_K + 5
    codes = torch.randint(0, 1 << bits, (fmt.TILE_N, k), generator=g, dtype=torch.uint8)
    qw = fmt.QuantizedWeight(codes, torch.ones(fmt.TILE_N), torch.zeros(fmt.TILE_N, dtype=torch.int32),
                             torch.full((fmt.TILE_N,), bits))
    packed = quant.pack(qw)
    assert packed.data.numel() == fmt.tile_bytes(bits, k)
    planes = [(w, 0 if i == 0 else fmt.SIX_BIT_HIGH_OFFSET, sum(fmt.SIX_BIT_PLANES[:i]))
              for i, w in enumerate(fmt.SIX_BIT_PLANES)] if bits == 6 else [(bits, 0, 0)]
    data = packed.data.tolist()
    for c in range(fmt.TILE_N):
        row = int(packed.perm[c])
        for i in range(k):
            block = i // fmt.TILE_K * fmt.block_bytes(bits)
            got = sum(((data[block + base + fmt.field_byte(w, c, i % fmt.TILE_K)] >> fmt.field_shift(w, i % fmt.TILE_K))
                       & ((1 << w) - 1)) << low for w, base, low in planes)
            assert got == int(codes[row, i])


@pytest.mark.skipif(not ops.HAS_CPP, reason="needs the compiled extension")
def test_cpp_kernels_read_the_python_layout():
    # the C++ dequantize reads what the Python packer wrote (both widths' buckets, a ragged K)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 70, generator=g)
    for group in (None, 32):
        p = quant.quantize_channelwise(w, torch.tensor([2, 4, 6, 8] * 10), group)
        assert torch.equal(quant.dequantize(p, backend="cpu"), p.quantized().dequantize())

"""pyeditor::read_probe and copy_probe, the benchmarks' multi-stream bandwidth probes
(csrc/cpu/bandwidth_probe.cpp): the max of int32 words and the copy equal the reference for every
stream count, size and tail; bad input is refused."""
import pytest
import torch

from pyeditor import reference as ref

probe = torch.ops.pyeditor.read_probe
copy = torch.ops.pyeditor.copy_probe


@pytest.mark.parametrize("words", [1, 15, 64, 257, 4096 + 3, 100_003])
@pytest.mark.parametrize("streams", [1, 2, 3, 8, 64])
def test_matches_reference(words, streams):
    g = torch.Generator().manual_seed(words * 100 + streams)
    x = torch.randint(-2**31, 2**31 - 1, (words,), dtype=torch.int32, generator=g)
    assert probe(x, streams).item() == ref.read_probe(x).item()
    x[words // 2] = 2**31 - 1  # the largest word anywhere in the buffer, the tail included
    assert probe(x, streams).item() == 2**31 - 1
    x[-1:] = 2**31 - 1
    x[words // 2] = 0
    assert probe(x, streams).item() == ref.read_probe(x).item()


def test_all_minimum_and_other_dtypes():
    x = torch.full((1000,), -2**31, dtype=torch.int32)
    assert probe(x, 4).item() == -2**31
    f = torch.randn(3, 1001)  # float32 bytes read as int32 words
    assert probe(f, 4).item() == ref.read_probe(f).item()
    b = torch.arange(64, dtype=torch.uint8)
    assert probe(b, 2).item() == ref.read_probe(b).item()


def test_bad_input():
    with pytest.raises(RuntimeError, match="contiguous"):
        probe(torch.zeros(8, 8).t(), 4)
    with pytest.raises(RuntimeError, match="multiple of 4 bytes"):
        probe(torch.zeros(6, dtype=torch.uint8), 4)
    with pytest.raises(RuntimeError, match="multiple of 4 bytes"):
        probe(torch.zeros(0), 4)
    for streams in (0, 65):
        with pytest.raises(RuntimeError, match="streams"):
            probe(torch.zeros(16), streams)


def test_opcheck():
    torch.library.opcheck(probe, (torch.randn(1000), 4))


@pytest.mark.parametrize("words", [1, 15, 64, 257, 4096 + 3, 100_003])
@pytest.mark.parametrize("streams", [1, 3, 8, 64])
def test_copy_matches_reference(words, streams):
    src = torch.randint(-2**31, 2**31 - 1, (words,), dtype=torch.int32, generator=torch.Generator().manual_seed(words))
    dst = torch.full_like(src, 7)
    copy(src, dst, streams)
    expect = torch.zeros_like(src)
    ref.copy_probe(src, expect)
    assert torch.equal(dst, expect) and torch.equal(dst, src)


def test_copy_other_dtypes_and_bad_input():
    src, dst = torch.randn(3, 1001), torch.empty(3003)
    copy(src, dst, 4)
    assert torch.equal(dst.view(3, 1001), src)
    with pytest.raises(RuntimeError, match="as many bytes"):
        copy(torch.zeros(16), torch.zeros(12), 4)
    with pytest.raises(RuntimeError, match="dst must be contiguous"):
        copy(torch.zeros(64), torch.zeros(8, 8).t(), 4)
    with pytest.raises(RuntimeError, match="overlap"):
        buf = torch.zeros(32)
        copy(buf[:16], buf[8:24], 4)
    with pytest.raises(RuntimeError, match="streams"):
        copy(torch.zeros(16), torch.zeros(16), 0)


def test_copy_opcheck():
    torch.library.opcheck(copy, (torch.randn(1000), torch.empty(1000), 4))

"""pyeditor::read_probe, the benchmarks' multi-stream read (csrc/cpu/read_probe.cpp): its max of
int32 words equals the reference for every stream count, size and tail; bad input is refused."""
import pytest
import torch

from pyeditor import reference as ref

probe = torch.ops.pyeditor.read_probe


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

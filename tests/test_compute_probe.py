"""pyeditor::fma_probe, the benchmarks' compute-roofline probe (csrc/cpu/compute_probe.cpp): every
element takes `rounds` fused multiply-adds, as the reference's exact float64 steps, through the
SIMD blocks and the scalar tail alike; bad input is refused. (Its speed is the bench's business.)"""
import math

import pytest
import torch

from pyeditor import reference as ref

pytest.importorskip("pyeditor._C")
probe = torch.ops.pyeditor.fma_probe

# sizes around the SIMD block (768 floats) and the AVX2 / AVX-512 register groups (96, 256)
SIZES = [0, 1, 7, 95, 96, 97, 255, 256, 767, 768, 769, 2 * 768 + 5, 5000]
# (a, b): a a power of two or one, so the reference's float64 steps are exact fused steps
STEPS = [(0.5, 1.0), (-2.0, 0.25), (1.0, 3.0), (0.0, -1.5)]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("a,b", STEPS)
@pytest.mark.parametrize("rounds", [0, 1, 3, 17])
def test_matches_reference(n, a, b, rounds):
    g = torch.Generator().manual_seed(n * 31 + rounds)
    x = torch.randn(n, generator=g) * 100
    before = x.clone()
    y = probe(x, a, b, rounds)
    torch.testing.assert_close(y, ref.fma_probe(x, a, b, rounds), rtol=0, atol=0)
    assert torch.equal(x, before), "the probe must not write its input"


def test_one_rounding_per_step():
    """A step whose unfused form rounds twice: x * a is not a float32, x * a + b is one."""
    x = torch.full((1000,), 1.0 + 2.0 ** -12)
    a = 1.0 + 2.0 ** -12  # x * a = 1 + 2^-11 + 2^-24 needs 25 bits
    y = probe(x, a, -1.0, 1)
    want = (1.0 + 2.0 ** -12) ** 2 - 1.0  # 2^-11 + 2^-24, exact in float32
    assert torch.equal(y, torch.full_like(x, want))


def test_non_finite_and_shapes():
    x = torch.tensor([[math.nan, math.inf], [-math.inf, 3.0]]).t()  # non-contiguous
    y = probe(x, 0.5, 1.0, 4)
    assert y.shape == x.shape
    torch.testing.assert_close(y, ref.fma_probe(x, 0.5, 1.0, 4), equal_nan=True, rtol=0, atol=0)
    big = torch.full((300,), 3e38)
    assert torch.isinf(probe(big, 2.0, 0.0, 1)).all()


def test_bad_input():
    with pytest.raises(RuntimeError, match="x must be float32"):
        probe(torch.zeros(8, dtype=torch.float64), 1.0, 1.0, 1)
    with pytest.raises(RuntimeError, match="rounds must be >= 0"):
        probe(torch.zeros(8), 1.0, 1.0, -1)


def test_opcheck():
    x = torch.randn(3, 300)
    torch.library.opcheck(probe, (x, 0.5, 1.0, 3))
    torch.library.opcheck(probe, (x.t(), 0.5, 1.0, 2))

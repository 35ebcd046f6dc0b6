"""assign_prototypes' peak extra memory, measured with torch.profiler's memory events
(pyeditor.memory), against the plain form that builds every prototype's [P, B, n] edit."""
import pytest
import torch

from pyeditor import hyper
from pyeditor import reference as ref
from pyeditor.memory import peak_extra_bytes

B, D, N, P = 64, 32, 8192, 4


def inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, D, generator=g), torch.randn(P, D, N, generator=g) * D ** -0.5,
            torch.randn(P, N, generator=g) * 0.1)


def test_measurement_sees_allocations():
    x = torch.empty(1)
    sizes = []

    def alloc():
        a = torch.empty(1 << 18)  # 1 MiB, freed before the next one
        sizes.append(a.nbytes)
        del a
        return x.new_empty(1 << 17)  # 0.5 MiB, alive until fn returns

    peak = peak_extra_bytes(alloc)
    assert (1 << 20) <= peak < (1 << 20) + (1 << 19)


@pytest.mark.parametrize("method,thr", [("fused", None), ("fused", 0.5), ("gram", None), ("auto", None)])
def test_assign_peak_memory_at_most_one_over_p_of_the_edits(method, thr):
    e, w, b = inputs()
    edits = P * B * N * e.element_size()

    def plain():
        g = torch.baddbmm(b.unsqueeze(1), e.expand(P, B, D), w)  # every prototype's edit
        if thr is not None:
            g = g.clamp_(-thr, thr)
        norms = torch.linalg.vector_norm(g, dim=-1).t()
        return norms, norms.argmin(1)

    plain_peak = peak_extra_bytes(plain)
    assert plain_peak >= edits  # the measurement sees the [P, B, n] tensor
    ours = peak_extra_bytes(lambda: hyper.assign_prototypes(e, w, b, thr, backend="cpu", method=method))
    assert 0 < ours <= edits / P, f"{method}: peak {ours} bytes, [P, B, n] = {edits} bytes"
    got = hyper.assign_prototypes(e, w, b, thr, backend="cpu", method=method).chosen
    assert torch.equal(got, ref.assign_prototypes(e, w, b, thr)[1])

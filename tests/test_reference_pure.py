"""The oracle runs no code it checks: with every pyeditor custom op poisoned (cached op handles
included), each public function still computes on backend="reference"."""
import pytest
import torch

import pyeditor
from pyeditor import quant


@pytest.fixture
def poisoned(monkeypatch):
    def guard(original):
        def call(self, *args, **kwargs):
            if "pyeditor" in str(getattr(self, "_qualified_op_name", None) or getattr(self, "_name", "")):
                raise AssertionError(f"the reference backend called {self}")
            return original(self, *args, **kwargs)
        return call

    monkeypatch.setattr(torch._ops.OpOverloadPacket, "__call__", guard(torch._ops.OpOverloadPacket.__call__))
    monkeypatch.setattr(torch._ops.OpOverload, "__call__", guard(torch._ops.OpOverload.__call__))
    with pytest.raises(AssertionError, match="reference backend called"):  # the poison works
        torch.ops.pyeditor.quant_dequantize(torch.zeros(0, dtype=torch.uint8), torch.zeros(0), torch.zeros(0,
                                            dtype=torch.uint8), torch.zeros(0, dtype=torch.int16), [], 0, 0)


def test_reference_backend_calls_no_pyeditor_op(poisoned):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    theta, delta, idx = r(3, 8, 6), r(4, 8, 6), torch.tensor([0, 2, 1, 2])
    kw = {"backend": "reference"}
    pyeditor.apply_edit(theta, delta, 0.5, idx, **kw)
    pyeditor.edited_linear(r(4, 5, 8), theta, delta, 0.5, None, idx, **kw)
    e, w, b = r(4, 7), r(3, 7, 12), r(3, 12)
    pyeditor.hyper_matmul(e, w, b, idx, **kw)
    pyeditor.hyper_matmul_heads(r(2, 4, 7), w, [4, 8], b, idx, **kw)
    pyeditor.generate_edit(e, w, b, idx, **kw)
    pyeditor.edit_norms(e, w, b, **kw)
    pyeditor.assign_prototypes(e, w, b, **kw)
    x, protos = r(20, 5), r(6, 5)
    pyeditor.nearest_prototype(x, protos, 2, **kw)
    pyeditor.kmeans(x, 3, n_iter=3, seed=0, **kw)
    pyeditor.kmeans_predict(x, protos, **kw)
    for group in (None, 32):
        p = quant.quantize_channelwise(r(20, 70), torch.tensor([2, 4, 6, 8] * 5), group)
        quant.dequantize(p, **kw)
        quant.packed_linear(r(3, 70), p, r(20), **kw)

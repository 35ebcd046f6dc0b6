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


# ---------------------------------------------------------------- the oracle and production stay apart
# Read from the source (AST), so a regression fails here before any numerics test could hide it:
# the oracle imports only the shared constants, and production code calls the oracle only as
# the "reference" backend of a public function (never for a helper, a type or a check).
import ast  # noqa: E402
import pathlib  # noqa: E402

_ROOT = pathlib.Path(pyeditor.__file__).parent
_SHARED = {"constants", "quant_format"}  # pure data the oracle may import
_COMPARES_WITH_ORACLE = {"reference.py", "verify.py"}  # the oracle itself; the CLI that checks against it


def _package_imports(path: pathlib.Path) -> set:
    """Modules of the package that a file imports (pyeditor.x / .x / pyeditor.kernels.x -> x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 0 and not mod.startswith("pyeditor"):
                continue
            base = mod.removeprefix("pyeditor").lstrip(".")
            found |= {base.split(".")[0]} if base else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("pyeditor.")}
    return found


def _oracle_uses(path: pathlib.Path) -> set:
    """Names a file takes from pyeditor.reference: reference.X / alias.X and from-imports."""
    tree = ast.parse(path.read_text())
    aliases, names = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = (node.module or "").removeprefix("pyeditor").lstrip(".")
            if mod == "reference":
                names |= {a.name for a in node.names}
            elif mod == "" and (node.level or node.module == "pyeditor"):
                aliases |= {a.asname or a.name for a in node.names if a.name == "reference"}
        elif isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == "pyeditor.reference" and a.asname}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            names.add(node.attr)
    return names


def test_oracle_imports_only_shared_constants():
    assert _package_imports(_ROOT / "reference.py") <= _SHARED
    for name in _SHARED:
        assert not _package_imports(_ROOT / f"{name}.py"), f"{name}.py must import nothing of the package"


def test_production_calls_the_oracle_only_as_the_reference_backend():
    public = set(pyeditor.__all__)
    files = [p for p in _ROOT.glob("*.py") if p.name not in _COMPARES_WITH_ORACLE]
    files += list((_ROOT.parent / "kernels").glob("*.py")) if (_ROOT.parent / "kernels").is_dir() else []
    assert len(files) > 10
    bad = {p.name: sorted(used - public) for p in files if (used := _oracle_uses(p)) - public}
    assert not bad, f"production code takes helpers from pyeditor.reference (move them to their family): {bad}"


def test_the_purity_checks_see_a_helper(tmp_path):
    # the detectors themselves: an aliased helper use and a package import are both found
    f = tmp_path / "m.py"
    f.write_text("from . import reference as _r, ops\nimport pyeditor.reference as ref\nfrom .reference import lloyd\n"
                 "x = _r.QuantizedWeight\ny = ref.apply_edit\n")
    assert _oracle_uses(f) == {"QuantizedWeight", "apply_edit", "lloyd"}
    assert _package_imports(f) == {"reference", "ops"}

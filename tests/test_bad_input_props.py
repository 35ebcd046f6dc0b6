"""Bad input on every public op (issue 26, item 7): a hypothesis property run over the bad-input
matrix of tests/bad_input on the C++ CPU ops and the Triton interpreter, plus the numeric edge
cases found by the fuzz run (overflow near the float32 maximum, thresholds beyond it, bool and
complex thresholds, cached Gram forms of other editors).

The matrix runs in one subprocess per backend (TRITON_INTERPRET=1 must be set before triton is
imported, and a case that kills the process must be a failure naming that case, not a lost run);
a run that dies resumes after the case that killed it."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyeditor
from pyeditor import quantizers
from pyeditor import reference as ref
from pyeditor.testing import check_close, reduction_tolerance

from bad_input.run import FAMILIES, families
from conftest import backend_params

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BACKENDS = [p for p in backend_params() if p.id in ("cpu", "triton")]  # C++ CPU and the interpreter
WITH_REFERENCE = [p for p in backend_params(include_reference=True) if p.id in ("cpu", "triton", "reference")]
F32_MAX = torch.finfo(torch.float32).max
QUICK = settings(max_examples=8, derandomize=True, database=None, deadline=None)


# ------------------------------------------------------------------ the matrix, in subprocesses
def _start(backend: str, skip: int) -> subprocess.Popen:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, HERE] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    return subprocess.Popen([sys.executable, "-m", "bad_input.run", backend, str(skip)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _collect(proc: subprocess.Popen, run: dict) -> bool:
    """Reads one finished subprocess into run; True when it finished the matrix."""
    out, err = proc.communicate(timeout=600)
    started = None
    for line in out.splitlines():
        rec = json.loads(line)
        if "start" in rec:
            started = rec
        elif "case" in rec:
            run["cases"][rec["case"]] = rec
            started = None
        elif "done" in rec:
            run["total"] = rec["done"]
            return True
    if started is None:  # died before its first case or between cases: nothing to resume after
        run["deaths"].append(("(outside a case)", proc.returncode, err[-2000:]))
        return True
    run["deaths"].append((started["start"], proc.returncode, err[-2000:]))
    run["cases"][started["start"]] = {"case": started["start"], "ok": False,
                                      "detail": f"killed the process (exit {proc.returncode}): {err[-500:]}"}
    run["skip"] = started["index"]
    return False


@pytest.fixture(scope="module")
def matrix():
    """{backend: {"cases": {name: record}, "deaths": [(case, exit, stderr)], "total": n}}; the
    backends run side by side, each restarted after a case that killed it (at most 8 times)."""
    names = [p.id for p in BACKENDS if not any(m.name == "skip" for m in p.marks)]
    runs = {b: {"cases": {}, "deaths": [], "total": None, "skip": 0} for b in names}
    procs = {b: _start(b, 0) for b in names}
    for b, proc in procs.items():
        done = _collect(proc, runs[b])
        for _ in range(8):
            if done:
                break
            done = _collect(_start(b, runs[b]["skip"]), runs[b])
    return runs


def _family_params():
    return [pytest.param(b.id, f, id=f"{b.id}-{f}", marks=b.marks) for b in BACKENDS for f in families(b.id)]


@pytest.mark.parametrize("backend,family", _family_params())
def test_bad_input_property(matrix, backend, family):
    """Every case raises a clear error naming the argument or returns the reference's result."""
    cases = [r for name, r in matrix[backend]["cases"].items() if name.startswith(family + "/")]
    assert cases, f"no {family} case ran on {backend}: {matrix[backend]['deaths']}"
    bad = [f"{r['case']}: {r['detail']}" for r in cases if not r["ok"]]
    assert not bad, f"{len(bad)} of {len(cases)} {family} cases on {backend} fail:\n" + "\n".join(bad)


@pytest.mark.parametrize("backend", [pytest.param(b.id, marks=b.marks) for b in BACKENDS])
def test_bad_input_no_process_killed(matrix, backend):
    run = matrix[backend]
    assert not run["deaths"], "\n".join(f"{c}: exit {rc}\n{err}" for c, rc, err in run["deaths"])
    assert run["total"] == len(run["cases"]), f"{run['total']} cases drawn, {len(run['cases'])} reported"
    ran = {name.split("/")[0] for name in run["cases"]}
    assert ran == set(families(backend)) and set(families("cpu")) == set(FAMILIES)


# ------------------------------------------------------------------ edit_norms near the float32 maximum
@pytest.mark.parametrize("backend,device", BACKENDS)
@QUICK
@given(e_exp=st.integers(15, 38), w_exp=st.integers(15, 38), signs=st.integers(0, 2 ** 12 - 1),
       threshold=st.sampled_from([None, "big"]))
def test_edit_norms_overflow_matches_float64(backend, device, e_exp, w_exp, signs, threshold):
    """Edits past the float32 maximum (the fused kernels form them in float32, then overflow to inf
    or NaN) get the reference's float64 norms; a threshold above every edit clips nothing."""
    g = torch.Generator().manual_seed(signs)
    sign = torch.tensor([1.0 if signs >> i & 1 else -1.0 for i in range(12)])
    e = (torch.rand(3, 4, generator=g) + 0.5) * 10.0 ** e_exp * sign[:4]
    w = (torch.rand(2, 4, 5, generator=g) + 0.5) * 10.0 ** w_exp * sign[4:8, None]
    b = torch.rand(2, 5, generator=g) * sign[8:10, None]
    t = None if threshold is None else 1e39  # saturates to +inf: no clip, as in float64
    got = pyeditor.edit_norms(e, w, b, t, backend=backend, method="fused")
    want = ref.edit_norms(e, w, b, None)
    check_close(got, want, tol=reduction_tolerance(torch.float32, 20))
    assert bool(torch.isfinite(got).all()) or not bool(torch.isfinite(want).all())
    chosen = pyeditor.assign_prototypes(e, w, b, backend=backend, method="fused").chosen
    assert torch.equal(chosen, ref.assign_prototypes(e, w, b)[1])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_edit_norms_clip_hides_no_float32_overflow(backend, device):
    """The fused kernels keep an edit that overflowed float32 non-finite through the clip (not
    +-T, a finite wrong norm), so edit_norms redoes that pair in float64."""
    e, w = torch.tensor([[2.0, 1.0]]), torch.tensor([[[3e38], [-3e38]]])  # 6e38 - 3e38: inf in float32
    got = pyeditor.edit_norms(e, w, None, 3.4e38, backend=backend, method="fused")
    check_close(got, ref.edit_norms(e, w, None, 3.4e38), tol=(0.0, 1e-6))


# ------------------------------------------------------------------ quantization near the float32 maximum
@QUICK
@given(bits=st.sampled_from([2, 4, 6, 8, "mixed"]), group_size=st.sampled_from([None, 32, 64]),
       big=st.sampled_from([F32_MAX, 3.4e38, 3e38, 2e38, 1e38]), seed=st.integers(0, 2 ** 16))
def test_quantize_near_float32_max_dequantizes_finite(bits, group_size, big, seed):
    """A range reaching +-3e38 put an end code past the float32 maximum ((code - zero) * scale
    = -inf with a rounded zero point): every code now dequantizes finite, within one scale of w,
    bit-identically in the reference, the fast min-max quantizer and every backend's dequantize."""
    g = torch.Generator().manual_seed(seed)
    n, k = 5, 70
    w = torch.randn(n, k, generator=g)
    w = torch.where(w.abs() > 1.0, w.sign() * big, w)
    w[:, 0], w[:, 1] = big, -big  # both ends in every channel (and the first group)
    b = torch.tensor([2, 4, 6, 8, 4]) if bits == "mixed" else bits
    qw = ref.quantize_channelwise(w, b, group_size)
    fast = quantizers.minmax(w, b, group_size)
    for name, x, y in zip(qw._fields[:4], qw[:4], fast[:4]):
        assert torch.equal(x, y), f"minmax {name} differs from the reference"
    deq = ref.dequantize(qw)
    assert bool(torch.isfinite(deq).all())
    scale = qw.scale.double().reshape(n, -1)[:, torch.arange(k) // (group_size or k)]
    assert bool(((deq.double() - w.double()).abs() <= scale).all())
    packed = pyeditor.quantize_channelwise(w, b, group_size)
    for p in BACKENDS:
        if not any(m.name == "skip" for m in p.marks):
            assert torch.equal(pyeditor.dequantize(packed, backend=p.id), deq), p.id


# ------------------------------------------------------------------ thresholds: beyond float32, bool, complex
def _threshold_ops(dtype=torch.float32):
    """name -> call(T, backend) for every public op taking a threshold, on small fixed inputs."""
    g = torch.Generator().manual_seed(0)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)

    theta, delta, idx = rnd(2, 3, 4), rnd(3, 3, 4) * 1e30, torch.tensor([1, 0, 1])
    x, e, w, b = rnd(3, 2, 3), rnd(3, 4), rnd(2, 4, 5) * 1e30, rnd(2, 5)
    return {
        "apply_edit": lambda t, bk: pyeditor.apply_edit(theta, delta, t, idx, backend=bk),
        "apply_edit-out": lambda t, bk: pyeditor.apply_edit(theta, delta, t, idx, out=torch.empty_like(delta),
                                                            backend=bk),
        "edited_linear": lambda t, bk: pyeditor.edited_linear(x, theta, delta, t, None, idx, backend=bk),
        "generate_edit": lambda t, bk: pyeditor.generate_edit(e, w, b, idx, t, backend=bk),
        "edit_norms": lambda t, bk: pyeditor.edit_norms(e, w, b, t, backend=bk, method="fused"),
    }


HUGE_T = [1e39, 3.5e38, 10 ** 400, torch.tensor(1e39, dtype=torch.float64),
          torch.tensor([1e39, 5e38, 1e300], dtype=torch.float64)]


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
@pytest.mark.parametrize("op", list(_threshold_ops()))
@pytest.mark.parametrize("t", HUGE_T, ids=["1e39", "3.5e38", "10**400", "f64-tensor", "f64-per-sample"])
def test_threshold_beyond_float32_saturates(backend, device, op, t):
    """A T above the float32 maximum (float32 / 16-bit edits) clips nothing: it becomes +inf, exactly
    the result of T = inf (before: 'value cannot be converted to type float without overflow')."""
    call = _threshold_ops()[op]
    got = call(t, backend)
    check_close(got, call(math.inf, backend), tol=(0.0, 0.0))


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
def test_threshold_beyond_float32_still_clips_float64(backend, device):
    """float64 edits keep T = 1e39 (not saturated): an edit of 1e300 is clipped to it."""
    theta, delta = torch.zeros(2, 3, dtype=torch.float64), torch.full((2, 3), 1e300, dtype=torch.float64)
    got = pyeditor.apply_edit(theta, delta, 1e39, backend=backend)
    assert torch.equal(got, torch.full((2, 3), 1e39, dtype=torch.float64))
    got = pyeditor.apply_edit(theta, delta, 10 ** 400, backend=backend)  # past float64 too: no clip
    assert torch.equal(got, delta)


BAD_T = [True, 1 + 1j, torch.tensor(True), torch.tensor([True, False, True]), torch.tensor(0.5 + 0.5j),
         torch.tensor([0.5j, 1, 2])]


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
@pytest.mark.parametrize("op", list(_threshold_ops()))
@pytest.mark.parametrize("t", BAD_T, ids=["bool", "complex", "bool-tensor", "bool-per-sample", "complex-tensor",
                                          "complex-per-sample"])
def test_bool_and_complex_threshold_refused(backend, device, op, t):
    with pytest.raises(TypeError, match="threshold"):
        _threshold_ops()[op](t, backend)


# ------------------------------------------------------------------ cached Gram forms
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gram_of_other_or_changed_editors_refused(backend, device):
    """A Gram form must be prototype_gram of these very editors, unchanged since: another editor's
    (same shape) or one updated in place would assign silently wrong; a plain tensor raised
    AttributeError."""
    e, w, b = torch.randn(6, 3), torch.randn(2, 3, 5), torch.randn(2, 5)
    gram = pyeditor.prototype_gram(w, b)
    want = ref.assign_prototypes(e, w, b)
    got = pyeditor.assign_prototypes(e, w, b, backend=backend, gram=gram)
    assert torch.equal(got.chosen, want[1])
    with pytest.raises(TypeError, match="gram"):
        pyeditor.assign_prototypes(e, w, b, backend=backend, gram=gram.gram)
    with pytest.raises(ValueError, match="gram"):
        pyeditor.assign_prototypes(e, w, b, backend=backend, gram=pyeditor.prototype_gram(w.clone(), b))
    with pytest.raises(ValueError, match="gram"):
        pyeditor.assign_prototypes(e, w, b, backend=backend, gram=pyeditor.prototype_gram(torch.randn(3, 3, 5)))
    with pytest.raises(ValueError, match="gram"):
        pyeditor.edit_norms(e, w, None, backend=backend, gram=gram)  # computed with the bias
    with torch.no_grad():
        w.mul_(2.0)  # an optimizer step on the editors
    with pytest.raises(ValueError, match="gram"):
        pyeditor.assign_prototypes(e, w, b, backend=backend, gram=gram)
    fresh = pyeditor.prototype_gram(w, b)
    assert torch.equal(pyeditor.assign_prototypes(e, w, b, backend=backend, gram=fresh).chosen,
                       ref.assign_prototypes(e, w, b)[1])

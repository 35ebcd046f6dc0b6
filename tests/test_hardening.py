"""Bad and unusual input on every backend (issue 26): the Triton ops check what the C++ ops check,
read strided / stride-0 index, threshold and bias inputs correctly, refuse aliased out= buffers,
and stay checked under torch.compile.

Cases that used to kill the process (out-of-bounds reads and writes in the Triton kernels) run in
one subprocess, so a crash is a test failure instead of the end of the run."""
import os
import re
import subprocess
import sys

import pytest
import torch

import pyeditor
from pyeditor import reference as ref
from pyeditor.testing import check_close

from conftest import backend_params

BACKENDS = [p for p in backend_params() if p.id in ("cpu", "triton")]  # CPU C++ and the interpreter
OPS = torch.ops.pyeditor


# ------------------------------------------------------------------ direct op calls, in a subprocess
# Every case calls a registered op directly (no Python API checks) with the C++ op ("") and its
# Triton twin ("_triton"); it must raise RuntimeError matching `expect`, or (expect None) return
# True. One line per case: "CASE <name> ok|FAIL ...".
_SCRIPT = r'''
import re, sys
import torch, pyeditor
from pyeditor import reference as ref
ops = torch.ops.pyeditor
g = torch.Generator().manual_seed(0)
def rnd(*s, dtype=torch.float32):
    return torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
t05 = torch.tensor(0.5)

def close(a, b):
    return bool(torch.allclose(a, b, atol=1e-5, rtol=1e-5))

def packed(gs=None):
    p = pyeditor.quantize_channelwise(rnd(20, 40), 4, gs)
    return p

def cases(sfx):
    op = lambda name: getattr(ops, name + sfx)
    x, th, de = rnd(3, 2, 4), rnd(4, 4, 5), rnd(3, 4, 5) * 2
    idx0 = torch.tensor([2]).expand(3)          # valid, stride 0
    yield "edited_linear-stride0-index", None, lambda: close(
        op("edited_linear")(x, th, de, t05, None, idx0), ref.edited_linear(x, th, de, t05, None, idx0))
    bias2 = rnd(4, 10)[:, ::2]                  # [P, out] with a column stride
    yield "edited_linear-strided-bias", None, lambda: close(
        op("edited_linear")(x, th, de, t05, bias2, idx0), ref.edited_linear(x, th, de, t05, bias2, idx0))
    yield "edited_linear-index-out-of-range", "out of range", lambda: op("edited_linear")(
        x, th, de, t05, None, torch.tensor([0, 7, 1]))
    yield "edited_linear-negative-index", "out of range", lambda: op("edited_linear")(
        x, th, de, t05, None, torch.tensor([0, -1, 1]))
    yield "edited_linear-threshold-shape", "threshold must hold", lambda: op("edited_linear")(
        x, th, de, torch.tensor([0.1, 0.2]), None, idx0)
    yield "edited_linear-threshold-dtype", "threshold must be", lambda: op("edited_linear")(
        x, th, de, torch.tensor(0.5, dtype=torch.float64), None, idx0)
    yield "edited_linear-negative-threshold", "threshold must be >= 0", lambda: op("edited_linear")(
        x, th, de, torch.tensor(-1.0), None, idx0)
    yield "edited_linear-index-shape", "proto_index must have shape", lambda: op("edited_linear")(
        x, th, de, t05, None, torch.tensor([0, 1]))
    ta, da = rnd(3, 4, 5), rnd(4, 4, 5)
    idx = torch.tensor([0, 2, 1, 1, 2, 0, 1, 0])[::2]   # strided, valid
    thr = torch.tensor([0.1, 9.0, 0.2, 9.0, 0.3, 9.0, 0.4, 9.0])[::2]
    yield "apply_edit-strided-index-threshold", None, lambda: close(
        op("apply_edit")(ta, da, thr, idx), ref.apply_edit(ta, da, thr, idx))
    yield "apply_edit-index-out-of-range", "out of range", lambda: op("apply_edit")(
        ta, da, t05, torch.tensor([0, 1, 3, 0]))
    yield "apply_edit-negative-index", "out of range", lambda: op("apply_edit")(
        ta, da, t05, torch.tensor([0, -4, 1, 0]))
    yield "apply_edit-threshold-too-short", "threshold must be a number", lambda: op("apply_edit")(
        ta, da, torch.tensor([0.1, 0.2]), idx)
    yield "apply_edit-nan-threshold", "threshold must be >= 0", lambda: op("apply_edit")(
        ta, da, torch.tensor(float("nan")), idx)
    yield "apply_edit-index-dtype", "proto_index must be int64", lambda: op("apply_edit")(
        ta, da, t05, idx.int())
    yield "apply_edit_out-out-too-small", "out has shape", lambda: op("apply_edit_out")(
        ta, da, t05, idx, torch.empty(1, 4, 5))
    yield "apply_edit_out-broadcast-out", "memory location|broadcast", lambda: op("apply_edit_out")(
        ta, da, t05, idx, torch.empty(1, 4, 5).expand(4, 4, 5))
    yield "apply_edit_out-index-out-of-range", "out of range", lambda: op("apply_edit_out")(
        ta, da, t05, torch.tensor([0, 1, 9, 0]), torch.empty(4, 4, 5))
    yield "apply_edit_backward-delta-shape", "does not fit grad shape", lambda: op("apply_edit_backward")(
        rnd(2, 4, 5), rnd(3, 4, 5), t05)
    yield "apply_edit_backward-threshold-shape", "threshold must be", lambda: op("apply_edit_backward")(
        rnd(2, 4, 5), rnd(2, 4, 5), torch.tensor([0.1, 0.2, 0.3]))
    e, w, b = rnd(4, 3), rnd(2, 3, 5), rnd(2, 5)
    yield "hyper_matmul-index-out-of-range", "out of range", lambda: op("hyper_matmul")(
        e, w, b, torch.tensor([0, 1, 2, 0]))
    yield "hyper_matmul-negative-index", "out of range", lambda: op("hyper_matmul")(
        e, w, b, torch.tensor([0, 1, -1, 0]))
    yield "hyper_matmul-stride0-index", None, lambda: close(
        op("hyper_matmul")(e, w, b, torch.tensor([1]).expand(4)), ref.hyper_matmul(e, w, b, torch.tensor([1] * 4)))
    yield "hyper_matmul-bias-shape", "bias must be", lambda: op("hyper_matmul")(e, w, b[:, :4], None)
    yield "hyper_matmul-weight-shape", "weight must be", lambda: op("hyper_matmul")(e, rnd(2, 4, 5), None, None)
    eh = rnd(2, 4, 3)
    yield "hyper_matmul_heads-negative-size", "is negative", lambda: op("hyper_matmul_heads")(
        eh, w, [-2, 7], b, None)
    yield "hyper_matmul_heads-sizes-sum", "sizes sum to", lambda: op("hyper_matmul_heads")(eh, w, [2, 2], b, None)
    yield "hyper_matmul_heads-sizes-count", "sizes has 3 entries", lambda: op("hyper_matmul_heads")(
        eh, w, [2, 2, 1], b, None)
    yield "hyper_matmul_heads-index-out-of-range", "out of range", lambda: op("hyper_matmul_heads")(
        eh, w, [2, 3], b, torch.tensor([0, 5, 0, 1]))
    yield "hyper_weight_grad-negative-protos", "protos must be >= 0", lambda: op("hyper_weight_grad")(
        eh, rnd(4, 5), [2, 3], torch.tensor([0, 0, 0, 0]), -1)
    yield "hyper_weight_grad-index-out-of-range", "out of range", lambda: op("hyper_weight_grad")(
        eh, rnd(4, 5), [2, 3], torch.tensor([0, 2, 0, 1]), 2)
    yield "hyper_weight_grad-negative-size", "is negative", lambda: op("hyper_weight_grad")(
        eh, rnd(4, 5), [-1, 6], torch.tensor([0, 1, 0, 1]), 2)
    yield "edit_sumsq-threshold-shape", "threshold must hold", lambda: op("edit_sumsq")(
        e, w, b, torch.tensor([0.1, 0.2]))
    p = packed()
    data, scale, zero, perm = p.tensors()
    bk, xq = p.flat_buckets, rnd(3, 40)
    lin, deq = op("quant_linear"), op("quant_dequantize")
    bq = rnd(40)[::2]
    yield "quant_linear-strided-bias", None, lambda: close(
        lin(xq, data, scale, zero, perm, bk, 40, 20, bq, False, 0), ref.packed_linear(xq, p.quantized(), bq))
    yield "quant_linear-truncated-data", "packed data holds", lambda: lin(
        xq, data[:-64], scale, zero, perm, bk, 40, 20, None, False, 0)
    yield "quant_dequantize-truncated-data", "packed data holds", lambda: deq(
        data[:-64], scale, zero, perm, bk, 40, 20, 0)
    yield "quant_dequantize-bad-bits", "bucket bits", lambda: deq(data, scale, zero, perm, [3] + bk[1:], 40, 20, 0)
    yield "quant_dequantize-buckets-out-of-order", "contiguous and in order", lambda: deq(
        data, scale, zero, perm, bk[:1] + [16] + bk[2:], 40, 20, 0)
    yield "quant_dequantize-int64-overflow", "at most 2\\^40|bucket rows", lambda: deq(
        data, scale, zero, perm, [8, 0, 2 ** 62, 0], 40, 20, 0)
    yield "quant_dequantize-huge-features", "at most 2\\^40", lambda: deq(
        data, scale, zero, perm, bk, 2 ** 61, 20, 0)
    yield "quant_dequantize-negative-features", "must be >= 0", lambda: deq(data, scale, zero, perm, bk, -40, 20, 0)
    yield "quant_dequantize-too-many-channels", "packed rows cannot hold", lambda: deq(
        data, scale, zero, perm, bk, 40, 33, 0)
    yield "quant_dequantize-group-size", "group_size must be", lambda: deq(data, scale, zero, perm, bk, 40, 20, 48)
    yield "quant_dequantize-scale-shape-grouped", "packed scale must be", lambda: deq(
        data, scale, zero, perm, bk, 40, 20, 32)
    yield "quant_dequantize-perm-dtype", "packed perm must be", lambda: deq(data, scale, zero, perm.int(), bk, 40, 20, 0)
    yield "quant_dequantize-scale-noncontiguous", "packed scale must be", lambda: deq(
        data, torch.stack([scale, scale], 1)[:, 0], zero, perm, bk, 40, 20, 0)
    dup = perm.clone()
    dup[1] = dup[0]
    yield "quant_dequantize-perm-duplicate", "not a permutation|covers", lambda: deq(data, scale, zero, dup, bk, 40, 20, 0)
    big = perm.clone()
    big[0] = 30
    yield "quant_dequantize-perm-out-of-range", "not a permutation", lambda: deq(data, scale, zero, big, bk, 40, 20, 0)
    pg = packed(32)
    gd, gsc, gz, gp = pg.tensors()
    yield "quant_linear-grouped-scale-flat", "packed scale must be", lambda: lin(
        xq, gd, gsc[0], gz, gp, pg.flat_buckets, 40, 20, None, False, 32)
    yield "quant_linear-grouped-zero-shape", "packed zero must be", lambda: lin(
        xq, gd, gsc, gz[:1], gp, pg.flat_buckets, 40, 20, None, False, 32)
    yield "quant_linear-bias-shape", "bias must be a floating", lambda: lin(
        xq, data, scale, zero, perm, bk, 40, 20, rnd(19), False, 0)
    yield "quant_linear-x-features", "x has 50 input features", lambda: lin(
        rnd(3, 50), data, scale, zero, perm, bk, 40, 20, None, False, 0)
    # 41 inputs fit the 40-wide weight's padded blocks: only in_features tells them apart
    yield "quant_linear-x-features-in-padding", "x has 41 input features", lambda: lin(
        rnd(3, 41), data, scale, zero, perm, bk, 40, 20, None, False, 0)
    yield "quant_linear-in-features-padding", "x has 40 input features", lambda: lin(
        xq, data, scale, zero, perm, bk, 41, 20, None, False, 0)
    yield "quant_linear-x-dtype", "x must be float32", lambda: lin(xq.int(), data, scale, zero, perm, bk, 40, 20, None, False, 0)
    xs, ps = rnd(5, 3), rnd(4, 3)
    yield "nearest_prototype-k-too-large", "k must be in", lambda: op("nearest_prototype")(xs, ps, 5, "l2")
    yield "nearest_prototype-k-zero", "k must be in", lambda: op("nearest_prototype")(xs, ps, 0, "l2")
    yield "nearest_prototype-metric", "metric must be", lambda: op("nearest_prototype")(xs, ps, 1, "l1")
    yield "nearest_prototype-features", "features but prototypes have", lambda: op("nearest_prototype")(
        xs, rnd(4, 2), 1, "l2")

start = int(sys.argv[1])
i = 0
for sfx in sys.argv[2:]:
    for name, expect, fn in cases(sfx):
        label = name.replace("-", sfx + "-", 1) if sfx else name
        i += 1
        if i <= start:
            continue
        print(f"START {i} {label}", flush=True)
        try:
            got = fn()
        except Exception as exc:
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            ok = expect is not None and isinstance(exc, RuntimeError) and re.search(expect, str(exc)) is not None
            print(f"CASE {label} {'ok' if ok else 'FAIL'} raised {type(exc).__name__}: {first}", flush=True)
            continue
        ok = expect is None and got is True
        print(f"CASE {label} {'ok' if ok else 'FAIL'} returned {got!r}", flush=True)
'''

def _case_names():
    """The case names of _SCRIPT, read without running it (for the test ids)."""
    return re.findall(r'yield "([a-z_]+-[a-z0-9-]+)"', _SCRIPT)


@pytest.fixture(scope="module")
def op_results():
    """Runs every case for the C++ ops and the Triton ops in a subprocess; {label: line}. A case
    that kills the process is recorded as a failure and the run resumes after it (at most 8 times)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    lines, start, procs = {}, 0, []
    for _ in range(8):
        proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(start), "", "_triton"], capture_output=True,
                              text=True, env=env, timeout=600)
        procs.append(proc)
        current = None
        for line in proc.stdout.splitlines():
            if line.startswith("START "):
                _, index, current = line.split()[:3]
                start = int(index)
            elif line.startswith("CASE "):
                lines[line.split()[1]] = line
                current = None
        if proc.returncode == 0 or current is None:
            break
        lines[current] = f"CASE {current} FAIL killed the process (exit {proc.returncode}): {proc.stderr[-500:]}"
    return procs, lines


def _label(name: str, sfx: str) -> str:
    return name.replace("-", sfx + "-", 1) if sfx else name


@pytest.mark.parametrize("sfx", [pytest.param("", id="cpp"), pytest.param("_triton", id="triton",
                                                                          marks=pytest.mark.triton)])
@pytest.mark.parametrize("name", _case_names())
def test_direct_op_call(op_results, name, sfx):
    procs, lines = op_results
    label = _label(name, sfx)
    line = lines.get(label)
    if line is None:
        tail = (procs[-1].stderr or "")[-2000:]
        pytest.fail(f"{label}: no result; the subprocess exited with {procs[-1].returncode}\n{tail}")
    assert " ok " in line, line


def test_subprocess_exits_cleanly(op_results):
    procs, lines = op_results
    assert [p.returncode for p in procs] == [0], f"exits {[p.returncode for p in procs]}\n{procs[-1].stderr[-3000:]}"
    assert len(lines) == 2 * len(_case_names())


# ------------------------------------------------------------------ public API, strided inputs
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_apply_edit_strided_index_and_threshold(backend, device):
    theta, delta = torch.randn(3, 4, 5), torch.randn(4, 4, 5) * 2
    idx = torch.tensor([2, 9, 0, 9, 1, 9, 2, 9])[::2]
    thr = torch.tensor([0.1, 7.0, 0.2, 7.0, 0.3, 7.0, 0.4, 7.0])[::2]
    check_close(pyeditor.apply_edit(theta, delta, thr, idx, backend=backend), ref.apply_edit(theta, delta, thr, idx))
    out = torch.empty(4, 4, 5)
    pyeditor.apply_edit(theta, delta, thr, idx, out=out, backend=backend)
    check_close(out, ref.apply_edit(theta, delta, thr, idx))
    idx0 = torch.tensor([1]).expand(4)
    check_close(pyeditor.apply_edit(theta, delta, 0.3, idx0, backend=backend), ref.apply_edit(theta, delta, 0.3, idx0))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_edited_linear_strided_index_threshold_bias(backend, device):
    x, theta, delta = torch.randn(3, 2, 4), torch.randn(4, 4, 5), torch.randn(3, 4, 5) * 2
    idx = torch.tensor([3, 9, 0, 9, 3, 9])[::2]
    thr = torch.tensor([0.1, 7.0, 0.2, 7.0, 0.3, 7.0])[::2]
    bias = torch.randn(5, 4).T  # [P, out], column stride 4
    check_close(pyeditor.edited_linear(x, theta, delta, thr, bias, idx, backend=backend),
                ref.edited_linear(x, theta, delta, thr, bias, idx))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_packed_linear_strided_bias(backend, device):
    p = pyeditor.quantize_channelwise(torch.randn(20, 40), 4)
    x, bias = torch.randn(3, 40), torch.randn(40)[::2]
    check_close(pyeditor.packed_linear(x, p, bias, backend=backend), ref.packed_linear(x, p.quantized(), bias),
                tol=(1e-5, 1e-5))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_hyper_strided_index_and_threshold(backend, device):
    e, w, b = torch.randn(4, 3), torch.randn(2, 3, 5), torch.randn(2, 5)
    idx = torch.tensor([1, 9, 0, 9, 1, 9, 1, 9])[::2]
    check_close(pyeditor.hyper_matmul(e, w, b, idx, backend=backend), ref.hyper_matmul(e, w, b, idx))
    thr = torch.tensor([0.1, 7.0, 0.2, 7.0, 0.3, 7.0, 0.4, 7.0])[::2]
    got = pyeditor.edit_norms(e, w, b, thr, backend=backend, method="fused")
    check_close(got, ref.edit_norms(e, w, b, thr), tol=(1e-5, 1e-5))  # float64 norms of float32 edits


# ------------------------------------------------------------------ out= aliasing
def _alias_cases():
    """(name, call(backend) -> None) that must raise: each out overlaps what the op reads."""
    def theta_permuted(backend):
        theta, delta = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
        pyeditor.apply_edit(theta, delta, 0.5, torch.tensor([2, 0, 1]), out=theta, backend=backend)

    def threshold_overlap(backend):
        buf = torch.zeros(3, 4, 5)
        thr = buf.view(-1)[:3]  # per-sample T living in out's storage
        pyeditor.apply_edit(torch.randn(3, 4, 5), torch.randn(3, 4, 5), thr, out=buf, backend=backend)

    def delta_partial(backend):
        buf = torch.randn(4, 4, 5)
        pyeditor.apply_edit(torch.randn(3, 4, 5), buf[:3], 0.5, out=buf[1:], backend=backend)

    def theta_other_layout(backend):
        theta = torch.randn(5, 5)
        pyeditor.apply_edit(theta, torch.randn(5, 5), 0.5, out=theta.T, backend=backend)

    return {"theta-permuted": theta_permuted, "threshold": threshold_overlap, "delta-partial": delta_partial,
            "theta-transposed": theta_other_layout}


@pytest.mark.parametrize("backend,device", [p for p in backend_params(include_reference=True)
                                            if p.id in ("cpu", "triton", "reference")])
@pytest.mark.parametrize("case", list(_alias_cases()))
def test_out_aliasing_refused(backend, device, case):
    with pytest.raises(ValueError, match="overlap|theta itself"):
        _alias_cases()[case](backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_out_in_place_still_allowed(backend, device):
    theta, delta = torch.randn(3, 4, 5), torch.randn(3, 4, 5) * 2
    expected = ref.apply_edit(theta, delta, 0.5)
    t2 = theta.clone()
    pyeditor.apply_edit(t2, delta, 0.5, out=t2, backend=backend)  # no proto_index: each sample its own matrix
    check_close(t2, expected)
    d2 = delta.clone()
    pyeditor.apply_edit(theta, d2, 0.5, out=d2, backend=backend)  # element-wise in place on delta
    check_close(d2, expected)


def _direct_alias_calls(sfx):
    op = getattr(OPS, "apply_edit_out" + sfx)
    theta, delta = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    buf = torch.zeros(3, 4, 5)
    return [
        lambda: op(theta, delta, torch.tensor(0.5), torch.tensor([2, 0, 1]), theta),
        lambda: op(torch.randn(3, 4, 5), delta, buf.view(-1)[:3], None, buf),
    ]


@pytest.mark.triton
def test_triton_out_op_refuses_aliasing():
    for call in _direct_alias_calls("_triton"):
        with pytest.raises(RuntimeError, match="out is theta itself|out overlaps threshold"):
            call()


def test_cpp_out_op_refuses_aliasing():
    for call in _direct_alias_calls(""):
        with pytest.raises(RuntimeError, match="overlap|theta itself|memory location"):
            call()


# ------------------------------------------------------------------ torch.compile (cpu backend)
def test_compiled_ops_stay_checked():
    """Compiled code skips the public functions' value checks: the ops' own checks must hold.
    aot_eager: the graphs call the ops as inductor's do (extern calls), without its C++ codegen,
    which each family's test_compile_fullgraph runs (and a fresh clone compiles from scratch)."""
    torch._dynamo.reset()
    x, theta, delta = torch.randn(3, 2, 4), torch.randn(4, 4, 5), torch.randn(3, 4, 5) * 2
    lin = torch.compile(lambda x, i: pyeditor.edited_linear(x, theta, delta, 0.5, None, i, backend="cpu"),
                        fullgraph=True, backend="aot_eager")
    idx0 = torch.tensor([2]).expand(3)
    check_close(lin(x, idx0), ref.edited_linear(x, theta, delta, 0.5, None, idx0))
    with pytest.raises(RuntimeError, match="out of range"):
        lin(x, torch.tensor([0, 4, 1]))
    edit = torch.compile(lambda t, d, thr, i: pyeditor.apply_edit(t, d, thr, i, backend="cpu") * 2,
                         fullgraph=True, backend="aot_eager")
    thr = torch.tensor([0.1, 7.0, 0.2, 7.0, 0.3, 7.0])[::2]
    check_close(edit(theta, delta, thr, idx0), ref.apply_edit(theta, delta, thr, idx0) * 2)
    with pytest.raises(RuntimeError, match="out of range"):
        edit(theta, delta, thr, torch.tensor([0, -1, 1]))
    with pytest.raises(RuntimeError, match="threshold must be >= 0"):
        edit(theta, delta, torch.tensor([0.1, -1.0, 0.2]), idx0)
    hm = torch.compile(lambda e, i: pyeditor.hyper_matmul(e, torch.ones(2, 3, 5), None, i, backend="cpu"),
                       fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match="out of range"):
        hm(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))


def test_compiled_direct_op_shape_checks():
    """The fake kernels run the shape checks, so a bad direct call fails while tracing."""
    torch._dynamo.reset()
    f = torch.compile(lambda e, w, s: OPS.hyper_matmul_heads(e, w, s, None, None) + 1, fullgraph=True)
    with pytest.raises(RuntimeError, match="is negative"):
        f(torch.randn(2, 4, 3), torch.randn(2, 3, 5), [-2, 7])
    g = torch.compile(lambda t, d, o: OPS.apply_edit_out(t, d, torch.tensor(0.5), None, o), fullgraph=True)
    with pytest.raises(RuntimeError, match="out has shape"):
        g(torch.randn(3, 4, 5), torch.randn(3, 4, 5), torch.empty(1, 4, 5))


def test_fake_kernels_check_under_tracing():
    """Traced (fake) calls of a Triton op keep its value checks as graph asserts."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from pyeditor import validate

    def f(theta, delta, t, i):
        return validate.edit_args(theta, delta, t, i)[2] + 0

    gm = make_fx(f, tracing_mode="fake")(torch.randn(3, 4, 5), torch.randn(2, 4, 5), torch.tensor(0.5),
                                         torch.tensor([0, 2]))
    assert "_assert_async" in gm.code
    with pytest.raises(RuntimeError, match="out of range"):
        gm(torch.randn(3, 4, 5), torch.randn(2, 4, 5), torch.tensor(0.5), torch.tensor([0, 3]))

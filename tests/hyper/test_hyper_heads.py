"""hyper_matmul_heads (every head of an editor in one launch) and the segmented weight gradient
of the gathered hyper_matmul, on every backend against pyeditor.reference."""
import pytest
import torch

import pyeditor
from pyeditor import hyper
from pyeditor import reference as ref
from pyeditor.testing import check_close

from test_hyper import BACKENDS, DTYPES, close, make  # one set of input/tolerance helpers for the family


HEADS = {  # (B, d, sizes, P, index)
    "gathered": (9, 20, [70, 5, 33], 3, [2, 0, 1, 1, 2, 0, 0, 2, 1]),
    "all": (5, 9, [12, 65, 1], 2, None),
    "L=1": (6, 7, [40], 3, [1, 1, 0, 2, 0, 1]),
    "zero-width-head": (4, 5, [8, 0, 3], 2, [1, 0, 1, 1]),
    "deep": (3, 300, [7, 9], 2, [1, 0, 1]),  # d over one CPU k-block
    "B=0": (0, 4, [5, 6], 2, []),
    "missing-proto": (4, 6, [17, 4], 4, [3, 3, 0, 3]),
}


def heads_inputs(case, dtype, device="cpu"):
    B, d, sizes, P, index = HEADS[case]
    L, N = len(sizes), sum(sizes)
    e = make((L, B, d), dtype, device, seed=1)
    w = make((P, d, N), dtype, device, scale=d ** -0.5, seed=2)
    b = make((P, N), dtype, device, seed=3)
    idx = None if index is None else torch.tensor(index, dtype=torch.int64, device=device)
    return e, w, sizes, b, idx


def check_heads(got, want, d):
    assert len(got) == len(want)
    for g, r in zip(got, want):
        close(g, r, d)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(HEADS))
def test_heads_match_reference(backend, device, dtype, case):
    e, w, sizes, b, idx = heads_inputs(case, dtype, device)
    for bias in (b, None):
        got = hyper.hyper_matmul_heads(e, w, sizes, bias, idx, backend=backend)
        want = ref.hyper_matmul_heads(e, w, sizes, bias, idx)
        check_heads(got, want, e.shape[2])
        # the same as one hyper_matmul per head
        start = 0
        for l, n in enumerate(sizes):
            bl = None if bias is None else bias[:, start:start + n]
            close(got[l], ref.hyper_matmul(e[l], w[:, :, start:start + n], bl, idx), e.shape[2])
            start += n


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_heads_strided_and_list_form(backend, device):
    e2 = make((5, 16), device=device)[:, ::2]                        # [5, 8], column stride 2
    e = e2.expand(3, 5, 8)                                           # one embedding shared: stride 0
    wt = make((2, 30, 8), device=device, seed=2).transpose(1, 2)     # [2, 8, 30] transposed
    b = make((1, 30), device=device, seed=3).expand(2, 30)          # stride-0 rows
    sizes = [10, 3, 17]
    idx = torch.tensor([1, 1, 0, 1, 0], device=device)
    for i in (idx, None):
        want = ref.hyper_matmul_heads(e.contiguous(), wt.contiguous(), sizes, b.contiguous(), i)
        check_heads(hyper.hyper_matmul_heads(e, wt, sizes, b, i, backend=backend), want, 8)
        heads = list(wt.split(sizes, dim=2))
        biases = list(b.split(sizes, dim=1))
        check_heads(hyper.hyper_matmul_heads(e, heads, bias=biases, index=i, backend=backend), want, 8)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_heads_run_in_one_launch(backend, device, monkeypatch):
    e, w, sizes, b, idx = heads_inputs("gathered", torch.float32, device)
    if backend == "triton":
        from pyeditor.kernels import hyper as kernels

        calls = []
        real = kernels._launch_hyper
        monkeypatch.setattr(kernels, "_launch_hyper", lambda *a, **k: calls.append(1) or real(*a, **k))
        hyper.hyper_matmul_heads(e, w, sizes, b, idx, backend=backend)
        assert len(calls) == 1
    else:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            hyper.hyper_matmul_heads(e, w, sizes, b, idx, backend=backend)
        names = [ev.name for ev in prof.events()]
        assert names.count("pyeditor::hyper_matmul_heads") == 1
        assert "pyeditor::hyper_matmul" not in names


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", ["gathered", "all", "L=1", "zero-width-head"])
def test_heads_gradcheck(backend, device, case):
    e, w, sizes, b, idx = heads_inputs(case, torch.float64, device)
    e, w = e[:, :4, :3].contiguous(), w[:, :3].contiguous()
    idx = None if idx is None else idx[:4]
    args = [t.clone().requires_grad_() for t in (e, w, b)]

    def fn(e, w, b):
        return tuple(hyper.hyper_matmul_heads(e, w, sizes, b, idx, backend=backend))

    assert torch.autograd.gradcheck(fn, args, fast_mode=backend == "triton")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["gathered", "all", "missing-proto"])
def test_heads_grads_match_reference(backend, device, dtype, case):
    e, w, sizes, b, idx = heads_inputs(case, dtype, device)
    grads = []
    for fn in (lambda *a: hyper.hyper_matmul_heads(*a, backend=backend), ref.hyper_matmul_heads):
        ins = [t.clone().requires_grad_() for t in (e, w, b)]
        outs = fn(ins[0], ins[1], sizes, ins[2], idx)
        sum((o.float() * make(o.shape, device=device, seed=9 + l)).sum() for l, o in enumerate(outs)).backward()
        grads.append([t.grad for t in ins])
    for g, r in zip(*grads):
        close(g, r, max(e.shape[1], sum(sizes)))


# ------------------------------------------------------------------ segmented weight gradient
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["gathered", "missing-proto", "deep", "B=0"])
def test_weight_grad_op_matches_masked_product(backend, device, dtype, case):
    e, _, sizes, _, idx = heads_inputs(case, dtype, device)
    P = HEADS[case][3]
    grad = make((e.shape[1], sum(sizes)), dtype, device, seed=5)
    got = pyeditor.ops.heads_ops(backend)[1](e, grad, sizes, idx, P)
    # definition: dW[p][:, head l] = sum over rows with index p of e[l, r]^T grad[r, head l]
    want, start = [], 0
    onehot = torch.nn.functional.one_hot(idx, P).double().t()  # [P, B]
    for l, n in enumerate(sizes):
        em = onehot[:, :, None] * e[l].double()[None]
        want.append(torch.einsum("pbd,bn->pdn", em, grad[:, start:start + n].double()))
        start += n
    close(got, torch.cat(want, 2).to(dtype), max(e.shape[1], 1))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gathered_hyper_matmul_weight_grad(backend, device, dtype):
    # the gathered hyper_matmul's d weight now comes from the segmented op
    g = torch.Generator().manual_seed(0)
    B, d, n, P = 37, 19, 70, 5
    e, w, b = make((B, d), dtype, device, seed=1), make((P, d, n), dtype, device, seed=2), make((P, n), dtype, device)
    idx = torch.randint(0, P - 1, (B,), generator=g).to(device)  # prototype P-1 gets no rows
    grads = []
    for fn in (lambda *a: hyper.hyper_matmul(*a, backend=backend), ref.hyper_matmul):
        ins = [t.clone().requires_grad_() for t in (e, w, b)]
        (fn(ins[0], ins[1], ins[2], idx).float() * make((B, n), device=device, seed=7)).sum().backward()
        grads.append([t.grad for t in ins])
    for got, want in zip(*grads):
        close(got, want, B)
    assert not grads[0][1][P - 1].any()


# ------------------------------------------------------------------ registration, errors, module
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    heads, wgrad = pyeditor.ops.heads_ops(backend)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if backend == "triton" and device == "cpu":
        tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    for case in ("gathered", "all"):
        e, w, sizes, b, idx = heads_inputs(case, torch.float32, device)
        torch.library.opcheck(heads, (e, w, sizes, b, idx), test_utils=tests)
        grad_args = (e.clone().requires_grad_(), w.clone().requires_grad_(), sizes, b.clone().requires_grad_(), idx)
        torch.library.opcheck(heads, grad_args, test_utils=tests)
    e, w, sizes, b, idx = heads_inputs("gathered", torch.float32, device)
    torch.library.opcheck(wgrad, (e, make((e.shape[1], sum(sizes)), device=device), sizes, idx, 3), test_utils=tests)


def test_compile_fullgraph():
    torch._dynamo.reset()
    e, w, sizes, b, idx = heads_inputs("gathered", torch.float32)

    def step(e, w, b):
        return sum(o.square().sum() for o in hyper.hyper_matmul_heads(e, w, sizes, b, idx))

    args = [t.clone().requires_grad_() for t in (e, w, b)]
    out = torch.compile(step, fullgraph=True)(*args)
    out.backward()
    args2 = [t.clone().requires_grad_() for t in (e, w, b)]
    out2 = step(*args2)
    out2.backward()
    check_close(out, out2, tol=(1e-3, 1e-5))
    for a, a2 in zip(args, args2):
        close(a.grad, a2.grad, 70)


def test_bad_input():
    e, w, sizes = torch.randn(2, 3, 4), torch.randn(2, 4, 9), [4, 5]
    with pytest.raises(IndexError, match="index value 2 is out of range"):
        hyper.hyper_matmul_heads(e, w, sizes, index=torch.tensor([0, 2, 1]))
    with pytest.raises(IndexError, match="index value -1"):
        hyper.hyper_matmul_heads(e, w, sizes, index=torch.tensor([0, -1, 1]))
    with pytest.raises(ValueError, match="sizes sum to 8 but weight has 9 columns"):
        hyper.hyper_matmul_heads(e, w, [4, 4])
    with pytest.raises(ValueError, match="sizes has 3 entries but e holds 2 heads"):
        hyper.hyper_matmul_heads(e, w, [3, 3, 3])
    with pytest.raises(TypeError, match="sizes must be ints"):
        hyper.hyper_matmul_heads(e, w, [4.0, 5])
    with pytest.raises(ValueError, match="sizes is required"):
        hyper.hyper_matmul_heads(e, w)
    with pytest.raises(ValueError, match=r"e must be \[L >= 1, B, d\]"):
        hyper.hyper_matmul_heads(e[0], w, sizes)
    with pytest.raises(ValueError, match="bias must have shape"):
        hyper.hyper_matmul_heads(e, w, sizes, torch.randn(2, 8))
    with pytest.raises(TypeError, match=r"weight\[1\] must be float"):
        hyper.hyper_matmul_heads(e, [w[:, :, :4], w[:, :, 4:].long()])
    with pytest.raises(ValueError, match=r"weight\[1\] must be \[P, d, n_l\] with the P and d of weight\[0\]"):
        hyper.hyper_matmul_heads(e, [w[:, :, :4], torch.randn(3, 4, 5)])
    with pytest.raises(TypeError, match=r"bias\[1\] must be a torch.Tensor, got NoneType"):
        hyper.hyper_matmul_heads(e, [w[:, :, :4], w[:, :, 4:]], bias=[torch.randn(2, 4), None])
    with pytest.raises(TypeError, match="index must be a torch.Tensor, got list"):
        hyper.hyper_matmul_heads(e, w, sizes, index=[0, 1, 1])
    # the C++ ops re-check what the kernels index with
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.pyeditor.hyper_matmul_heads(e, w, sizes, None, torch.tensor([0, 5, 1]))
    with pytest.raises(RuntimeError, match="sizes sum to 8"):
        torch.ops.pyeditor.hyper_matmul_heads(e, w, [4, 4], None, None)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.pyeditor.hyper_weight_grad(e, torch.randn(3, 9), sizes, torch.tensor([0, 2, 1]), 2)


def test_parameter_editor_heads_and_old_checkpoints():
    torch.manual_seed(0)
    layers = [(8, 5), (5, 3)]
    editor = pyeditor.nn.ParameterEditor(embed_dim=7, hidden=16, layer_shapes=layers, prototypes=3)
    emb, idx = torch.randn(6, 7), torch.tensor([2, 0, 1, 1, 0, 2])
    deltas = editor(emb, idx)
    e = editor.layer_embeddings(emb)
    for l, sl in enumerate(editor.head_slices):
        want = ref.hyper_matmul(e[l], editor.head_weight[:, :, sl], editor.head_bias[:, sl], idx)
        close(deltas[l], want, 16)
    # a checkpoint with the earlier per-layer keys loads into the concatenated parameters
    state = {k: v for k, v in editor.state_dict().items() if not k.startswith("head_")}
    for l, sl in enumerate(editor.head_slices):
        state[f"head_weights.{l}"] = editor.head_weight.detach()[:, :, sl].clone() * 2
        state[f"head_biases.{l}"] = editor.head_bias.detach()[:, sl].clone() + 1
    fresh = pyeditor.nn.ParameterEditor(embed_dim=7, hidden=16, layer_shapes=layers, prototypes=3)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.head_weight, editor.head_weight.detach() * 2)
    assert torch.equal(fresh.head_bias, editor.head_bias.detach() + 1)

"""Data-parallel training of a Parameter Editor through pyeditor's custom ops (gloo, 2 processes).

Each process trains DistributedDataParallel(editor + edited layers) on its half of the batch; the
parameters after a few SGD steps, and the first step's gradients, must equal a single process
training on the whole batch. float64 throughout, so the only difference is summation order.
"""
import faulthandler
import gc
import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pyeditor.nn import EditedLinear, ParameterEditor

WORLD, BATCH, STEPS, LR = 2, 8, 3, 0.2
TOL = dict(rtol=1e-9, atol=1e-12)  # float64; only the order of the gradient sums differs
TIMEOUT_S = 90  # a run takes ~8 s; see _spawn for a stuck one

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


class EditedNet(nn.Module):
    """Two adaptive layers edited by a multi-prototype editor with the cross-layer GRU."""

    def __init__(self):
        super().__init__()
        kw = dict(dtype=torch.float64)
        self.layers = nn.ModuleList([EditedLinear(6, 5, prototypes=2, threshold=0.3, **kw),
                                     EditedLinear(5, 3, prototypes=2, threshold=0.3, **kw)])
        self.editor = ParameterEditor(4, 8, [(6, 5), (5, 3)], prototypes=2, sequential=True, **kw)
        with torch.no_grad():  # edits large enough that some are clipped and some are not
            self.editor.head_weight.mul_(300)

    def forward(self, x, emb, proto):
        edits = self.editor(emb, proto)
        h = torch.relu(self.layers[0](x, edits[0], proto))
        return self.layers[1](h, edits[1], proto)


def _problem():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(BATCH, 3, 6, generator=g, dtype=torch.float64)
    emb = torch.randn(BATCH, 4, generator=g, dtype=torch.float64)
    proto = torch.randint(0, 2, (BATCH,), generator=g)
    target = torch.randn(BATCH, 3, 3, generator=g, dtype=torch.float64)
    torch.manual_seed(3)
    return EditedNet(), (x, emb, proto, target)


def _train(model, data, rows):
    """STEPS of SGD on the rows given; returns the first step's gradients by name."""
    x, emb, proto, target = (t[rows] for t in data)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    first = None
    for step in range(STEPS):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x, emb, proto), target).backward()
        if step == 0:
            first = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
    return first


def _worker(rank, init_file, out_dir):
    # a worker still running near the deadline prints every thread's stack and exits, so a hang
    # shows where it is in the test output instead of only a timeout
    faulthandler.dump_traceback_later(TIMEOUT_S - 10, exit=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    ddp = None
    try:
        model, data = _problem()
        ddp = nn.parallel.DistributedDataParallel(model)
        rows = torch.arange(rank, BATCH, WORLD)  # equal shards: the mean of shard means is the batch mean
        grads = _train(ddp, data, rows)
        grads = {n.removeprefix("module."): g for n, g in grads.items()}
        torch.save({"params": dict(model.named_parameters()), "grads": grads}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        # DDP's Reducer holds the process group. Dropped last at the frame's exit, it would destroy
        # the group holding the GIL, and the group's destructor joins gloo's worker threads, one of
        # which may need the GIL to free its last allreduce: an intermittent deadlock (torch's; gdb
        # shows both sides). Freed first, also when training raised, the group dies in
        # destroy_process_group, which releases the GIL.
        ddp = None
        gc.collect()
        dist.destroy_process_group()


def _spawn(out_dir):
    out_dir.mkdir()
    ctx = mp.start_processes(_worker, args=(str(out_dir / "init"), str(out_dir)), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1):  # re-raises a worker's exception (a stuck one exits, see _worker)
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"distributed workers did not finish in {TIMEOUT_S} s")


def test_ddp_editor_matches_single_process(tmp_path):
    tmp_path = tmp_path / "run"
    _spawn(tmp_path)
    model, data = _problem()
    grads = _train(model, data, torch.arange(BATCH))
    params = dict(model.named_parameters())
    assert any(bool((p.grad.abs() > 0).any()) for p in params.values())
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert got["grads"].keys() == grads.keys() and got["params"].keys() == params.keys()
        for name, g in grads.items():
            torch.testing.assert_close(got["grads"][name], g, **TOL, msg=f"rank {rank} gradient of {name}")
        for name, p in params.items():
            torch.testing.assert_close(got["params"][name], p.detach(), **TOL, msg=f"rank {rank} {name}")
    # the edits were partly clipped, so the masked backward of edited_linear was exercised
    with torch.no_grad():
        x, emb, proto, _ = data
        edits = model.editor(emb, proto)
        assert any(bool((e.abs() > 0.3).any()) and bool((e.abs() < 0.3).any()) for e in edits)

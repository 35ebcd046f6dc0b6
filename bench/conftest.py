"""Fixtures for the pytest-benchmark view of the cases (``pytest bench/ --benchmark-only``)."""
from __future__ import annotations

import os

import pytest
import torch

from bench.registry import Context, default_backend
from bench.roofline import measure_bandwidth

DEVICE = os.environ.get("PYEDITOR_BENCH_DEVICE", "cpu")


@pytest.fixture(scope="session")
def bench_ctx() -> Context:
    torch.set_num_threads(int(os.environ.get("PYEDITOR_BENCH_THREADS", len(os.sched_getaffinity(0)))))
    return Context(device=DEVICE, backend=os.environ.get("PYEDITOR_BENCH_BACKEND") or default_backend(DEVICE))


@pytest.fixture(scope="session")
def bandwidth(bench_ctx: Context) -> dict:
    return measure_bandwidth(bench_ctx.device, sync=bench_ctx.sync)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["torch"] = torch.__version__

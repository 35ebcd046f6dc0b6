"""Test set-up: Triton runs in its CPU interpreter on machines without a GPU.

TRITON_INTERPRET must be set before triton is first imported, so it is set here.
Markers: `triton` (Triton kernels; interpreter on CPU), `cuda` (need a GPU; skipped here),
`slow` (full sizes and long runs: `make test` deselects them, `make test-slow` runs only them).
"""
import functools
import os
import re


def _threads_per_worker() -> int:
    """The cores this process may use, shared evenly among pytest-xdist workers."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


# Under pytest-xdist every worker would start one thread per core and the workers would fight
# over the cores. Set before torch (and numpy's BLAS) load, so their pools start at this size,
# and in the environment, so subprocesses a test starts get the same share. A value the caller
# set is kept.
WORKER_THREADS = None
if "PYTEST_XDIST_WORKER" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    WORKER_THREADS = _threads_per_worker()
    os.environ["OMP_NUM_THREADS"] = str(WORKER_THREADS)

import pytest  # noqa: E402

import torch  # noqa: E402  (torch does not import triton)

if WORKER_THREADS is not None:
    torch.set_num_threads(WORKER_THREADS)

# one compile cache per checkout: inductor's shared /tmp cache can hand one checkout a graph
# compiled in another that calls ops this one does not have
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "inductor"))

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pyeditor  # noqa: E402,F401


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: runs Triton kernels (interpreter on CPU tensors without a GPU)")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")
    config.addinivalue_line("markers", "slow: only worth the full run (make test-slow)")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


_SHARED_FIXTURE = re.compile(r"@pytest\.fixture\(\s*scope=[\"'](class|module|package)[\"']")


@functools.cache
def _shares_a_fixture(module_path: str) -> bool:
    """Whether a test module defines a fixture wider than one test (a subprocess run of a whole
    matrix, say). Read from its source: the pytest-xdist controller collects nothing itself."""
    try:
        with open(module_path, encoding="utf-8") as f:
            return bool(_SHARED_FIXTURE.search(f.read()))
    except OSError:
        return False


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """--dist loadgroup: one test per unit of work, except that a module with a shared fixture
    goes to one worker whole, so the fixture runs once. (pytest-xdist's own xdist_group marks
    do not reach the scheduler under pytest 9.)"""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            module = nodeid.split("::")[0]
            return module if _shares_a_fixture(os.path.join(str(config.rootpath), module)) else nodeid

    return SharedFixtureScheduling(config, log)


def backend_rows_params(rows, fast_rows):
    """pytest params (backend, device, m) for a row-count sweep. Only the CPU kernels choose a
    path by row count; Triton and CUDA run one kernel, so their fast-tier cases take fast_rows
    and the other counts run in the slow tier (the interpreter makes each case seconds long)."""
    params = []
    for bp in backend_params():
        for m in rows:
            slow = [pytest.mark.slow] if bp.id != "cpu" and m not in fast_rows else []
            params.append(pytest.param(*bp.values, m, marks=[*bp.marks, *slow], id=f"{m}-{bp.id}"))
    return params


def backend_params(include_reference: bool = False):
    """pytest params (backend, device) for every backend of the op families, marked."""
    params = [pytest.param("cpu", "cpu", id="cpu")]
    triton_device = "cuda" if HAS_CUDA else "cpu"
    params.append(pytest.param("triton", triton_device, id="triton", marks=pytest.mark.triton))
    params.append(pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.cuda))
    if include_reference:
        params.append(pytest.param("reference", "cpu", id="reference"))
    return params

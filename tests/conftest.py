"""Test set-up: Triton runs in its CPU interpreter on machines without a GPU.

TRITON_INTERPRET must be set before triton is first imported, so it is set here.
Markers: `triton` (Triton kernels; interpreter on CPU), `cuda` (need a GPU; skipped here).
"""
import os

import pytest

import torch  # noqa: E402  (torch does not import triton)

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


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


def backend_params(include_reference: bool = False):
    """pytest params (backend, device) for every backend of the op families, marked."""
    params = [pytest.param("cpu", "cpu", id="cpu")]
    triton_device = "cuda" if HAS_CUDA else "cpu"
    params.append(pytest.param("triton", triton_device, id="triton", marks=pytest.mark.triton))
    params.append(pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.cuda))
    if include_reference:
        params.append(pytest.param("reference", "cpu", id="reference"))
    return params

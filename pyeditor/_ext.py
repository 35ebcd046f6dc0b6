"""Loads the compiled extension pyeditor._C once, or explains why pyeditor runs without it."""
from __future__ import annotations

import warnings

import torch

_loaded: bool | None = None
_why_not = ""


def load() -> bool:
    """Import pyeditor._C (registers the C++ ops); False, with one warning, if it cannot be used."""
    global _loaded, _why_not
    if _loaded is not None:
        return _loaded
    try:
        from . import _C  # noqa: F401  (importing registers the ops)

        built_for = dict(kv.split("=", 1) for kv in torch.ops.pyeditor.build_info().split(";"))["torch"]
        if built_for != torch.__version__:
            raise ImportError(f"built for torch {built_for}, running torch {torch.__version__}; rebuild it")
        _loaded = True
    except (ImportError, OSError, RuntimeError, AttributeError, KeyError) as exc:
        _loaded, _why_not = False, str(exc)
        warnings.warn(
            f"pyeditor: compiled kernels unavailable ({exc}); using the reference (and Triton) "
            "backends only. Build them with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )
    return _loaded


def build_info() -> dict:
    """What the extension was built with ({} without it)."""
    if not load():
        return {"unavailable": _why_not}
    return dict(kv.split("=", 1) for kv in torch.ops.pyeditor.build_info().split(";"))


def search_cpu_eager(x, prototypes, k: int, metric: str):
    """The CPU search kernel called without the dispatcher (csrc/eager_call.cpp): (dist, idx),
    or None when the tensors or the dispatch state need the registered op."""
    if not load():
        return None
    global search_cpu_eager
    from ._C import search_cpu_eager as direct

    search_cpu_eager = direct  # later calls go straight to C
    return direct(x, prototypes, k, metric)

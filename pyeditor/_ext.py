"""Loads the compiled extension pyeditor._C once, or explains why pyeditor runs without it."""
from __future__ import annotations

import os
import platform
import warnings

import torch

_loaded: bool | None = None
_why_not = ""

# PYEDITOR_CPU_ISA (csrc/include/pyeditor/cpu_isa.h): the highest instruction set the CPU kernels
# may use, lowest first
ISA_LEVELS = ("portable", "avx2", "avx512", "amx")


def isa_of_flags(flags) -> str:
    """The highest ISA_LEVELS entry a CPU with these /proc/cpuinfo flags runs. Underscores are
    dropped before comparing: Linux writes "avx512_vnni" and "amx_tile", the compilers'
    target names (csrc) "avx512vnni" and "amx-tile"."""
    have = {f.replace("_", "") for f in flags}
    if {"avx512f", "avx512bw", "avx512vnni", "amxtile", "amxint8", "amxbf16"} <= have:
        return "amx"
    if {"avx512f", "avx512bw", "avx512vnni"} <= have:
        return "avx512"
    return "avx2" if {"avx2", "fma"} <= have else "portable"


def host_isa() -> str:
    """The highest ISA_LEVELS entry this CPU runs (from /proc/cpuinfo; "portable" elsewhere)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return "portable"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "portable"
    return isa_of_flags(flags)


def requested_isa() -> str | None:
    """PYEDITOR_CPU_ISA, checked: an unknown name, or a level this CPU lacks, raises ValueError."""
    want = os.environ.get("PYEDITOR_CPU_ISA") or None
    if want is None:
        return None
    if want not in ISA_LEVELS:
        raise ValueError(f"PYEDITOR_CPU_ISA must be one of {', '.join(ISA_LEVELS)}, got {want!r}")
    host = host_isa()
    if ISA_LEVELS.index(want) > ISA_LEVELS.index(host):
        raise ValueError(f"PYEDITOR_CPU_ISA={want} asks for more than this CPU has (at most {host})")
    return want


def load() -> bool:
    """Import pyeditor._C (registers the C++ ops); False, with one warning, if it cannot be used."""
    global _loaded, _why_not
    if _loaded is not None:
        return _loaded
    requested_isa()  # a bad request is an error, not a reason to run without the kernels
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

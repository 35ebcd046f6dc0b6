"""Which implementation runs an op: Triton, C++ CUDA, C++ CPU, or the plain-PyTorch reference.

Order of precedence: the op's ``backend=`` argument, then the ``PYEDITOR_BACKEND`` environment
variable, then the default for the tensors' device:

=========  ======================================  ==========================================
device     default order                           also selectable
=========  ======================================  ==========================================
cuda       "cuda" (C++), "triton", "reference"     any of them
cpu        "cpu" (C++), "reference"                "triton" when TRITON_INTERPRET=1 (testing)
=========  ======================================  ==========================================
"""
from __future__ import annotations

import importlib.util
import os

import torch

from . import _ext

NAMES = ("cpu", "cuda", "triton", "reference")
ENV_VAR = "PYEDITOR_BACKEND"


_ENV_DATA, _ENV_KEY = getattr(os.environ, "_data", None), getattr(os.environ, "encodekey", None)


_ENCODED: dict = {}


def env(name: str) -> str | None:
    """os.environ.get(name), without its cost for an unset name (about 1 us: get() raises and
    catches a KeyError); per-call dispatch of small ops reads the environment every time."""
    if _ENV_DATA is not None and _ENV_KEY is not None:
        key = _ENCODED.get(name)
        if key is None:
            key = _ENCODED[name] = _ENV_KEY(name)
        if key not in _ENV_DATA:
            return None
    return os.environ.get(name)


def env_set(name: str) -> bool:
    """Whether the environment has ``name`` (set, possibly empty): env() without the lookup."""
    if _ENV_DATA is not None and _ENV_KEY is not None:
        key = _ENCODED.get(name)
        if key is None:
            key = _ENCODED[name] = _ENV_KEY(name)
        return key in _ENV_DATA
    return name in os.environ


_HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _HAS_TRITON


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run on ``device`` in this process, best first."""
    kind = torch.device(device).type
    names = []
    if kind == "cpu":
        if _ext.load():
            names.append("cpu")
        if triton_available() and triton_interpreted():
            names.append("triton")
    elif kind == "cuda":
        if _ext.load() and _ext.build_info().get("cuda") == "1":
            names.append("cuda")
        if triton_available():
            names.append("triton")
    names.append("reference")
    return names


def default(device: torch.device | str) -> str:
    """The backend used for ``device`` when neither the call nor the environment names one."""
    names = [n for n in available(device) if not (n == "triton" and torch.device(device).type == "cpu")]
    return names[0]


_resolved: dict = {}


def resolve(backend: str | None, device: torch.device) -> str:
    """The backend to run on ``device``: the argument, else $PYEDITOR_BACKEND, else the default."""
    key = (backend, device.type, env(ENV_VAR) if backend is None else None)
    name = _resolved.get(key)
    if name is None:
        name = _resolved[key] = _resolve(backend, device)  # raises for a bad choice, never cached
    return name


def _resolve(backend: str | None, device: torch.device) -> str:
    chosen = backend or os.environ.get(ENV_VAR) or None
    if chosen is None:
        return default(device)
    if chosen not in NAMES:
        raise ValueError(f"backend must be one of {NAMES}, got {chosen!r}")
    if chosen not in available(device):
        hint = " (set TRITON_INTERPRET=1 before importing triton)" if chosen == "triton" else ""
        raise RuntimeError(
            f"backend {chosen!r} cannot run on {device.type} tensors here{hint}; "
            f"available: {available(device)}"
        )
    return chosen

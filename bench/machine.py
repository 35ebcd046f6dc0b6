"""Describe the machine and software a run happened on (for the JSON)."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import torch

REPO = Path(__file__).resolve().parent.parent


def _read(path: str) -> Optional[str]:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def cpu_model() -> Optional[str]:
    text = _read("/proc/cpuinfo") or ""
    for line in text.splitlines():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or None


def caches() -> dict[str, str]:
    out = {}
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in sorted(base.glob("index*")):
        level, kind, size = (_read(str(idx / f)) for f in ("level", "type", "size"))
        if level and size and kind != "Instruction":
            out[f"L{level}{'d' if kind == 'Data' else ''}"] = size
    return out


def _size_bytes(size: str) -> int:
    text = size.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    digits = text.rstrip("KMGB") if mult > 1 else text
    return int(digits) * mult if digits.isdigit() else 0


def last_level_cache_bytes() -> int:
    """Size of the largest data/unified cache the OS reports for cpu0 (0 when unknown)."""
    return max((_size_bytes(size) for size in caches().values()), default=0)


def last_level_cache() -> Optional[str]:
    """The largest data/unified cache as "L3 32768K" (None when the OS reports none)."""
    sizes = caches()
    if not sizes:
        return None
    level = max(sizes, key=lambda k: _size_bytes(sizes[k]))
    return f"{level} {sizes[level]}"


def pyeditor_isa() -> Optional[str]:
    """The instruction-set level pyeditor's CPU kernels run at (PYEDITOR_CPU_ISA or the host's best)."""
    try:
        from pyeditor import _ext

        return _ext.requested_isa() or _ext.host_isa()
    except Exception:  # noqa: BLE001  (an old or broken pyeditor: the JSON just lacks the field)
        return None


def _git(*args: str) -> Optional[str]:
    # only a checkout's own commit: an installed copy (site-packages) may sit inside some other repository
    if not (REPO / ".git").exists():
        return None
    # read-only queries; GIT_OPTIONAL_LOCKS=0 keeps `git status` from touching the index
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")
    try:
        r = subprocess.run(["git", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info(device: str = "cpu") -> dict[str, Any]:
    status = _git("status", "--porcelain", "--untracked-files=no")
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "caches": caches(),
        "llc": last_level_cache(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "pyeditor_isa": pyeditor_isa(),
        "transparent_hugepage": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "pyeditor": _version("pyeditor"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "device": device,
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "THP_MEM_ALLOC_ENABLE",
                                           "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES",
                                           "PYEDITOR_CPU_ISA") if k in os.environ},
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info

"""Case definitions shared by the CLI runner and the pytest-benchmark tests.

A kernel family adds rows by adding one module ``bench/cases_<family>.py`` that
defines ``CASES: list[Case]``; :func:`discover` imports every such module.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch

from bench.roles import OURS, impl_role  # noqa: F401  (OURS is re-exported to the cases)

# An impl is a zero-argument callable returning its result tensor, or a string
# saying why it is unavailable (recorded in the row instead of a time).
Impl = Union[Callable[[], Any], str]


@dataclass(frozen=True)
class Context:
    """Where and how to run: the device and the pyeditor backend used for "ours"."""

    device: str = "cpu"
    backend: Optional[str] = None  # None: pyeditor's own dispatch

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


@dataclass
class Prepared:
    """A case's inputs turned into runnable impls (built by ``Case.make``)."""

    fns: dict[str, Impl]
    bytes_moved: Optional[int] = None  # bytes that must move; the roofline's numerator
    flops: Optional[int] = None  # floating-point operations the op must do (a multiply-add is 2)
    reference: Optional[Callable[[], torch.Tensor]] = None  # oracle output for max|err|
    tol: Optional[float] = None  # max|err| above this is flagged
    notes: list[str] = field(default_factory=list)
    # derive({impl: Timing.as_dict()}) -> extra metrics for the row
    derive: Optional[Callable[[dict[str, dict[str, Any]]], dict[str, Any]]] = None
    # overrides of the runner's timing arguments for this case (e.g. fewer reps for a slow peer)
    timing: dict[str, Any] = field(default_factory=dict)
    # impl -> fn(output) -> the tensor compared with the reference; applied outside the timed
    # call, so each impl is timed on its own library call and output type only
    convert: dict[str, Callable[[Any], torch.Tensor]] = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    name: str  # unique id, "family/path/shape/dtype"; what --filter and JSON use
    label: str  # human-readable, printed in progress and tables
    family: str
    impls: tuple[str, ...]  # "ours" first (if any), then peers; fixed names
    make: Callable[[Context], Prepared]
    full: bool = False  # only in --full runs
    params: dict[str, Any] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)  # impl -> role, where impl_role's rule is wrong

    def role(self, impl: str) -> str:
        return self.roles.get(impl) or impl_role(impl)

    @property
    def peers(self) -> tuple[str, ...]:
        """Impls from other libraries or plain torch: what "speedup vs peers" compares with."""
        return tuple(i for i in self.impls if self.role(i) == "peer")

    @property
    def variants(self) -> tuple[str, ...]:
        """pyeditor's other paths and modes of the same op (e.g. ours-fast)."""
        return tuple(i for i in self.impls if self.role(i) == "own")


def discover_modules(package: str = "bench") -> dict[str, list[Case]]:
    """Each ``<package>/cases_<short>.py`` module's cases, keyed by ``short``, in module-name order."""
    pkg = importlib.import_module(package)
    out: dict[str, list[Case]] = {}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("cases_"):
            out[info.name[len("cases_"):]] = list(importlib.import_module(f"{package}.{info.name}").CASES)
    return out


def discover(package: str = "bench") -> list[Case]:
    """All cases from every ``<package>/cases_*.py`` module, in module-name order."""
    cases = [c for module in discover_modules(package).values() for c in module]
    names = [c.name for c in cases]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate benchmark case names: {dupes}")
    return cases


def select(cases: list[Case], *, full: bool = False, filters: Optional[list[str]] = None) -> list[Case]:
    """Default cases (plus full-only ones with ``full``), matching any filter substring."""
    out = [c for c in cases if full or not c.full]
    if filters:
        fs = [f.lower() for f in filters]
        out = [c for c in out if any(f in c.name.lower() or f in c.label.lower() for f in fs)]
    return out


def default_backend(device: str) -> Optional[str]:
    """The backend to benchmark as "ours" on ``device``: pyeditor's default for it.

    That is its best native backend (never "triton" on CPU, where it would be the
    numpy interpreter). None when pyeditor cannot say; its dispatch then picks.
    """
    try:
        from pyeditor import backends

        return backends.default(device)
    except Exception:
        return None

"""The judge of the bad-input matrix and its subprocess entry point:

    PYTHONPATH=tests python -m bad_input.run BACKEND [SKIP [EXAMPLES [FAMILY,...]]]

BACKEND is "cpu" (the C++ ops) or "triton" (set TRITON_INTERPRET=1 in the environment). The cases
of the first SKIP (op, kind, example) triples are drawn but not run (resuming after a crash). One
JSON line per case: {"start": name} before it runs, {"case": name, "ok": ..., "detail": ...}
after, so a case that kills the process is the last one started.

Each (op, kind) is a hypothesis property over shapes, dtypes and values (derandomized, no
database, no shrinking: the run is the same on every host). The property: the call raises
ValueError / TypeError / IndexError / RuntimeError whose message names the offending argument,
or returns the reference's result within pyeditor.testing's tolerances. Cases marked valid
(strided and stride-0 views, NaN / inf data, out-of-range thresholds with a defined meaning)
must return it.
"""
from __future__ import annotations

import inspect
import json
import math
import re
import sys
import warnings
from typing import Optional

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from pyeditor.testing import check_close

from .core import Case, Draw
from .edit import apply_edit_cases, edited_linear_cases
from .hyper import (assign_prototypes_cases, edit_norms_cases, generate_edit_cases, hyper_matmul_cases,
                    hyper_matmul_heads_cases)
from .ops import direct_op_cases
from .quant import dequantize_cases, packed_linear_cases, quantize_cases, strategy_cases
from .search import kmeans_cases, nearest_prototype_cases

ACCEPTED = (ValueError, TypeError, IndexError, RuntimeError)
EXAMPLES = {"cpu": 8, "triton": 3}  # hypothesis examples per (op, kind): the interpreter is slow


# family -> ops; strategy codes are plain torch (no backend), run once (with the CPU backend)
FAMILIES = {
    "edit": [("apply_edit", apply_edit_cases), ("edited_linear", edited_linear_cases)],
    "hyper": [("hyper_matmul", hyper_matmul_cases), ("hyper_matmul_heads", hyper_matmul_heads_cases),
              ("generate_edit", generate_edit_cases), ("edit_norms", edit_norms_cases),
              ("assign_prototypes", assign_prototypes_cases)],
    "search": [("nearest_prototype", nearest_prototype_cases), ("kmeans", kmeans_cases)],
    "quant": [("quantize_channelwise", quantize_cases), ("dequantize", dequantize_cases),
              ("packed_linear", packed_linear_cases)],
    "strategy": [("strategy", strategy_cases)],
    "ops": [("direct_op", direct_op_cases)],
}


def families(backend: str) -> list:
    return [f for f in FAMILIES if not (f == "strategy" and backend != "cpu")]


# ------------------------------------------------------------------ judging
def _compare(got, want, tol) -> None:
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            raise AssertionError(f"returned {type(got).__name__}, the reference a tensor")
        if want.is_floating_point():
            check_close(got, want, tol=tol)
        elif not (got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)):
            raise AssertionError(f"{got.dtype} {tuple(got.shape)} {got.flatten()[:8].tolist()} != reference "
                                 f"{want.dtype} {tuple(want.shape)} {want.flatten()[:8].tolist()}")
    elif isinstance(want, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(want):
            raise AssertionError(f"returned {type(got).__name__} of {len(got)}, the reference {len(want)} items")
        for g, w in zip(got, want):
            _compare(g, w, tol)
    elif isinstance(want, float):
        if not (math.isclose(got, want, rel_tol=(tol or (0, 1e-5))[1] + 1e-6, abs_tol=1e-9)
                or (math.isnan(got) and math.isnan(want))):
            raise AssertionError(f"{got!r} != reference {want!r}")
    elif got != want:
        raise AssertionError(f"{got!r} != reference {want!r}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


def judge(case: Case) -> tuple[bool, str]:
    try:
        got = case.call()
    except ACCEPTED as exc:
        if case.valid:
            return False, f"refused valid input: {_first_line(exc)}"
        if not re.search(case.names, str(exc)):
            return False, f"error does not name /{case.names}/: {_first_line(exc)}"
        return True, f"raised {_first_line(exc)}"
    except Exception as exc:  # noqa: BLE001  (the property: only the four clear error types)
        return False, f"raised {_first_line(exc)} (not ValueError/TypeError/IndexError/RuntimeError)"
    if case.ref is None:
        return False, "returned a result for input without one (expected an error naming " f"/{case.names}/)"
    try:
        want = case.ref()
    except Exception as exc:  # noqa: BLE001
        return False, f"returned a result where the reference raises {_first_line(exc)}"
    try:
        _compare(got, want, case.tol)
    except AssertionError as exc:
        return False, f"returned a result that differs from the reference: {str(exc)[:400]}"
    return True, "matches the reference"


def _is_kind(name: str, obj) -> bool:
    """The case builders of an op: its public functions of one Draw (the rest are helpers)."""
    return not name.startswith("_") and callable(obj) and list(inspect.signature(obj).parameters) == ["d"]


def _emit(**record) -> None:
    print(json.dumps(record), flush=True)


def run(backend: str, skip: int, examples: int, only: Optional[list] = None) -> None:
    warnings.simplefilter("ignore")  # the interpreter's numpy overflow warnings, op fallbacks
    state = {"count": 0, "skip": skip, "examples": examples}
    for family in families(backend):
        if only and family not in only:
            continue
        for op, builder in FAMILIES[family]:
            for kind, make in builder(backend).items():
                if _is_kind(kind, make):
                    _property(make, f"{family}/{op}/{kind}", state)()
    _emit(done=state["count"])


def _property(make, label: str, state: dict):
    """The hypothesis test of one (op, kind): each example is one judged case."""
    example = [0]

    def prop(data):
        case = make(Draw(data.draw))  # drawn even when skipped: the sequence stays the same
        state["count"] += 1
        name, index = f"{label}#{example[0]}", state["count"]
        example[0] += 1
        if index <= state["skip"]:
            return
        _emit(start=name, index=index)
        ok, detail = judge(case)
        _emit(case=name, index=index, ok=ok, detail=detail)

    prop.__name__ = prop.__qualname__ = label.replace("/", "_")  # derandomize seeds from the name
    return settings(max_examples=state["examples"], derandomize=True, database=None, deadline=None,
                    phases=[Phase.generate], suppress_health_check=list(HealthCheck))(given(st.data())(prop))


if __name__ == "__main__":
    backend = sys.argv[1]
    run(backend, int(sys.argv[2]) if len(sys.argv) > 2 else 0,
        int(sys.argv[3]) if len(sys.argv) > 3 else EXAMPLES[backend],
        sys.argv[4].split(",") if len(sys.argv) > 4 else None)

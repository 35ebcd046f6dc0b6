"""Results files: where a run writes them, their names, and reading them back (no torch import).

Each run writes ``<results dir>/<host>-<UTC date>-<commit>.json`` (never overwriting another run)
and copies it to ``latest.json`` beside it. The results dir is ``bench/results`` of the checkout
the bench package lives in, or ``./bench-results`` when the package is installed elsewhere;
``PYEDITOR_BENCH_RESULTS`` overrides both.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from pathlib import Path
from typing import Any, Optional

SCHEMA = 2
READABLE = (1, 2)  # schema 1: the files written before results were timestamped (no "command")
LATEST = "latest.json"
_PKG = Path(__file__).resolve().parent


class ResultsError(ValueError):
    """A results file that cannot be read as the bench's output."""


def results_dir() -> Path:
    env = os.environ.get("PYEDITOR_BENCH_RESULTS")
    if env:
        return Path(env)
    if (_PKG.parent / ".git").exists():  # a checkout: results stay beside the suite
        return _PKG / "results"
    return Path.cwd() / "bench-results"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-") or "unknown"


def result_name(machine: dict[str, Any]) -> str:
    """``<host>-<YYYYmmddTHHMMSSZ>-<commit12>[-dirty].json`` from the machine description."""
    date = re.sub(r"[^0-9T]", "", (machine.get("date") or "")[:19]) or "nodate"
    commit = (machine.get("git_commit") or "nogit")[:12] + ("-dirty" if machine.get("git_dirty") else "")
    return f"{_slug(machine.get('hostname') or 'host')}-{date}Z-{commit}.json"


def command_line(args: list[str]) -> str:
    """How to repeat the run, whatever path argv[0] had."""
    return shlex.join(["python", "-m", "bench", *args])


def _write(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    tmp.replace(path)


def document(machine: dict[str, Any], rows: list[dict[str, Any]], args: list[str]) -> dict[str, Any]:
    return {"schema": SCHEMA, "command": command_line(args), "argv": list(args), "machine": machine, "rows": rows}


def write_run(doc: dict[str, Any], out: Optional[Path] = None, directory: Optional[Path] = None) -> list[Path]:
    """Write a run's document: to ``out`` if given, else timestamped into the results dir plus a
    copy at latest.json. Returns the paths written, the run's own file first."""
    if out is not None:
        _write(out, doc)
        return [out]
    directory = directory or results_dir()
    stem = result_name(doc["machine"])[:-len(".json")]
    path, n = directory / f"{stem}.json", 2
    while path.exists():  # two runs in one second on one commit: keep both
        path, n = directory / f"{stem}-{n}.json", n + 1
    _write(path, doc)
    latest = directory / LATEST
    tmp = latest.with_name(LATEST + ".tmp")
    shutil.copyfile(path, tmp)
    tmp.replace(latest)
    return [path, latest]


def load(path: Path) -> dict[str, Any]:
    """A results document, checked enough that the report and compare can rely on its layout."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultsError(f"{path}: no such results file (run `python -m bench` first)") from None
    except (OSError, ValueError) as e:
        raise ResultsError(f"{path}: not a readable JSON results file ({e})") from None
    if not isinstance(doc, dict) or "rows" not in doc or "machine" not in doc:
        raise ResultsError(f"{path}: not a bench results file (no 'machine' and 'rows')")
    schema = doc.get("schema")
    if schema not in READABLE:
        raise ResultsError(f"{path}: results schema {schema!r}; this version reads schema "
                           f"{', '.join(map(str, READABLE))}: rerun `python -m bench` to write a current file")
    if not isinstance(doc["rows"], list) or not all(isinstance(r, dict) and "name" in r for r in doc["rows"]):
        raise ResultsError(f"{path}: 'rows' must be a list of result rows, each with a 'name'")
    if schema == 1:  # no command recorded: rebuild it from argv (argv[0] was the script's path)
        argv = list(doc.get("argv") or [])
        if argv and argv[0].endswith(("__main__.py", "bench")):
            argv = argv[1:]
        doc["command"] = command_line(argv)
    doc["path"] = str(path)
    return doc


def _cache_bytes(text: str) -> int:
    t = str(text).strip().upper().rstrip("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    digits = t[:-1] if mult > 1 else t
    return int(digits) * mult if digits.isdigit() else 0


def llc(machine: dict[str, Any]) -> str:
    """The last-level cache as the machine description gives it ("L3 32768K")."""
    if machine.get("llc"):
        return machine["llc"]
    caches = machine.get("caches") or {}
    if not caches:
        return "?"
    level = max(caches, key=lambda k: _cache_bytes(caches[k]))
    return f"{level} {caches[level]}"


def isa(machine: dict[str, Any]) -> str:
    """pyeditor's CPU kernel level (schema 2) and torch's CPU capability."""
    ours, torch_cap = machine.get("pyeditor_isa"), machine.get("cpu_capability")
    return f"{ours} (torch {torch_cap})" if ours else str(torch_cap or "?")


def host_key(machine: dict[str, Any]) -> tuple[str, str, str, str]:
    """What makes two runs comparable: CPU model, ISA level, usable cores, last-level cache."""
    return (str(machine.get("cpu_model") or "unknown CPU"), isa(machine), str(machine.get("cores_usable") or "?"),
            llc(machine))


def host_title(machine: dict[str, Any]) -> str:
    cpu, level, cores, cache = host_key(machine)
    return f"{cpu}, {level}, {cores} cores, {cache}"

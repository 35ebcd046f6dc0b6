"""Package-level behaviour: works without the compiled extension, verify CLI, public names."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

import pyeditor

ROOT = Path(__file__).resolve().parents[1]


def test_public_api_matches_reference_signatures():
    import inspect

    for name in ["apply_edit"]:
        ours = inspect.signature(getattr(pyeditor, name)).parameters
        theirs = inspect.signature(getattr(pyeditor.reference, name)).parameters
        assert list(theirs) == list(ours)[: len(theirs)], name


def test_works_without_extension(tmp_path):
    """A copy of the package without _C*.so: imports, warns once, runs on the reference backend."""
    skip = shutil.ignore_patterns("_C*", "__pycache__")
    shutil.copytree(ROOT / "pyeditor", tmp_path / "pyeditor", ignore=skip)
    shutil.copytree(ROOT / "kernels", tmp_path / "pyeditor" / "kernels", ignore=skip)  # the wheel's layout
    code = (
        "import sys\n"  # the editable install would otherwise find the real _C for the copy
        "sys.meta_path[:] = [f for f in sys.meta_path if 'Editable' not in getattr(f, '__name__', '')]\n"
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import pyeditor\n"
        "    k = pyeditor.apply_edit(torch.ones(2, 3), torch.full((2, 3), 5.0), 0.5)\n"
        "    k = pyeditor.apply_edit(torch.ones(2, 3), torch.full((2, 3), 5.0), 0.5)\n"
        "assert pyeditor.backends.available('cpu')[0] == 'reference', pyeditor.backends.available('cpu')\n"
        "assert torch.equal(k, torch.full((2, 3), 1.5))\n"
        "msgs = [str(x.message) for x in w if 'compiled kernels unavailable' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr


def test_verify_cli_smoke(tmp_path):
    """`python -m pyeditor verify` end to end at small size: one op, one dtype, every backend (the
    per-op tests cover the ops, tests/test_cli.py the options and the restart into the interpreter)."""
    out = tmp_path / "verify.json"
    run = subprocess.run([sys.executable, "-m", "pyeditor", "verify", "--small", "--op", "apply_edit",
                          "--dtype", "f32", "--json", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "apply_edit on cpu" in run.stdout and " 0 failed" in run.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {r["op"] for r in rows} == {"apply_edit"} and all(r["pass"] for r in rows)
    backends_seen = {r["backend"] for r in rows}
    assert "cpu" in backends_seen
    if not torch.cuda.is_available():
        assert "triton" in backends_seen  # the interpreter run counts


def test_docs_name_files_that_exist():
    """Every repository path the README, ARCHITECTURE and CONTRIBUTING pages name in backticks or
    link to exists, so the checklist and the layout follow the code when files move."""
    import re

    missing = []
    for page in ("README.md", "ARCHITECTURE.md", "CONTRIBUTING.md"):
        text = re.sub(r"```.*?```", "", (ROOT / page).read_text(), flags=re.S)  # commands, not paths
        names = re.findall(r"`([^`\s]+)`", text) + re.findall(r"\]\(([^)#]+)\)", text)
        for name in names:
            if "/" not in name or "://" in name or name.startswith(("/", "./")) or any(c in name for c in "<*=") \
                    or "..." in name or name.startswith("build/"):
                continue  # not a path, a URL, a path outside the checkout, a pattern, a setting or a build output
            if not (ROOT / name.split(":")[0]).exists():
                missing.append(f"{page}: {name}")
    assert not missing, missing
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")

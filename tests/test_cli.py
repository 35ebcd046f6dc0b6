"""The command lines: `python -m pyeditor` (help, verify options, JSON rows, exit codes, info
without a restart) and scripts/gpu_check.py (arguments, the no-GPU stop, the step runner)."""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyeditor import __main__ as cli
from pyeditor import verify

ROOT = Path(__file__).resolve().parents[1]
GPU_CHECK = ROOT / "scripts" / "gpu_check.py"
NEW_OPS = {"kmeans", "assign_prototypes", "generate_edit"}


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as done:
        cli._main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for name, summary in cli.COMMANDS.items():
        assert name in out and summary in out, (name, out)
    assert cli._main([]) == 2  # no command: the help, on stderr, and a usage error
    assert "verify" in capsys.readouterr().err


def test_verify_help_lists_its_options(capsys):
    with pytest.raises(SystemExit) as done:
        cli._main(["verify", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for option in ("--backend", "--device", "--op", "--dtype", "--small", "--json"):
        assert option in out
    for name in verify.op_names():
        assert name in out  # --op's help names every valid op
    assert NEW_OPS <= set(verify.op_names())


BAD_NAMES = [(["--op", "kmeans,nope"], "nope"), (["--op", "kmeans", "--op", "KMeans"], "KMeans"),
             (["--dtype", "f8"], "f8"), (["--backend", "reference"], "reference")]


@pytest.mark.parametrize("argv,wrong", BAD_NAMES)
def test_verify_refuses_unknown_names(capsys, argv, wrong):
    with pytest.raises(SystemExit) as done:
        cli._main(["verify", *argv])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert wrong in err and ("valid" in err or "choose from" in err), err
    if "--op" in argv:
        assert all(name in err for name in verify.op_names())


def test_verify_json_path_checked_before_running(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(verify, "run_all", lambda *a, **k: pytest.fail("ran checks with an unwritable --json"))
    assert cli._main(["verify", "--backend", "cpu", "--json", str(tmp_path / "missing" / "rows.json")]) == 2
    assert "cannot write --json" in capsys.readouterr().err


def _rows(path):
    doc = json.loads(Path(path).read_text())
    assert doc["complete"] is True and doc["failed"] == sum(not r["pass"] for r in doc["rows"])
    for row in doc["rows"]:
        assert {"op", "backend", "dtype", "shape", "errors", "tolerances", "rule", "pass"} <= set(row)
        assert {"max_abs", "max_rel"} <= set(row["errors"]) and {"atol", "rtol"} <= set(row["tolerances"])
    return doc["rows"]


def test_verify_new_ops_json_and_progress(tmp_path, capsys):
    path = tmp_path / "rows.json"
    rc = cli._main(["verify", "--small", "--backend", "cpu", "--op", "kmeans,assign_prototypes", "--op",
                    "generate_edit", "--dtype", "f32", "--json", str(path)])
    captured = capsys.readouterr()
    assert rc == 0, captured.out[-3000:]
    rows = _rows(path)
    assert {r["op"] for r in rows} == NEW_OPS and all(r["pass"] for r in rows)
    assert {r["backend"] for r in rows} == {"cpu"} and {r["dtype"] for r in rows} == {"f32"}
    # indices must match exactly where the op returns them
    assert all("labels" in r["exact"] for r in rows if r["op"] == "kmeans")
    assert all("chosen" in r["exact"] for r in rows if r["op"] == "assign_prototypes")
    progress = [line for line in captured.err.splitlines() if line.startswith("verify ")]
    assert len(progress) == len(NEW_OPS) and all("passed" in line for line in progress)
    table = captured.out.split("\n\n")[0].splitlines()
    assert max(len(line) for line in table) <= verify.TABLE_WIDTH
    assert any("abs<=" in line and "|ref|" in line for line in table)  # the rule beside the errors


@pytest.mark.triton
def test_verify_new_ops_on_triton(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("the GPU run of verify is `make gpu-check`'s")
    path = tmp_path / "rows.json"
    rc = cli._main(["verify", "--backend", "triton", "--op", "kmeans,assign_prototypes,generate_edit",
                    "--dtype", "f32", "--json", str(path)])
    assert rc == 0, capsys.readouterr().out[-3000:]
    rows = _rows(path)
    assert {r["op"] for r in rows} == NEW_OPS and {r["backend"] for r in rows} == {"triton"}


def test_verify_failure_exits_nonzero(tmp_path, capsys, monkeypatch):
    def wrong(backend, device):
        return torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5]), {"labels": False}

    def broken(backend, device):
        raise RuntimeError("kernel exploded")

    def checks(small):
        yield verify.Check("fake_op", "x[2]", torch.float32, wrong)
        yield verify.Check("fake_op (grad)", "x[2]", torch.float32, broken)

    monkeypatch.setattr(verify, "CHECKS", [checks])
    path = tmp_path / "rows.json"
    assert cli._main(["verify", "--backend", "cpu", "--json", str(path)]) == 1
    out = capsys.readouterr().out
    assert "labels differ" in out and "RuntimeError: kernel exploded" in out and "0 passed, 2 failed" in out
    rows = _rows(path)
    assert [r["pass"] for r in rows] == [False, False]
    assert rows[0]["errors"]["max_abs"] == 0.5 and rows[1]["errors"]["max_abs"] is None  # strict JSON, no NaN


class Restarted(Exception):
    pass


def _no_restart(*args):
    raise AssertionError(f"restarted the interpreter: {args}")


def test_info_runs_without_a_restart(capsys, monkeypatch):
    monkeypatch.setattr(os, "execve", _no_restart)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # as a user's shell has it
    assert cli._main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("pyeditor ") and "backends on cpu:" in out and "extension:" in out
    if not torch.cuda.is_available():  # Triton cannot take CPU tensors without the interpreter: said so
        assert "TRITON_INTERPRET=1" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, Triton is verified compiled: no restart")
def test_verify_restarts_into_the_interpreter_only_for_triton(tmp_path, capsys, monkeypatch):
    def restart(path, argv, env):
        raise Restarted(path, argv, env)

    monkeypatch.setattr(os, "execve", restart)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(Restarted) as done:
        cli._main(["verify", "--op", "kmeans"])
    path, argv, env = done.value.args
    assert path == sys.executable and argv[1:] == ["-m", "pyeditor", "verify", "--op", "kmeans"]
    assert env["TRITON_INTERPRET"] == "1"
    monkeypatch.setattr(os, "execve", _no_restart)
    for only_cpu in (["--backend", "cpu"], ["--device", "cpu", "--backend", "cpu"]):
        assert cli._main(["verify", "--small", "--op", "generate_edit", "--dtype", "f32", *only_cpu]) == 0
    capsys.readouterr()


# ------------------------------------------------------------------ scripts/gpu_check.py
def _gpu_check(*args, env=None):
    return subprocess.run([sys.executable, str(GPU_CHECK), *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=60)


def test_gpu_check_arguments(tmp_path):
    run = _gpu_check("--help")
    assert run.returncode == 0 and "--budget-s" in run.stdout and "--preflight" in run.stdout
    for bad in (["--budget-s", "0"], ["--budget-s", "nan"], ["--skip", "everything"], ["--what"]):
        assert _gpu_check(*bad).returncode == 2
    run = _gpu_check("--dry-run", "--skip", "build", "--bench-filter", "search/l2", "--results-dir", str(tmp_path))
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert [line.split()[0] for line in lines[:-1]] == ["info", "tests", "verify", "bench"]
    assert "-m 'cuda or triton'" in run.stdout and "(no TRITON_INTERPRET)" in lines[1]
    assert "--device cuda" in lines[2] and "--filter search/l2" in lines[3] and str(tmp_path) in lines[-1]
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


def _no_gpu_env(tmp_path):
    """PATH without nvidia-smi (only what the script may call besides it)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("git", "timeout"):
        real = next((Path(d) / tool for d in os.environ["PATH"].split(os.pathsep) if (Path(d) / tool).exists()), None)
        if real:
            (bin_dir / tool).symlink_to(real)
    return {**os.environ, "PATH": str(bin_dir)}


@pytest.mark.skipif(Path("/proc/driver/nvidia/gpus").is_dir(), reason="this machine has an NVIDIA driver")
def test_gpu_check_stops_at_once_without_a_gpu(tmp_path):
    env = _no_gpu_env(tmp_path)
    for args in ([], ["--preflight"]):
        run = _gpu_check("--results-dir", str(tmp_path / "results"), *args, env=env)
        assert run.returncode == 2 and "no CUDA GPU" in run.stderr and "nothing was built or run" in run.stderr
    assert not (tmp_path / "results").exists()


def _fake(path, body):
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.skipif(Path("/proc/driver/nvidia/gpus").is_dir(), reason="this machine has an NVIDIA driver")
@pytest.mark.parametrize("failing", [None, "-m pytest"])
def test_gpu_check_runs_every_step_and_logs(tmp_path, failing):
    """The step runner with stand-ins for nvidia-smi, nvcc and a CUDA-enabled interpreter."""
    env = _no_gpu_env(tmp_path)
    bin_dir = Path(env["PATH"])
    _fake(bin_dir / "nvidia-smi", 'echo "GPU 0: Stand-in GPU (UUID: GPU-0)"\n')
    _fake(bin_dir / "nvcc", 'echo "Cuda compilation tools, release 12.8"\n')
    probe = ('{"torch": "2.13.0+cu128", "cuda": "12.8", "available": true, "device": "Stand-in GPU", '
             '"capability": [9, 0]}')
    _fake(bin_dir / "python", f"""case "$*" in
  *get_device_name*) echo '{probe}' ;;
  *"{failing or 'never-matches'}"*) echo "step failed: $*"; exit 1 ;;
  *) echo "ran: $* TRITON_INTERPRET=${{TRITON_INTERPRET-unset}} USE_CUDA=${{USE_CUDA-unset}}" ;;
esac
""")
    env["TRITON_INTERPRET"] = "1"
    results = tmp_path / "results"
    run = _gpu_check("--python", str(bin_dir / "python"), "--results-dir", str(results), "--budget-s", "200", env=env)
    assert run.returncode == (1 if failing else 0), run.stdout + run.stderr
    logs = list(results.glob("gpu-check-*.log"))
    assert len(logs) == 1
    log = logs[0].read_text()
    assert "Stand-in GPU" in log and "release 12.8" in log and "=== summary" in log
    assert "ran: -m pip install" in log and "USE_CUDA=1" in log
    for step in ("verify", "bench"):
        assert f"ran: -m {'pyeditor verify' if step == 'verify' else 'bench'}" in log
    assert "TRITON_INTERPRET=1" not in log  # every step runs Triton compiled (the caller's setting dropped)
    summary = log.split("=== summary")[1]
    assert ("tests   FAILED" in summary) == bool(failing) and "build   ok" in summary

"""The framework-free C++ tests (ctest) and the nvcc compile check of every csrc/cuda/*.cu.

Both reuse build/cmake: cmake rebuilds only what changed, and the compile check compiles a .cu
again only when its command, nvcc, or a file the last compile read (nvcc's dependency list) is
newer than the object. The compile checks are `slow` (make test-slow, which .ci/run runs): on a
fresh clone one .cu takes over a minute of the fast tier's four on a 2-core host."""
import fcntl
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "cmake"
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc") or (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc").exists()

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")


@functools.cache
def _ctest_tests() -> dict:
    """Configures and builds build/cmake (serialised: pytest-xdist workers share it); ctest's
    tests by name, each with its command."""
    BUILD.mkdir(parents=True, exist_ok=True)
    with open(BUILD / ".pytest-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        configure = ["cmake", "-S", str(ROOT), "-B", str(BUILD), f"-DPython_EXECUTABLE={sys.executable}"]
        for cmd in (configure, ["cmake", "--build", str(BUILD), "-j", str(os.cpu_count() or 1)]):
            run = subprocess.run(cmd, capture_output=True, text=True)
            assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    run = subprocess.run(["ctest", "--test-dir", str(BUILD), "--show-only=json-v1"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    return {t["name"]: t for t in json.loads(run.stdout)["tests"]}


def test_ctest():
    tests = _ctest_tests()
    assert {"edit_math", "cpu_spans", "pack"} <= set(tests)
    run = subprocess.run(["ctest", "--test-dir", str(BUILD), "--output-on-failure", "-E", "^nvcc_compile_"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "edit_math" in run.stdout and "cpu_spans" in run.stdout and "pack" in run.stdout


def _dependencies(depfile: Path) -> list:
    """The files a make-style dependency file lists (escaped spaces kept in their names)."""
    text = depfile.read_text().replace("\\\n", " ")
    _, _, deps = text.partition(": ")
    return [d.replace("\\ ", " ") for d in re.split(r"(?<!\\)\s+", deps.strip()) if d]


def _up_to_date(command: list, obj: Path, depfile: Path, stamp: Path) -> bool:
    if not (obj.exists() and depfile.exists() and stamp.exists()) or json.loads(stamp.read_text()) != command:
        return False
    built = obj.stat().st_mtime
    deps = [*_dependencies(depfile), command[0]]
    return all(os.path.exists(d) and os.stat(d).st_mtime <= built for d in deps)


@pytest.mark.slow
@pytest.mark.parametrize("cu", [pytest.param(cu, id=cu.stem) for cu in CUDA_SOURCES])
def test_nvcc_compile_check(cu):
    if not NVCC:
        pytest.skip("nvcc not found: the CUDA sources were not compiled")
    tests = _ctest_tests()
    name = f"nvcc_compile_{cu.stem}"
    assert name in tests, f"{cu.name} has no nvcc compile check in CMakeLists.txt"
    command = tests[name]["command"]
    obj = Path(command[command.index("-o") + 1])
    depfile, stamp = obj.with_suffix(".d"), obj.with_suffix(".command.json")
    if _up_to_date(command, obj, depfile, stamp):
        print(f"{cu.name}: unchanged since its last compile check")
        return
    stamp.unlink(missing_ok=True)
    run = subprocess.run([*command, "-MD", "-MF", str(depfile)], cwd=BUILD, capture_output=True, text=True)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert obj.exists()
    stamp.write_text(json.dumps(command))

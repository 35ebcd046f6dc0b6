"""The framework-free C++ tests (ctest) and the nvcc compile check of every csrc/cuda/*.cu."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "cmake"


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_ctest_and_cuda_compile_check():
    configure = ["cmake", "-S", str(ROOT), "-B", str(BUILD), f"-DPython_EXECUTABLE={sys.executable}"]
    subprocess.run(configure, check=True, capture_output=True, text=True)
    subprocess.run(["cmake", "--build", str(BUILD), "-j", str(os.cpu_count() or 1)], check=True,
                   capture_output=True, text=True)
    run = subprocess.run(["ctest", "--test-dir", str(BUILD), "--output-on-failure"], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "edit_math" in run.stdout and "cpu_spans" in run.stdout and "pack" in run.stdout
    nvcc = shutil.which("nvcc") or (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc").exists()
    if nvcc:
        for cu in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
            assert f"nvcc_compile_{cu.stem}" in run.stdout, f"{cu.name} was not compiled by nvcc"
    else:
        pytest.skip("nvcc not found: the CUDA sources were not compiled")

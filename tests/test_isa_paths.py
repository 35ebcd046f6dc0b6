"""Every CPU kernel path this host can run, not only its best: the packed-weight, edit and hyper
op tests again in a subprocess under each lower PYEDITOR_CPU_ISA cap (the default run above
takes the host's own level). Each run says which paths it took (build_info)."""
import os
import subprocess
import sys

import pytest
import torch

from pyeditor import _ext

HERE = os.path.dirname(os.path.abspath(__file__))
LEVELS = _ext.ISA_LEVELS
HOST = _ext.host_isa()
# what build_info reports under each cap (quant kernels, tile GEMM)
EXPECT = {"portable": ("scalar", "portable"), "avx2": ("avx2", "avx2"), "avx512": ("avx512-vnni", "avx512"),
          "amx": ("avx512-vnni+amx", "avx512")}
TESTS = ["test_quant.py", "test_quant_group.py", "test_hyper.py", "test_apply_edit.py"]


def _run(code_or_args, level, timeout):
    env = {**os.environ, "PYEDITOR_CPU_ISA": level}
    return subprocess.run([sys.executable, *code_or_args], env=env, cwd=HERE, capture_output=True, text=True,
                          timeout=timeout)


def _info_cmd():
    return ["-c", "import torch, pyeditor, json; from pyeditor import _ext; print(json.dumps(_ext.build_info()))"]


@pytest.mark.parametrize("level", [lv for lv in LEVELS if LEVELS.index(lv) < LEVELS.index(HOST)])
def test_op_tests_under_lower_isa(level):
    info = _run(_info_cmd(), level, 120)
    assert info.returncode == 0, info.stderr[-3000:]
    import json
    got = json.loads(info.stdout.strip().splitlines()[-1])
    print(f"PYEDITOR_CPU_ISA={level}: quant_cpu={got['quant_cpu']} tile_gemm={got['tile_gemm']}")
    assert (got["quant_cpu"], got["tile_gemm"]) == EXPECT[level]
    run = _run(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "not triton and not cuda", *TESTS],
               level, 1500)
    tail = (run.stdout + run.stderr)[-4000:]
    assert run.returncode == 0, tail
    print(tail.strip().splitlines()[-1])


def test_host_level_is_the_default():
    """Without a cap the kernels take everything the CPU has."""
    if not _ext.load():
        pytest.skip("no compiled extension")
    got = _ext.build_info()
    if "PYEDITOR_CPU_ISA" not in os.environ:
        assert (got["quant_cpu"], got["tile_gemm"]) == EXPECT[HOST] or HOST == "amx" and \
            got["quant_cpu"] == "avx512-vnni"  # PYEDITOR_CPU_AMX=0 or no OS tile state
    print(f"host {HOST}: {got}")


@pytest.mark.parametrize("bad,match", [("avx7", "must be one of"), ("amx", "more than this CPU has")])
def test_bad_request_is_refused(bad, match):
    if bad == "amx" and HOST == "amx":
        pytest.skip("this CPU has AMX")
    run = _run(["-c", "import pyeditor"], bad, 120)
    assert run.returncode != 0 and "PYEDITOR_CPU_ISA" in run.stderr and match in run.stderr, run.stderr[-2000:]
    assert torch.__version__  # (torch itself imports fine under any value)

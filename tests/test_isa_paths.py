"""Every CPU kernel path this host can run, not only its best: the packed-weight, edit, hyper,
all-layer assignment and search op tests again in a subprocess under each lower PYEDITOR_CPU_ISA cap (the default run
above takes the host's own level). Each run says which paths it took (build_info)."""
import os
import subprocess
import sys

import pytest
import torch

import pyeditor
from pyeditor import _ext

HERE = os.path.dirname(os.path.abspath(__file__))
# the subprocesses import this pyeditor (a checkout's), not whichever one is installed
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(pyeditor.__file__)))
LEVELS = _ext.ISA_LEVELS
HOST = _ext.host_isa()
# the kernel families build_info names, and what each reports under each cap
FAMILIES = ("quant_cpu", "tile_gemm", "edit_cpu", "search_cpu", "fma_probe", "layer_norms_cpu")
EXPECT = {"portable": ("scalar", "portable", "portable", "portable", "portable", "portable"),
          "avx2": ("avx2", "avx2", "avx2", "avx2", "avx2", "avx2"),
          "avx512": ("avx512-vnni", "avx512", "avx512", "avx512", "avx512", "avx512"),
          "amx": ("avx512-vnni+amx", "avx512", "avx512", "avx512", "avx512", "avx512")}
TESTS = ["quant/test_quant.py", "quant/test_quant_group.py", "hyper/test_hyper.py", "edit/test_apply_edit.py",
         "search/test_search.py", "hyper/test_layer_norms_op.py", "hyper/test_assign_layers.py",
         "test_compute_probe.py"]


def _run(code_or_args, level, timeout):
    path = os.pathsep.join(p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYEDITOR_CPU_ISA": level, "PYTHONPATH": path}
    return subprocess.run([sys.executable, *code_or_args], env=env, cwd=HERE, capture_output=True, text=True,
                          timeout=timeout)


def _info_cmd():
    return ["-c", "import torch, pyeditor, json; from pyeditor import _ext; "
                  "print(json.dumps({**_ext.build_info(), 'file': pyeditor.__file__}))"]


def _paths(info):
    return tuple(info.get(f) for f in FAMILIES)


def _describe(info):
    return " ".join(f"{f}={info.get(f)}" for f in FAMILIES)


LOWER = [lv for lv in LEVELS if LEVELS.index(lv) < LEVELS.index(HOST)]
# The rerun is split between the tiers: make test reruns every test but opcheck, torch.compile,
# float64 gradcheck and the slow ones; make test-slow reruns those (together: every test). opcheck
# and torch.compile check registration and tracing, not the kernel path, and the three are most of
# the rerun's time; the fp32 gradient-vs-reference tests keep the backward kernels in the fast rerun.
NOT_KERNEL_PATH = "slow or opcheck or compile or gradcheck"
TIERS = [pytest.param(f"not ({NOT_KERNEL_PATH})", id="fast"),
         pytest.param(NOT_KERNEL_PATH, id="slow", marks=pytest.mark.slow)]


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("level", LOWER)
def test_op_tests_under_lower_isa(level, tier):
    info = _run(_info_cmd(), level, 120)
    assert info.returncode == 0, info.stderr[-3000:]
    import json
    got = json.loads(info.stdout.strip().splitlines()[-1])
    assert os.path.samefile(got["file"], pyeditor.__file__), got["file"]
    print(f"PYEDITOR_CPU_ISA={level}: {_describe(got)}")
    assert _paths(got) == EXPECT[level]
    run = _run(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", f"not triton and not cuda and ({tier})",
                *TESTS], level, 1500)
    tail = (run.stdout + run.stderr)[-4000:]
    assert run.returncode == 0, tail
    print(f"PYEDITOR_CPU_ISA={level}: {' '.join(TESTS)} ({tier}, not triton, not cuda): "
          f"{tail.strip().splitlines()[-1]}")


def test_host_level_is_the_default():
    """Without a cap the kernels take everything the CPU has."""
    if not _ext.load():
        pytest.skip("no compiled extension")
    got = _ext.build_info()
    if "PYEDITOR_CPU_ISA" not in os.environ:
        want = EXPECT[HOST]
        if HOST == "amx" and got["quant_cpu"] == "avx512-vnni":  # PYEDITOR_CPU_AMX=0 or no OS tile state
            want = EXPECT["avx512"]
        assert _paths(got) == want
    print(f"host {HOST}: {_describe(got)}")


@pytest.mark.parametrize("bad,match", [("avx7", "must be one of"), ("amx", "more than this CPU has")])
def test_bad_request_is_refused(bad, match):
    if bad == "amx" and HOST == "amx":
        pytest.skip("this CPU has AMX")
    run = _run(["-c", "import pyeditor"], bad, 120)
    assert run.returncode != 0 and "PYEDITOR_CPU_ISA" in run.stderr and match in run.stderr, run.stderr[-2000:]
    assert torch.__version__  # (torch itself imports fine under any value)


# /proc/cpuinfo flags as Linux writes them (underscores) on the hosts this project has run on
ZEN3 = "fpu sse2 avx fma avx2 bmi2 sha_ni".split()
AVX512_VNNI = ZEN3 + "avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni avx512_bitalg".split()
SPR = AVX512_VNNI + "avx512_bf16 amx_bf16 amx_tile amx_int8".split()


@pytest.mark.parametrize("flags,want", [(ZEN3, "avx2"), (AVX512_VNNI, "avx512"), (SPR, "amx"),
                                        ("fpu sse2 avx".split(), "portable"),
                                        ([f for f in AVX512_VNNI if f != "avx512_vnni"], "avx2"),
                                        ([f for f in SPR if f != "amx_int8"], "avx512")])
def test_isa_of_linux_flags(flags, want):
    """The host level from Linux's flag names: an AVX-512 VNNI host read as AVX2 would refuse
    PYEDITOR_CPU_ISA=avx512 and skip the AVX2 rerun."""
    assert _ext.isa_of_flags(flags) == want

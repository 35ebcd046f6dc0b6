"""Builds pyeditor._C: the CPU kernels always, the CUDA kernels when torch has CUDA and nvcc exists.

USE_CUDA=0/1 overrides the CUDA choice. Install with `pip install --no-build-isolation -e .`
(the build needs the torch that is already installed, not a fresh one in an isolated env).
"""
import glob
import os
import shutil

import torch
from setuptools import setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    flag = os.environ.get("USE_CUDA")
    if flag is not None:
        return flag == "1"
    return torch.version.cuda is not None and (
        shutil.which("nvcc") is not None or os.environ.get("CUDA_HOME") is not None
    )


def extension():
    cuda = want_cuda()
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    define = [("PYEDITOR_TORCH_VERSION", f'"{torch.__version__}"')]
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno"]
    args = {"cxx": cxx}
    cls = cpp_extension.CppExtension
    if cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define.append(("PYEDITOR_WITH_CUDA", None))
        args["nvcc"] = ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]
        cls = cpp_extension.CUDAExtension
    return cls(
        "pyeditor._C",
        sources,
        include_dirs=[os.path.join(HERE, "csrc", "include")],
        define_macros=define,
        extra_compile_args=args,
        extra_link_args=["-fopenmp"],
    )


setup(
    name="pyeditor",
    version="0.1.0",
    description="Custom kernels for Persona parameter editing and CHORD mixed-precision layers",
    license="MIT",
    # bench: the benchmark suite, so that `python -m bench` runs from any directory once installed;
    # its text data ships with it, its results never do (they go to ./bench-results outside a checkout)
    packages=["pyeditor", "pyeditor.kernels", "bench"],
    package_dir={"pyeditor": "pyeditor", "pyeditor.kernels": "kernels", "bench": "bench"},
    package_data={"bench": ["data/*.txt"]},
    python_requires=">=3.10",
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)

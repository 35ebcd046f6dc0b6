"""Command line: `python -m pyeditor verify [--backend NAME]`, `python -m pyeditor info`."""
import os
import sys


def _main() -> int:
    argv = sys.argv[1:]
    if not argv or argv[0] not in ("verify", "info"):
        print("usage: python -m pyeditor {verify,info} [options]", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
        # No GPU: verify the Triton kernels in the interpreter. The variable must be set before
        # triton is imported, and importing pyeditor (to get here) already did: start over.
        os.execve(sys.executable, [sys.executable, "-m", "pyeditor", *argv], {**os.environ, "TRITON_INTERPRET": "1"})
    if argv[0] == "info":
        import pyeditor
        from pyeditor import _ext

        print(f"pyeditor {pyeditor.__version__}, torch {torch.__version__}")
        print(f"extension: {_ext.build_info()}")
        for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
            print(f"backends on {dev}: {pyeditor.backends.available(dev)} (default {pyeditor.backends.default(dev)})")
        return 0
    from pyeditor import verify

    return verify.main(argv[1:])


if __name__ == "__main__":
    sys.exit(_main())

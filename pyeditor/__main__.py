"""Command line: `python -m pyeditor COMMAND` (`python -m pyeditor --help` lists the commands)."""
from __future__ import annotations

import argparse
import os
import sys

COMMANDS = {
    "verify": "check every op and backend here against pyeditor.reference",
    "info": "versions, extension build and backends per device",
}


def _parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    from . import verify

    parser = argparse.ArgumentParser(prog="python -m pyeditor",
                                     description="pyeditor: kernels for Persona editing and CHORD packed layers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    cmd = sub.add_parser("verify", help=COMMANDS["verify"], description=verify.__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    verify.add_arguments(cmd)
    sub.add_parser("info", help=COMMANDS["info"], description=COMMANDS["info"])
    return parser, cmd


def _needs_interpreter(args) -> bool:
    """Whether verify must restart with TRITON_INTERPRET=1: it would verify Triton on CPU tensors,
    and the variable only counts when set before triton is imported (importing pyeditor, to get
    here, already did)."""
    import torch

    from . import backends

    return (not torch.cuda.is_available() and backends.triton_available() and "TRITON_INTERPRET" not in os.environ
            and args.backend in (None, "triton") and args.device in (None, "cpu"))


def _info() -> int:
    import importlib.metadata

    import torch

    import pyeditor
    from pyeditor import _ext, backends

    triton = "not installed"
    if backends.triton_available():
        mode = " (interpreter on CPU tensors)" if backends.triton_interpreted() else ""
        triton = importlib.metadata.version("triton") + mode
    print(f"pyeditor {pyeditor.__version__}, torch {torch.__version__}, triton {triton}")
    print(f"extension: {_ext.build_info()}")
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        print(f"backends on {dev}: {backends.available(dev)} (default {backends.default(dev)})")
    if backends.triton_available() and not backends.triton_interpreted():
        print("triton on cpu: only with TRITON_INTERPRET=1 set before the first import (verify and the tests set it)")
    return 0


def _main(argv: list[str]) -> int:
    parser, verify_parser = _parser()
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info()
    from . import verify

    verify.check_args(verify_parser, args)  # a bad --op fails here, before any restart
    if _needs_interpreter(args):
        os.execve(sys.executable, [sys.executable, "-m", "pyeditor", *argv], {**os.environ, "TRITON_INTERPRET": "1"})
    return verify.run(args, argv)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

"""Benchmark cases for ``pyeditor.apply_edit``: K = clamp(delta, -T, T) + theta[idx].

Rows (default run, fp32):
  serving  4096x4096            into a preallocated out=
  serving  64 x 512x512, P=8    into out=, per-sample prototype gather
  alloc    both shapes          fresh result every call (peers: eager, torch.compile)
  first-touch                   what a freshly allocated 64 MiB result costs here
--full adds bf16/fp16 of all of these, a cache-resident 512x512, an odd shape and
a many-prototype gather.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from bench.registry import OURS, Case, Context, Prepared

FAMILY = "apply_edit"
T = 0.5
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# clamp+add in fp32 rounded once: kernels should match the reference exactly; these
# bounds (about one ulp near |K| = 6) only flag gross errors.
TOL = {"fp32": 1e-5, "bf16": 2.0 ** -5, "fp16": 2.0 ** -8}
TILE_BYTES = 2 << 20  # eager-tiled: chunk size that stays in L2/L3 between clamp and add


def _randn(shape, dtype, device, gen) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


def _inputs(ctx: Context, dt: str, theta_shape, delta_shape, protos: Optional[int], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    dtype = DTYPES[dt]
    theta = _randn(theta_shape, dtype, ctx.device, gen)
    delta = _randn(delta_shape, dtype, ctx.device, gen)
    idx = None
    if protos is not None:
        idx = torch.randint(0, protos, (delta_shape[0],), generator=gen).to(ctx.device)
    return theta, delta, idx


def _ours(ctx: Context, theta, delta, idx, out=None):
    """pyeditor.apply_edit with the chosen backend (or a string saying why it can't run)."""
    try:
        import pyeditor
        apply_edit = pyeditor.apply_edit
    except (ImportError, AttributeError) as e:
        return f"pyeditor.apply_edit unavailable: {type(e).__name__}: {e}"
    kw = {} if ctx.backend is None else {"backend": ctx.backend}
    if out is not None:
        kw["out"] = out
    return lambda: apply_edit(theta, delta, T, idx, **kw)


def _compiled_reference(*args):
    """torch.compile of the plain-PyTorch oracle (compiled on the first, untimed call)."""
    import pyeditor.reference as ref

    try:
        torch._dynamo.reset()  # fresh cache per case: no recompile limit, no dynamic-shape reuse
        compiled = torch.compile(ref.apply_edit, dynamic=False)
    except Exception as e:  # failures on the first (compiling) call are caught by the runner
        return f"torch.compile failed: {type(e).__name__}: {e}"
    return lambda: compiled(*args)


def _reference(theta, delta, idx):
    import pyeditor.reference as ref

    return lambda: ref.apply_edit(theta, delta, T, idx)


def _bytes(theta, delta, idx) -> int:
    """delta read + theta rows actually used (each distinct prototype once) + K written."""
    if idx is None:
        theta_bytes = theta.nbytes
        out_numel = torch.broadcast_shapes(theta.shape, delta.shape).numel()
    else:
        theta_bytes = int(torch.unique(idx).numel()) * theta[0].nbytes
        out_numel = idx.numel() * theta[0].numel()
    return delta.nbytes + theta_bytes + out_numel * theta.element_size()


# -- serving path: write into existing storage -------------------------------------------

def _make_serving(rows: int, cols: int, dt: str, ctx: Context) -> Prepared:
    theta, delta, _ = _inputs(ctx, dt, (rows, cols), (rows, cols), None)
    o = torch.zeros_like(theta)

    def eager():
        torch.clamp(delta, -T, T, out=o)
        return o.add_(theta)

    step = max(1, TILE_BYTES // (cols * theta.element_size()))
    eager_tiled = _eager_in_chunks([(delta[i:i + step], theta[i:i + step], o[i:i + step])
                                    for i in range(0, rows, step)], o)

    return Prepared(
        fns={OURS: _ours(ctx, theta, delta, None, out=o), "eager": eager, "eager-tiled": eager_tiled},
        bytes_moved=_bytes(theta, delta, None), reference=_reference(theta, delta, None), tol=TOL[dt],
        notes=["eager: clamp(delta,-T,T,out=o); o.add_(theta)",
               f"eager-tiled: the same on {step}-row chunks (~{TILE_BYTES >> 20} MiB) so o stays in cache"],
    )


def _eager_in_chunks(chunks, o):
    """Eager clamp-then-add over (delta, theta, out) chunks small enough to stay in cache."""
    def run():
        for d, t, oo in chunks:
            torch.clamp(d, -T, T, out=oo)
            oo.add_(t)
        return o
    return run


def _make_serving_gather(batch: int, protos: int, rows: int, cols: int, dt: str, ctx: Context) -> Prepared:
    theta, delta, idx = _inputs(ctx, dt, (protos, rows, cols), (batch, rows, cols), protos)
    o = torch.zeros_like(delta)

    def eager():
        torch.index_select(theta, 0, idx, out=o)
        return o.add_(delta.clamp(-T, T))

    eager_tiled = _eager_in_chunks([(delta[b], theta[p], o[b]) for b, p in enumerate(idx.tolist())], o)

    return Prepared(
        fns={OURS: _ours(ctx, theta, delta, idx, out=o), "eager": eager, "eager-tiled": eager_tiled},
        bytes_moved=_bytes(theta, delta, idx), reference=_reference(theta, delta, idx), tol=TOL[dt],
        notes=["eager: index_select(theta,0,idx,out=o); o.add_(delta.clamp(-T,T)) -- fastest whole-tensor "
               "form (beats clamp(out=o)+add_(theta.index_select) ), allocates one delta-sized temp",
               "eager-tiled: per sample clamp(delta[b],out=o[b]); o[b].add_(theta[idx[b]]) -- no temp"],
    )


# -- allocating path: a fresh result every call ------------------------------------------

def _make_alloc(theta_shape, delta_shape, protos: Optional[int], dt: str, ctx: Context) -> Prepared:
    theta, delta, idx = _inputs(ctx, dt, theta_shape, delta_shape, protos)
    if idx is None:
        eager = lambda: torch.clamp(delta, -T, T) + theta  # noqa: E731
        compiled = _compiled_reference(theta, delta, T)
        note = "eager: torch.clamp(delta,-T,T) + theta"
    else:
        eager = lambda: torch.clamp(delta, -T, T) + theta.index_select(0, idx)  # noqa: E731
        compiled = _compiled_reference(theta, delta, T, idx)
        note = "eager: torch.clamp(delta,-T,T) + theta.index_select(0,idx)"
    return Prepared(
        fns={OURS: _ours(ctx, theta, delta, idx), "eager": eager, "compile": compiled},
        bytes_moved=_bytes(theta, delta, idx), reference=_reference(theta, delta, idx), tol=TOL[dt],
        notes=[note, "compile: torch.compile(pyeditor.reference.apply_edit, dynamic=False); "
                     "compile time = first_call_s in the JSON, not timed"],
    )


# -- first-touch cost of a fresh result --------------------------------------------------

def _madvise_hugepage():
    """fn(tensor) asking the kernel for transparent huge pages on its storage, or a reason why not."""
    import ctypes
    import mmap

    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError) as e:
        return f"madvise unavailable: {e}"
    if advice is None:
        return "MADV_HUGEPAGE unavailable"
    huge = 2 << 20

    def advise(t: torch.Tensor) -> torch.Tensor:
        first = -(-t.data_ptr() // huge) * huge
        last = (t.data_ptr() + t.nbytes) // huge * huge
        if last > first:
            libc.madvise(first, last - first, advice)
        return t

    return advise


def _make_first_touch(shape, dt: str, ctx: Context) -> Prepared:
    dtype = DTYPES[dt]
    touched = torch.zeros(shape, dtype=dtype, device=ctx.device)
    nbytes = touched.nbytes
    advise = _madvise_hugepage()
    fresh_thp = advise if isinstance(advise, str) else \
        (lambda: advise(torch.empty(shape, dtype=dtype, device=ctx.device)).fill_(0))

    def derive(stats: dict) -> dict:
        m = {k: v["median_s"] for k, v in stats.items()}
        cost = m["fresh"] - m["touched"]
        pages = nbytes / 4096
        out = {"first_touch_s": cost, "first_touch_us_per_4k_page": cost / pages * 1e6,
               "summary": f"a fresh {nbytes >> 20} MiB result costs {cost * 1e3:.2f} ms extra "
                          f"({cost / pages * 1e6:.2f} us per 4 KiB page)"}
        if "fresh-thp" in m:
            out["first_touch_thp_s"] = thp = m["fresh-thp"] - m["touched"]
            out["summary"] += f"; {thp * 1e3:.2f} ms with madvise(MADV_HUGEPAGE)"
        return out

    return Prepared(
        fns={"fresh": lambda: torch.empty(shape, dtype=dtype, device=ctx.device).fill_(0),
             "fresh-thp": fresh_thp, "touched": lambda: touched.fill_(0)},
        bytes_moved=nbytes, derive=derive,
        notes=["fresh: torch.empty(shape).fill_(0) (+ free); touched: fill_(0) on a reused buffer; "
               "difference = first-touch page-fault cost",
               "fresh-thp: as fresh, after madvise(MADV_HUGEPAGE) on the storage (THP is 'madvise' here)"],
    )


# -- the case list ---------------------------------------------------------------------

def _shape(*dims) -> str:
    return "x".join(str(d) for d in dims)


def _serving(rows, cols, dt, full=False):
    return Case(f"{FAMILY}/serving/{_shape(rows, cols)}/{dt}", f"apply_edit serving {_shape(rows, cols)} {dt}",
                FAMILY, (OURS, "eager", "eager-tiled"), functools.partial(_make_serving, rows, cols, dt), full,
                {"path": "serving", "theta": [rows, cols], "delta": [rows, cols], "dtype": dt, "T": T})


def _serving_gather(batch, protos, rows, cols, dt, full=False):
    shape = _shape(batch, rows, cols)
    return Case(f"{FAMILY}/serving/{shape}-P{protos}/{dt}", f"apply_edit serving {shape} P={protos} {dt}",
                FAMILY, (OURS, "eager", "eager-tiled"),
                functools.partial(_make_serving_gather, batch, protos, rows, cols, dt), full,
                {"path": "serving", "theta": [protos, rows, cols], "delta": [batch, rows, cols],
                 "proto_index": [batch], "dtype": dt, "T": T})


def _alloc(rows, cols, dt, full=False):
    return Case(f"{FAMILY}/alloc/{_shape(rows, cols)}/{dt}", f"apply_edit alloc {_shape(rows, cols)} {dt}",
                FAMILY, (OURS, "eager", "compile"),
                functools.partial(_make_alloc, (rows, cols), (rows, cols), None, dt), full,
                {"path": "alloc", "theta": [rows, cols], "delta": [rows, cols], "dtype": dt, "T": T})


def _alloc_gather(batch, protos, rows, cols, dt, full=False):
    shape = _shape(batch, rows, cols)
    return Case(f"{FAMILY}/alloc/{shape}-P{protos}/{dt}", f"apply_edit alloc {shape} P={protos} {dt}",
                FAMILY, (OURS, "eager", "compile"),
                functools.partial(_make_alloc, (protos, rows, cols), (batch, rows, cols), protos, dt), full,
                {"path": "alloc", "theta": [protos, rows, cols], "delta": [batch, rows, cols],
                 "proto_index": [batch], "dtype": dt, "T": T})


def _first_touch(rows, cols, dt, full=False):
    return Case(f"alloc/first-touch/{_shape(rows, cols)}/{dt}",
                f"first-touch of a fresh {_shape(rows, cols)} {dt} result", FAMILY, ("fresh", "fresh-thp", "touched"),
                functools.partial(_make_first_touch, (rows, cols), dt), full,
                {"path": "alloc-overhead", "shape": [rows, cols], "dtype": dt})


def _cases() -> list[Case]:
    cases = []
    for dt in DTYPES:  # fp32 in the default run, bf16/fp16 with --full
        full = dt != "fp32"
        # the single-matrix alloc row is --full: the gathered one times the same path against torch.compile
        cases += [_serving(4096, 4096, dt, full), _serving_gather(64, 8, 512, 512, dt, full),
                  _alloc(4096, 4096, dt, True), _alloc_gather(64, 8, 512, 512, dt, full)]
    cases.append(_first_touch(4096, 4096, "fp32", True))  # --full: a diagnostic of the allocator, not of an op
    for dt in DTYPES:  # --full: cache-resident single matrix
        cases += [_serving(512, 512, dt, True), _alloc(512, 512, dt, True)]
    cases += [_serving(4095, 4097, "fp32", True),  # odd widths: vector tails everywhere
              _serving_gather(256, 64, 256, 256, "fp32", True)]  # many prototypes
    return cases


CASES: list[Case] = _cases()

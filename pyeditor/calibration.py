"""Calibration activations for :func:`pyeditor.nn.quantize_model`: forward hooks collect the inputs of
chosen nn.Linear layers while calibration data runs through the model, in bounded memory.

``calibration`` (what runs the model, under ``torch.no_grad``):
  * a callable ``fn(model)`` that runs the model itself (any number of batches, any signature);
  * a Tensor ``x`` (``model(x)``), a tuple of positional arguments (``model(*args)``) or a dict of
    keyword arguments (``model(**kwargs)``);
  * a list of those, one per batch.

Each layer keeps at most ``rows`` input rows (the input flattened to [-1, in_features], float32
on the CPU): all of them while they fit, then a uniform sample of every row seen (reservoir
sampling with a fixed seed, so the same data gives the same rows). Layers that read the same
tensors (q, k and v of one attention) share the copied rows while they fit, and layers whose
inputs were the same tensors on every call get the same result tensor object, which lets the
calibrated quantizer reuse its per-input work. Past ``rows`` rows each layer samples into its
own buffer, so memory is bounded by rows x in_features x 4 bytes per layer (per distinct input
while the rows fit).
"""
from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

_SEED = 0


class Reservoir:
    """Up to ``capacity`` rows sampled uniformly from all rows added (Algorithm R). While the rows
    fit, it holds the chunks it was given (shared with other reservoirs given the same chunks)."""

    def __init__(self, in_features: int, capacity: int):
        self.in_features, self.capacity = in_features, capacity
        self._parts: List[Tensor] = []
        self._own: Optional[Tensor] = None  # the sampling buffer, once more rows than capacity came
        self.seen = 0
        self.gen = torch.Generator().manual_seed(_SEED)

    def add(self, rows: Tensor) -> None:
        """rows: float32 [n, in_features] on the CPU, not changed afterwards."""
        take = min(max(0, self.capacity - self.seen), rows.shape[0])
        if take:  # a part of a chunk is copied, so that the rest of it is not kept alive
            self._parts.append(rows if take == rows.shape[0] else rows[:take].clone())
        rest = rows.shape[0] - take
        if rest:  # row g (0-based over all rows) replaces a random slot with probability capacity / (g + 1)
            g = torch.arange(self.seen + take, self.seen + take + rest, dtype=torch.float64)
            slot = (torch.rand(rest, generator=self.gen, dtype=torch.float64) * (g + 1)).floor_().long()
            keep = (slot < self.capacity).nonzero().flatten()
            if keep.numel():
                if self._own is None:
                    self._own = torch.cat(self._parts)
                    self._parts = []
                src = rows[take + keep]
                for j, s in enumerate(slot[keep].tolist()):  # in order: a later row overwrites an earlier one
                    self._own[s] = src[j]
        self.seen += rows.shape[0]

    def rows(self) -> Tensor:
        if self._own is not None:
            return self._own
        if not self._parts:
            return torch.empty(0, self.in_features, dtype=torch.float32)
        return self._parts[0] if len(self._parts) == 1 else torch.cat(self._parts)


class _Capture:
    """Hooks' target: per layer a reservoir and the history of its inputs (a serial number per
    distinct input tensor); one CPU copy per input tensor, however many layers read it."""

    def __init__(self, layers: Dict[str, nn.Linear], rows: int):
        self.layers, self.rows = layers, rows
        self.res: Dict[str, Reservoir] = {}
        self.history: Dict[str, List[int]] = {}
        self.order: List[str] = []  # layers in the order of their first call
        self._copies: Dict[int, tuple] = {}  # id(input) -> (weakref to it, its version, serial, CPU rows)
        self._serial = 0

    def _copy(self, x: Tensor, in_features: int) -> tuple:
        hit = self._copies.get(id(x))
        if hit is not None and hit[0]() is x and hit[1] == x._version:  # not changed in place since
            return hit[2], hit[3]
        self._serial += 1
        rows = x.detach().reshape(-1, in_features).to("cpu", torch.float32, copy=True)
        key = id(x)
        try:  # the entry goes when x does (so its id can be reused safely)
            ref = weakref.ref(x, lambda _r, _k=key, _s=self._serial: self._drop(_k, _s))
        except TypeError:
            return self._serial, rows
        self._copies[key] = (ref, x._version, self._serial, rows)
        return self._serial, rows

    def _drop(self, key: int, serial: int) -> None:
        hit = self._copies.get(key)
        if hit is not None and hit[2] == serial:
            del self._copies[key]

    def hook(self, name: str, x) -> None:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"calibration: layer {name!r} got a {type(x).__name__} input, expected a floating tensor")
        in_features = self.layers[name].in_features
        if name not in self.res:
            self.order.append(name)
            self.res[name] = Reservoir(in_features, self.rows)
            self.history[name] = []
        serial, rows = self._copy(x, in_features)
        self.history[name].append(serial)
        self.res[name].add(rows)

    def result(self) -> Dict[str, Tensor]:
        """{layer: its rows}; layers with the same input history share one tensor object."""
        out, by_history = {}, {}
        for name in self.order:
            first = by_history.setdefault(tuple(self.history[name]), name)
            out[name] = out[first] if first != name else self.res[name].rows()
        return out

    def groups(self) -> List[List[str]]:
        """The layers grouped by input history, in the order of their first call."""
        by_history: Dict[tuple, List[str]] = {}
        for name in self.order:
            by_history.setdefault(tuple(self.history[name]), []).append(name)
        return list(by_history.values())


def check_calibration(calibration: object) -> None:
    """TypeError naming ``calibration`` unless it is one of the accepted forms (see the module)."""
    def one(c) -> bool:
        return isinstance(c, (Tensor, tuple, Mapping))

    if callable(calibration) or one(calibration):
        return
    if isinstance(calibration, list) and calibration and all(one(c) for c in calibration):
        return
    raise TypeError("calibration must be a callable fn(model), a Tensor, a tuple of positional arguments, a dict of "
                    "keyword arguments, or a non-empty list of those (one per batch), got "
                    f"{type(calibration).__name__}")


def run(model: nn.Module, calibration) -> None:
    """Run the calibration data through ``model`` under no_grad."""
    check_calibration(calibration)
    batches = calibration if isinstance(calibration, list) else [calibration]
    with torch.no_grad():
        for c in batches:
            if isinstance(c, Tensor):
                model(c)
            elif isinstance(c, tuple):
                model(*c)
            elif isinstance(c, Mapping):
                model(**c)
            else:
                c(model)


def _hooked_run(model: nn.Module, layers: Dict[str, nn.Linear], calibration, rows: int) -> _Capture:
    cap = _Capture(layers, rows)
    hooks = [m.register_forward_pre_hook(lambda mod, inp, _n=name: cap.hook(_n, inp[0] if inp else None))
             for name, m in layers.items()]
    try:
        run(model, calibration)
    finally:
        for h in hooks:
            h.remove()
    return cap


def capture(model: nn.Module, layers: Dict[str, nn.Linear], calibration, rows: int) -> tuple:
    """Inputs of ``layers`` (name -> module of ``model``) while ``calibration`` runs through the
    model: ({name: float32 [n, in_features]}, names in the order of their first call). A layer
    that is never called is absent from both."""
    cap = _hooked_run(model, layers, calibration, rows)
    return cap.result(), list(cap.order)


def input_groups(model: nn.Module, layers: Dict[str, nn.Linear], calibration) -> List[List[str]]:
    """The layers grouped by shared inputs (the same tensors on every call), in the order of
    their first call: the steps of sequential calibration (a capture of one row per layer)."""
    return _hooked_run(model, layers, calibration, 1).groups()

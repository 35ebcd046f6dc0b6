"""``--shape FAMILY:KEY=VALUE,...``: run a family's cases at the user's own sizes.

Every case builds its inputs with ``functools.partial(make_fn, *args)``; the keys a case
accepts are the argument names of that function (e.g. ``n, k, m, width, dram`` for the packed
layers, ``B, N, d`` for search), matched exactly or, when unique, case-insensitively. A case
whose function lacks one of the keys is left out; a spec that no case accepts is an error that
lists what each case takes. FAMILY is a family name (``packed_linear``), a case module's short
name (``quant`` for cases_quant.py) or a case-name prefix (``search/l2``).
"""
from __future__ import annotations

import ast
import functools
import inspect
import re
from dataclasses import dataclass, replace
from typing import Any

from bench.registry import Case


@dataclass(frozen=True)
class ShapeSpec:
    selector: str
    overrides: tuple[tuple[str, str], ...]  # (key, raw value text), in the order given

    def __str__(self) -> str:
        return self.selector + (":" + ",".join(f"{k}={v}" for k, v in self.overrides) if self.overrides else "")


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets and quotes, so list values (heads=[(512,512)]) survive."""
    parts, depth, cur, quote = [], 0, "", None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    if depth != 0 or quote:
        raise ValueError(f"--shape: unbalanced brackets or quotes in {text!r}")
    parts.append(cur)
    return [p.strip() for p in parts]


def parse_shape(spec: str) -> ShapeSpec:
    """``"quant:M=1,N=4096,K=4096"`` -> ShapeSpec("quant", (("M", "1"), ("N", "4096"), ("K", "4096")))."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("--shape needs FAMILY[:KEY=VALUE,...], got an empty value")
    selector, _, rest = spec.strip().partition(":")
    selector = selector.strip()
    if not selector:
        raise ValueError(f"--shape {spec!r}: no family before ':'")
    overrides = []
    if rest.strip():
        for item in _split_top(rest):
            key, eq, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not eq or not key.isidentifier() or not value:
                raise ValueError(f"--shape {spec!r}: {item!r} is not KEY=VALUE")
            if any(k == key for k, _ in overrides):
                raise ValueError(f"--shape {spec!r}: {key} given twice")
            overrides.append((key, value))
    return ShapeSpec(selector, tuple(overrides))


def _literal(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word, e.g. bits=mix or metric=ip


def convert(text: str, like: Any, key: str) -> Any:
    """``text`` as a value of the type the case's own argument ``like`` has."""
    value = _literal(text)
    if like is None or isinstance(value, type(like)) and not (isinstance(value, bool) and not isinstance(like, bool)):
        return value
    if isinstance(like, bool):
        if value in (0, 1):
            return bool(value)
    elif isinstance(like, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif isinstance(like, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(like, str):
        return text  # e.g. the packed width "4" or "mix"
    elif isinstance(like, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(like)(value)
    raise ValueError(f"--shape: {key}={text!r} is not of type {type(like).__name__} (the case's default is {like!r})")


def accepted(case: Case) -> dict[str, Any]:
    """The case's shape arguments and their values, or {} when its make is not a partial."""
    make = case.make
    if not isinstance(make, functools.partial):
        return {}
    sig = inspect.signature(make.func)
    try:
        bound = sig.bind_partial(*make.args, **make.keywords)
    except TypeError:
        return {}
    bound.apply_defaults()
    return {k: v for k, v in bound.arguments.items() if k != "ctx"}


def _resolve(key: str, names: list[str]) -> str | None:
    if key in names:
        return key
    folded = [n for n in names if n.lower() == key.lower()]
    return folded[0] if len(folded) == 1 else None


def _reshaped(case: Case, spec: ShapeSpec) -> Case | None:
    args = accepted(case)
    names = list(args)
    keys = {}
    for key, _ in spec.overrides:
        name = _resolve(key, names)
        if name is None:
            return None
        keys[key] = name
    new = dict(args)
    for key, text in spec.overrides:
        new[keys[key]] = convert(text, args[keys[key]], key)
    if not spec.overrides:
        return case
    make = case.make
    ordered = [new[n] for n in names]
    tag = ",".join(f"{keys[k]}={new[keys[k]]!r}" if isinstance(new[keys[k]], str) else f"{keys[k]}={new[keys[k]]}"
                   for k, _ in spec.overrides)
    return replace(case, name=f"{case.name}@{tag}", label=_relabel(case.label, args, new, [keys[k] for k, _ in
                                                                                     spec.overrides]),
                   make=functools.partial(make.func, *ordered),
                   params={"args": dict(new), "base_case": case.name, "base_params": case.params, "shape": str(spec)})


def _relabel(label: str, old: dict[str, Any], new: dict[str, Any], names: list[str]) -> str:
    """The label with each ``name=old`` it shows turned into ``name=new``; the rest appended."""
    rest = []
    for name in names:
        # labels spell sizes as the issues do (M=1 for the argument m): match the name in any case
        pattern = re.compile(rf"(?<![A-Za-z0-9_])({re.escape(name)})={re.escape(str(old[name]))}(?![A-Za-z0-9_.])",
                             re.IGNORECASE)
        if old[name] != new[name] and pattern.search(label):
            label = pattern.sub(lambda m: f"{m.group(1)}={new[name]}", label)
        elif old[name] != new[name]:
            rest.append(f"{name}={new[name]}")
    return label + (f" with {','.join(rest)}" if rest else "")


def _matches(case: Case, selector: str, module: str) -> bool:
    return selector in (case.family, module) or case.name.startswith(selector.rstrip("/") + "/")


def apply_shapes(modules: dict[str, list[Case]], specs: list[ShapeSpec]) -> list[Case]:
    """The cases each spec selects, rebuilt at its sizes; duplicates (same function and arguments)
    are run once."""
    out: list[Case] = []
    seen = set()
    for spec in specs:
        picked = [(c, m) for m, cs in modules.items() for c in cs if _matches(c, spec.selector, m)]
        if not picked:
            known = sorted({c.family for cs in modules.values() for c in cs} | set(modules))
            raise ValueError(f"--shape {spec}: no selected case of family {spec.selector!r} (a family, a cases_ "
                             f"module's short name or a case-name prefix; full-only cases need --full, --filter "
                             f"narrows); known: {', '.join(known)}")
        made = [r for r in (_reshaped(c, spec) for c, _ in picked) if r is not None]
        if not made:
            forms = sorted({f"{c.make.func.__name__}({', '.join(accepted(c))})" for c, _ in picked
                            if isinstance(c.make, functools.partial)})
            raise ValueError(f"--shape {spec}: no {spec.selector} case takes "
                             f"{', '.join(k for k, _ in spec.overrides)}; its cases take: " + "; ".join(forms))
        for case in made:
            key = (case.make.func, repr(case.make.args)) if isinstance(case.make, functools.partial) else case.name
            if key not in seen:
                seen.add(key)
                out.append(case)
    return out

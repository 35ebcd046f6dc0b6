"""What each impl of a case is, for the report's columns and the speedup figures (no torch import,
so reading results stays light):

  ours   pyeditor's default path
  own    another pyeditor path or mode of the same op (ours-fast, ours-bf16x, ...)
  bound  not a computation of the result: a read of the bytes that sets the roofline
  peer   another library or plain torch; "speedup vs peers" compares with these only
"""
from __future__ import annotations

OURS = "ours"
ROLES = ("ours", "own", "bound", "peer")
# impl names the naming rule gets wrong; a case may also say so itself (Case.roles)
_NAMED = {
    "loop": "own",  # hyper_matmul_heads rows: pyeditor.hyper_matmul called once per head
}


def impl_role(impl: str) -> str:
    """By name: ours -> ours, ours-* -> own, read-* -> bound, anything else -> peer."""
    if impl in _NAMED:
        return _NAMED[impl]
    if impl == OURS:
        return "ours"
    if impl.startswith(OURS + "-"):
        return "own"
    if impl.startswith("read-"):
        return "bound"
    return "peer"


def row_role(row: dict, impl: str) -> str:
    """The role a results row recorded for ``impl`` (older files recorded none: the naming rule)."""
    return (row.get("roles") or {}).get(impl) or impl_role(impl)

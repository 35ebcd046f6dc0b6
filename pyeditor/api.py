"""Deprecated alias of :mod:`pyeditor.edit` (the edit family's module); kept so old imports work."""
import warnings

from .edit import apply_edit

warnings.warn("pyeditor.api is deprecated; import apply_edit from pyeditor or pyeditor.edit",
              DeprecationWarning, stacklevel=2)

__all__ = ["apply_edit"]

"""pyeditor: fast kernels for Persona parameter editing and CHORD mixed-precision layers.

The top-level functions take the same arguments as their plain-PyTorch definitions in
:mod:`pyeditor.reference` (the numerics oracle), plus ``backend=`` to pick an implementation
(see :mod:`pyeditor.backends`).
"""
from . import backends, reference
from .api import apply_edit
from .search import kmeans, kmeans_predict, nearest_prototype  # issue 5

__all__ = ["apply_edit", "backends", "reference"]
__all__ += ["nearest_prototype", "kmeans", "kmeans_predict"]  # issue 5
__version__ = "0.1.0"

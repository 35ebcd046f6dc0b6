"""pyeditor: fast kernels for Persona parameter editing and CHORD mixed-precision layers.

The top-level functions take the same arguments as their plain-PyTorch definitions in
:mod:`pyeditor.reference` (the numerics oracle), plus ``backend=`` to pick an implementation
(see :mod:`pyeditor.backends`).
"""
from . import backends, reference
from .api import apply_edit
from . import nn  # noqa: E402  (issue 4: EditedLinear, ParameterEditor)
from .hyper import assign_prototypes, edit_norms, edited_linear, generate_edit, hyper_matmul, prototype_gram

__all__ = ["apply_edit", "backends", "reference"]
__all__ += ["assign_prototypes", "edit_norms", "edited_linear", "generate_edit", "hyper_matmul", "nn",
            "prototype_gram"]
__version__ = "0.1.0"

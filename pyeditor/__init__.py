"""pyeditor: fast kernels for Persona parameter editing and CHORD mixed-precision layers.

The top-level functions take the same arguments as their plain-PyTorch definitions in
:mod:`pyeditor.reference` (the numerics oracle), plus ``backend=`` to pick an implementation
(see :mod:`pyeditor.backends`).
"""
from . import backends, reference
from .edit import apply_edit
from . import quant
from .quant import PackedWeight, dequantize, packed_linear, quantize_channelwise
from .bit_allocation import allocate_bits
from .fake_quant import fake_quantize
from .strategy_message import (LayerStrategy, WireReport, decode_strategy, decode_strategy_message, encode_strategy,
                               encode_strategy_message, wire_report)
from .search import kmeans, kmeans_predict, nearest_prototype
from .hyper import (assign_prototypes, edit_norms, edited_linear, generate_edit, hyper_matmul, hyper_matmul_heads,
                    prototype_gram)
from .assign_layers import assign_prototypes_layers, assignment_agreement, edit_norms_layers, prototype_gram_layers
from . import nn  # noqa: E402  (modules: PackedLinear, quantize_model, EditedLinear, ParameterEditor)

__all__ = ["apply_edit", "backends", "reference", "nn",
           "quant", "PackedWeight", "quantize_channelwise", "dequantize", "packed_linear", "encode_strategy",
           "decode_strategy", "allocate_bits", "fake_quantize", "encode_strategy_message", "decode_strategy_message",
           "LayerStrategy", "WireReport", "wire_report",
           "nearest_prototype", "kmeans", "kmeans_predict",
           "assign_prototypes", "edit_norms", "edited_linear", "generate_edit", "hyper_matmul", "prototype_gram",
           "hyper_matmul_heads", "assign_prototypes_layers", "edit_norms_layers", "prototype_gram_layers",
           "assignment_agreement"]
__version__ = "0.1.0"

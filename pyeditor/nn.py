"""torch.nn modules built on pyeditor's ops."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn


# ------------------------------------------------------------------ Persona (issue 4)
class EditedLinear(nn.Module):
    """A linear layer whose weight is edited per sample (Persona Eq. 6-7):
    ``y[b] = x[b] @ (theta[p_b] + clamp(delta[b], -T, T)) + bias[p_b]``, computed by
    :func:`pyeditor.edited_linear` without forming the edited weights.

    Holds ``prototypes`` weight matrices theta [P, in, out] (the Prototype Models' copies of
    this layer), an optional bias [P, out] and the threshold T. Call with x [B, S, in] (or
    [B, in]), per-sample edits delta [B, in, out] / [B, in*out] and, if P > 1, proto_index [B];
    or pass ``editor=`` (a callable mapping (embedding, proto_index) to delta) and ``embedding=``.
    """

    def __init__(self, in_features: int, out_features: int, prototypes: int = 1, threshold: float = 0.5,
                 bias: bool = True, backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        if prototypes < 1:
            raise ValueError(f"prototypes must be >= 1, got {prototypes}")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.threshold, self.backend = in_features, out_features, threshold, backend
        self.theta = nn.Parameter(torch.empty(prototypes, in_features, out_features, **kw))
        self.bias = nn.Parameter(torch.empty(prototypes, out_features, **kw)) if bias else None
        bound = in_features ** -0.5
        nn.init.uniform_(self.theta, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, prototypes: int = 1, threshold: float = 0.5, **kw) -> "EditedLinear":
        """Every prototype starts as a copy of ``linear`` (theta = linear.weight^T)."""
        m = cls(linear.in_features, linear.out_features, prototypes, threshold, linear.bias is not None,
                device=linear.weight.device, dtype=linear.weight.dtype, **kw)
        with torch.no_grad():
            m.theta.copy_(linear.weight.t().expand_as(m.theta))
            if m.bias is not None:
                m.bias.copy_(linear.bias.expand_as(m.bias))
        return m

    def forward(self, x: Tensor, delta: Optional[Tensor] = None, proto_index: Optional[Tensor] = None, *,
                editor=None, embedding: Optional[Tensor] = None) -> Tensor:
        from .hyper import edited_linear

        if delta is None:
            if editor is None or embedding is None:
                raise ValueError("pass delta, or editor= and embedding=")
            delta = editor(embedding, proto_index)
        squeeze = x.dim() == 2
        if squeeze:
            x = x.unsqueeze(1)
        P = self.theta.shape[0]
        if proto_index is None:
            if P != 1:
                raise ValueError(f"this layer has {P} prototypes: pass proto_index")
            theta, bias = self.theta[0], None if self.bias is None else self.bias[0]
        else:
            theta, bias = self.theta, self.bias
        y = edited_linear(x, theta, delta, self.threshold, bias, proto_index, backend=self.backend)
        return y.squeeze(1) if squeeze else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"prototypes={self.theta.shape[0]}, threshold={self.threshold}, bias={self.bias is not None}")


class ParameterEditor(nn.Module):
    """Persona's Parameter Editor (Eq. 5-6, 11-13), one per prototype, trained jointly.

    embedding [B, embed_dim] -> shared neck (Linear + ReLU) -> per-layer encoders (one linear
    each, run as one batched matmul) -> optional cross-layer sequential module Omega_seq (a GRU
    over the layer axis, Eq. 13) -> per-layer heads, one generator per prototype, run with
    :func:`pyeditor.hyper_matmul` (gathered by ``proto_index`` when given, so each sample only
    pays for its own prototype's head). Returns a list of edits, one per layer, each
    [B, in_l * out_l] (or [P, B, in_l * out_l] without proto_index), ready for EditedLinear.
    """

    def __init__(self, embed_dim: int, hidden: int, layer_shapes: Sequence[Tuple[int, int]], prototypes: int = 1,
                 sequential: bool = False, backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        if prototypes < 1:
            raise ValueError(f"prototypes must be >= 1, got {prototypes}")
        if not layer_shapes:
            raise ValueError("layer_shapes must name at least one layer")
        kw = {"device": device, "dtype": dtype}
        self.layer_shapes = [(int(i), int(o)) for i, o in layer_shapes]
        self.backend = backend
        self.neck = nn.Sequential(nn.Linear(embed_dim, hidden, **kw), nn.ReLU())
        L = len(self.layer_shapes)
        self.encoder_weight = nn.Parameter(torch.empty(L, hidden, hidden, **kw))
        self.encoder_bias = nn.Parameter(torch.zeros(L, hidden, **kw))
        self.sequential = nn.GRU(hidden, hidden, batch_first=True, **kw) if sequential else None
        self.head_weights = nn.ParameterList()
        self.head_biases = nn.ParameterList()
        for i, o in self.layer_shapes:
            # small init: edits start near zero, so every prototype starts at its own Theta
            self.head_weights.append(nn.Parameter(torch.randn(prototypes, hidden, i * o, **kw) * (0.01 / hidden ** 0.5)))
            self.head_biases.append(nn.Parameter(torch.zeros(prototypes, i * o, **kw)))
        nn.init.uniform_(self.encoder_weight, -hidden ** -0.5, hidden ** -0.5)

    def layer_embeddings(self, embedding: Tensor) -> Tensor:
        """[L, B, hidden]: the per-layer embeddings e^n (after Omega_seq if enabled)."""
        from .hyper import hyper_matmul

        h = self.neck(embedding)
        e = torch.relu(hyper_matmul(h, self.encoder_weight, self.encoder_bias, backend=self.backend))  # [L, B, h]
        if self.sequential is not None:
            e = self.sequential(e.transpose(0, 1))[0].transpose(0, 1)
        return e

    def forward(self, embedding: Tensor, proto_index: Optional[Tensor] = None) -> List[Tensor]:
        from .hyper import hyper_matmul

        e = self.layer_embeddings(embedding)
        return [hyper_matmul(e[n], w, b, proto_index, backend=self.backend)
                for n, (w, b) in enumerate(zip(self.head_weights, self.head_biases))]

"""CHORD's strategy on the wire (Liu et al., MM '25, Sec. 3.2 and Eq. 12): the 2-bit code of one
layer, a checksummed message that carries every layer's code, and the message's cost counted as
the paper counts it.

One layer's code: channel i's bit width is named by its index in the four-entry ladder ``widths``
(2 bits), channel i in byte i // 4 at bit offset 2 * (i % 4), least significant first, padding
bits zero. With the default ladder (2, 4, 6, 8) the index is bits / 2 - 1.

The message (little-endian), version 1:

    offset  size            field
    0       4               magic b"CHRD"
    4       1               version (1)
    5       4               the ladder: four widths in bits, strictly increasing, each 1..8
    9       4               L, the number of layers (uint32)
    13      8 L             per layer: out_features, in_features (uint32 each)
    13+8L   sum ceil(out/4) per layer, its code as above
    end-4   4               CRC-32 (zlib.crc32) of every byte before it

The checksum is checked first and the length the header implies second, so every truncation
(the implied length no longer matches) and every single-bit flip (CRC-32 detects all of them,
the checksum field included) raises ValueError.
"""
from __future__ import annotations

import struct
import zlib
from typing import List, NamedTuple, Sequence, Tuple, Union

import torch
from torch import Tensor

WIDTHS = (2, 4, 6, 8)
MAGIC = b"CHRD"
VERSION = 1
_HEAD = struct.Struct("<4sB4BI")
_SHAPE = struct.Struct("<II")
_CRC = struct.Struct("<I")
_U32_MAX = 2 ** 32 - 1


def check_widths(widths: object) -> Tuple[int, int, int, int]:
    """The ladder the 2-bit code names: four strictly increasing ints in [1, 8]."""
    if not isinstance(widths, (tuple, list)) or len(widths) != 4 or any(
            isinstance(w, bool) or not isinstance(w, int) for w in widths):
        raise TypeError(f"widths must be four ints (the bit widths codes 0-3 name), got {widths!r}")
    if not all(1 <= w <= 8 for w in widths) or any(a >= b for a, b in zip(widths, widths[1:])):
        raise ValueError(f"widths must be strictly increasing and in [1, 8], got {tuple(widths)}")
    return tuple(widths)  # type: ignore[return-value]


def _levels_of(bits: object, widths: Tuple[int, ...], name: str = "bits") -> Tensor:
    """int64 ladder index of every channel of a 1-D bits tensor (integral floats accepted)."""
    if not isinstance(bits, Tensor) or bits.dtype == torch.bool or bits.is_complex():
        got = bits.dtype if isinstance(bits, Tensor) else type(bits).__name__
        raise TypeError(f"{name} must be an integer (or integral float) tensor, got {got}")
    if bits.dim() != 1:
        raise ValueError(f"{name} must have shape 1-D, got {tuple(bits.shape)}")
    b = bits.detach().cpu()
    table = torch.full((9,), -1, dtype=torch.int64)
    table[list(widths)] = torch.arange(4)
    ok = (b >= 0) & (b <= 8) & (b == b.round()) if b.is_floating_point() else (b >= 0) & (b <= 8)
    levels = torch.where(ok, table[torch.where(ok, b, 0).long()], -1)
    if bool((levels < 0).any()):
        bad = b[levels < 0][0].item()
        raise ValueError(f"{name} must be in {{{', '.join(map(str, widths))}}}, got {bad}")
    return levels


def encode_strategy(bits: Tensor, widths: Sequence[int] = WIDTHS) -> Tensor:
    """One layer's 2-bit code: uint8 [ceil(C / 4)] for bits [C] drawn from ``widths``
    (see the module docstring for the layout). C == 0 gives an empty tensor."""
    levels = _levels_of(bits, check_widths(widths))
    pad = (-levels.shape[0]) % 4
    q = torch.cat([levels, levels.new_zeros(pad)]).view(-1, 4)
    return (q[:, 0] | (q[:, 1] << 2) | (q[:, 2] << 4) | (q[:, 3] << 6)).to(torch.uint8)


def decode_strategy(codes: Tensor, n_channels: int, widths: Sequence[int] = WIDTHS) -> Tensor:
    """Inverse of encode_strategy: int64 bits [n_channels]. codes must be uint8
    [ceil(n_channels / 4)] with zero padding bits (ValueError otherwise)."""
    widths = check_widths(widths)
    if isinstance(n_channels, bool) or not isinstance(n_channels, int):
        raise TypeError(f"n_channels must be an int, got {type(n_channels).__name__}")
    if n_channels < 0:
        raise ValueError(f"n_channels must be >= 0, got {n_channels}")
    if not isinstance(codes, Tensor) or codes.dtype != torch.uint8:
        got = codes.dtype if isinstance(codes, Tensor) else type(codes).__name__
        raise TypeError(f"codes must be a uint8 tensor, got {got}")
    n_bytes = (n_channels + 3) // 4
    if codes.dim() != 1 or codes.shape[0] != n_bytes:
        raise ValueError(f"codes must have shape [{n_bytes}] for {n_channels} channels, got {tuple(codes.shape)}")
    c = codes.detach().cpu().to(torch.int64)
    fields = torch.stack([(c >> s) & 3 for s in (0, 2, 4, 6)], 1).flatten()
    if bool((fields[n_channels:] != 0).any()):
        raise ValueError("codes has non-zero padding bits after the last channel")
    return torch.tensor(widths, dtype=torch.int64)[fields[:n_channels]]


class LayerStrategy(NamedTuple):
    """One layer of a strategy message: its channels' bit widths [out] and its input width."""

    bits: Tensor
    in_features: int


def encode_strategy_message(layers: Sequence[Union[LayerStrategy, Tuple[Tensor, int]]],
                            widths: Sequence[int] = WIDTHS) -> bytes:
    """Every layer's strategy in one checksummed message (layout in the module docstring).

    layers: (bits [out], in_features) per layer, in the order the device applies them; bits
    drawn from ``widths``. Returns the bytes that travel from cloud to device.
    """
    widths = check_widths(widths)
    if isinstance(layers, (Tensor, str, bytes)) or not isinstance(layers, Sequence):
        raise TypeError(f"layers must be a sequence of (bits, in_features) pairs, got {type(layers).__name__}")
    if len(layers) > _U32_MAX:
        raise ValueError(f"layers must hold at most {_U32_MAX} layers, got {len(layers)}")
    shapes, codes = [], []
    for i, layer in enumerate(layers):
        if not isinstance(layer, tuple) or len(layer) != 2:
            raise TypeError(f"layers[{i}] must be a (bits, in_features) pair, got {type(layer).__name__}")
        bits, in_features = layer
        if isinstance(in_features, bool) or not isinstance(in_features, int):
            raise TypeError(f"layers[{i}].in_features must be an int, got {type(in_features).__name__}")
        if not 0 <= in_features <= _U32_MAX:
            raise ValueError(f"layers[{i}].in_features must be in [0, {_U32_MAX}], got {in_features}")
        levels = _levels_of(bits, widths, f"layers[{i}].bits")
        if levels.shape[0] > _U32_MAX:
            raise ValueError(f"layers[{i}].bits must hold at most {_U32_MAX} channels")
        shapes.append(_SHAPE.pack(levels.shape[0], in_features))
        codes.append(encode_strategy(bits, widths).numpy().tobytes())
    body = _HEAD.pack(MAGIC, VERSION, *widths, len(layers)) + b"".join(shapes) + b"".join(codes)
    return body + _CRC.pack(zlib.crc32(body))


def _parse(data: object) -> Tuple[Tuple[int, ...], List[Tuple[int, int]], List[bytes]]:
    """Checked header and per-layer code bytes of a message: (widths, shapes, codes)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    least = _HEAD.size + _CRC.size
    if len(data) < least:
        raise ValueError(f"strategy message truncated: {len(data)} bytes, a message has at least {least}")
    body, (crc,) = data[:-_CRC.size], _CRC.unpack(data[-_CRC.size:])
    if zlib.crc32(body) != crc:
        raise ValueError("strategy message corrupt or truncated: CRC-32 mismatch")
    magic, version, *widths, n_layers = _HEAD.unpack_from(body)
    if magic != MAGIC:
        raise ValueError(f"not a CHORD strategy message: magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise ValueError(f"strategy message version {version} is not supported (this reader knows {VERSION})")
    try:
        widths = check_widths(widths)
    except ValueError as e:
        raise ValueError(f"strategy message header: {e}") from None
    shapes_end = _HEAD.size + _SHAPE.size * n_layers
    if len(body) < shapes_end:
        raise ValueError(f"strategy message truncated: its header names {n_layers} layers, "
                         f"which needs more than its {len(data)} bytes")
    shapes = [_SHAPE.unpack_from(body, _HEAD.size + _SHAPE.size * i) for i in range(n_layers)]
    sizes = [(out + 3) // 4 for out, _ in shapes]
    expected = shapes_end + sum(sizes) + _CRC.size
    if len(data) != expected:
        raise ValueError(f"strategy message length {len(data)} bytes does not match the {expected} its header implies")
    codes, at = [], shapes_end
    for n in sizes:
        codes.append(body[at:at + n])
        at += n
    return widths, shapes, codes


def decode_strategy_message(data: Union[bytes, bytearray, memoryview]) -> List[LayerStrategy]:
    """Inverse of encode_strategy_message: LayerStrategy(bits int64 [out], in_features) per layer.
    A truncated, extended, corrupt or bit-flipped message raises ValueError (TypeError for
    anything but bytes)."""
    widths, shapes, codes = _parse(data)
    out = []
    for i, ((n_out, n_in), raw) in enumerate(zip(shapes, codes)):
        t = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.zeros(0, dtype=torch.uint8)
        try:
            bits = decode_strategy(t, n_out, widths)
        except ValueError as e:
            raise ValueError(f"strategy message layer {i}: {e}") from None
        out.append(LayerStrategy(bits, n_in))
    return out


class WireReport(NamedTuple):
    """What one strategy message costs on the wire, two ways (see :func:`wire_report`)."""

    message_bits: int        # everything sent: header, codes and checksum
    code_bits: int           # the codes alone: 2 bits per channel plus each layer's last-byte padding
    channels: int            # output channels the message covers
    quantized_weights: int   # sum of out * in over the message's layers
    model_parameters: int    # every parameter of the deployed model
    base_param_mbit: float   # paper's Param of the full-precision model: base_bits * model_parameters / 1e6
    chord_param_mbit: float  # paper's Param of CHORD: message_bits / 1e6
    paper_ratio: float       # base_param_mbit / chord_param_mbit
    raw_ratio: float         # 32 * quantized_weights / code_bits: fp32 bytes of the quantized weights per code byte


def wire_report(message: Union[bytes, bytearray, memoryview], model_parameters: int,
                base_bits: int = 32) -> WireReport:
    """The message's cost as CHORD reports it, next to the raw code-to-weights ratio.

    The paper's accounting (CHORD, Sec. 4.1.3): "Regarding communication efficiency, we use the
    million bit count of model parameters (Param) that are transmitted." Table 2 lists Param per
    method: the full-precision model ("Base", 32 bits per parameter of the whole model) and
    CHORD, whose "Improvement" row is their quotient (x173.8 for Caser, x61.20 for SASRec). Here:

        base_param_mbit  = base_bits * model_parameters / 1e6   (the whole model a device would
                           otherwise download: every parameter, biases and layers CHORD leaves
                           in float included)
        chord_param_mbit = len(message) * 8 / 1e6              (all that CHORD sends: header,
                           2-bit codes with padding, checksum)
        paper_ratio      = base_param_mbit / chord_param_mbit

    The paper does not itemise its CHORD Param beyond 2 bits per channel, so its figures cannot
    be re-derived from its tables; this is the same quotient for the model at hand.
    raw_ratio = 32 * sum(out * in) / code_bits is the narrower comparison (fp32 bytes of the
    quantized layers' weights per code byte, 16 x in for one layer with out a multiple of 4).

    model_parameters: every parameter of the deployed model (e.g. sum of p.numel() over
    model.parameters()); it must be at least the quantized weights the message covers.
    """
    _, shapes, codes = _parse(message)
    for name, v, low in (("model_parameters", model_parameters, 0), ("base_bits", base_bits, 1)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if v < low:
            raise ValueError(f"{name} must be >= {low}, got {v}")
    weights = sum(o * i for o, i in shapes)
    channels = sum(o for o, _ in shapes)
    if channels == 0:
        raise ValueError("the message holds no channels: there is nothing to compare")
    if model_parameters < weights:
        raise ValueError(f"model_parameters ({model_parameters}) must count at least the "
                         f"{weights} quantized weights the message covers")
    message_bits = 8 * len(bytes(message))
    code_bits = 8 * sum(len(c) for c in codes)
    base, chord = base_bits * model_parameters / 1e6, message_bits / 1e6
    return WireReport(message_bits, code_bits, channels, weights, model_parameters, base, chord,
                      base / chord, 32 * weights / code_bits)

"""The two end-to-end examples, in their small default configuration with the seed fixed.

Margins below come from seeds 0-4 of the default configuration (the README lists them); the
asserted seed is 0 and every threshold holds for all five with room.
"""
import importlib.util
import math
import os
import sys

import pytest
import torch

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _load(name):
    sys.path.insert(0, EXAMPLES)
    try:
        spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(EXAMPLES)


@pytest.fixture(scope="module")
def persona():
    return _load("persona_pipeline")


@pytest.fixture(scope="module")
def chord():
    return _load("chord_pipeline")


def test_persona_pipeline_multi_prototype_beats_static_and_single(persona, capsys):
    res = persona.main(["--no-latency", "--seed", "0"])
    out = capsys.readouterr().out
    assert "Persona multi-prototype" in out and "static" in out
    # seeds 0-4 (cpu backend): multi - static >= 0.17, multi - single >= 0.019
    assert res["multi_acc"] > res["static_acc"] + 0.10
    assert res["multi_acc"] > res["single_acc"] + 0.01
    assert res["single_acc"] > res["static_acc"]
    # the weights the device receives (apply_edit) reproduce the fused edited_linear forward
    assert res["served_vs_fused_max_abs"] < 1e-4
    # Eq. 12 assignment recovers the history clusters' groups on the shifted sessions
    assert res["test_assignment_purity"] > 0.9


def test_persona_latency_path_runs_and_times(persona):
    lat = persona.adaptation_latency(size=32, embed_dim=8, hidden=8, prototypes=3, batch=16, threshold=0.1,
                                     repeats=1)
    for key in ("latency_batch_ms", "latency_per_device_ms", "latency_single_ms"):
        assert math.isfinite(lat[key]) and lat[key] > 0
    assert lat["latency_per_device_ms"] == pytest.approx(lat["latency_batch_ms"] / 16)


def test_chord_pipeline_mixed_precision_near_full_precision(chord, capsys):
    res = chord.main(["--seed", "0"])
    out = capsys.readouterr().out
    assert "CHORD, per-device strategy" in out and "on the wire" in out
    # seeds 0-4: fp32 - chord <= 0.016, chord - uniform 2-bit >= 0.10, chord - global >= 0.006
    assert res["acc_chord"] >= res["acc_fp32"] - 0.05
    assert res["acc_chord"] > res["acc_uniform2"] + 0.05
    assert res["acc_chord"] >= res["acc_global_mixed"]
    assert res["avg_bits_chord"] <= 3.0 + 1e-9  # beta = 0.125: 12.5% 8-bit, 12.5% 4-bit, 75% 2-bit
    assert res["wire_bytes_per_user"] == 2 * 128 // 4  # two 128-channel layers, 2 bits per channel
    assert res["fp32_weight_bytes"] / res["wire_bytes_per_user"] > 1000


def test_chord_quant_levels_equal_mixed_quantization(chord):
    """Training picks each channel's row from the per-width quantizations; that must be exactly
    pyeditor's mixed-precision quantization of the same strategy."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(20, 33)
    levels = chord.QuantLevels(lin)
    bits = torch.tensor([2, 4, 6, 8] * 8 + [4])
    import pyeditor
    want = pyeditor.quantize_channelwise(lin.weight.detach(), bits).dequantize()
    got = levels.weights(bits.double().unsqueeze(0).float())[0]
    assert torch.equal(got, want)

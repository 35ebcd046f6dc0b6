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


CHORD_SMALL = ["--users", "32", "--test-users", "16", "--hidden", "64", "--steps", "20", "--batch", "8",
               "--samples", "32"]


def test_chord_pipeline_tables_served_path_and_wire(chord, capsys):
    res = chord.main(CHORD_SMALL + ["--seed", "0"])
    out = capsys.readouterr().out
    assert "Table 3 shape" in out and "Table 4 shape" in out and "paper's accounting" in out
    rows, table4 = res["rows"], res["table4"]
    assert set(table4) == {"2-4-6-8", "2-5-6-7"} and "+Weighted Channel (Lambda off)" in rows
    # beta = 0.125 holds 3.0 average bits per weight in both ladders, Lambda on or off
    mixed = [rows["CHORD (Lambda on)"], rows["+Weighted Channel (Lambda off)"], *table4.values()]
    assert all(r["bits"] == 3.0 for r in mixed)
    # the device's decoded message and packed layers serve what training saw
    assert res["served_vs_fake_quant_max_abs"] < 1e-4
    assert res["served"]["acc"] == pytest.approx(rows["CHORD (Lambda on)"]["acc"], abs=2 / 512)
    # seeds 0-4 at this size: every mixed row >= uniform 2-bit + 0.006 and fp32 >= uniform 2-bit +
    # 0.037 (the 2-bit floor is real); Lambda on/off and the two ladders differ by seed noise here
    assert all(r["acc"] > rows["Quant (uniform 2-bit)"]["acc"] - 0.02 for r in mixed)
    assert rows["Base (fp32)"]["acc"] > rows["Quant (uniform 2-bit)"]["acc"] + 0.02
    wire = res["wire"]
    assert wire["message_bits"] == 8 * (17 + 8 * 3 + 3 * 64 // 4)  # header, 3 shapes, 2-bit codes, CRC
    assert wire["raw_ratio"] == 16 * 64
    assert wire["paper_ratio"] == pytest.approx(32 * wire["model_parameters"] / wire["message_bits"])


def test_chord_pipeline_lambda_off_and_uneven_ladder(chord, capsys):
    res = chord.main(["--users", "16", "--test-users", "8", "--hidden", "32", "--steps", "3", "--batch", "4",
                      "--samples", "16", "--no-layer-importance", "--bit-configs", "2-5-6-7"])
    out = capsys.readouterr().out
    assert "CHORD with Lambda off" in out and "served on the device" not in out  # no packed 5/7-bit kernel
    assert set(res["table4"]) == {"2-5-6-7"} and res["table4"]["2-5-6-7"]["bits"] == 3.0
    assert not any("Lambda" in name for name in res["rows"])
    with pytest.raises(SystemExit):
        chord.main(["--bit-configs", "2-3-4-5"])

"""The two end-to-end examples at reduced sizes (size flags), seed fixed: the paper-shaped tables
have the right rows and columns, every figure is finite and in range, the served paths match the
trained ones, and a subset of rows (--no-cross-layer) reproduces the full table's rows exactly."""
import importlib.util
import math
import os
import sys

import pytest

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


PERSONA_SMALL = ["--no-latency", "--devices", "16", "--history", "4", "--future", "2", "--steps", "12",
                 "--batch", "32", "--hidden", "16", "--editor-hidden", "16", "--group-numbers", "2,3",
                 "--assign-weights", "0,0.1", "--seed", "0"]


@pytest.fixture(scope="module")
def persona_full(persona):
    import io
    from contextlib import redirect_stdout
    out = io.StringIO()
    with redirect_stdout(out):
        res = persona.main(PERSONA_SMALL)
    return res, out.getvalue()


def _check_ranking(row):
    for key in ("auc", "ndcg", "hr", "acc"):
        assert math.isfinite(row[key]) and 0.0 <= row[key] <= 1.0, (key, row)
    # top-1 <= NDCG@k <= HR@k for one relevant class
    assert row["acc"] <= row["ndcg"] + 1e-12 and row["ndcg"] <= row["hr"] + 1e-12, row


def test_persona_table4_rows_and_figures(persona_full):
    res, out = persona_full
    rows = res["rows"]
    # static, then per CLKT setting (w/o. first, as in the paper): single, then N_M x assign-loss weights
    expected = [("static", None, None, None)]
    for cross in (False, True):
        expected.append(("single", cross, 1, None))
        expected += [("multi", cross, n, w) for n in (2, 3) for w in (0.0, 0.1)]
    assert [(r["kind"], r["cross_layer"], r["prototypes"], r["assign_weight"]) for r in rows] == expected
    for r in rows:
        _check_ranking(r)
    for r in rows:
        if r["kind"] == "multi":
            for key in ("purity", "agreement", "cluster_purity"):
                assert 0.0 <= r[key] <= 1.0, (key, r)
            # the weights each device receives (apply_edit) reproduce the fused edited_linear forward
            assert r["served_vs_fused_max_abs"] < 1e-4
    # the trained models rank the label above chance
    assert all(r["auc"] > 0.5 for r in rows)
    assert res["threads"] == 1 and "1 intra-op thread" in out
    assert "Table 4 shape" in out and "w/o. CLKT" in out and "w. CLKT" in out
    lines = out.splitlines()
    # the paper's figure sits beside the rows it has (assign loss off, N_M in its table), not beside the others
    w_off = [ln for ln in lines if ln.startswith("w. CLKT") and " off " in ln and ln.split()[2] == "2"]
    w_on = [ln for ln in lines if ln.startswith("w. CLKT") and " 0.1 " in ln and ln.split()[2] == "2"]
    assert len(w_off) == 1 and "0.6685" in w_off[0] and "0.4153" in w_off[0]
    assert len(w_on) == 1 and "0.66" not in w_on[0].split("|")[-1]
    assert any(ln.startswith("static") and "0.6588" in ln for ln in lines)


def test_persona_no_cross_layer_reproduces_the_rows(persona, persona_full, capsys):
    full = persona_full[0]["rows"]
    sub = persona.main(PERSONA_SMALL + ["--no-cross-layer"])["rows"]
    capsys.readouterr()
    assert [r for r in full if r["cross_layer"] is not True] == sub  # each row has its own seed
    assert not any(r["cross_layer"] for r in sub)


def test_persona_bad_flags(persona, capsys):
    for bad in (["--group-numbers", "0"], ["--assign-weights", "-1"], ["--no-cross-layer", "--cross-layer-only"],
                ["--top-k", "6"], ["--threads", "-1"]):
        with pytest.raises((SystemExit, ValueError)):
            persona.main(["--no-latency", "--steps", "1"] + bad)
    capsys.readouterr()


def test_persona_latency_path_runs_and_times(persona):
    lat = persona.adaptation_latency(size=32, embed_dim=8, hidden=8, prototypes=3, batch=16, threshold=0.1,
                                     repeats=1)
    for key in ("latency_batch_ms", "latency_per_device_ms", "latency_single_ms"):
        assert math.isfinite(lat[key]) and lat[key] > 0
    assert lat["latency_per_device_ms"] == pytest.approx(lat["latency_batch_ms"] / 16)


CHORD_SMALL = ["--users", "24", "--test-users", "12", "--hidden", "32", "--steps", "8", "--batch", "8",
               "--samples", "24", "--seed", "0"]


def _check_chord_row(r):
    for key in ("acc", "hr10", "ndcg10"):
        assert math.isfinite(r[key]) and 0.0 <= r[key] <= 1.0, (key, r)
    assert r["acc"] <= r["ndcg10"] + 1e-12 <= r["hr10"] + 2e-12
    if "shares" in r:
        assert sum(r["shares"].values()) == pytest.approx(1.0)


def test_chord_pipeline_tables_served_path_and_wire(chord, capsys):
    res = chord.main(CHORD_SMALL)
    out = capsys.readouterr().out
    assert "Table 3 shape" in out and "Table 4 shape" in out and "paper's accounting" in out
    assert res["threads"] == 1 and "1 intra-op thread" in out
    rows, table4 = res["rows"], res["table4"]
    assert list(rows) == ["Base (fp32)", "Quant (uniform 3-bit)", "Quant (uniform 2-bit)",
                          "+Customization (filter only)", "+Weighted Channel (Lambda off)", "CHORD (Lambda on)"]
    assert list(table4) == ["2-4-6-8", "2-5-6-7"]
    for r in [*rows.values(), *table4.values()]:
        _check_chord_row(r)
    # beta = 0.125 holds 3.0 average bits per weight in both ladders, Lambda on or off
    mixed = [rows[k] for k in list(rows)[3:]] + list(table4.values())
    assert all(r["bits"] == 3.0 for r in mixed)
    # the paper's figures beside ours: Table 3's CHORD row and Table 4's 2-5-6-7 row
    lines = out.splitlines()
    assert any(ln.startswith("CHORD (Lambda on)") and "0.0707" in ln and "0.1463" in ln for ln in lines)
    assert any(ln.startswith("2-5-6-7") and "0.0672" in ln and "0.1368" in ln for ln in lines)
    assert any(ln.startswith("Quant (uniform 2-bit)") and ln.split("|")[1].split() == ["-"] * 3 for ln in lines)
    # the device's decoded message and packed layers serve what training saw
    assert res["served_vs_fake_quant_max_abs"] < 1e-4
    assert res["served"]["acc"] == pytest.approx(rows["CHORD (Lambda on)"]["acc"], abs=2 / (12 * 24))
    wire = res["wire"]
    assert wire["message_bits"] == 8 * (17 + 8 * 3 + 3 * 32 // 4)  # header, 3 shapes, 2-bit codes, CRC
    assert wire["raw_ratio"] == 16 * 32
    assert wire["paper_ratio"] == pytest.approx(32 * wire["model_parameters"] / wire["message_bits"])


def test_chord_pipeline_lambda_off_and_uneven_ladder(chord, capsys):
    res = chord.main(["--users", "16", "--test-users", "8", "--hidden", "32", "--steps", "3", "--batch", "4",
                      "--samples", "16", "--no-layer-importance", "--bit-configs", "2-5-6-7"])
    out = capsys.readouterr().out
    assert "CHORD with Lambda off" in out and "served on the device" not in out  # no packed 5/7-bit kernel
    assert set(res["table4"]) == {"2-5-6-7"} and res["table4"]["2-5-6-7"]["bits"] == 3.0
    assert set(res["table4"]["2-5-6-7"]["shares"]) == {2, 5, 6, 7}
    assert not any("Lambda" in name for name in res["rows"])
    # Table 4 without Lambda is not the paper's setting: no paper figure beside it
    assert [ln.split("|")[1].split() for ln in out.splitlines() if ln.startswith("2-5-6-7")] == [["-"] * 3]
    with pytest.raises(SystemExit):
        chord.main(["--bit-configs", "2-3-4-5"])


def test_report_writes_both_tables(tmp_path, capsys):
    report = _load("report")
    out = tmp_path / "results.md"
    text = report.main(["--out", str(out), "--persona-args",
                        "--no-latency --devices 8 --history 2 --future 1 --steps 2 --group-numbers 2 "
                        "--assign-weights 0 --cross-layer-only",
                        "--chord-args", "--users 8 --test-users 4 --hidden 32 --steps 2 --batch 4 --samples 8 "
                        "--bit-configs 2-5-6-7"])
    capsys.readouterr()
    assert out.read_text() == text + "\n"
    assert text.startswith("# Example results") and "examples/report.py --out" in text
    assert text.count("```text") == 2 and "Table 4 shape (Persona" in text and "Table 3 shape" in text
    assert "persona_pipeline.py --no-latency --devices 8" in text

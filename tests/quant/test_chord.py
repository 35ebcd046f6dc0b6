"""CHORD's strategy side: allocate_bits (Gamma, Lambda, budget, straight-through), the fake-quant
used in training, the 2-bit code and the multi-layer strategy message with its wire report."""
import math
import struct
import zlib
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyeditor
from pyeditor import reference as ref
from pyeditor.bit_allocation import allocate_bits, budget_total
from pyeditor.fake_quant import fake_quantize
from pyeditor.strategy_message import (LayerStrategy, decode_strategy, decode_strategy_message, encode_strategy,
                                       encode_strategy_message, wire_report)

LADDERS = [(2, 4, 6, 8), (2, 5, 6, 7), (1, 2, 3, 4)]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _sensitivities(g, sizes, lead, ties):
    if ties:
        return [torch.randint(0, 4, lead + (c,), generator=g).float() for c in sizes]
    return [torch.randn(lead + (c,), generator=g) for c in sizes]


# ------------------------------------------------------------------------------- allocate_bits
@settings(max_examples=120, deadline=None)
@given(st.data())
def test_allocate_bits_matches_oracle(data):
    g = gen(data.draw(st.integers(0, 2**31 - 1)))
    n_layers = data.draw(st.integers(1, 4))
    sizes = data.draw(st.lists(st.integers(0, 12), min_size=n_layers, max_size=n_layers))
    lead = data.draw(st.sampled_from([(), (3,)]))
    widths = data.draw(st.sampled_from(LADDERS))
    beta = data.draw(st.sampled_from([0.0, 0.0625, 0.125, 0.25, 0.4, 0.5]))
    budget = data.draw(st.one_of(st.none(), st.floats(widths[0], widths[3])))
    sens = _sensitivities(g, sizes, lead, data.draw(st.booleans()))
    lam = None
    if data.draw(st.booleans()):
        lam = torch.randint(0, 3, data.draw(st.sampled_from([lead, ()])) + (n_layers,), generator=g).float()
    got = allocate_bits(sens, beta, lam, budget=budget, widths=widths)
    want = ref.allocate_bits(sens, beta, lam, budget=budget, widths=widths)
    assert all(a.dtype == torch.int64 and torch.equal(a, b) for a, b in zip(got, want))


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), sizes=st.lists(st.integers(0, 40), min_size=1, max_size=6),
       budget=st.floats(2.0, 8.0), with_lam=st.booleans(), batch=st.sampled_from([(), (4,)]))
def test_allocate_bits_keeps_the_budget_exactly(seed, sizes, budget, with_lam, batch):
    g = gen(seed)
    sens = _sensitivities(g, sizes, batch, seed % 2 == 0)
    lam = torch.randn(batch + (len(sizes),), generator=g) if with_lam else None
    bits = allocate_bits(sens, 0.125, lam, budget=budget)
    n = sum(sizes)
    total = sum(b.sum(-1) for b in bits)
    exact = Fraction(budget) * n
    # the rule: the largest even total (all 2-4-6-8 allocations have even totals) <= budget * N
    want = budget_total(budget, n)
    assert want % 2 == 0 and want <= exact and (want + 2 > exact or want == 8 * n)
    assert torch.all(torch.as_tensor(total) == want)
    assert all(bool(torch.isin(b, torch.tensor([2, 4, 6, 8])).all()) for b in bits)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), sizes=st.lists(st.integers(1, 30), min_size=2, max_size=5),
       widths=st.sampled_from(LADDERS), budget=st.one_of(st.none(), st.floats(1.0, 8.0)))
def test_allocate_bits_lambda_moves_bits_between_layers(seed, sizes, widths, budget):
    """Without a budget Lambda keeps Gamma's total; no allocation goes above its target, and
    only an uneven ladder (2-5-6-7) may stay below it, by at most 2 bits."""
    g = gen(seed)
    budget = None if budget is None else min(max(budget, widths[0]), widths[3])
    sens = _sensitivities(g, sizes, (), False)
    lam = torch.randn(len(sizes), generator=g)
    gamma = sum(int(b.sum()) for b in allocate_bits(sens, 0.125, widths=widths))
    total = sum(int(b.sum()) for b in allocate_bits(sens, 0.125, lam, budget=budget, widths=widths))
    target = gamma if budget is None else budget_total(budget, sum(sizes), widths)
    short = 2 if widths == (2, 5, 6, 7) else 0
    assert target - short <= total <= target


def test_allocate_bits_boosts_and_cuts_every_layer():
    s = torch.arange(8.0, 0.0, -1.0)  # channel i has rank i
    layers = [s.clone() for _ in range(4)]
    # Gamma: 8, 4, then 2 in every layer (24 bits each). Mean importance 2: layers 0, 1 go one rung
    # up (8, 6, 4 x 6 = 38), layers 2, 3 one down (6, 2, 2 x 6 = 20): 116 bits. The 20 over come off
    # the least sensitive channels of every layer, last rank first (layers 3, 2 are at 2 there):
    # ranks 7..3 of layers 1 and 0 go 4 -> 2
    lam = torch.tensor([4.0, 3.0, 1.0, 0.0])
    out = allocate_bits(layers, 0.125, lam)
    assert [b.tolist() for b in out] == [[8, 6, 4] + [2] * 5] * 2 + [[6] + [2] * 7] * 2
    assert torch.equal(torch.stack(out), torch.stack(ref.allocate_bits(layers, 0.125, lam)))
    # an explicit budget of 4 bits: 128 - 116 = +12 from the most sensitive channels on, the more
    # important layer first at equal rank: rank 0 of layers 2, 3 (6 -> 8), rank 1 of layers 0, 1
    # (6 -> 8), and rank 1 of layer 2 as far as the last 4 bits go (2 -> 6)
    out = allocate_bits(layers, 0.125, lam, budget=4.0)
    assert [b.tolist() for b in out] == [[8, 8] + [4] * 6] * 2 + [[8, 6] + [2] * 6, [8, 2] + [2] * 6]
    # Table 4's other ladder: Gamma's tiers are 7 / 5 / 2 (3.0 average at beta = 0.125, as 2-4-6-8)
    tiers = allocate_bits(s, 0.125, widths=(2, 5, 6, 7))
    assert tiers.tolist() == [7, 5] + [2] * 6 and float(tiers.float().mean()) == 3.0


def test_allocate_bits_batch_equals_one_user_at_a_time():
    g = gen(3)
    sens = [torch.randn(5, 9, generator=g), torch.randn(5, 4, generator=g)]
    lam = torch.randn(5, 2, generator=g)
    batch = allocate_bits(sens, 0.25, lam, budget=3.4)
    for u in range(5):
        one = allocate_bits([s[u] for s in sens], 0.25, lam[u], budget=3.4)
        assert all(torch.equal(b[u], o) for b, o in zip(batch, one))


def test_straight_through_gradient_matches_the_surrogate_finite_difference():
    """Differentiated: bits~[l, c] = bits[l, c] + (s[l, c] - s0[l, c]) + (lam_l - mean lam) -
    (lam0_l - mean lam0), with the discrete bits frozen at the current point."""
    g = gen(1)
    sens = [torch.randn(2, c, generator=g, dtype=torch.float64, requires_grad=True) for c in (6, 10, 3)]
    lam0 = torch.randn(2, 3, generator=g, dtype=torch.float64)
    lam = lam0.clone().requires_grad_(True)
    bits = allocate_bits(sens, 0.25, lam, True, budget=3.5)
    weights = [torch.randn(b.shape, generator=g, dtype=torch.float64) for b in bits]

    def loss(bs):
        return sum((w * b.pow(2)).sum() for w, b in zip(weights, bs))

    loss(bits).backward()
    frozen = [b.detach() for b in bits]

    def surrogate(lam_new):
        c, c0 = lam_new - lam_new.mean(-1, keepdim=True), lam0 - lam0.mean(-1, keepdim=True)
        return [b + (c[:, i:i + 1] - c0[:, i:i + 1]) for i, b in enumerate(frozen)]

    h, numeric = 1e-4, torch.zeros_like(lam0)
    for idx in range(lam0.numel()):
        e = torch.zeros_like(lam0).view(-1)
        e[idx] = h
        e = e.view_as(lam0)
        numeric.view(-1)[idx] = (loss(surrogate(lam0 + e)) - loss(surrogate(lam0 - e))) / (2 * h)
    assert lam.grad.abs().sum() > 0
    assert torch.allclose(lam.grad, numeric, rtol=1e-6, atol=1e-6)
    assert torch.allclose(lam.grad.sum(-1), torch.zeros(2, dtype=torch.float64), atol=1e-9)  # shift-invariant
    for s, w, b in zip(sens, weights, frozen):
        assert torch.equal(s.grad, 2 * w * b)
    # the oracle's straight-through gives the same gradients
    lam_ref = lam0.clone().requires_grad_(True)
    sens_ref = [s.detach().clone().requires_grad_(True) for s in sens]
    loss(ref.allocate_bits(sens_ref, 0.25, lam_ref, True, budget=3.5)).backward()
    assert torch.allclose(lam_ref.grad, lam.grad) and all(torch.equal(a.grad, b.grad) for a, b in zip(sens_ref, sens))


def test_gradients_reach_sensitivity_and_importance_through_fake_quant():
    g = gen(2)
    w = [torch.randn(12, 9, generator=g), torch.randn(7, 12, generator=g)]
    sens = [torch.rand(4, 12, generator=g, requires_grad=True), torch.rand(4, 7, generator=g, requires_grad=True)]
    lam = torch.randn(4, 2, generator=g, requires_grad=True)
    bits = allocate_bits(sens, 0.25, lam, True)
    x = torch.randn(4, 5, 9, generator=g)
    h = torch.relu(torch.einsum("bsi,boi->bso", x, fake_quantize(w[0], bits[0])))
    y = torch.einsum("bsi,boi->bso", h, fake_quantize(w[1], bits[1]))
    (y - torch.einsum("bsi,oi->bso", torch.relu(x @ w[0].T), w[1])).pow(2).mean().backward()
    assert all(bool(s.grad.abs().sum() > 0) and bool(torch.isfinite(s.grad).all()) for s in sens)
    assert bool(lam.grad.abs().sum() > 0)


@pytest.mark.parametrize(
    "args, kwargs, err, match",
    [
        ((torch.ones(4), 0.25), dict(budget=1.5), ValueError, r"budget must be in \[2, 8\]"),
        ((torch.ones(4), 0.25), dict(budget=math.nan), ValueError, "budget must be in"),
        ((torch.ones(4), 0.25), dict(budget="3"), TypeError, "budget must be a number"),
        ((torch.ones(4), 0.25), dict(budget=1.5, widths=(2, 5, 6, 7)), ValueError, r"budget must be in \[2, 7\]"),
        ((torch.ones(4), 0.25), dict(widths=(2, 4, 6)), TypeError, "widths must be four ints"),
        ((torch.ones(4), 0.25), dict(widths=(0, 4, 6, 8)), ValueError, "widths must be strictly increasing"),
        ((torch.ones(2, 2, 4), 0.25), {}, ValueError, r"sensitivity must be 1-D \[C\] or 2-D"),
        (([torch.ones(3, 4), torch.ones(2, 4)], 0.25), {}, ValueError, r"sensitivity\[1\] has batch shape"),
        (([torch.ones(3, 4), torch.ones(3, 4)], 0.25), dict(layer_importance=torch.ones(2, 2)), ValueError,
         r"layer_importance must have shape \[2\] or \[3, 2\]"),
        ((torch.ones(4), 0.25), dict(layer_importance=torch.tensor([math.inf])), ValueError, "must be finite"),
        ((torch.ones(4), 0.25), dict(layer_importance=torch.tensor([1])), TypeError,
         "layer_importance must be a floating"),
        ((torch.ones(4), 0.25), dict(straight_through=1), TypeError, "straight_through must be a bool"),
        (("abc", 0.25), {}, TypeError, "sensitivity must be a tensor or a list"),
    ],
)
def test_allocate_bits_errors(args, kwargs, err, match):
    with pytest.raises(err, match=match):
        allocate_bits(*args, **kwargs)


def test_public_names_are_the_production_ones():
    assert pyeditor.allocate_bits is allocate_bits and pyeditor.fake_quantize is fake_quantize
    assert pyeditor.encode_strategy is encode_strategy and pyeditor.decode_strategy is decode_strategy
    assert pyeditor.encode_strategy_message is encode_strategy_message
    # the oracle runs none of them
    import inspect
    src = inspect.getsource(ref)
    assert all(m not in src for m in ("bit_allocation", "fake_quant import", "strategy_message"))


# ------------------------------------------------------------------------------- fake-quant
@pytest.mark.parametrize("group_size", [None, 32, 64])
def test_fake_quantize_is_the_packed_layers_dequantized_weight(group_size):
    g = gen(4)
    w = torch.randn(9, 70, generator=g) * 3
    w[2] = 0.0  # constant channel
    w[5, :40] = 1.25  # constant group (for 32)
    bits = torch.tensor([2, 4, 6, 8, 8, 6, 4, 2, 2])
    want = ref.dequantize(ref.quantize_channelwise(w, bits, group_size))
    assert torch.equal(fake_quantize(w, bits, group_size), want)
    assert torch.equal(fake_quantize(w, bits.float(), group_size), want)
    assert torch.equal(fake_quantize(w, 4, group_size), ref.dequantize(ref.quantize_channelwise(w, 4, group_size)))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), out=st.integers(1, 6), n_in=st.integers(0, 140),
       group_size=st.sampled_from([None, 32, 128]), batch=st.sampled_from([(), (2,)]))
def test_fake_quantize_matches_oracle_at_every_width(seed, out, n_in, group_size, batch):
    g = gen(seed)
    w = torch.randn(out, n_in, generator=g) * torch.rand(out, 1, generator=g) * 10
    bits = torch.randint(1, 9, batch + (out,), generator=g)
    got = fake_quantize(w, bits, group_size)
    assert got.shape == batch + (out, n_in)
    assert torch.equal(got, ref.fake_quantize(w, bits, group_size))


def test_fake_quantize_gradient_is_identity_inside_the_range():
    # row 0: scale 0.5 and zero round(1.5) = 2 (half to even), so 0.75 would need code 4 > 3 at
    # 2 bits: clipped to 3, the only element outside the range; row 1 is random
    w = torch.tensor([[-0.75, 0.75, 0.25, -0.5], [0.3, -1.1, 0.7, 0.05]], dtype=torch.float64)
    bits = torch.tensor([2, 3])
    jac = torch.autograd.functional.jacobian(lambda t: fake_quantize(t, bits), w)
    expected = torch.diag(torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    assert torch.equal(jac.reshape(8, 8), expected)
    assert fake_quantize(w, bits)[0, 1] == 0.5  # (3 - 2) * 0.5
    # a batch of strategies sums its gradients into the one weight
    wg = w.clone().requires_grad_(True)
    fake_quantize(wg, torch.tensor([[8, 8], [8, 8], [8, 8]])).sum().backward()
    assert torch.equal(wg.grad, torch.full_like(w, 3.0))


def test_fake_quantize_gradient_to_bits():
    g = gen(5)
    w = torch.randn(6, 11, generator=g)
    bits = torch.tensor([[2.0, 4, 6, 8, 3, 5], [8, 8, 2, 2, 7, 1]], requires_grad=True)
    up = torch.randn(2, 6, 11, generator=g)
    out = fake_quantize(w, bits)
    (out * up).sum().backward()
    want = -math.log(2.0) * (up * (out.detach() - w)).sum(-1)
    assert torch.allclose(bits.grad, want, rtol=1e-6, atol=1e-7)
    assert bits.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "args, err, match",
    [
        ((torch.ones(3, 4), torch.tensor([2, 4])), ValueError, r"bits must have shape \[3\]"),
        ((torch.ones(3, 4), torch.tensor([2, 9, 4])), ValueError, r"bits must be whole numbers in \[1, 8\], got 9"),
        ((torch.ones(3, 4), torch.tensor([2.5, 4, 4])), ValueError, "whole numbers"),
        ((torch.ones(3, 4), 2, 48), ValueError, "group_size must be None"),
        ((torch.ones(4), 2), ValueError, r"weight must be 2-D \[out, in\]"),
        ((torch.ones(3, 4, dtype=torch.int32), 2), TypeError, "weight must be a floating-point tensor"),
        ((torch.tensor([[1.0, math.inf]]), 2), ValueError, "weight must be finite"),
        ((torch.ones(3, 4), [2, 4, 4]), TypeError, "bits must be an int or an integer"),
    ],
)
def test_fake_quantize_errors(args, err, match):
    with pytest.raises(err, match=match):
        fake_quantize(*args)


# ------------------------------------------------------------------------------- strategy codes
@settings(max_examples=60, deadline=None)
@given(widths=st.sampled_from(LADDERS), data=st.data())
def test_strategy_code_round_trip_on_any_ladder(widths, data):
    bits = torch.tensor(data.draw(st.lists(st.sampled_from(widths), max_size=23)), dtype=torch.int64)
    code = encode_strategy(bits, widths)
    assert code.dtype == torch.uint8 and code.shape == ((bits.numel() + 3) // 4,)
    assert torch.equal(decode_strategy(code, bits.numel(), widths), bits)
    if widths == (2, 4, 6, 8):
        assert torch.equal(code, ref.encode_strategy(bits))


def test_strategy_code_layout_and_errors():
    assert encode_strategy(torch.tensor([2, 7, 6, 5, 7]), (2, 5, 6, 7)).tolist() == [0b01101100, 0b11]
    with pytest.raises(ValueError, match=r"bits must be in \{2, 5, 6, 7\}, got 4"):
        encode_strategy(torch.tensor([2, 4]), (2, 5, 6, 7))
    with pytest.raises(ValueError, match="padding"):
        decode_strategy(torch.tensor([0b11000000], dtype=torch.uint8), 3)


# ------------------------------------------------------------------------------- the message
def _layers(g, n_layers, widths):
    out = []
    for _ in range(n_layers):
        c = int(torch.randint(0, 14, (1,), generator=g))
        pick = torch.randint(0, 4, (c,), generator=g)
        out.append(LayerStrategy(torch.tensor(widths)[pick], int(torch.randint(0, 300, (1,), generator=g))))
    return out


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_layers=st.integers(0, 5), widths=st.sampled_from(LADDERS))
def test_message_round_trip(seed, n_layers, widths):
    layers = _layers(gen(seed), n_layers, widths)
    msg = encode_strategy_message(layers, widths)
    assert isinstance(msg, bytes) and len(msg) == 17 + 8 * n_layers + sum((len(b) + 3) // 4 for b, _ in layers)
    back = decode_strategy_message(msg)
    assert len(back) == n_layers
    for (b, k), got in zip(layers, back):
        assert isinstance(got, LayerStrategy) and torch.equal(got.bits, b) and got.in_features == k


def test_message_hand_layout():
    msg = encode_strategy_message([(torch.tensor([2, 4, 6, 8, 8]), 3), (torch.tensor([8.0]), 1)])
    body = (b"CHRD" + bytes([1, 2, 4, 6, 8]) + struct.pack("<I", 2) + struct.pack("<IIII", 5, 3, 1, 1)
            + bytes([0b11100100, 0b11, 0b11]))
    assert msg == body + struct.pack("<I", zlib.crc32(body))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_layers=st.integers(0, 3), widths=st.sampled_from(LADDERS))
def test_message_every_truncation_and_bit_flip_is_detected(seed, n_layers, widths):
    msg = encode_strategy_message(_layers(gen(seed), n_layers, widths), widths)
    for k in range(len(msg)):
        with pytest.raises(ValueError):
            decode_strategy_message(msg[:k])
    with pytest.raises(ValueError):
        decode_strategy_message(msg + b"\0")
    flipped = bytearray(msg)
    for bit in range(8 * len(msg)):
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(ValueError):
            decode_strategy_message(flipped)
        flipped[bit // 8] ^= 1 << (bit % 8)
    assert len(decode_strategy_message(bytes(flipped))) == n_layers  # restored: reads again


def _resealed(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize(
    "data, err, match",
    [
        (b"CHRD", ValueError, "truncated: 4 bytes"),
        (_resealed(b"CHRX" + bytes([1, 2, 4, 6, 8]) + struct.pack("<I", 0)), ValueError,
         "not a CHORD strategy message"),
        (_resealed(b"CHRD" + bytes([2, 2, 4, 6, 8]) + struct.pack("<I", 0)), ValueError, "version 2 is not supported"),
        (_resealed(b"CHRD" + bytes([1, 2, 4, 4, 8]) + struct.pack("<I", 0)), ValueError, "header: widths must be"),
        (_resealed(b"CHRD" + bytes([1, 2, 4, 6, 8]) + struct.pack("<I", 3)), ValueError, "names 3 layers"),
        (_resealed(b"CHRD" + bytes([1, 2, 4, 6, 8]) + struct.pack("<III", 1, 3, 1) + bytes([0b11000000])),
         ValueError, "layer 0: codes has non-zero padding"),
        (_resealed(b"CHRD" + bytes([1, 2, 4, 6, 8]) + struct.pack("<III", 1, 5, 1) + bytes([0])), ValueError,
         "length 26 bytes does not match the 27 its header implies"),
        (b"CHRD" + bytes([1, 2, 4, 6, 8]) + struct.pack("<II", 0, 0), ValueError, "CRC-32 mismatch"),
        ("CHRD", TypeError, "data must be bytes"),
    ],
)
def test_message_errors(data, err, match):
    with pytest.raises(err, match=match):
        decode_strategy_message(data)


@pytest.mark.parametrize(
    "layers, kwargs, err, match",
    [
        ([(torch.tensor([2, 3]), 4)], {}, ValueError, r"layers\[0\].bits must be in \{2, 4, 6, 8\}, got 3"),
        ([(torch.tensor([2, 4]), -1)], {}, ValueError, r"layers\[0\].in_features must be in"),
        ([(torch.tensor([2, 4]), 4.0)], {}, TypeError, r"layers\[0\].in_features must be an int"),
        ([torch.tensor([2, 4])], {}, TypeError, r"layers\[0\] must be a \(bits, in_features\) pair"),
        (torch.tensor([2, 4]), {}, TypeError, "layers must be a sequence"),
        ([(torch.tensor([[2, 4]]), 4)], {}, ValueError, r"layers\[0\].bits must have shape 1-D"),
        ([(torch.tensor([2, 4]), 4)], dict(widths=(2, 4, 6, 9)), ValueError, "widths must be"),
    ],
)
def test_message_encode_errors(layers, kwargs, err, match):
    with pytest.raises(err, match=match):
        encode_strategy_message(layers, **kwargs)


def test_wire_report_paper_and_raw_accounting():
    layers = [(torch.full((128,), 2), 16), (torch.full((128,), 8), 128)]
    msg = encode_strategy_message(layers)
    params = 16 * 128 + 128 + 128 * 128 + 128 + 128 * 32 + 32  # both layers, their biases and a readout
    r = wire_report(msg, params)
    assert r.message_bits == 8 * len(msg) == 8 * (17 + 16 + 32 + 32)
    assert r.code_bits == 2 * 256 and r.channels == 256 and r.quantized_weights == 128 * 16 + 128 * 128
    assert r.base_param_mbit == 32 * params / 1e6 and r.chord_param_mbit == r.message_bits / 1e6
    assert r.paper_ratio == pytest.approx(32 * params / r.message_bits)
    assert r.raw_ratio == pytest.approx(32 * (128 * 16 + 128 * 128) / 512)  # 16 x mean input width
    one = wire_report(encode_strategy_message([(torch.full((64,), 4), 48)]), 64 * 48)
    assert one.raw_ratio == 16 * 48
    with pytest.raises(ValueError, match="at least the 18432 quantized weights"):
        wire_report(msg, 100)
    with pytest.raises(ValueError, match="no channels"):
        wire_report(encode_strategy_message([]), 10)
    with pytest.raises(TypeError, match="model_parameters must be an int"):
        wire_report(msg, 1e6)

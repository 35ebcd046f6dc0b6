// Framework-free tests of the shared math (no torch): dtype conversions, clip semantics,
// and the work decomposition that the CPU and CUDA kernels both use.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "pyeditor/edit_math.h"

#include "expect.h"

static uint16_t half_bits_of(_Float16 h) {
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}

static void test_f16_matches_compiler() {
  for (uint32_t b = 0; b < 65536; ++b) {
    _Float16 h;
    const uint16_t bits = static_cast<uint16_t>(b);
    std::memcpy(&h, &bits, 2);
    const float ours = pe::to_float(pe::f16{bits});
    const float theirs = static_cast<float>(h);
    if (std::isnan(theirs)) {
      EXPECT(std::isnan(ours));
      EXPECT(std::isnan(pe::to_float(pe::to_f16(ours))));
      continue;
    }
    EXPECT(pe::float_bits(ours) == pe::float_bits(theirs));
    EXPECT(pe::to_f16(ours).bits == bits);  // exact round trip
  }
  std::mt19937 rng(1);
  std::uniform_int_distribution<uint32_t> any;
  for (int i = 0; i < 2000000; ++i) {  // random float bit patterns: every exponent range
    const float f = pe::bits_float(any(rng));
    if (std::isnan(f)) continue;
    EXPECT(pe::to_f16(f).bits == half_bits_of(static_cast<_Float16>(f)));
  }
}

static void test_bf16_rounding() {
  for (uint32_t b = 0; b < 65536; ++b) {
    const float f = pe::to_float(pe::bf16{static_cast<uint16_t>(b)});
    if (std::isnan(f)) continue;
    EXPECT(pe::to_bf16(f).bits == b);
  }
  // halfway cases round to even; just above halfway rounds up
  EXPECT(pe::to_bf16(1.0f + std::ldexp(1.0f, -8)).bits == pe::to_bf16(1.0f).bits);
  EXPECT(pe::to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)).bits == pe::to_bf16(1.0f + std::ldexp(1.0f, -6)).bits);
  EXPECT(pe::to_float(pe::to_bf16(1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20))) == 1.0f + std::ldexp(1.0f, -7));
  EXPECT(std::isnan(pe::to_float(pe::to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT(std::isinf(pe::to_float(pe::to_bf16(std::numeric_limits<float>::max()))));
}

static void test_clip() {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  EXPECT(pe::clip_add(2.0f, 1.0f, 0.5f) == 1.5f);
  EXPECT(pe::clip_add(-2.0f, 1.0f, 0.5f) == 0.5f);
  EXPECT(pe::clip_add(0.25f, 1.0f, 0.5f) == 1.25f);
  EXPECT(std::isnan(pe::clip_add(nan, 1.0f, 0.5f)));  // NaN propagates like torch.clamp
  EXPECT(pe::clip_add(inf, 1.0f, 0.5f) == 1.5f);
  EXPECT(pe::clip_add(-inf, 1.0f, inf) == -inf);
  EXPECT(pe::clip_add(3.0f, 1.0f, 0.0f) == 1.0f);
  EXPECT(pe::clip_grad(7.0f, 0.5f, 0.5f) == 7.0f);  // boundary keeps the gradient
  EXPECT(pe::clip_grad(7.0f, 0.6f, 0.5f) == 0.0f);
  EXPECT(pe::clip_grad(7.0f, nan, 0.5f) == 0.0f);
  EXPECT(pe::clip_grad(7.0, -1e300, std::numeric_limits<double>::infinity()) == 7.0);
}

static void test_span_items_cover_once() {
  pe::EditGeometry g{};
  g.samples = 3;
  g.rows = 5;
  g.cols = 37;
  std::vector<int> seen(3 * 5 * 37, 0);
  for (int64_t block : {1, 4, 16, 37, 64}) {
    std::fill(seen.begin(), seen.end(), 0);
    for (int64_t it = 0; it < pe::span_items(g, block); ++it) {
      const pe::SpanItem s = pe::span_item(g, it, block);
      EXPECT(s.len > 0 && s.len <= block);
      for (int64_t c = s.col0; c < s.col0 + s.len; ++c) ++seen[(s.sample * 5 + s.row) * 37 + c];
    }
    for (int v : seen) EXPECT(v == 1);
  }
}

static void test_flatten_dense() {
  pe::EditGeometry g{};
  g.samples = 2;
  g.rows = 4;
  g.cols = 8;
  g.theta = {32, 8, 1};
  g.delta = {32, 8, 1};
  g.out = {32, 8, 1};
  pe::EditGeometry f = pe::flatten_dense(g);
  EXPECT(f.rows == 1 && f.cols == 32);
  g.delta = {32, 16, 1};  // padded rows: must stay 2-D
  f = pe::flatten_dense(g);
  EXPECT(f.rows == 4 && f.cols == 8);
}

int main() {
  test_f16_matches_compiler();
  test_bf16_rounding();
  test_clip();
  test_span_items_cover_once();
  test_flatten_dense();
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::puts("test_edit_math: all checks passed");
  return 0;
}

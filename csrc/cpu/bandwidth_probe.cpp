// Memory-bandwidth probes for the benchmark suite's rooflines, reading (and writing) several
// concurrent streams per thread: one sequential stream per core (what torch's .sum() and copy_ do)
// moves less than several streams per core, so rooflines from the torch ops alone understate what
// the machine can move (the bench prints both at the start of a run).
// read_probe: the largest int32 word of a buffer (exact: the max does not depend on the order).
// copy_probe: dst = src, bytewise.
#include "pyeditor/cpu_isa.h"
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "../ops.h"

namespace pyeditor {
namespace {

constexpr int64_t kPiece = 64;  // words read from one stream before moving to the next (256 B)

// words [begin, end) split into `streams` runs of whole pieces plus a tail
struct Streams {
  int64_t len, tail;
  Streams(int64_t begin, int64_t end, int64_t streams)
      : len((end - begin) / streams / kPiece * kPiece), tail(begin + streams * len) {}
};

int32_t max_tail(const int32_t* w, int64_t begin, int64_t end, int32_t m) {
  for (int64_t i = begin; i < end; ++i) m = std::max(m, w[i]);
  return m;
}

#if defined(__x86_64__) && defined(__GNUC__)
// AVX-512: one piece is four vectors; the plain loop below does not vectorize well (it
// reads far below one stream's bandwidth)
__attribute__((target("avx512f"))) int32_t max_streams_avx512(const int32_t* w, int64_t begin, int64_t end,
                                                                int64_t streams) {
  const Streams st(begin, end, streams);
  __m512i a0 = _mm512_set1_epi32(INT32_MIN), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t off = 0; off < st.len; off += kPiece)
    for (int64_t s = 0; s < streams; ++s) {
      const int32_t* p = w + begin + s * st.len + off;
      a0 = _mm512_max_epi32(a0, _mm512_loadu_si512(p));
      a1 = _mm512_max_epi32(a1, _mm512_loadu_si512(p + 16));
      a2 = _mm512_max_epi32(a2, _mm512_loadu_si512(p + 32));
      a3 = _mm512_max_epi32(a3, _mm512_loadu_si512(p + 48));
    }
  const int32_t m = _mm512_reduce_max_epi32(_mm512_max_epi32(_mm512_max_epi32(a0, a1), _mm512_max_epi32(a2, a3)));
  return max_tail(w, st.tail, end, m);
}
const bool kAvx512 = pe::cpu::isa_allows(pe::cpu::kIsaAvx512) && __builtin_cpu_supports("avx512f");
#else
const bool kAvx512 = false;
#endif

// max over words [begin, end) of w, as `streams` equal runs read a piece of each in turn
int32_t max_streams(const int32_t* w, int64_t begin, int64_t end, int64_t streams) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (kAvx512) return max_streams_avx512(w, begin, end, streams);
#endif
  const Streams st(begin, end, streams);
  int32_t m = INT32_MIN;
  for (int64_t off = 0; off < st.len; off += kPiece)
    for (int64_t s = 0; s < streams; ++s) m = max_tail(w + begin + s * st.len + off, 0, kPiece, m);
  return max_tail(w, st.tail, end, m);
}

// copy words [begin, end) of src to dst as `streams` equal runs, a piece of each in turn
void copy_streams(const int32_t* src, int32_t* dst, int64_t begin, int64_t end, int64_t streams) {
  const Streams st(begin, end, streams);
  for (int64_t off = 0; off < st.len; off += kPiece)
    for (int64_t s = 0; s < streams; ++s) {
      const int64_t at = begin + s * st.len + off;
      std::memcpy(dst + at, src + at, kPiece * sizeof(int32_t));
    }
  std::memcpy(dst + st.tail, src + st.tail, (end - st.tail) * sizeof(int32_t));
}

void check_probe_buffer(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "pyeditor.", op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "pyeditor.", op, ": ", name, " must be contiguous");
  const int64_t nbytes = t.numel() * static_cast<int64_t>(t.element_size());
  TORCH_CHECK(nbytes > 0 && nbytes % 4 == 0, "pyeditor.", op, ": ", name,
              " must hold a positive multiple of 4 bytes, got ", nbytes);
}

void check_streams(int64_t streams, const char* op) {
  TORCH_CHECK(streams >= 1 && streams <= 64, "pyeditor.", op, ": streams must be in [1, 64], got ", streams);
}

// fn(begin, end) over equal word ranges, one per thread
template <class F>
void per_thread(int64_t words, const F& fn) {
  const int64_t threads = at::get_num_threads();
  at::parallel_for(0, threads, 1, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) fn(t, words * t / threads, words * (t + 1) / threads);
  });
}

}  // namespace

at::Tensor read_probe_cpu(const at::Tensor& data, int64_t streams) {
  check_probe_buffer(data, "read_probe", "data");
  check_streams(streams, "read_probe");
  const auto* w = static_cast<const int32_t*>(data.const_data_ptr());
  std::vector<int32_t> partial(at::get_num_threads(), INT32_MIN);
  per_thread(data.numel() * static_cast<int64_t>(data.element_size()) / 4,
             [&](int64_t t, int64_t b, int64_t e) { partial[t] = max_streams(w, b, e, streams); });
  return at::scalar_tensor(*std::max_element(partial.begin(), partial.end()), data.options().dtype(at::kInt));
}

void copy_probe_cpu(const at::Tensor& src, at::Tensor dst, int64_t streams) {
  check_probe_buffer(src, "copy_probe", "src");
  check_probe_buffer(dst, "copy_probe", "dst");
  check_streams(streams, "copy_probe");
  const int64_t nbytes = src.numel() * static_cast<int64_t>(src.element_size());
  TORCH_CHECK(dst.numel() * static_cast<int64_t>(dst.element_size()) == nbytes,
              "pyeditor.copy_probe: dst must hold as many bytes as src (", nbytes, ")");
  const auto* s = static_cast<const int32_t*>(src.const_data_ptr());
  auto* d = static_cast<int32_t*>(dst.mutable_data_ptr());
  TORCH_CHECK(d + nbytes / 4 <= s || s + nbytes / 4 <= d, "pyeditor.copy_probe: src and dst must not overlap");
  per_thread(nbytes / 4, [&](int64_t, int64_t b, int64_t e) { copy_streams(s, d, b, e, streams); });
}

}  // namespace pyeditor

// read_probe: the largest int32 word of a buffer, read as several concurrent streams per thread.
// It exists for the benchmarks' weight-read roofline: on the VMs measured here one sequential
// stream per core (what a plain .sum() does) reached about 20 GB/s while four streams per core
// reached about 27, so a roofline taken from .sum() understated what the machine can read.
// The max of int32 words does not depend on the reading order, so the result is exact.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <climits>
#include <cstdint>

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
// AVX-512: one piece is four vectors; the plain loop below does not vectorize well (measured
// 6 GB/s, a third of one stream's bandwidth)
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
const bool kAvx512 = __builtin_cpu_supports("avx512f");
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

}  // namespace

at::Tensor read_probe_cpu(const at::Tensor& data, int64_t streams) {
  TORCH_CHECK(data.device().is_cpu(), "pyeditor.read_probe: data must be a CPU tensor, got ", data.device());
  TORCH_CHECK(data.is_contiguous(), "pyeditor.read_probe: data must be contiguous");
  const int64_t nbytes = data.numel() * static_cast<int64_t>(data.element_size());
  TORCH_CHECK(nbytes > 0 && nbytes % 4 == 0, "pyeditor.read_probe: data must hold a positive multiple of 4 bytes, got ",
              nbytes);
  TORCH_CHECK(streams >= 1 && streams <= 64, "pyeditor.read_probe: streams must be in [1, 64], got ", streams);
  const auto* w = static_cast<const int32_t*>(data.const_data_ptr());
  const int64_t words = nbytes / 4, threads = at::get_num_threads();
  std::vector<int32_t> partial(threads, INT32_MIN);
  at::parallel_for(0, threads, 1, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t)
      partial[t] = max_streams(w, words * t / threads, words * (t + 1) / threads, streams);
  });
  return at::scalar_tensor(*std::max_element(partial.begin(), partial.end()), data.options().dtype(at::kInt));
}

}  // namespace pyeditor

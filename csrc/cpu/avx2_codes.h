// AVX2 + FMA reads of one packed 16x16 block (pack.h), shared by the per-channel kernels
// (quant_avx2.cpp) and the group-wise one-row kernels (quant_group_avx2.cpp): the fields of a
// block half as u8 lanes, the in-place reads of one float32 row, and the int8 row sums. The
// layout puts channels 0-7 of every 64-byte chunk in its first 32 bytes and channels 8-15 in the
// rest, so a tile is two independent halves of 8 int32 lanes, each lane holding one channel's
// codes of 4 consecutive inputs. Internal to csrc/cpu.
#pragma once
#include <cstdint>
#include <cstring>

#include "pyeditor/cpu_quant.h"
#include "pyeditor/pack.h"
#include "quant_block.h"

#ifdef PE_QUANT_X86
namespace pe::quant::cpu::avx2 {
namespace {

#define PE_AVX2 __attribute__((target("avx2,fma")))

PE_AVX2 inline __m256i ld(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// Field g of the block half at b (channels 8h..8h+7 of a block start at its byte 32h): lane c holds
// the u8 codes of inputs 4g..4g+3 of that channel. Decoded field by field straight from memory
// (L1 after the first touch), so few vectors are live: a block's eight FMA chains and their
// operands fit the 16 registers.
template <int BITS>
PE_AVX2 inline __m256i field(const uint8_t* b, int g) {
  if constexpr (BITS == 8) return ld(b + 64 * g);
  if constexpr (BITS == 2) return _mm256_and_si256(_mm256_srli_epi32(ld(b), 2 * g), _mm256_set1_epi8(0x03));
  const __m256i c = ld(b + 64 * (g >> 1));
  __m256i v = _mm256_and_si256(g & 1 ? _mm256_srli_epi32(c, 4) : c, _mm256_set1_epi8(0x0F));
  if constexpr (BITS == 6) {  // high bits from the 2-bit plane, field g at bits 2g, moved to bits 4-5
    const __m256i hp = ld(b + 128);
    const __m256i hg = g < 2 ? _mm256_slli_epi32(hp, 4 - 2 * g) : _mm256_srli_epi32(hp, 2 * g - 4);
    v = _mm256_or_si256(v, _mm256_and_si256(hg, _mm256_set1_epi8(0x30)));
  }
  return v;
}

// byte t of every lane as 8 floats
template <int T>
PE_AVX2 inline __m256 byte_ps(__m256i v) {
  if constexpr (T == 3) return _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 24));
  const __m256i s = T == 0 ? v : _mm256_srli_epi32(v, 8 * T);
  return _mm256_cvtepi32_ps(_mm256_and_si256(s, _mm256_set1_epi32(0xFF)));
}

// FMA chains per tile half: a block's eight chains, interleaved, cover the FMA latency. One chain
// per half with four tiles walked together (the AVX-512 way) left the out-of-order window too
// few independent chains.
constexpr int kChains = 4;

// The chain of input 4g + t in a tile half: t, or g for 2 and 4 bits, whose in-place reads walk t
// outside (see avx2_in_place_asm.h); every one-row path of a width adds in the same order.
constexpr int chain_of(int bits, int g, int t) { return bits == 2 || bits == 4 ? g : t; }

// acc[c] (half 0) and acc[4 + c] (half 1) += codes x xs for one block, input 4g + t into chain c =
// chain_of(BITS, g, t)
template <int BITS>
PE_AVX2 inline void block_fma(const uint8_t* block, const float* xs, __m256 acc[2 * kChains]) {
  static_assert(kChains == 4, "four chains per half");
  for (int g = 0; g < 4; ++g) {
    const __m256i v0 = field<BITS>(block, g), v1 = field<BITS>(block + 32, g);
    __m256 xb = _mm256_broadcast_ss(xs + 4 * g);
    const int k0 = chain_of(BITS, g, 0), k1 = chain_of(BITS, g, 1), k2 = chain_of(BITS, g, 2), k3 = chain_of(BITS, g, 3);
    acc[k0] = _mm256_fmadd_ps(byte_ps<0>(v0), xb, acc[k0]);
    acc[4 + k0] = _mm256_fmadd_ps(byte_ps<0>(v1), xb, acc[4 + k0]);
    xb = _mm256_broadcast_ss(xs + 4 * g + 1);
    acc[k1] = _mm256_fmadd_ps(byte_ps<1>(v0), xb, acc[k1]);
    acc[4 + k1] = _mm256_fmadd_ps(byte_ps<1>(v1), xb, acc[4 + k1]);
    xb = _mm256_broadcast_ss(xs + 4 * g + 2);
    acc[k2] = _mm256_fmadd_ps(byte_ps<2>(v0), xb, acc[k2]);
    acc[4 + k2] = _mm256_fmadd_ps(byte_ps<2>(v1), xb, acc[4 + k2]);
    xb = _mm256_broadcast_ss(xs + 4 * g + 3);
    acc[k3] = _mm256_fmadd_ps(byte_ps<3>(v0), xb, acc[k3]);
    acc[4 + k3] = _mm256_fmadd_ps(byte_ps<3>(v1), xb, acc[4 + k3]);
  }
}

// ---- One row, codes read in place. The code of input 4g + t sits at bit code_pos of its lane in
// the loaded word; shifted down by read_shift and masked there it is the integer q * 2^p
// (p = in_place_bit). kConvert converts that integer to float (p + width <= 31). kDenormal takes
// its bits as the float32 they already are: below 2^24 (p + width <= 24) an integer m reads as
// m * 2^-149 (a denormal, or past 2^23 the smallest normal binade, whose spacing is the same),
// so exactly q * 2^(p - 149), with no operation at all; AMD's FMA takes denormal inputs at full
// speed (Intel's needs a microcode assist, so Intel converts). Against x scaled per position by
// scale_row (quant_avx2.cpp), the products are the q * x of block_fma times a power of two (1, or
// 2^-(22 + e) for kDenormal, e: x's largest exponent) that keeps every value in the normal
// floats, so the chains add the same values in the same order, bit for bit, and one product by
// the inverse power gives block_fma's sums.
constexpr int code_pos(int bits, int g, int t) {
  return bits == 2 ? 8 * t + 2 * g : bits == 4 ? 8 * t + 4 * (g & 1) : 8 * t;  // 6 bits: in field<6>
}
constexpr int code_width(int bits) { return bits == 6 ? 6 : bits; }
// the top field of a lane (6 bits: a byte of field<6>, whose top bits are 0) needs a shift and no mask
constexpr bool top_field(int bits, int g, int t) { return code_pos(bits, g, t) + (bits == 6 ? 8 : bits) == 32; }
constexpr int read_shift(InPlaceRead read, int bits, int g, int t) {
  return bits == 2 ? 8 * t : bits == 4 ? 16 * (t >> 1)  // as avx2_in_place_asm.h reads them
         : top_field(bits, g, t) ? code_pos(bits, g, t)
         : read == InPlaceRead::kDenormal && code_pos(bits, g, t) + code_width(bits) > 24 ? 16 : 0;
}
constexpr int in_place_bit(InPlaceRead read, int bits, int g, int t) {
  return code_pos(bits, g, t) - read_shift(read, bits, g, t);
}

// masks[p]: W ones from bit p in each of 8 lanes. Read from memory in the loop: hoisted into
// registers (GCC's choice) they pushed the accumulators onto the stack.
struct MaskTable {
  alignas(32) uint32_t m[32][8];
};
template <int W>
constexpr MaskTable make_masks() {
  MaskTable t{};
  for (int p = 0; p + W <= 32; ++p)
    for (int l = 0; l < 8; ++l) t.m[p][l] = ((1u << W) - 1u) << p;
  return t;
}
template <int W>
inline constexpr MaskTable kMasks = make_masks<W>();

// the code of input 4G + T of the block half at h, times 2^in_place_bit, as 8 floats (READ)
template <InPlaceRead READ, int BITS, int G, int T>
PE_AVX2 inline __m256 code_ps(const uint8_t* h, const MaskTable* mt) {
  constexpr int shift = read_shift(READ, BITS, G, T), bit = in_place_bit(READ, BITS, G, T);
  const __m256i w = BITS == 2 ? ld(h) : BITS == 4 ? ld(h + 64 * (G >> 1)) : BITS == 8 ? ld(h + 64 * G) : field<6>(h, G);
  __m256i v = shift ? _mm256_srli_epi32(w, shift) : w;
  if constexpr (!top_field(BITS, G, T))
    v = _mm256_and_si256(v, BITS == 8 ? _mm256_set1_epi32(static_cast<int>(0xFFu << bit))
                                      : _mm256_load_si256(reinterpret_cast<const __m256i*>(mt->m[bit])));
  if constexpr (READ == InPlaceRead::kDenormal) return _mm256_castsi256_ps(v);
  else return _mm256_cvtepi32_ps(v);
}

template <InPlaceRead READ, int BITS, int G, int T>
PE_AVX2 inline void fma_in_place(const uint8_t* block, const float* xs, __m256 acc[2 * kChains], const MaskTable* mt) {
  const __m256 xb = _mm256_broadcast_ss(xs + 4 * G + T);
  acc[T] = _mm256_fmadd_ps(code_ps<READ, BITS, G, T>(block, mt), xb, acc[T]);
  acc[kChains + T] = _mm256_fmadd_ps(code_ps<READ, BITS, G, T>(block + 32, mt), xb, acc[kChains + T]);
}

// acc[t] (half 0) and acc[4 + t] (half 1) += the codes of inputs 4G + t times xs
template <InPlaceRead READ, int BITS, int G>
PE_AVX2 inline void field_fma_in_place(const uint8_t* block, const float* xs, __m256 acc[2 * kChains],
                                       const MaskTable* mt) {
  static_assert(kChains == 4, "one chain per input of a field");
  fma_in_place<READ, BITS, G, 0>(block, xs, acc, mt);
  fma_in_place<READ, BITS, G, 1>(block, xs, acc, mt);
  fma_in_place<READ, BITS, G, 2>(block, xs, acc, mt);
  fma_in_place<READ, BITS, G, 3>(block, xs, acc, mt);
}

// the i-th mask of avx2_in_place_asm.h: 2-bit codes at bit 2i, 4-bit at 4i
PE_AVX2 inline __m256i in_place_mask(int bits, int i) {
  return _mm256_set1_epi32(bits == 2 ? 3 << 2 * i : 15 << 4 * i);
}

// ---- int8 activations. vpmaddubsw multiplies u8 codes by s8 x and adds neighbouring products
// into int16 with saturation; sums of codes <= 63 stay clear of it (4 products of 63 x 128:
// 32256 < 32767), so 2-, 4- and 6-bit codes go in as they are (6 bits: two fields per int16
// sum), 8-bit codes as two nibbles (hi * 16 + lo). vpmaddwd by ones then widens to int32.
//
// R rows, one block half b (8 channels x 16 inputs): acc[r] += its sums. Each field is decoded
// once for all R rows; x is broadcast from memory as it is needed.
template <int BITS, int R>
PE_AVX2 inline void half_rows_i8(const uint8_t* b, const int8_t* x, int64_t ldx, __m256i* acc) {
  const __m256i ones = _mm256_set1_epi16(1), m4 = _mm256_set1_epi8(0x0F);
  __m256i p[R], q[R];  // int16 sums: 8 bits low nibbles / high nibbles, 6 bits fields 0-1 / 2-3
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) p[r] = q[r] = _mm256_setzero_si256();
  for (int g = 0; g < 4; ++g) {
    const __m256i v = field<BITS>(b, g);
    const __m256i lo = BITS == 8 ? _mm256_and_si256(v, m4) : v;
    const __m256i hi = BITS == 8 ? _mm256_and_si256(_mm256_srli_epi16(v, 4), m4) : v;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      int32_t x4;
      std::memcpy(&x4, x + r * ldx + 4 * g, 4);
      const __m256i xr = _mm256_set1_epi32(x4);
      if (BITS == 8) {
        p[r] = _mm256_add_epi16(p[r], _mm256_maddubs_epi16(lo, xr));
        q[r] = _mm256_add_epi16(q[r], _mm256_maddubs_epi16(hi, xr));
      } else if (BITS == 6 && g >= 2) {
        q[r] = _mm256_add_epi16(q[r], _mm256_maddubs_epi16(v, xr));
      } else {
        p[r] = _mm256_add_epi16(p[r], _mm256_maddubs_epi16(v, xr));
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    __m256i s = _mm256_madd_epi16(p[r], ones);
    if (BITS == 8) s = _mm256_add_epi32(s, _mm256_slli_epi32(_mm256_madd_epi16(q[r], ones), 4));
    if (BITS == 6) s = _mm256_add_epi32(s, _mm256_madd_epi16(q[r], ones));
    acc[r] = _mm256_add_epi32(acc[r], s);
  }
}

}  // namespace
}  // namespace pe::quant::cpu::avx2
#endif

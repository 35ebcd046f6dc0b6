// One block of 2- or 4-bit codes (16 channels x 16 inputs, pack.h) read in place for one float32
// row, as fixed AVX2 instruction sequences. Written as assembly because GCC, given the same
// sequence as intrinsics, hoisted the loads and broadcasts and moved accumulators onto the
// stack, where every FMA of a chain waited on a store and a reload (Zen 3, one thread,
// L1-resident, ns per block: 2-bit 8.5 as intrinsics against 6.8-7.0 here, 4-bit 10.4 against 6.8).
//
// Chain g of each tile half takes the inputs 4g + t (block_fma does the same for these widths):
// walking t outside and g inside then feeds the eight chains in turn while only the 4 masks,
// 2 shifted code words, the masked code and the broadcast x are live beside them, 16 registers
// in all. Code (g, t) is masked where it sits after the block half's word is shifted right by
// read_shift (8t for 2 bits, 16 (t / 2) for 4 bits), at in_place_bit = 2g (2 bits) or
// 8 (t % 2) + 4 (g % 2) (4 bits): masks[i] = the width's ones shifted to the i-th of those four
// positions. kConvert adds one vcvtdq2ps per code; kDenormal takes the masked bits as they are
// (see code_ps in quant_avx2.cpp).
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace pe::quant::cpu::avx2 {

// ymm12/13: the words of the two tile halves; ymm14: a masked code; ymm15: x broadcast.
#define PE_IP_LOAD(OFF, R) "vmovdqu " #OFF "(%[blk]), %%ymm" #R "\n\t"
#define PE_IP_SHIFT(N) "vpsrld $" #N ", %%ymm12, %%ymm12\n\t" "vpsrld $" #N ", %%ymm13, %%ymm13\n\t"
#define PE_IP_CVT "vcvtdq2ps %%ymm14, %%ymm14\n\t"
// code at mask M, inputs x[XOFF / 4], into chain G of both halves
#define PE_IP_CODE(XOFF, M, G, CVT)                                                             \
  "vbroadcastss " #XOFF "(%[xs]), %%ymm15\n\t"                                                 \
  "vpand %[m" #M "], %%ymm12, %%ymm14\n\t" CVT "vfmadd231ps %%ymm15, %%ymm14, %[a" #G "]\n\t"  \
  "vpand %[m" #M "], %%ymm13, %%ymm14\n\t" CVT "vfmadd231ps %%ymm15, %%ymm14, %[h" #G "]\n\t"

// 2 bits: code (g, t) at bit 8t + 2g of a lane; x offset 4 (4g + t) bytes
#define PE_IP_T2(T4, CVT) \
  PE_IP_CODE(T4, 0, 0, CVT) PE_IP_CODE(16 + T4, 1, 1, CVT) PE_IP_CODE(32 + T4, 2, 2, CVT) PE_IP_CODE(48 + T4, 3, 3, CVT)
#define PE_IP_BLOCK2(CVT)                                                                     \
  PE_IP_LOAD(0, 12) PE_IP_LOAD(32, 13) PE_IP_T2(0, CVT)                                       \
  PE_IP_LOAD(0, 12) PE_IP_LOAD(32, 13) PE_IP_SHIFT(8) PE_IP_T2(4, CVT)                        \
  PE_IP_LOAD(0, 12) PE_IP_LOAD(32, 13) PE_IP_SHIFT(16) PE_IP_T2(8, CVT)                       \
  PE_IP_LOAD(0, 12) PE_IP_LOAD(32, 13) PE_IP_SHIFT(24) PE_IP_T2(12, CVT)

// 4 bits: word W (inputs 0-7 or 8-15, at byte 64W of the block) holds code (g, t), g = 2W + (0|1),
// at bit 8t + 4 (g % 2); shifted by 16 for t >= 2. Per word, t = 2P, 2P + 1 (T4 = 8P) and its g0, g1.
#define PE_IP_W4(T4, G0, G1, CVT)                                                                   \
  PE_IP_CODE(16 * G0 + T4, 0, G0, CVT) PE_IP_CODE(16 * G1 + T4, 1, G1, CVT)                         \
  PE_IP_CODE(16 * G0 + T4 + 4, 2, G0, CVT) PE_IP_CODE(16 * G1 + T4 + 4, 3, G1, CVT)
#define PE_IP_BLOCK4(CVT)                                                         \
  PE_IP_LOAD(0, 12) PE_IP_LOAD(32, 13) PE_IP_W4(0, 0, 1, CVT)                        \
  PE_IP_LOAD(64, 12) PE_IP_LOAD(96, 13) PE_IP_W4(0, 2, 3, CVT)                       \
  PE_IP_LOAD(0, 12) PE_IP_LOAD(32, 13) PE_IP_SHIFT(16) PE_IP_W4(8, 0, 1, CVT)        \
  PE_IP_LOAD(64, 12) PE_IP_LOAD(96, 13) PE_IP_SHIFT(16) PE_IP_W4(8, 2, 3, CVT)

#define PE_IP_OPERANDS                                                                               \
  : [a0] "+x"(acc[0]), [a1] "+x"(acc[1]), [a2] "+x"(acc[2]), [a3] "+x"(acc[3]), [h0] "+x"(acc[4]), \
    [h1] "+x"(acc[5]), [h2] "+x"(acc[6]), [h3] "+x"(acc[7])                                         \
  : [m0] "x"(masks[0]), [m1] "x"(masks[1]), [m2] "x"(masks[2]), [m3] "x"(masks[3]), [blk] "r"(blk), \
    [xs] "r"(xs)                                                                                    \
  : "xmm12", "xmm13", "xmm14", "xmm15", "memory"

// acc[g] (channels 0-7) and acc[4 + g] (8-15) += the block's codes (g, t) x xs[4g + t], t = 0..3
template <int BITS, bool CONVERT>
__attribute__((target("avx2,fma"))) inline void block_in_place_asm(const uint8_t* blk, const float* xs,
                                                                    __m256 acc[8], const __m256i masks[4]) {
  static_assert(BITS == 2 || BITS == 4, "2- and 4-bit blocks only");
  if constexpr (BITS == 2 && CONVERT) asm(PE_IP_BLOCK2(PE_IP_CVT) PE_IP_OPERANDS);
  else if constexpr (BITS == 2) asm(PE_IP_BLOCK2("") PE_IP_OPERANDS);
  else if constexpr (CONVERT) asm(PE_IP_BLOCK4(PE_IP_CVT) PE_IP_OPERANDS);
  else asm(PE_IP_BLOCK4("") PE_IP_OPERANDS);
}

#undef PE_IP_LOAD
#undef PE_IP_SHIFT
#undef PE_IP_CVT
#undef PE_IP_CODE
#undef PE_IP_T2
#undef PE_IP_BLOCK2
#undef PE_IP_W4
#undef PE_IP_BLOCK4
#undef PE_IP_OPERANDS

}  // namespace pe::quant::cpu::avx2

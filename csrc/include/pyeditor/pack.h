// The packed layout of channel-wise 2/4/6/8-bit weights, shared by the CPU and CUDA kernels.
// Python and Triton read the same rule from pyeditor/quant_format.py; tests/quant/test_quant_format.py
// parses this header's constants and formulas and cross-checks them (ctest checks put/get agree).
//
// Output channels are grouped by width into buckets; a bucket is a run of tiles of
// kTileN = 16 channels (one AVX-512 vector of int32/fp32 lanes). Along K a tile is a run of
// blocks of kTileK = 16 inputs; a block of a width-w plane is w/2 chunks of 64 bytes, and
// byte c*4 + t of chunk j holds, at bit shift f*w, the code of channel c for input
// k = 4*g + t with g = j*(8/w) + f. So one 64-byte load feeds 16 channels x 4 inputs per
// field: exactly the operand of one vpdpbusd, and every field is one shift and one mask.
// 6 bits = a 4-bit plane (low bits, 128 bytes) followed by a 2-bit plane (high bits, 64 bytes):
// no value straddles a byte.
#pragma once
#include <cstdint>

#include "macros.h"

namespace pe::quant {

constexpr int kTileN = 16;  // channels per tile
constexpr int kTileK = 16;  // inputs per block

// The permutation (original channel of each packed row, -1 for padding) is int16 when there are
// fewer than 2^15 output channels (2 bytes of metadata per channel fewer: 9 -> 7 per channel,
// which keeps a 2-bit layer with 1536 inputs under 2% metadata), else int32. One view reads both.
constexpr int64_t kPermInt16Channels = 32767;  // out_features up to this: int16 entries
struct PermView {
  const int16_t* p16 = nullptr;
  const int32_t* p32 = nullptr;
  PE_HD int32_t operator[](int64_t row) const { return p16 ? int32_t(p16[row]) : p32[row]; }
};

PE_HD bool valid_bits(int64_t bits) { return bits == 2 || bits == 4 || bits == 6 || bits == 8; }

// Group-wise scales: input i of a channel uses scale/zero entry i / group_size (a multiple of
// kTileK, so a block never straddles two groups; the last group may be ragged). 0: one scale
// and zero point per channel.
PE_HD bool valid_group_size(int64_t g) { return g == 0 || g == 32 || g == 64 || g == 128; }
PE_HD int64_t scale_groups(int64_t k, int64_t group_size) {
  return group_size > 0 ? (k + group_size - 1) / group_size : 1;
}

// Bytes of one 16 x 16 block at `bits` bits.
PE_HD int64_t block_bytes(int64_t bits) { return bits * 32; }

// K rounded up to whole blocks.
PE_HD int64_t padded_k(int64_t k) { return (k + kTileK - 1) / kTileK * kTileK; }

// Bytes of one tile (16 channels x padded K).
PE_HD int64_t tile_bytes(int64_t bits, int64_t k) { return padded_k(k) / kTileK * block_bytes(bits); }

// Byte index inside a plane block and the bit shift of channel c, input kk (< 16), width w.
PE_HD int field_byte(int w, int c, int kk) {
  const int g = kk >> 2, t = kk & 3, per = 8 / w;
  return (g / per) * 64 + c * 4 + t;
}
PE_HD int field_shift(int w, int kk) { return ((kk >> 2) % (8 / w)) * w; }

PE_HD unsigned get_field(const uint8_t* block, int w, int c, int kk) {
  return (static_cast<unsigned>(block[field_byte(w, c, kk)]) >> field_shift(w, kk)) & ((1u << w) - 1u);
}

// The code of channel c (< 16) at input kk (< 16) of a block of width `bits`.
PE_HD unsigned get_code(const uint8_t* block, int bits, int c, int kk) {
  if (bits == 6) return get_field(block, 4, c, kk) | (get_field(block + 128, 2, c, kk) << 4);
  return get_field(block, bits, c, kk);
}

// Writes a code into a zero-initialised block (the inverse of get_code).
PE_HD void put_code(uint8_t* block, int bits, int c, int kk, unsigned code) {
  if (bits == 6) {
    block[field_byte(4, c, kk)] |= static_cast<uint8_t>((code & 15u) << field_shift(4, kk));
    block[128 + field_byte(2, c, kk)] |= static_cast<uint8_t>((code >> 4) << field_shift(2, kk));
    return;
  }
  block[field_byte(bits, c, kk)] |= static_cast<uint8_t>(code << field_shift(bits, kk));
}

// One bucket of same-width channels: packed rows [row_start, row_start + rows) of the
// weight (rows a multiple of kTileN) whose bytes start at byte_offset of the data buffer.
struct Bucket {
  int64_t bits, row_start, rows, byte_offset;
};

// The dequantized value of a code: (q - zero) * scale, one float multiply (exactly like
// pyeditor.reference.dequantize).
PE_HD float dequant(unsigned q, uint8_t zero, float scale) {
  return (static_cast<float>(q) - static_cast<float>(zero)) * scale;
}

}  // namespace pe::quant

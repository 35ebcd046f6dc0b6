// The packed weight as a list of 16-channel tiles (pack.h layout), for the CPU wrappers of the
// packed ops (quant_linear_cpu.cpp, quant_group_cpu.cpp). Internal to csrc/cpu.
#pragma once
#include <cstdint>
#include <vector>

#include "../quant_args.h"
#include "pyeditor/pack.h"

namespace pyeditor {

struct QuantTile {
  int bits;
  const uint8_t* ptr;
  int64_t row;  // first packed row
};

inline std::vector<QuantTile> quant_tiles(const PackedArgs& a, const uint8_t* data) {
  namespace q = pe::quant;
  std::vector<QuantTile> tiles;
  tiles.reserve(a.rows / q::kTileN);
  for (const auto& b : a.buckets)
    for (int64_t t = 0; t < b.rows / q::kTileN; ++t)
      tiles.push_back({static_cast<int>(b.bits), data + b.byte_offset + t * q::tile_bytes(b.bits, a.k),
                       b.row_start + t * q::kTileN});
  return tiles;
}

}  // namespace pyeditor

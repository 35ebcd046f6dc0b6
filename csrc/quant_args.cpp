#include "quant_args.h"

#include <cstring>

namespace pyeditor {

PackedArgs check_packed(const at::Tensor& data, const at::Tensor& scale, const at::Tensor& zero,
                        const at::Tensor& perm, at::IntArrayRef buckets, int64_t in_features,
                        int64_t out_features, int64_t group_size) {
  namespace q = pe::quant;
  TORCH_CHECK(data.scalar_type() == at::kByte && data.dim() == 1 && data.is_contiguous(),
              "pyeditor: packed data must be a contiguous 1-D uint8 tensor, got ", data.scalar_type(), " ",
              data.sizes());
  TORCH_CHECK(in_features >= 0 && out_features >= 0, "pyeditor: in_features and out_features must be >= 0");
  TORCH_CHECK(q::valid_group_size(group_size), "pyeditor: group_size must be 0 (per channel), 32, 64 or 128, got ",
              group_size);
  // rows and byte counts are summed in int64: bound every term so no sum can wrap
  TORCH_CHECK(in_features <= (int64_t(1) << 40) && out_features <= (int64_t(1) << 40),
              "pyeditor: in_features and out_features must be at most 2^40");
  TORCH_CHECK(buckets.size() % 4 == 0, "pyeditor: buckets must hold (bits, row_start, rows, byte_offset) "
              "quadruples, got ", buckets.size(), " values");
  PackedArgs a;
  a.k = in_features;
  a.n = out_features;
  a.group_size = group_size;
  a.groups = q::scale_groups(in_features, group_size);
  int64_t bytes = 0;
  for (size_t i = 0; i < buckets.size(); i += 4) {
    q::Bucket b{buckets[i], buckets[i + 1], buckets[i + 2], buckets[i + 3]};
    TORCH_CHECK(q::valid_bits(b.bits), "pyeditor: bucket bits must be 2, 4, 6 or 8, got ", b.bits);
    TORCH_CHECK(b.rows >= 0 && b.rows % q::kTileN == 0 && b.rows <= (int64_t(1) << 40),
                "pyeditor: bucket rows must be a multiple of ", q::kTileN, " (at most 2^40), got ", b.rows);
    TORCH_CHECK(b.row_start == a.rows && b.byte_offset == bytes,
                "pyeditor: buckets must be contiguous and in order (bucket ", i / 4, ")");
    const int64_t tile = q::tile_bytes(b.bits, in_features);  // <= 2^44: no wrap
    TORCH_CHECK(tile == 0 || b.rows / q::kTileN <= (data.numel() - bytes) / tile, "pyeditor: packed data holds ",
                data.numel(), " bytes, fewer than the buckets need (bucket ", i / 4, ")");
    a.rows += b.rows;
    bytes += b.rows / q::kTileN * tile;
    a.buckets.push_back(b);
  }
  TORCH_CHECK(bytes == data.numel(), "pyeditor: packed data holds ", data.numel(), " bytes, the buckets need ",
              bytes);
  TORCH_CHECK(a.rows >= out_features, "pyeditor: ", a.rows, " packed rows cannot hold ", out_features, " channels");
  const auto perm_type = out_features <= q::kPermInt16Channels ? at::kShort : at::kInt;
  for (auto [t, name, type] : {std::tuple{&scale, "scale", at::kFloat}, {&zero, "zero", at::kByte},
                               {&perm, "perm", perm_type}}) {
    const bool grouped = group_size > 0 && t != &perm;
    const bool shape_ok = grouped ? (t->dim() == 2 && t->size(0) == a.groups && t->size(1) == a.rows)
                                  : (t->dim() == 1 && t->size(0) == a.rows);
    TORCH_CHECK(t->scalar_type() == type && shape_ok && t->is_contiguous(), "pyeditor: packed ", name,
                " must be a contiguous ", grouped ? "[" + std::to_string(a.groups) + ", " : std::string("["), a.rows,
                "] ", type, " tensor (group_size ", group_size, "), got ", t->scalar_type(), " ", t->sizes());
    TORCH_CHECK(t->device() == data.device(), "pyeditor: packed ", name, " is on ", t->device(),
                " but data is on ", data.device());
  }
  return a;
}

pe::quant::PermView perm_view(const at::Tensor& perm) {
  pe::quant::PermView v;
  if (perm.scalar_type() == at::kShort) v.p16 = perm.const_data_ptr<int16_t>();
  else v.p32 = perm.const_data_ptr<int32_t>();
  return v;
}

namespace {
// True when p[0, rows) holds every value of [0, n) once and -1 elsewhere. Each entry only
// stores a flag at slot p + 1 (slot 0: padding, slot n + 1: out of range) and a second pass
// counts them: no test-and-set chain through memory (bench: the packed_linear M=1 rows).
// rows - pads == n entries covering n slots is a bijection.
template <class P>
bool is_permutation(const P* p, int64_t rows, int64_t n) {
  std::vector<uint8_t> seen((static_cast<size_t>(n) + 2 + 7) / 8 * 8, 0);
  const uint64_t cap = static_cast<uint64_t>(n) + 1;
  int64_t pads = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const uint64_t u = static_cast<uint64_t>(static_cast<int64_t>(p[i]) + 1);
    pads += u == 0;
    seen[u < cap ? u : cap] = 1;
  }
  if (seen[n + 1] || rows - pads != n) return false;
  uint64_t covered = 0;  // bytes are 0 or 1: eight at a time, summed by one multiply
  int64_t i = 1;
  for (; i + 8 <= n + 1; i += 8) {
    uint64_t w;
    std::memcpy(&w, seen.data() + i, 8);
    covered += (w * 0x0101010101010101ull) >> 56;
  }
  for (; i <= n; ++i) covered += seen[i];
  return covered == static_cast<uint64_t>(n);
}
}  // namespace

void check_perm_values(const at::Tensor& perm_cpu, int64_t n) {
  const bool ok = perm_cpu.scalar_type() == at::kShort
                      ? is_permutation(perm_cpu.const_data_ptr<int16_t>(), perm_cpu.numel(), n)
                      : is_permutation(perm_cpu.const_data_ptr<int32_t>(), perm_cpu.numel(), n);
  if (ok) return;
  // the first offending entry, for the message
  const pe::quant::PermView p = perm_view(perm_cpu);
  std::vector<uint8_t> seen(static_cast<size_t>(n), 0);
  int64_t hits = 0;
  for (int64_t i = 0; i < perm_cpu.numel(); ++i) {
    if (p[i] == -1) continue;
    TORCH_CHECK(p[i] >= 0 && p[i] < n && !seen[p[i]], "pyeditor: packed perm is not a permutation of [0, ", n,
                ") (entry ", i, " = ", p[i], ")");
    seen[p[i]] = 1;
    ++hits;
  }
  TORCH_CHECK(hits == n, "pyeditor: packed perm covers ", hits, " of ", n, " channels");
  TORCH_CHECK(false, "pyeditor: packed perm is not a permutation of [0, ", n, ")");  // unreachable
}

void check_linear_inputs(const PackedArgs& args, const at::Tensor& x, const c10::optional<at::Tensor>& bias,
                         const at::Tensor& data) {
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "pyeditor: x must be float32, float64, float16 or bfloat16, got ", t);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == args.k, "pyeditor: x has ", x.dim() ? x.size(-1) : 0,
              " input features but the packed weight has ", args.k);
  TORCH_CHECK(x.device() == data.device(), "pyeditor: x is on ", x.device(), " but the packed weight is on ",
              data.device());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(at::isFloatingType(bias->scalar_type()) && bias->dim() == 1 && bias->size(0) == args.n,
                "pyeditor: bias must be a floating [", args.n, "] tensor, got ", bias->scalar_type(), " ",
                bias->sizes());
    TORCH_CHECK(bias->device() == x.device(), "pyeditor: bias is on ", bias->device(), " but x is on ", x.device());
  }
}

at::Tensor mode_activations(const at::Tensor& x, bool fast, bool bf16) {
  TORCH_CHECK(!(fast && bf16), "pyeditor: fast (int8 activations) and bf16 (bfloat16 activations) exclude each "
              "other: pass at most one");
  if (!bf16 || x.scalar_type() == at::kBFloat16) return x;
  const auto held = x.scalar_type() == at::kHalf ? at::kFloat : x.scalar_type();
  return x.to(at::kBFloat16).to(held);
}

std::vector<int64_t> linear_out_shape(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return shape;
}

}  // namespace pyeditor

// Framework-free checks of hyper_math.h: the edited weight element, the clipped square and the
// counting-sort segments every backend's gathered matmul relies on.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <vector>

#include "pyeditor/hyper_math.h"

static int failures = 0;
#define CHECK(...)                                                   \
  do {                                                                \
    if (!(__VA_ARGS__)) {                                                  \
      std::printf("FAILED %s:%d: %s\n", __FILE__, __LINE__, #__VA_ARGS__);   \
      ++failures;                                                     \
    }                                                                 \
  } while (0)

int main() {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  // K = clip(delta) + theta, NaN propagates, inf clipped
  const float d[4] = {0.2f, 3.0f, -inf, nan}, th[4] = {1.0f, 1.0f, 1.0f, 1.0f};
  CHECK(pe::edited_weight<float, float>(d + 0, th, 0.5f) == 1.2f);
  CHECK(pe::edited_weight<float, float>(d + 1, th, 0.5f) == 1.5f);
  CHECK(pe::edited_weight<float, float>(d + 2, th, 0.5f) == 0.5f);
  CHECK(std::isnan(pe::edited_weight<float, float>(d + 3, th, 0.5f)));
  pe::bf16 hb = pe::to_bf16(2.0f), tb = pe::to_bf16(-1.0f);
  CHECK(pe::edited_weight<pe::bf16, float>(&hb, &tb, 0.25f) == -0.75f);
  // clipped squares in double
  CHECK(pe::clipped_square<float>(3.0f, true, 0.5f) == 0.25);
  CHECK(pe::clipped_square<float>(3.0f, false, 0.5f) == 9.0);
  CHECK(std::isnan(pe::clipped_square<float>(nan, true, 0.5f)));
  CHECK(std::isinf(pe::clipped_square<float>(inf, false, 0.5f)));
  CHECK(std::isnan(pe::clipped_square<float>(inf, true, 0.5f)));   // overflow is not hidden by T
  CHECK(std::isnan(pe::clipped_square<float>(-inf, true, 0.5f)));
  // stable counting segments, including an empty group
  const int64_t index[7] = {2, 0, 2, 3, 0, 2, 3};
  std::vector<int64_t> offsets(5), rows(7);
  pe::counting_segments(index, 7, 4, offsets.data(), rows.data());
  const int64_t want_off[5] = {0, 2, 2, 5, 7}, want_rows[7] = {1, 4, 0, 2, 5, 3, 6};
  for (int i = 0; i < 5; ++i) CHECK(offsets[i] == want_off[i]);
  for (int i = 0; i < 7; ++i) CHECK(rows[i] == want_rows[i]);
  pe::counting_segments(index, 0, 4, offsets.data(), rows.data());
  for (int i = 0; i < 5; ++i) CHECK(offsets[i] == 0);
  CHECK(pe::sample_slot(nullptr, true, 5) == 5 && pe::sample_slot(nullptr, false, 5) == 0 &&
        pe::sample_slot(index, false, 3) == 3);
  // head tiles: heads of 5, 0 and 3 columns in tiles of 4 -> (0,0,4) (0,4,5) (2,5,8)
  const int64_t heads[4] = {0, 5, 5, 8};
  CHECK(pe::head_tiles(heads, 3, 4, nullptr) == 3);
  std::vector<int64_t> table(9);
  pe::head_tiles(heads, 3, 4, table.data());
  const int64_t want_table[9] = {0, 0, 4, 0, 4, 5, 2, 5, 8};
  for (int i = 0; i < 9; ++i) CHECK(table[i] == want_table[i]);
  if (failures == 0) std::printf("hyper_math: all checks passed\n");
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

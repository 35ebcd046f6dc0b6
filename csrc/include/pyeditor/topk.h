// A small fixed-capacity top-k ("smallest keys first") with a deterministic tie-break: equal
// keys are ordered by index, lowest first, whatever order the candidates arrive in. Shared by
// the CPU and CUDA search kernels (framework-free, __host__ __device__).
#pragma once
#include <cstdint>

#include "macros.h"

namespace pe::search {

// (key, index) lexicographic order: the order every backend ranks candidates in.
template <class K> PE_HD bool before(K a, int64_t ia, K b, int64_t ib) { return a < b || (a == b && ia < ib); }

template <class K, int CAP> struct TopK {
  K key[CAP];
  int64_t idx[CAP];
  int n = 0;      // entries held
  int limit = 1;  // entries wanted (<= CAP)

  PE_HD void reset(int want) {
    n = 0;
    limit = want < CAP ? want : CAP;
  }
  PE_HD bool full() const { return n >= limit; }
  // The key a candidate must beat to enter (only meaningful when full()).
  PE_HD K worst() const { return key[n - 1]; }

  // Inserts (k, i) unless the list is full of better entries. NaN keys never enter.
  PE_HD void push(K k, int64_t i) {
    if (!(k == k)) return;
    if (full() && !before(k, i, key[n - 1], idx[n - 1])) return;
    int pos = full() ? n - 1 : n++;
    while (pos > 0 && before(k, i, key[pos - 1], idx[pos - 1])) {
      key[pos] = key[pos - 1];
      idx[pos] = idx[pos - 1];
      --pos;
    }
    key[pos] = k;
    idx[pos] = i;
  }
};

}  // namespace pe::search

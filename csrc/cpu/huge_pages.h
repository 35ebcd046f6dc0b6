// A fresh multi-megabyte result (an edit K, a batch's generated edits G) comes from freshly
// mapped memory on every call, and faulting it in 4 KiB pages costs about as much as the kernel
// writing it; asking for transparent huge pages on its 2 MiB-aligned interior before the first
// write cuts the fault count 512-fold (a no-op where THP is off or outside Linux).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#ifdef __linux__
#include <sys/mman.h>
#endif

namespace pyeditor::cpu {

inline void advise_huge_pages(const at::Tensor& t) {
#ifdef MADV_HUGEPAGE
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = end & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

}  // namespace pyeditor::cpu

// Dynamic work claiming for the CPU kernels' parallel loops. Internal to csrc/cpu.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace pyeditor {

// fn(i, i + 1) for every i < items, each of at most `threads` threads claiming the next item
// when it is done: where the hypervisor takes a vCPU away for a while (a shared host), a static
// split would leave the whole call waiting for the slowed thread's fixed share. Costs an atomic
// per item.
template <class F>
void parallel_claim(int64_t items, int threads, const F& fn) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(items, std::max(threads, 1)), 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < items; i = next.fetch_add(1)) fn(i, i + 1);
  });
}

}  // namespace pyeditor

// Pieces the CPU kernels of the Persona serving ops share (hyper_cpu.cpp: forwards,
// hyper_grad_cpu.cpp: the segmented weight gradient).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "../hyper_args.h"
#include "pyeditor/hyper_math.h"

namespace pyeditor::cpu {

template <class S> const S* cptr(const at::Tensor& t) { return reinterpret_cast<const S*>(t.const_data_ptr()); }
template <class S> S* mptr(at::Tensor& t) { return reinterpret_cast<S*>(t.mutable_data_ptr()); }

// Groups of rows sharing one generator: all rows for every p (all-prototype form), or the
// rows whose index is p (gathered form, counting-sorted: no per-sample weight copy).
struct Groups {
  std::vector<int64_t> offsets, rows;  // empty rows: identity (every group holds all B rows)
  int64_t batch = 0;
  int64_t size(int64_t p) const { return rows.empty() ? batch : offsets[p + 1] - offsets[p]; }
  int64_t row(int64_t p, int64_t i) const { return rows.empty() ? i : rows[offsets[p] + i]; }
};

inline Groups make_groups(const HyperArgs& g) {
  Groups gr;
  gr.batch = g.batch;
  if (g.index.defined()) {
    gr.offsets.resize(g.protos + 1);
    gr.rows.resize(g.batch);
    pe::counting_segments(g.index.const_data_ptr<int64_t>(), g.batch, g.protos, gr.offsets.data(), gr.rows.data());
  }
  return gr;
}

// Per-thread scratch, taken by the calling thread from the c10 CPU allocator before the parallel
// loop, as one tensor: the allocation is visible to torch.profiler's memory events (the
// peak-memory tests measure it) and nothing is allocated inside the loop.
template <class A> class Scratch {
 public:
  explicit Scratch(int64_t per_thread)
      : per_(per_thread),
        buf_(at::empty({at::get_num_threads() * per_thread}, at::TensorOptions().dtype(c10::CppTypeToScalarType<A>()))) {}
  A* get() const { return buf_.data_ptr<A>() + at::get_thread_num() * per_; }

 private:
  int64_t per_;
  at::Tensor buf_;
};

}  // namespace pyeditor::cpu

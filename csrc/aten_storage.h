// ATen scalar types -> the framework-free storage types of csrc/include (same bit layout),
// shared by every CPU and CUDA wrapper that hands ATen data to the pe:: math.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "pyeditor/numeric.h"

namespace pyeditor {

template <class T> struct storage_of { using type = T; };
template <> struct storage_of<c10::BFloat16> { using type = pe::bf16; };
template <> struct storage_of<c10::Half> { using type = pe::f16; };

}  // namespace pyeditor

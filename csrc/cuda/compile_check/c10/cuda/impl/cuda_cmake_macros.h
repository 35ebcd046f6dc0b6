// Stand-in for the header that CUDA builds of torch generate and CPU-only wheels omit.
// Only the nvcc compile check (CMake / tests) puts this folder on the include path, so the
// .cu files can be compiled on a machine whose torch has no CUDA; real CUDA builds use torch's own.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS

// Portability macros shared by the CPU and CUDA builds. Framework-free: no torch headers.
#pragma once

#if defined(__CUDACC__)
#define PE_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// always_inline lets the per-level variants in cpu/ inline the shared loops at their own ISA level.
#define PE_HD inline __attribute__((always_inline))
#else
#define PE_HD inline
#endif

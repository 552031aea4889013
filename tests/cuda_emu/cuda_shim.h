// Host stand-ins for the CUDA built-ins that csrc/cuda/apply_seeds_kernel.cuh uses, so that the
// kernel's own source compiles as C++ for the CPU (tests/test_cuda_emulated.py). Arithmetic keeps
// the GPU's semantics where the kernel relies on them: __fadd_rn / __fmul_rn round once to nearest
// even (built with -ffp-contract=off, no FMA), the 128-bit accesses abort when misaligned (a GPU
// faults), half conversions round to nearest even (F16C). NaN payloads may differ from a GPU's;
// the kernel writes NaN bits explicitly, so that does not reach the results.
#pragma once

#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>

#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct uint4 {
  unsigned int x, y, z, w;
};
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return uint4{a, b, c, d}; }

struct EmuDim {
  unsigned x = 0, y = 0, z = 0;
};
extern EmuDim threadIdx, blockIdx;
void __syncthreads();  // the emulator's CTA barrier (tests/cuda_emu/emu.cpp)

inline float __fadd_rn(float a, float b) {
  volatile float r = a + b;
  return r;
}
inline float __fmul_rn(float a, float b) {
  volatile float r = a * b;
  return r;
}
inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
template <class T>
inline T __ldg(const T* p) {
  return *p;
}
extern long long emu_vector_accesses;  // 128-bit loads and stores executed (tests read it)
inline void emu_check_aligned(const void* p) {
  ++emu_vector_accesses;
  if (reinterpret_cast<uintptr_t>(p) & 15u) {
    fprintf(stderr, "cuda_emu: misaligned 128-bit access at %p\n", p);
    abort();
  }
}
inline uint4 __ldcs(const uint4* p) {
  emu_check_aligned(p);
  uint4 v;
  memcpy(&v, p, 16);
  return v;
}
inline void __stcs(uint4* p, uint4 v) {
  emu_check_aligned(p);
  memcpy(p, &v, 16);
}

struct __half {
  unsigned short x;
};
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline float __half2float(__half h) { return _cvtsh_ss(h.x); }
inline __half __float2half_rn(float f) {
  return __half{(unsigned short)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT)};
}

using std::min;

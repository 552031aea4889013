// Device code of the CUDA backend of zo_kernels::apply_seeds_ (the multi-tensor kernel); the design
// is described in apply_seeds_cuda.cu, which includes this file and launches the kernel.
//
// Kept in a header of its own so that tests/cuda_emu can compile the very same source for the host
// (with a few CUDA intrinsics emulated and the 256 threads of a CTA run as coroutines) and check it
// bit for bit on machines without a GPU. Only CUDA built-ins listed in tests/cuda_emu/cuda_shim.h
// may be used here.
#pragma once

#include <stdint.h>

#include "../philox.h"

namespace zo_cuda {


constexpr int kThreads = 256;
constexpr int kTileBlocks = 32;                         // noise blocks per CTA tile
constexpr int kTileElems = kTileBlocks * zo::kBlock;    // 4096
constexpr int kPerThread = kTileElems / kThreads;       // 16 elements per thread
constexpr int kSeedChunk = 32;                          // seeds per shared-memory round
constexpr int kGroup = 4;                               // SUM_GROUP
constexpr int kGroupsPerChunk = kSeedChunk / kGroup;    // 8

__device__ __forceinline__ uint32_t f2u(float f) { return __float_as_uint(f); }
__device__ __forceinline__ float u2f(uint32_t u) { return __uint_as_float(u); }

// Element storage: float (code 0) or 16-bit patterns (bf16 code 1, fp16 code 2) handled as raw bits,
// so NaN signs survive and the rounding is explicit.
template <int kCode>
struct Elem;
template <>
struct Elem<0> {
  using T = float;
  static constexpr int kVec = 4;  // elements per 16-byte vector
  __device__ static float to_f32(uint32_t raw) { return u2f(raw); }
  __device__ static uint32_t nan_bits(uint32_t raw) { return raw | 0x400000u; }  // quieted, as x86
  __device__ static uint32_t from_f32(float p, uint32_t pb) { return pb; }
  __device__ static uint32_t load(const T* x, int64_t e) { return f2u(x[e]); }
  __device__ static void store(T* x, int64_t e, uint32_t v) { x[e] = u2f(v); }
};
template <>
struct Elem<1> {  // bfloat16
  using T = uint16_t;
  static constexpr int kVec = 8;
  __device__ static float to_f32(uint32_t raw) { return u2f(raw << 16); }
  __device__ static uint32_t nan_bits(uint32_t raw) { return (raw << 16) | 0x400000u; }
  __device__ static uint32_t from_f32(float p, uint32_t pb) {
    if (p != p) return 0x7FC0u;                                   // torch's bfloat16 NaN
    return (pb + 0x7FFFu + ((pb >> 16) & 1u)) >> 16;              // round to nearest even
  }
  __device__ static uint32_t load(const T* x, int64_t e) { return x[e]; }
  __device__ static void store(T* x, int64_t e, uint32_t v) { x[e] = (uint16_t)v; }
};
template <>
struct Elem<2> {  // float16
  using T = uint16_t;
  static constexpr int kVec = 8;
  __device__ static float to_f32(uint32_t raw) {
    return __half2float(__ushort_as_half((unsigned short)raw));
  }
  __device__ static uint32_t nan_bits(uint32_t raw) { return ((raw & 0x8000u) << 16) | 0x7FC00000u; }
  __device__ static uint32_t from_f32(float p, uint32_t pb) {
    if (p != p) return ((pb >> 16) & 0x8000u) | 0x7E00u;         // torch's float16 NaN, sign kept
    return __half_as_ushort(__float2half_rn(p));
  }
  __device__ static uint32_t load(const T* x, int64_t e) { return x[e]; }
  __device__ static void store(T* x, int64_t e, uint32_t v) { x[e] = (uint16_t)v; }
};

// Slot (element index within the tile) of element i (0..kPerThread-1) of thread tid: vectors of kVec
// consecutive elements, vector v of the thread at (v * kThreads + tid) * kVec, so a warp's vector
// accesses are contiguous.
template <int kVec>
__device__ __forceinline__ int slot_of(int tid, int i) {
  return ((i / kVec) * kThreads + tid) * kVec + (i % kVec);
}

template <int kCode, bool kGaussian>
__device__ void process_tile(void* base_ptr, int64_t n, int64_t start, uint64_t first_row,
                             const int64_t* __restrict__ seeds, const float* __restrict__ coeffs,
                             int K, float decay, bool apply_decay,
                             uint32_t (*s_words)[kTileBlocks][4], float (*s_tab)[16]) {
  using E = Elem<kCode>;
  using T = typename E::T;
  constexpr int kVec = E::kVec;
  constexpr int kNumVec = kPerThread / kVec;
  T* x = reinterpret_cast<T*>(base_ptr);
  const int tid = threadIdx.x;

  // 1. x first: its loads are in flight while the noise is computed.
  uint32_t raw[kPerThread];
  const bool full = start >= 0 && start + kTileElems <= n;
  const bool aligned =
      full && ((reinterpret_cast<uintptr_t>(x + start) & 15u) == 0);  // CTA-uniform
  if (aligned) {
#pragma unroll
    for (int v = 0; v < kNumVec; ++v) {
      // Streaming 128-bit load (ld.global.cs.v4): every byte is read once.
      const uint4 q = __ldcs(reinterpret_cast<const uint4*>(x + start + slot_of<kVec>(tid, v * kVec)));
      const uint32_t w[4] = {q.x, q.y, q.z, q.w};
      if (kVec == 4) {
#pragma unroll
        for (int i = 0; i < 4; ++i) raw[v * 4 + i] = w[i];
      } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          raw[v * 8 + 2 * i] = w[i] & 0xFFFFu;
          raw[v * 8 + 2 * i + 1] = w[i] >> 16;
        }
      }
    }
  } else {  // unaligned or partial tile: scalar, bounds-checked
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int64_t e = start + slot_of<kVec>(tid, i);
      raw[i] = (e >= 0 && e < n) ? E::load(x, e) : 0u;
    }
  }

  // 2. the noise sum, in the contract's order.
  float acc[kPerThread];
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) acc[i] = 0.0f;
  if (!kGaussian) {
    for (int k0 = 0; k0 < K; k0 += kSeedChunk) {
      const int kn = min(kSeedChunk, K - k0);
      const int ng = (kn + kGroup - 1) / kGroup;
      // Philox words of every (seed, block) pair of the chunk, once per CTA.
      for (int p = tid; p < kn * kTileBlocks; p += kThreads) {
        const int s = p / kTileBlocks, r = p % kTileBlocks;
        zo::rademacher_words((uint64_t)seeds[k0 + s], first_row + (uint64_t)r, s_words[s][r]);
      }
      // Subset-sum tables of the chunk's groups (k0 is a multiple of 4: groups are whole).
      for (int p = tid; p < ng * 16; p += kThreads) {
        const int g = p >> 4, m = p & 15;
        const int gk = k0 + kGroup * g, n_g = min(kGroup, K - gk);
        float t = (m & 1) ? coeffs[gk] : -coeffs[gk];
        for (int j = 1; j < n_g; ++j) {
          const float c = coeffs[gk + j];
          t = __fadd_rn(t, ((m >> j) & 1) ? c : -c);
        }
        s_tab[g][m] = t;
      }
      __syncthreads();
#pragma unroll
      for (int v = 0; v < kNumVec; ++v) {
        const int s0 = slot_of<kVec>(tid, v * kVec);      // kVec consecutive slots, one word
        const int r = s0 >> 7, q = (s0 & 127) >> 5, b0 = s0 & 31;
        for (int g = 0; g < ng; ++g) {
          const int gn = min(kGroup, kn - kGroup * g);
          uint32_t w[kGroup];
#pragma unroll
          for (int j = 0; j < kGroup; ++j) w[j] = j < gn ? (s_words[kGroup * g + j][r][q] >> b0) : 0u;
#pragma unroll
          for (int i = 0; i < kVec; ++i) {
            const uint32_t idx = ((w[0] >> i) & 1u) | (((w[1] >> i) & 1u) << 1) |
                                 (((w[2] >> i) & 1u) << 2) | (((w[3] >> i) & 1u) << 3);
            acc[v * kVec + i] = __fadd_rn(acc[v * kVec + i], s_tab[g][idx]);
          }
        }
      }
      __syncthreads();  // the next chunk overwrites the shared words and tables
    }
  } else {
    for (int k = 0; k < K; ++k) {
      const float c = __ldg(coeffs + k);
      const uint64_t s = (uint64_t)__ldg(seeds + k);
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        const uint64_t gi = first_row * 128u + (uint64_t)slot_of<kVec>(tid, i);
        acc[i] = __fadd_rn(acc[i], __fmul_rn(c, zo::gaussian_value(s, gi)));
      }
    }
  }

  // 3. p = x * decay + acc, rounded once to the dtype, NaN with the CPU's bits.
  uint32_t out[kPerThread];
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const float xv = E::to_f32(raw[i]);
    const float p = __fadd_rn(apply_decay ? __fmul_rn(xv, decay) : xv, acc[i]);
    uint32_t pb = f2u(p);
    if (p != p) pb = (xv != xv) ? E::nan_bits(raw[i]) : 0xFFC00000u;
    out[i] = E::from_f32(p, pb);
  }
  if (aligned) {
#pragma unroll
    for (int v = 0; v < kNumVec; ++v) {
      uint4 q;
      if (kVec == 4) {
        q = make_uint4(out[v * 4], out[v * 4 + 1], out[v * 4 + 2], out[v * 4 + 3]);
      } else {
        q = make_uint4(out[v * 8] | (out[v * 8 + 1] << 16), out[v * 8 + 2] | (out[v * 8 + 3] << 16),
                       out[v * 8 + 4] | (out[v * 8 + 5] << 16), out[v * 8 + 6] | (out[v * 8 + 7] << 16));
      }
      __stcs(reinterpret_cast<uint4*>(x + start + slot_of<kVec>(tid, v * kVec)), q);  // st.global.cs.v4
    }
  } else {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int64_t e = start + slot_of<kVec>(tid, i);
      if (e >= 0 && e < n) E::store(x, e, out[i]);
    }
  }
}

// kGaussian is a template parameter so that the Rademacher kernel does not carry the registers of
// the Gaussian path (cosf's slow argument reduction). Occupancy hint: 4 CTAs (32 warps) per SM for
// Rademacher: ptxas then fits it in 64 registers without spills (with no hint it spilled 4 bytes
// at 64 registers; sm_90, CUDA 13.0); 2 CTAs for the Gaussian kernel (126 registers).
template <bool kGaussian>
__global__ void __launch_bounds__(kThreads, kGaussian ? 2 : 4)
apply_seeds_mt_kernel(const int64_t* __restrict__ desc, const int64_t* __restrict__ tile_start, int T,
                      const int64_t* __restrict__ seeds, const float* __restrict__ coeffs, int K,
                      float decay, bool apply_decay) {
  __shared__ __align__(16) uint32_t s_words[kSeedChunk][kTileBlocks][4];  // 16 KiB
  __shared__ float s_tab[kGroupsPerChunk][16];                             // 512 B
  __shared__ int s_t;
  const int64_t cta = blockIdx.x;
  if (threadIdx.x == 0) {  // largest t with tile_start[t] <= cta
    int lo = 0, hi = T;
    while (hi - lo > 1) {
      const int mid = (lo + hi) >> 1;
      if (tile_start[mid] <= cta) lo = mid; else hi = mid;
    }
    s_t = lo;
  }
  __syncthreads();
  const int t = s_t;
  void* ptr = reinterpret_cast<void*>(desc[4 * t]);
  const int64_t n = desc[4 * t + 1], base = desc[4 * t + 2];
  const int code = (int)desc[4 * t + 3];
  const uint64_t first_row = (uint64_t)(base / 128 + (cta - tile_start[t]) * kTileBlocks);
  const int64_t start = (int64_t)(first_row * 128u) - base;  // element index of tile slot 0
  switch (code) {  // CTA-uniform
    case 0:
      process_tile<0, kGaussian>(ptr, n, start, first_row, seeds, coeffs, K, decay, apply_decay,
                                  s_words, s_tab);
      break;
    case 1:
      process_tile<1, kGaussian>(ptr, n, start, first_row, seeds, coeffs, K, decay, apply_decay,
                                  s_words, s_tab);
      break;
    default:
      process_tile<2, kGaussian>(ptr, n, start, first_row, seeds, coeffs, K, decay, apply_decay,
                                  s_words, s_tab);
      break;
  }
}


}  // namespace zo_cuda

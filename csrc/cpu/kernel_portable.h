// Portable path of the CPU kernel: plain C++ written so that compilers vectorize it for whatever the
// baseline target offers (SSE2 on x86-64, NEON on aarch64). It runs where neither x86 path applies
// and when ZO_KERNELS_ISA=portable. No intrinsics, no target attributes.
//
// Vectorized loops (checked with g++ -O3 -fopt-info-vec on the baseline x86-64 target, see
// docs/DESIGN.md, "The CPU paths"):
//  - Philox over 16 blocks of one seed at a time (lanes over blocks; 32x32->64 products);
//  - the sums, over the 32 elements of one Philox word: each term is computed, not looked up:
//    T_g = ((s_0 c_0 + s_1 c_1) + s_2 c_2) + s_3 c_3 is the very expression that defines the table
//    entry T_g[idx_g] (fp32, left to right), so computing it per element gives the table's bits without
//    a gather (which no baseline target has). s_k c_k is c_k with its sign bit flipped on a bit test;
//  - the final p = p * decay + acc for float32, bfloat16 and float16 (the half types' conversions
//    written on integers and fp32 arithmetic, no branch).
#pragma once

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>

#include "../philox.h"
#include "kernel_common.h"

namespace zo_cpu {

struct BitMasks {
  uint32_t m[32];
};
constexpr BitMasks make_bit_masks() {
  BitMasks b{};
  for (int j = 0; j < 32; ++j) b.m[j] = 1u << j;
  return b;
}
alignas(64) inline constexpr BitMasks kBitMasks = make_bit_masks();

// Philox4x32-10 of counters (block0 + l, 0, 0) for l < 16 under one key; out[q][l] = word q.
inline void philox_blocks16_portable(uint64_t block0, uint64_t seed, uint32_t out[4][16]) {
  uint32_t c0[16], c1[16], c2[16], c3[16];
  for (int l = 0; l < 16; ++l) {
    const uint64_t b = block0 + (uint64_t)l;
    c0[l] = (uint32_t)(b & 0xffffffffu);
    c1[l] = (uint32_t)(b >> 32);
    c2[l] = 0;
    c3[l] = 0;
  }
  uint32_t k0 = zo::key_lo(seed), k1 = zo::key_hi(seed);
  for (int r = 0; r < zo::kRounds; ++r) {
#pragma omp simd
    for (int l = 0; l < 16; ++l) {
      const uint64_t pb = (uint64_t)zo::kRoundB * (uint64_t)c2[l];
      const uint64_t pa = (uint64_t)zo::kRoundA * (uint64_t)c0[l];
      const uint32_t n0 = (uint32_t)(pb >> 32) ^ c1[l] ^ k0;
      const uint32_t n2 = (uint32_t)(pa >> 32) ^ c3[l] ^ k1;
      c1[l] = (uint32_t)pb;
      c3[l] = (uint32_t)pa;
      c0[l] = n0;
      c2[l] = n2;
    }
    k0 += zo::kKeyA;
    k1 += zo::kKeyB;
  }
  for (int l = 0; l < 16; ++l) {
    out[0][l] = c0[l];
    out[1][l] = c1[l];
    out[2][l] = c2[l];
    out[3][l] = c3[l];
  }
}

// The sum of one group of N seeds for the 32 elements of one Philox word, with w[s] the word of
// seed s and cb[s] the bits of +c_s: t_j = ((s_0 c_0 + s_1 c_1) + s_2 c_2) + s_3 c_3 (first N terms),
// s_k c_k = c_k when bit j of w[k] is set, else c_k with its sign bit flipped (-c_k exactly): a bit
// test, a compare and two logic operations on any SIMD target, no float select. Then the
// accumulator: v = a + t (kFirst == 0), 0 + t (kFirst == 1: the first group), t (kFirst == 2: the
// first group when one of its coefficients is nonzero; then t is never -0, so 0 + t == t), stored in
// a, or with the last group into float32 x: x = x + v, x * decay + v (kDecay). One loop over j: it
// vectorizes on any SIMD width, and the last group writes the tensor without an accumulator pass.
template <int N, int kFirst, bool kToX, bool kDecay>
inline void group_terms32(float* __restrict a, float* __restrict x, const uint32_t* w,
                          const uint32_t* cb, float decay) {
  constexpr uint32_t kSignBit = 0x80000000u;
  const uint32_t w0 = w[0], w1 = N > 1 ? w[1] : 0u, w2 = N > 2 ? w[2] : 0u, w3 = N > 3 ? w[3] : 0u;
  const uint32_t p0 = cb[0], p1 = N > 1 ? cb[1] : 0u, p2 = N > 2 ? cb[2] : 0u, p3 = N > 3 ? cb[3] : 0u;
#pragma omp simd
  for (int j = 0; j < 32; ++j) {
    const uint32_t m = kBitMasks.m[j];
    float t = std::bit_cast<float>(p0 ^ ((w0 & m) ? 0u : kSignBit));
    if (N > 1) t = t + std::bit_cast<float>(p1 ^ ((w1 & m) ? 0u : kSignBit));
    if (N > 2) t = t + std::bit_cast<float>(p2 ^ ((w2 & m) ? 0u : kSignBit));
    if (N > 3) t = t + std::bit_cast<float>(p3 ^ ((w3 & m) ? 0u : kSignBit));
    const float v = kFirst == 0 ? a[j] + t : kFirst == 1 ? 0.0f + t : t;
    if (kToX) x[j] = (kDecay ? x[j] * decay : x[j]) + v;
    else a[j] = v;
  }
}

template <int kFirst, bool kToX, bool kDecay>
inline void group_terms32_n(int n, float* __restrict a, float* __restrict x, const uint32_t* w,
                            const uint32_t* cb, float decay) {
  switch (n) {
    case 1: group_terms32<1, kFirst, kToX, kDecay>(a, x, w, cb, decay); break;
    case 2: group_terms32<2, kFirst, kToX, kDecay>(a, x, w, cb, decay); break;
    case 3: group_terms32<3, kFirst, kToX, kDecay>(a, x, w, cb, decay); break;
    default: group_terms32<4, kFirst, kToX, kDecay>(a, x, w, cb, decay); break;
  }
}

// One group's terms with the accumulator mode chosen at run time (see group_terms32).
inline void group_terms32_any(int n, int first, bool to_x, bool dec, float* __restrict a,
                              float* __restrict x, const uint32_t* w, const uint32_t* cb,
                              float decay) {
  if (!to_x) {
    if (first == 0) group_terms32_n<0, false, false>(n, a, x, w, cb, decay);
    else if (first == 1) group_terms32_n<1, false, false>(n, a, x, w, cb, decay);
    else group_terms32_n<2, false, false>(n, a, x, w, cb, decay);
  } else if (dec) {
    if (first == 0) group_terms32_n<0, true, true>(n, a, x, w, cb, decay);
    else if (first == 1) group_terms32_n<1, true, true>(n, a, x, w, cb, decay);
    else group_terms32_n<2, true, true>(n, a, x, w, cb, decay);
  } else {
    if (first == 0) group_terms32_n<0, true, false>(n, a, x, w, cb, decay);
    else if (first == 1) group_terms32_n<1, true, false>(n, a, x, w, cb, decay);
    else group_terms32_n<2, true, false>(n, a, x, w, cb, decay);
  }
}

inline uint16_t bf16_round_portable(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // round to nearest even (c10's rule)
  return (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0x7fc0u : (uint16_t)r;
}
inline float bf16_load_portable(uint16_t h) {
  const uint32_t u = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// float16 <-> float32 written on integers and fp32 arithmetic only, no table and no branch, so
// that the loops below vectorize on any target; the same values as c10::Half's conversions (round to
// nearest even, subnormals, +-inf; NaN stays NaN with its sign). They need IEEE fp32 with subnormals
// (no flush-to-zero), like the rest of the kernel.
//
// Load: a normal or inf/NaN half moves its exponent and mantissa into fp32 position (exponent rebased
// by +224, then the product by 2**-112 removes the surplus: exact, and inf/NaN stay inf/NaN); a
// subnormal half m * 2**-24 is read as 0.5 + m * 2**-24 (exponent 126, m in the low bits) minus 0.5,
// which is exact.
inline float f16_load_portable(uint16_t h) {
  const uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
  const float normal = u2f((two_w >> 4) + (224u << 23)) * 0x1.0p-112f;
  const float subnormal = u2f((two_w >> 17) | (126u << 23)) - 0.5f;
  // Chosen on the bits with a mask, not with ?: on floats, which GCC (trapping math) keeps as a
  // branch and then does not vectorize.
  const uint32_t is_sub = 0u - (uint32_t)(two_w < (1u << 27));
  return u2f(sign | (f2u(subnormal) & is_sub) | (f2u(normal) & ~is_sub));
}
// Store: |f| * 2**112 * 2**-110 is |f| * 4 below the half range and +inf from 2**16 on (the first
// product overflows). Adding 2**(e + 15), e = max(exponent of f, -14), whose fp32 ulp 2**(e - 8) is
// 4 half ulps at exponent e, makes the fp32 adder round |f| * 4 to the half's 10 mantissa bits, to
// nearest even (subnormals and the overflow to inf included); the half's exponent and mantissa are
// then read from the sum's bits. NaN (|f| bits above inf's) gives sign | 0x7e00.
inline uint16_t f16_round_portable(float f) {
  const uint32_t w = f2u(f), sign = w & 0x80000000u, two_w = w + w;
  const float scaled = (u2f(w & 0x7fffffffu) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t e = two_w & 0xff000000u;  // 2 x biased exponent, at least 2 x 113 (masks, see load)
  const uint32_t low = 0u - (uint32_t)(e < 0x71000000u);
  const uint32_t e2 = (0x71000000u & low) | (e & ~low);
  const uint32_t sum = f2u(u2f((e2 >> 1) + 0x07800000u) + scaled);
  const uint32_t nonsign = ((sum >> 13) & 0x7c00u) + (sum & 0x0fffu);
  const uint32_t nan = 0u - (uint32_t)(two_w > 0xff000000u);
  return (uint16_t)((sign >> 16) | (0x7e00u & nan) | (nonsign & ~nan));
}

// x[0..n) = x * decay + acc (decay == 1: no multiply), rounded once to dtype dt.
inline void finalize_portable(void* p, int dt, int64_t e0, const float* __restrict acc, int n,
                              float decay) {
  if (dt == F32) {
    float* __restrict x = static_cast<float*>(p) + e0;
    if (decay != 1.0f) {
#pragma omp simd
      for (int i = 0; i < n; ++i) x[i] = x[i] * decay + acc[i];
    } else {
#pragma omp simd
      for (int i = 0; i < n; ++i) x[i] = x[i] + acc[i];
    }
  } else if (dt == BF16) {
    uint16_t* __restrict x = static_cast<uint16_t*>(p) + e0;
    if (decay != 1.0f) {
#pragma omp simd
      for (int i = 0; i < n; ++i) x[i] = bf16_round_portable(bf16_load_portable(x[i]) * decay + acc[i]);
    } else {
#pragma omp simd
      for (int i = 0; i < n; ++i) x[i] = bf16_round_portable(bf16_load_portable(x[i]) + acc[i]);
    }
  } else {
    uint16_t* __restrict x = static_cast<uint16_t*>(p) + e0;
    if (decay != 1.0f) {
#pragma omp simd
      for (int i = 0; i < n; ++i) x[i] = f16_round_portable(f16_load_portable(x[i]) * decay + acc[i]);
    } else {
#pragma omp simd
      for (int i = 0; i < n; ++i) x[i] = f16_round_portable(f16_load_portable(x[i]) + acc[i]);
    }
  }
}

// Full 128-element blocks [block0, block0 + nblocks) of one tensor whose element 0 is block0's
// first element, at p (dtype dt). Grouped order, terms computed per element (see the top). float32
// with K <= 64 (one seed batch): the last group writes the tensor (no accumulator pass).
inline void rademacher_blocks_portable(void* p, int dt, uint64_t block0, int64_t nblocks,
                                       const uint64_t* seeds, const float* coeffs, int K,
                                       float decay) {
  constexpr int G16 = 16;
  alignas(64) float acc[G16 * zo::kBlock];
  alignas(64) uint32_t words[kSeedBatch][4][G16];  // [seed][word][block]
  alignas(64) uint32_t wg[kSumGroup];
  alignas(64) uint32_t cbits[kSeedBatch];
  const bool fused = dt == F32 && K >= 1 && K <= kSeedBatch;
  const bool dec = decay != 1.0f;
  bool g0_nonzero = false;  // a nonzero coefficient in group 0: then 0 + T_0 == T_0
  for (int k = 0; k < std::min(K, kSumGroup); ++k) g0_nonzero |= coeffs[k] != 0.0f;
  for (int64_t g0 = 0; g0 < nblocks; g0 += G16) {
    const int G = (int)std::min<int64_t>(G16, nblocks - g0);
    if (!fused)
      for (int i = 0; i < G * zo::kBlock; ++i) acc[i] = 0.0f;
    for (int kb = 0; kb < K; kb += kSeedBatch) {
      const int KB = std::min(kSeedBatch, K - kb);
      for (int k = 0; k < KB; ++k) {
        philox_blocks16_portable(block0 + (uint64_t)g0, seeds[kb + k], words[k]);
        cbits[k] = f2u(coeffs[kb + k]);
      }
      for (int g = 0; g < G; ++g) {
        for (int q = 0; q < 4; ++q) {
          float* __restrict a = acc + g * zo::kBlock + 32 * q;
          float* x = fused ? static_cast<float*>(p) + (g0 + g) * (int64_t)zo::kBlock + 32 * q : nullptr;
          for (int k0 = 0; k0 < KB; k0 += kSumGroup) {  // kSeedBatch % 4 == 0: groups stay whole
            const int n = std::min(kSumGroup, KB - k0);
            for (int s = 0; s < n; ++s) wg[s] = words[k0 + s][q][g];
            // Not fused: acc starts at 0 and is added to like any later group (first = 0).
            const int first = (kb + k0 == 0 && fused) ? (g0_nonzero ? 2 : 1) : 0;
            const bool last = fused && k0 + kSumGroup >= KB;
            group_terms32_any(n, first, last, dec, a, x, wg, cbits + k0, decay);
          }
        }
      }
    }
    if (!fused) finalize_portable(p, dt, g0 * zo::kBlock, acc, G * zo::kBlock, decay);
  }
}

}  // namespace zo_cpu

// Portable path of the CPU kernel: plain C++ written so that compilers vectorize it for whatever the
// baseline target offers (SSE2 on x86-64, NEON on aarch64). It runs where neither x86 path applies
// and when ZO_KERNELS_ISA=portable. No intrinsics, no target attributes.
//
// Vectorized loops (checked with g++ -O3 -fopt-info-vec on the baseline x86-64 target, see
// docs/DESIGN.md, "The CPU paths"):
//  - Philox over 16 blocks of one seed at a time (lanes over blocks; 32x32->64 products);
//  - the spread of a group's words (spread_words: word >> lane, lanes over 16 blocks);
//  - the sums, over the 32 elements of one Philox word: each term is computed, not looked up:
//    T_g = ((s_0 c_0 + s_1 c_1) + s_2 c_2) + s_3 c_3 is the very expression that defines the table
//    entry T_g[idx_g] (fp32, left to right), so computing it per element gives the table's bits without
//    a gather (which no baseline target has). s_k c_k is -c_k with its sign bit flipped when the
//    element's bit is set: the bit is brought to the sign position by a shift that is the same in
//    every lane (lane l reads the word shifted right by l, see spread_words), then one AND and one
//    XOR; no per-lane shift count (which SSE2 lacks) and no compare;
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

// spread[q][s][g][l] = word q of seed s of block g, shifted right by l (l < 4): in a 4-lane vector
// of spread[q][s][g], lane l holds the sign bit of element 4t + l at bit 4t for every t, so one
// shift by 31 - 4t, the same in all lanes, brings the 4 elements' bits to the sign position.
// words[s][q][g] as philox_blocks16_portable writes them; n seeds, all 16 blocks.
inline void spread_words(const uint32_t (*words)[4][16], int n, uint32_t (*spread)[4][16][4]) {
  for (int q = 0; q < 4; ++q)
    for (int s = 0; s < n; ++s) {
      const uint32_t* __restrict w = words[s][q];
      uint32_t* __restrict v = &spread[q][s][0][0];
#pragma omp simd
      for (int g = 0; g < 16; ++g) {
        v[4 * g] = w[g];
        v[4 * g + 1] = w[g] >> 1;
        v[4 * g + 2] = w[g] >> 2;
        v[4 * g + 3] = w[g] >> 3;
      }
    }
}

// The sum of one group of N seeds for the 32 elements of one Philox word, with v[s] the 4 spread
// lanes of seed s (spread_words) and ncb[s] the bits of -c_s: for element j = 4t + l,
// t_j = ((s_0 c_0 + s_1 c_1) + s_2 c_2) + s_3 c_3 (first N terms), s_k c_k = -c_k with its sign bit
// flipped when bit j of the word is set (+c_k exactly), else -c_k. Then the accumulator: r = a + t
// (kFirst == 0), 0 + t (kFirst == 1: the first group), t (kFirst == 2: the first group when one of
// its coefficients is nonzero; then t is never -0, so 0 + t == t), stored in a, or with the last
// group into float32 x: x = x + r, x * decay + r (kDecay). The inner loop is one 4-lane vector on
// any 128-bit SIMD target; the outer one is unrolled, so each shift count is a constant.
template <int N, int kFirst, bool kToX, bool kDecay>
inline void group_terms32(float* __restrict a, float* __restrict x, const uint32_t* const* v,
                          const uint32_t* ncb, float decay) {
  constexpr uint32_t kSignBit = 0x80000000u;
  const uint32_t* __restrict v0 = v[0];
  const uint32_t* __restrict v1 = N > 1 ? v[1] : v[0];
  const uint32_t* __restrict v2 = N > 2 ? v[2] : v[0];
  const uint32_t* __restrict v3 = N > 3 ? v[3] : v[0];
  const uint32_t n0 = ncb[0], n1 = N > 1 ? ncb[1] : 0u, n2 = N > 2 ? ncb[2] : 0u;
  const uint32_t n3 = N > 3 ? ncb[3] : 0u;
#pragma GCC unroll 8
  for (int t = 0; t < 8; ++t) {
    const int sh = 31 - 4 * t;
#pragma omp simd
    for (int l = 0; l < 4; ++l) {
      const int j = 4 * t + l;
      float tt = std::bit_cast<float>(n0 ^ ((v0[l] << sh) & kSignBit));
      if (N > 1) tt = tt + std::bit_cast<float>(n1 ^ ((v1[l] << sh) & kSignBit));
      if (N > 2) tt = tt + std::bit_cast<float>(n2 ^ ((v2[l] << sh) & kSignBit));
      if (N > 3) tt = tt + std::bit_cast<float>(n3 ^ ((v3[l] << sh) & kSignBit));
      const float r = kFirst == 0 ? a[j] + tt : kFirst == 1 ? 0.0f + tt : tt;
      if (kToX) x[j] = (kDecay ? x[j] * decay : x[j]) + r;
      else a[j] = r;
    }
  }
}

// One group of N seeds over G blocks (acc and x: the blocks' first element), the accumulator mode
// fixed for the whole loop.
template <int N, int kFirst, bool kToX, bool kDecay>
inline void group_blocks(int G, float* __restrict acc, float* __restrict x,
                         const uint32_t (*spread)[4][16][4], const uint32_t* ncb, float decay) {
  for (int g = 0; g < G; ++g)
    for (int q = 0; q < 4; ++q) {
      const uint32_t* v[4] = {spread[q][0][g], spread[q][1][g], spread[q][2][g], spread[q][3][g]};
      const int e = g * zo::kBlock + 32 * q;
      group_terms32<N, kFirst, kToX, kDecay>(acc + e, kToX ? x + e : nullptr, v, ncb, decay);
    }
}

template <int kFirst, bool kToX, bool kDecay>
inline void group_blocks_n(int n, int G, float* __restrict acc, float* __restrict x,
                           const uint32_t (*spread)[4][16][4], const uint32_t* ncb, float decay) {
  switch (n) {
    case 1: group_blocks<1, kFirst, kToX, kDecay>(G, acc, x, spread, ncb, decay); break;
    case 2: group_blocks<2, kFirst, kToX, kDecay>(G, acc, x, spread, ncb, decay); break;
    case 3: group_blocks<3, kFirst, kToX, kDecay>(G, acc, x, spread, ncb, decay); break;
    default: group_blocks<4, kFirst, kToX, kDecay>(G, acc, x, spread, ncb, decay); break;
  }
}

// One group's sums over G blocks with the accumulator mode chosen at run time (see group_terms32).
inline void group_blocks_any(int n, int first, bool to_x, bool dec, int G, float* __restrict acc,
                             float* __restrict x, const uint32_t (*spread)[4][16][4],
                             const uint32_t* ncb, float decay) {
  if (!to_x) {
    if (first == 0) group_blocks_n<0, false, false>(n, G, acc, x, spread, ncb, decay);
    else if (first == 1) group_blocks_n<1, false, false>(n, G, acc, x, spread, ncb, decay);
    else group_blocks_n<2, false, false>(n, G, acc, x, spread, ncb, decay);
  } else if (dec) {
    if (first == 0) group_blocks_n<0, true, true>(n, G, acc, x, spread, ncb, decay);
    else if (first == 1) group_blocks_n<1, true, true>(n, G, acc, x, spread, ncb, decay);
    else group_blocks_n<2, true, true>(n, G, acc, x, spread, ncb, decay);
  } else {
    if (first == 0) group_blocks_n<0, true, false>(n, G, acc, x, spread, ncb, decay);
    else if (first == 1) group_blocks_n<1, true, false>(n, G, acc, x, spread, ncb, decay);
    else group_blocks_n<2, true, false>(n, G, acc, x, spread, ncb, decay);
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
// first element, at p (dtype dt). Grouped order, terms computed per element (see the top), one group
// at a time over 16 blocks. float32 with K <= 64 (one seed batch): the last group writes the tensor
// (no accumulator pass).
inline void rademacher_blocks_portable(void* p, int dt, uint64_t block0, int64_t nblocks,
                                       const uint64_t* seeds, const float* coeffs, int K,
                                       float decay) {
  constexpr int G16 = 16;
  alignas(64) float acc[G16 * zo::kBlock];
  alignas(64) uint32_t words[kSeedBatch][4][G16];        // [seed][word][block]
  alignas(64) uint32_t spread[4][kSumGroup][G16][4];     // one group's words, spread_words
  alignas(64) uint32_t ncbits[kSeedBatch];                // bits of -c
  const bool fused = dt == F32 && K >= 1 && K <= kSeedBatch;
  const bool dec = decay != 1.0f;
  bool g0_nonzero = false;  // a nonzero coefficient in group 0: then 0 + T_0 == T_0
  for (int k = 0; k < std::min(K, kSumGroup); ++k) g0_nonzero |= coeffs[k] != 0.0f;
  for (int64_t g0 = 0; g0 < nblocks; g0 += G16) {
    const int G = (int)std::min<int64_t>(G16, nblocks - g0);
    float* x = fused ? static_cast<float*>(p) + g0 * (int64_t)zo::kBlock : nullptr;
    if (!fused)
      for (int i = 0; i < G * zo::kBlock; ++i) acc[i] = 0.0f;
    for (int kb = 0; kb < K; kb += kSeedBatch) {
      const int KB = std::min(kSeedBatch, K - kb);
      for (int k = 0; k < KB; ++k) {
        philox_blocks16_portable(block0 + (uint64_t)g0, seeds[kb + k], words[k]);
        ncbits[k] = f2u(coeffs[kb + k]) ^ 0x80000000u;
      }
      for (int k0 = 0; k0 < KB; k0 += kSumGroup) {  // kSeedBatch % 4 == 0: groups stay whole
        const int n = std::min(kSumGroup, KB - k0);
        spread_words(words + k0, n, spread);
        // Not fused: acc starts at 0 and is added to like any later group (first = 0).
        const int first = (kb + k0 == 0 && fused) ? (g0_nonzero ? 2 : 1) : 0;
        const bool last = fused && k0 + kSumGroup >= KB;
        group_blocks_any(n, first, last, dec, G, acc, x, spread, ncbits + k0, decay);
      }
    }
    if (!fused) finalize_portable(p, dt, g0 * zo::kBlock, acc, G * zo::kBlock, decay);
  }
}

}  // namespace zo_cpu

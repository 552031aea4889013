// The grouped accumulation order of Rademacher noise (docs/DESIGN.md, Grouped summation order; every
// backend follows it), shared by the CPU kernel (apply_seeds_kernel.h) and its micro-benchmark
// (benchmarks/cpu_variants/variants.cpp). No torch dependency.
//
//   T_g[m] = (m&1 ? c_4g : -c_4g) + (m&2 ? c_4g+1 : -c_4g+1) + ...   (fp32, left to right, n_g terms)
//   idx_g(i) = sum_j [z_{4g+j}(i) = +1] << j
//   acc = 0.0f; for g: acc = acc + T_g[idx_g(i)]
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace zo_cpu {

constexpr int kSumGroup = 4;  // seeds per subset-sum table
inline int num_groups(int K) { return (K + kSumGroup - 1) / kSumGroup; }

// tables[16 g + m] = T_g[m]: fp32 sums left to right over the group's n_g seeds; entries with
// m >= 2**n_g (short last group) repeat T_g[m & (2**n_g - 1)] and are never used.
inline void group_tables(const float* coeffs, int K, float* tables) {
  for (int g = 0; g < num_groups(K); ++g) {
    const int n = std::min(kSumGroup, K - kSumGroup * g);
    const float* c = coeffs + kSumGroup * g;
    for (int m = 0; m < 16; ++m) {
      const int mm = m & ((1 << n) - 1);
      float t = (mm & 1) ? c[0] : -c[0];
      for (int j = 1; j < n; ++j) t = t + (((mm >> j) & 1) ? c[j] : -c[j]);
      tables[16 * g + m] = t;
    }
  }
}

#if defined(__x86_64__)
#define ZO_AVX512G \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi,gfni,avx2,fma,bmi,bmi2,f16c")))

// Byte permutations of the sign-bit transpose (see seed_bit_indices).
struct TransposePatterns {
  alignas(64) uint8_t tiles[64];      // vpermb: qword 4h + t <- byte t of seeds 8h + i, at byte 7 - i
  alignas(64) uint8_t lanes[2][64];   // vpermt2b, per half hh of a word: lane l, byte r <- tile bytes
};
constexpr TransposePatterns make_transpose_patterns() {
  TransposePatterns p{};
  for (int h = 0; h < 2; ++h)
    for (int t = 0; t < 4; ++t)
      for (int i = 0; i < 8; ++i) p.tiles[8 * (4 * h + t) + 7 - i] = (uint8_t)(4 * (8 * h + i) + t);
  // elements 16 hh + l of a word and seeds 32u + 8r + i: byte r of lane l comes from tile vector
  // 2u + r / 2 (bit 6 of the index picks the second source), qword 4 (r % 2) + t, byte l % 8.
  for (int hh = 0; hh < 2; ++hh)
    for (int l = 0; l < 16; ++l)
      for (int r = 0; r < 4; ++r)
        p.lanes[hh][4 * l + r] = (uint8_t)((r / 2) * 64 + 8 * (4 * (r % 2) + 2 * hh + l / 8) + l % 8);
  return p;
}
inline constexpr TransposePatterns kTransposePatterns = make_transpose_patterns();

// One 128-element block: words[q][k] is Philox word q of seed k (16 * nv seeds, zero past the real
// ones, nv <= 4). idx[2q + hh][u], lane l = element 32q + 16hh + l, bit b = sign bit of seed 32u + b,
// so nibble n of idx[.][u] is the table index of group 8u + n. vpermb gathers each 8x8 bit tile
// (8 seeds x 8 elements) into a qword, gf2p8affineqb with x bytes 1 << j transposes the tiles, and
// vpermt2b places the bytes in lanes.
ZO_AVX512G inline void seed_bit_indices(const uint32_t* const words[4], int nv, __m512i idx[8][2]) {
  const __m512i P1 = _mm512_load_si512(kTransposePatterns.tiles);
  const __m512i XT = _mm512_set1_epi64((long long)0x8040201008040201ull);
  const __m512i zero = _mm512_setzero_si512();
  __m512i Z[4][4];
  for (int q = 0; q < 4; ++q)
    for (int v = 0; v < nv; ++v) {
      const __m512i y = _mm512_permutexvar_epi8(P1, _mm512_loadu_si512(words[q] + 16 * v));
      Z[q][v] = _mm512_gf2p8affine_epi64_epi8(XT, y, 0);
    }
  const int nu = (nv + 1) / 2;
  for (int hh = 0; hh < 2; ++hh) {
    const __m512i P2 = _mm512_load_si512(kTransposePatterns.lanes[hh]);
    for (int q = 0; q < 4; ++q)
      for (int u = 0; u < nu; ++u)
        idx[2 * q + hh][u] =
            _mm512_permutex2var_epi8(Z[q][2 * u], P2, 2 * u + 1 < nv ? Z[q][2 * u + 1] : zero);
  }
}
#endif

}  // namespace zo_cpu

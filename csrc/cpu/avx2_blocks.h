// Building blocks of the AVX2 path (kernel_avx2.h), without torch: 8-lane Philox and the 32 x 32
// sign-bit transpose. Shared with the inner-loop micro-benchmark (benchmarks/cpu_variants/variants.cpp)
// so that what it times is the kernel's code.
#pragma once

#if defined(__x86_64__)
#include <immintrin.h>

#include <cstdint>

#include "../philox.h"

namespace zo_cpu {

#define ZO_AVX2 __attribute__((target("avx2,fma,bmi,bmi2,f16c")))

// The high and low 32-bit words of the 8 lanes' products x * M (M: the round constant in every lane).
ZO_AVX2 inline void mul_hi_lo8(__m256i x, __m256i M, __m256i& hi, __m256i& lo) {
  const __m256i e = _mm256_mul_epu32(x, M);                       // lanes 0, 2, 4, 6
  const __m256i o = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), M);  // lanes 1, 3, 5, 7
  hi = _mm256_blend_epi32(_mm256_srli_epi64(e, 32), o, 0xAA);
  lo = _mm256_blend_epi32(e, _mm256_slli_epi64(o, 32), 0xAA);
}

// M independent Philox4x32-10 evaluations on 8 lanes: counters (c0[m], c1[m], 0, 0), round keys
// rk[m][2r] and rk[m][2r + 1] (precomputed), interleaved round by round.
template <int M>
ZO_AVX2 inline void philox8_multi(const __m256i* c0, const __m256i* c1, const __m256i* const* rk,
                                  __m256i (*out)[4]) {
  const __m256i A = _mm256_set1_epi32((int)zo::kRoundA), B = _mm256_set1_epi32((int)zo::kRoundB);
  __m256i x0[M], x1[M], x2[M], x3[M];
  for (int m = 0; m < M; ++m) {
    x0[m] = c0[m];
    x1[m] = c1[m];
    x2[m] = _mm256_setzero_si256();
    x3[m] = _mm256_setzero_si256();
  }
  for (int r = 0; r < zo::kRounds; ++r) {
    for (int m = 0; m < M; ++m) {
      __m256i hiA, loA, hiB, loB;
      mul_hi_lo8(x0[m], A, hiA, loA);
      mul_hi_lo8(x2[m], B, hiB, loB);
      x0[m] = _mm256_xor_si256(_mm256_xor_si256(hiB, x1[m]), rk[m][2 * r]);
      x2[m] = _mm256_xor_si256(_mm256_xor_si256(hiA, x3[m]), rk[m][2 * r + 1]);
      x1[m] = loB;
      x3[m] = loA;
    }
  }
  for (int m = 0; m < M; ++m) {
    out[m][0] = x0[m];
    out[m][1] = x1[m];
    out[m][2] = x2[m];
    out[m][3] = x3[m];
  }
}

// Round keys of one key pair (k0, k1) in every lane.
ZO_AVX2 inline void round_keys8(uint32_t k0, uint32_t k1, __m256i rk[2 * zo::kRounds]) {
  for (int r = 0; r < zo::kRounds; ++r) {
    rk[2 * r] = _mm256_set1_epi32((int)k0);
    rk[2 * r + 1] = _mm256_set1_epi32((int)k1);
    k0 += zo::kKeyA;
    k1 += zo::kKeyB;
  }
}

// Lanes = 8 consecutive blocks starting at b (64-bit counters split into low and high words).
ZO_AVX2 inline void block_counters8(uint64_t b, __m256i& lo, __m256i& hi) {
  alignas(32) uint32_t l[8], h[8];
  for (int i = 0; i < 8; ++i) {
    l[i] = (uint32_t)((b + (uint64_t)i) & 0xffffffffu);
    h[i] = (uint32_t)((b + (uint64_t)i) >> 32);
  }
  lo = _mm256_load_si256(reinterpret_cast<const __m256i*>(l));
  hi = _mm256_load_si256(reinterpret_cast<const __m256i*>(h));
}

// 32 seeds x 32 elements: src[s] = Philox word q of seed s (s < 32, 8 per vector); out[j] gets, for
// element 32q + j, the 32 sign bits, nibble n holding chunk group gl = 2 (n % 4) + n / 4 (bits in seed
// order). vpshufb gathers byte c of 4 seeds into one dword per lane, two unpack levels make V_c = byte
// c of all 32 seeds, and vpmovmskb reads bit 7 - t of every byte after t doublings.
ZO_AVX2 inline void transpose32_avx2(const uint32_t* src, uint32_t* out) {
  const __m256i shuf = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                        0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  __m256i B[4];
  for (int i = 0; i < 4; ++i)
    B[i] = _mm256_shuffle_epi8(_mm256_load_si256(reinterpret_cast<const __m256i*>(src + 8 * i)), shuf);
  const __m256i U0 = _mm256_unpacklo_epi32(B[0], B[1]), U1 = _mm256_unpackhi_epi32(B[0], B[1]);
  const __m256i U2 = _mm256_unpacklo_epi32(B[2], B[3]), U3 = _mm256_unpackhi_epi32(B[2], B[3]);
  __m256i V[4] = {_mm256_unpacklo_epi64(U0, U2), _mm256_unpackhi_epi64(U0, U2),
                  _mm256_unpacklo_epi64(U1, U3), _mm256_unpackhi_epi64(U1, U3)};
  for (int c = 0; c < 4; ++c) {
    __m256i v = V[c];
    for (int t = 0; t < 8; ++t) {
      out[8 * c + 7 - t] = (uint32_t)_mm256_movemask_epi8(v);
      v = _mm256_add_epi8(v, v);
    }
  }
}

}  // namespace zo_cpu
#endif

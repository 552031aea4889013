// Building blocks of the AVX2 path (kernel_avx2.h), without torch: 8-lane Philox, the 32 x 32
// sign-bit transpose and the table lookups. Shared with the inner-loop micro-benchmark
// (benchmarks/cpu_variants/variants.cpp) so that what it times is the kernel's code.
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

// --- Philox that skips the work rounds 1 and 2 share -------------------------------------------
// The counter is (c0, c1, 0, 0), so round 1 multiplies only c0 by A (c2 = 0): its outputs are
//   x0 = c1 ^ k0,  x1 = 0,  x2 = hi(A c0) ^ k1,  x3 = lo(A c0),
// and round 2 (keys k0' = k0 + kKeyA, k1' = k1 + kKeyB) gives
//   x0 = hi(B x2) ^ k0',  x1 = lo(B x2),  x2 = hi(A (c1 ^ k0)) ^ lo(A c0) ^ k1',  x3 = lo(A (c1 ^ k0)).
// A c0 depends on the block only and A (c1 ^ k0) on the seed only (c1 = block >> 32 is the same for
// all blocks of a call below 2**32 blocks), so per (block, seed) rounds 1 and 2 cost one product
// (B x2) and three xors instead of four products; rounds 3..10 follow. Same words (checked against
// zo::philox4x32_10 by benchmarks/bench_cpu_variants.py and the tests).
struct Philox8State {
  __m256i x0, x1, x2, x3;
};

// Rounds R0..9 on M independent states, interleaved round by round; rk[m][2r], rk[m][2r + 1]: the
// round keys of state m.
template <int M, int R0>
ZO_AVX2 inline __attribute__((always_inline)) void philox8_rounds(Philox8State* st,
                                                                 const __m256i* const* rk) {
  const __m256i A = _mm256_set1_epi32((int)zo::kRoundA), B = _mm256_set1_epi32((int)zo::kRoundB);
#pragma GCC unroll 10
  for (int r = R0; r < zo::kRounds; ++r) {
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      __m256i hiA, loA, hiB, loB;
      mul_hi_lo8(st[m].x0, A, hiA, loA);
      mul_hi_lo8(st[m].x2, B, hiB, loB);
      st[m].x0 = _mm256_xor_si256(hiB, _mm256_xor_si256(st[m].x1, rk[m][2 * r]));
      st[m].x2 = _mm256_xor_si256(hiA, _mm256_xor_si256(st[m].x3, rk[m][2 * r + 1]));
      st[m].x1 = loB;
      st[m].x3 = loA;
    }
  }
}

// Per-seed part of round 2 for key lanes k0, k1 (round keys rk) and counter high words c1:
// hA2k = hi(A (c1 ^ k0)) ^ k1', lA2 = lo(A (c1 ^ k0)).
struct Philox8SeedPart {
  __m256i hA2k, lA2;
};
ZO_AVX2 inline Philox8SeedPart philox8_seed_part(const __m256i rk[2 * zo::kRounds], __m256i c1) {
  __m256i hi, lo;
  mul_hi_lo8(_mm256_xor_si256(rk[0], c1), _mm256_set1_epi32((int)zo::kRoundA), hi, lo);
  return Philox8SeedPart{_mm256_xor_si256(hi, rk[3]), lo};
}

// State after round 2 from the block part (hA1 = hi(A c0), lA1 = lo(A c0), per lane or broadcast)
// and the seed part.
ZO_AVX2 inline __attribute__((always_inline)) Philox8State philox8_after_round2(
    __m256i hA1, __m256i lA1, const __m256i rk[2 * zo::kRounds], const Philox8SeedPart& sp) {
  __m256i hB, lB;
  mul_hi_lo8(_mm256_xor_si256(hA1, rk[1]), _mm256_set1_epi32((int)zo::kRoundB), hB, lB);
  return Philox8State{_mm256_xor_si256(hB, rk[2]), lB, _mm256_xor_si256(sp.hA2k, lA1), sp.lA2};
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

// acc[v] = acc[v] + T[nibble n of I[v]] for 8 vectors of 8 elements: the 16-entry table is two
// 8-entry halves looked up with vpermps and chosen by bit 3 of the nibble (moved to the sign by a
// left shift) with vblendvps. The nibble position is a template argument, so both shifts take an
// immediate count (with a count in a register they measured 5% slower here).
template <int N>
ZO_AVX2 inline __attribute__((always_inline)) void table_lookup8(const uint32_t* ib, const float* T,
                                                                __m256 acc[8]) {
  const __m256 TL = _mm256_loadu_ps(T), TH = _mm256_loadu_ps(T + 8);
#pragma GCC unroll 8
  for (int v = 0; v < 8; ++v) {
    const __m256i I = _mm256_load_si256(reinterpret_cast<const __m256i*>(ib + 8 * v));
    const __m256i ix = _mm256_srli_epi32(I, 4 * N);
    const __m256 lo = _mm256_permutevar8x32_ps(TL, ix);
    const __m256 hi = _mm256_permutevar8x32_ps(TH, ix);
    const __m256 t = _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(I, 28 - 4 * N)));
    acc[v] = _mm256_add_ps(acc[v], t);
  }
}

// The groups gi = 8u + gl < ngb of one 32-seed chunk u, in order (group gl sits in nibble
// 4 (gl % 2) + gl / 2, see transpose32_avx2).
ZO_AVX2 inline void table_chunk(const uint32_t* ib, const float* Tu, int ng, __m256 acc[8]) {
  if (ng > 0) table_lookup8<0>(ib, Tu, acc);
  if (ng > 1) table_lookup8<4>(ib, Tu + 16, acc);
  if (ng > 2) table_lookup8<1>(ib, Tu + 32, acc);
  if (ng > 3) table_lookup8<5>(ib, Tu + 48, acc);
  if (ng > 4) table_lookup8<2>(ib, Tu + 64, acc);
  if (ng > 5) table_lookup8<6>(ib, Tu + 80, acc);
  if (ng > 6) table_lookup8<3>(ib, Tu + 96, acc);
  if (ng > 7) table_lookup8<7>(ib, Tu + 112, acc);
}

}  // namespace zo_cpu
#endif

// AVX-512 path of the CPU kernel (F/BW/DQ/VL; the grouped K > 1 loop also needs VBMI and GFNI).
//
// Per group of 16 blocks and batch of up to 64 seeds:
//  1. Philox for every (block, seed) pair, 16 pairs per zmm (lanes over seeds when K >= 16, else over
//     blocks). The 32x32->64 products use vpmuludq on even and odd lanes, recombined with one
//     merge-masked vpshufd per word; round keys are precomputed once per seed batch, and the 4
//     independent 16-seed Philox evaluations of a block run interleaved (one at a time they are
//     latency-bound). With lanes over seeds, rounds 1 and 2 come from a per-block and a per-seed
//     product (philox16_multi_r2; K = 64: 13% less time, one thread). Words go to a small L1-resident buffer, seeds contiguous per (block, word).
//  2. Bit transpose: per block, the 64 seeds x 128 elements sign matrix becomes, per element, two
//     32-bit words of seed bits (nibble g = the 4-bit table index of group g): vpermb gathers 8x8 bit
//     tiles into qwords, gf2p8affineqb transposes each tile, vpermt2b places the bytes in lanes.
//  3. Sums: per group and 16 elements, vpsrld + vpermps (the 16-entry table is one zmm) + vaddps,
//     i.e. 3 uops per 64 element-seeds instead of 3 per 16 with a per-seed select.
// K <= 8 (perturb_, the ZO step's passes) has its own loop: vpsllvd + vpternlogd put bit j into the
// sign of -c_k, the group sums are computed; one Philox burst per 16 blocks.
#pragma once

#if defined(__x86_64__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "../philox.h"
#include "grouped_sum.h"
#include "kernel_avx2.h"
#include "kernel_common.h"

namespace zo_cpu {

// With the x86-64-v3 features too (every AVX-512 CPU has them, and isa.h requires them for this
// path), so that the avx2 path's helpers (finalize8: bfloat16/float16 rounding) inline here.
#define ZO_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi,bmi2,f16c")))

// Finalize one block: x = x * decay + acc (f32 in registers; other dtypes through a scalar round).
ZO_AVX512 inline void finalize_block_avx512(void* p, int dt, int64_t eb, const __m512* acc,
                                            float decay) {
  if (dt == F32) {
    float* x = static_cast<float*>(p) + eb;
    const __m512 d = _mm512_set1_ps(decay);
    // (Measured here: software prefetch and non-temporal stores both made this slower.)
    for (int v = 0; v < 8; ++v) {
      __m512 xv = _mm512_loadu_ps(x + 16 * v);
      if (decay != 1.0f) xv = _mm512_mul_ps(xv, d);
      _mm512_storeu_ps(x + 16 * v, _mm512_add_ps(xv, acc[v]));
    }
    return;
  }
  // bfloat16 / float16: the avx2 path's 8-element load, update and rounding store (same bits as
  // c10's scalar conversions; a scalar loop through c10::Half here took 6-18x the avx2 path's time).
  const bool dec = decay != 1.0f;
  const __m256 dv = _mm256_set1_ps(decay);
  for (int v = 0; v < 8; ++v) {
    finalize8(p, dt, eb + 16 * v, _mm512_castps512_ps256(acc[v]), dec, dv);
    finalize8(p, dt, eb + 16 * v + 8,
              _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[v]), 1)), dec, dv);
  }
}

// One Philox round on 16 lanes, then the key bump. 32x32->64 products with vpmuludq on even and
// odd lanes, recombined with blends.
struct Philox16State {
  __m512i c0, c1, c2, c3, k0, k1;
};

// The high and low words of the even-lane (e) and odd-lane (o) 64-bit products, each recombined
// with one merge-masked vpshufd (even lanes take e's upper words, odd lanes o's lower words).
ZO_AVX512 inline void mul_hi_lo(__m512i x, __m512i M, __m512i& hi, __m512i& lo) {
  const __m512i e = _mm512_mul_epu32(x, M), o = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), M);
  hi = _mm512_mask_shuffle_epi32(o, (__mmask16)0x5555, e, (_MM_PERM_ENUM)0xF5);  // _MM_SHUFFLE(3,3,1,1)
  lo = _mm512_mask_shuffle_epi32(e, (__mmask16)0xAAAA, o, (_MM_PERM_ENUM)0xA0);  // _MM_SHUFFLE(2,2,0,0)
}

ZO_AVX512 inline void philox16_round(Philox16State& s) {
  const __m512i A = _mm512_set1_epi64(zo::kRoundA), B = _mm512_set1_epi64(zo::kRoundB);
  __m512i hiA, loA, hiB, loB;
  mul_hi_lo(s.c0, A, hiA, loA);
  mul_hi_lo(s.c2, B, hiB, loB);
  s.c0 = _mm512_ternarylogic_epi32(hiB, s.c1, s.k0, 0x96);  // xor of three
  s.c2 = _mm512_ternarylogic_epi32(hiA, s.c3, s.k1, 0x96);
  s.c1 = loB;
  s.c3 = loA;
  s.k0 = _mm512_add_epi32(s.k0, _mm512_set1_epi32((int)zo::kKeyA));
  s.k1 = _mm512_add_epi32(s.k1, _mm512_set1_epi32((int)zo::kKeyB));
}

// Philox rounds R0 .. kRounds-1 of M interleaved evaluations (state x0..x3[m], round keys
// rk[m][2 * r + {0, 1}]), the final words written to out[m][0..3]. The one copy of the round loop of
// philox16_multi (all rounds) and philox16_multi_r2 (rounds 1-2 precomputed).
template <int M, int R0>
ZO_AVX512 inline void philox16_rounds(__m512i* x0, __m512i* x1, __m512i* x2, __m512i* x3,
                                      const __m512i (*rk)[2 * zo::kRounds], __m512i (*out)[4]) {
  const __m512i A = _mm512_set1_epi64(zo::kRoundA), B = _mm512_set1_epi64(zo::kRoundB);
  for (int r = R0; r < zo::kRounds; ++r) {
    for (int m = 0; m < M; ++m) {
      __m512i hiA, loA, hiB, loB;
      mul_hi_lo(x0[m], A, hiA, loA);
      mul_hi_lo(x2[m], B, hiB, loB);
      x0[m] = _mm512_ternarylogic_epi32(hiB, x1[m], rk[m][2 * r], 0x96);
      x2[m] = _mm512_ternarylogic_epi32(hiA, x3[m], rk[m][2 * r + 1], 0x96);
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

// M independent Philox4x32-10 evaluations on 16 lanes each, interleaved round by round (they are
// latency-bound one at a time), with round keys read from rk[m][2 * r + {0, 1}] (precomputed).
template <int M>
ZO_AVX512 inline void philox16_multi(__m512i c0, __m512i c1, const __m512i (*rk)[2 * zo::kRounds],
                                     __m512i (*out)[4]) {
  __m512i x0[M], x1[M], x2[M], x3[M];
  for (int m = 0; m < M; ++m) {
    x0[m] = c0;
    x1[m] = c1;
    x2[m] = _mm512_setzero_si512();
    x3[m] = _mm512_setzero_si512();
  }
  philox16_rounds<M, 0>(x0, x1, x2, x3, rk, out);
}

// The same from round 2 on, lanes over seeds of one block (counter (c0, c1, 0, 0) in every lane):
// rounds 1 and 2 from the block's product A c0 (hA1, lA1, broadcast) and the seeds' part
// A (c1 ^ k0) (hA2k = hi ^ k1', lA2 = lo; shared by every block with this c1), as in the avx2
// path's Philox8State (csrc/cpu/avx2_blocks.h): one product per (block, seed) for rounds 1-2
// instead of four.
struct Philox16SeedPart {
  __m512i hA2k, lA2;
};
ZO_AVX512 inline Philox16SeedPart philox16_seed_part(const __m512i rk[2 * zo::kRounds], uint32_t c1) {
  __m512i hi, lo;
  mul_hi_lo(_mm512_xor_si512(rk[0], _mm512_set1_epi32((int)c1)), _mm512_set1_epi64(zo::kRoundA), hi, lo);
  return Philox16SeedPart{_mm512_xor_si512(hi, rk[3]), lo};
}
template <int M>
ZO_AVX512 inline void philox16_multi_r2(__m512i hA1, __m512i lA1, const __m512i (*rk)[2 * zo::kRounds],
                                        const Philox16SeedPart* sp, __m512i (*out)[4]) {
  const __m512i B = _mm512_set1_epi64(zo::kRoundB);
  __m512i x0[M], x1[M], x2[M], x3[M];
  for (int m = 0; m < M; ++m) {
    __m512i hB, lB;
    mul_hi_lo(_mm512_xor_si512(hA1, rk[m][1]), B, hB, lB);
    x0[m] = _mm512_xor_si512(hB, rk[m][2]);
    x1[m] = lB;
    x2[m] = _mm512_xor_si512(sp[m].hA2k, lA1);
    x3[m] = sp[m].lA2;
  }
  philox16_rounds<M, 2>(x0, x1, x2, x3, rk, out);
}

// Philox4x32-10 of counters (c0, c1, 0, 0) under keys (k0, k1) on 16 lanes.
ZO_AVX512 inline void philox16(__m512i c0, __m512i c1, __m512i k0, __m512i k1, __m512i out[4]) {
  Philox16State s{c0, c1, _mm512_setzero_si512(), _mm512_setzero_si512(), k0, k1};
  for (int r = 0; r < zo::kRounds; ++r) philox16_round(s);
  out[0] = s.c0; out[1] = s.c1; out[2] = s.c2; out[3] = s.c3;
}

// Lanes = 16 consecutive blocks starting at b (64-bit counters split into low and high words).
ZO_AVX512 inline void block_counters(uint64_t b, __m512i& lo, __m512i& hi) {
  alignas(64) uint32_t l[16], h[16];
  for (int i = 0; i < 16; ++i) {
    l[i] = (uint32_t)((b + (uint64_t)i) & 0xffffffffu);
    h[i] = (uint32_t)((b + (uint64_t)i) >> 32);
  }
  lo = _mm512_load_si512(l);
  hi = _mm512_load_si512(h);
}

// K <= 8 (two groups), any dtype: memory-bound or nearly (perturb_ is K = 1; small K is the common
// case). Per group of 16 blocks one 16-lane Philox per seed (lanes over blocks, up to
// 4 seeds interleaved) as a burst, then per block and 16 elements: per seed vpsllvd + vpternlogd (bit
// j into the sign of -c_k), each group sum T_g = ((t_0 + t_1) + t_2) + t_3 computed (it is the table
// entry's defining expression, so the bits are the table's), acc = 0 + T_0 (or T_0 when a
// coefficient of group 0 is nonzero: then T_0 is never -0), acc = acc + T_1, x = x (* decay) + acc
// (bfloat16 with even/odd accumulators, finalize32_bf16_avx512; float16 through the avx2 path's
// finalize8). Instantiated per (K, decay != 1, 0 + T_0 needed, dtype) so that the loop has no
// branches. One thread,
// 32768 floats in L2: 0.064 ms per 1M elements at K = 2 (grouped loop: 0.155), 0.178 at K = 8
// (grouped: 0.242).
// (Measured on the Zen 5 machine, one thread, 100M floats, thread CPU time against a plain AVX-512
// x + c loop, K = 1: 0.99-1.01 this way; 1.13-1.16 with the earlier scheme that spread the next
// group's Philox rounds one per block between the loads and stores. K = 2 took 1.21x add_ in the
// grouped loop below, 1.0x here.)
constexpr int kSmallMaxK = 8;

// bfloat16 bits of 16 floats in the high half of each lane (the low half is left over), rounded as
// c10 does: to nearest even, NaN -> 0x7fc0.
ZO_AVX512 inline __attribute__((always_inline)) __m512i bf16_round_hi16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                        _mm512_set1_epi32(0x7fff));
  return _mm512_mask_mov_epi32(_mm512_add_epi32(u, bias), _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                               _mm512_set1_epi32(0x7fc00000));
}

// 32 bfloat16 elements at e: x = x * decay + acc, the even elements' acc in ae, the odd ones' in ao
// (as finalize16_bf16 on the avx2 path: one 64-byte load and store, no lane-crossing shuffle).
ZO_AVX512 inline __attribute__((always_inline)) void finalize32_bf16_avx512(void* p, int64_t e,
                                                                           __m512 ae, __m512 ao,
                                                                           bool dec, __m512 d) {
  uint16_t* q = static_cast<uint16_t*>(p) + e;
  const __m512i x = _mm512_loadu_si512(q);
  __m512 xe = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
  __m512 xo = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32((int)0xffff0000u)));
  if (dec) {
    xe = _mm512_mul_ps(xe, d);
    xo = _mm512_mul_ps(xo, d);
  }
  const __m512i re = bf16_round_hi16(_mm512_add_ps(xe, ae)), ro = bf16_round_hi16(_mm512_add_ps(xo, ao));
  _mm512_storeu_si512(q, _mm512_mask_blend_epi16((__mmask32)0xAAAAAAAAu, _mm512_srli_epi32(re, 16), ro));
}

// DT: the dtype, compiled into the loop. bfloat16 keeps the even elements of each 32 in t0 and the
// odd ones in t1 (finalize32_bf16_avx512); the other dtypes elements 0..15 and 16..31.
template <int N, bool kDecay, bool kZeroAdd, int DT>
ZO_AVX512 inline void rademacher_small_avx512_t(void* p, int dt, uint64_t block0, int64_t nblocks,
                                                const uint64_t* seeds, const float* coeffs,
                                                float decay) {
  constexpr bool kF32 = DT == F32, kPairs = DT == BF16;
  float* x = static_cast<float*>(p);
  const __m256 dv = _mm256_set1_ps(decay);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  // lane i of sh_lo / sh_hi moves bit i / 16 + i (pairs: 2i / 2i + 1) of a word to the sign
  const __m512i sh_lo = kPairs ? _mm512_sub_epi32(_mm512_set1_epi32(31), _mm512_add_epi32(iota, iota))
                               : _mm512_sub_epi32(_mm512_set1_epi32(31), iota);
  const __m512i sh_hi = kPairs ? _mm512_sub_epi32(_mm512_set1_epi32(30), _mm512_add_epi32(iota, iota))
                               : _mm512_sub_epi32(_mm512_set1_epi32(15), iota);
  const __m512i sign = _mm512_set1_epi32((int)0x80000000u);
  const __m512 d = _mm512_set1_ps(decay);
  __m512i nc[N];
  alignas(64) __m512i rk[N][2 * zo::kRounds];
  for (int k = 0; k < N; ++k) {
    nc[k] = _mm512_set1_epi32((int)f2u(-coeffs[k]));
    __m512i k0 = _mm512_set1_epi32((int)zo::key_lo(seeds[k]));
    __m512i k1 = _mm512_set1_epi32((int)zo::key_hi(seeds[k]));
    for (int r = 0; r < zo::kRounds; ++r) {
      rk[k][2 * r] = k0;
      rk[k][2 * r + 1] = k1;
      k0 = _mm512_add_epi32(k0, _mm512_set1_epi32((int)zo::kKeyA));
      k1 = _mm512_add_epi32(k1, _mm512_set1_epi32((int)zo::kKeyB));
    }
  }
  alignas(64) uint32_t cur[N][4][16];  // [seed][word][block]
  for (int64_t g0 = 0; g0 < nblocks; g0 += kGroup) {
    const int G = (int)std::min<int64_t>(kGroup, nblocks - g0);
    {
      __m512i lo, hi, out[N][4];
      block_counters(block0 + (uint64_t)g0, lo, hi);
      if (N <= 4) {
        philox16_multi<(N <= 4 ? N : 4)>(lo, hi, rk, out);
      } else {
        philox16_multi<4>(lo, hi, rk, out);
        philox16_multi<(N > 4 ? N - 4 : 1)>(lo, hi, rk + 4, out + 4);
      }
      for (int k = 0; k < N; ++k)
        for (int q = 0; q < 4; ++q) _mm512_store_si512(cur[k][q], out[k][q]);
    }
    for (int g = 0; g < G; ++g) {
      const int64_t eb = (g0 + g) * (int64_t)zo::kBlock;
      float* xb = x + eb;
      for (int q = 0; q < 4; ++q) {
        __m512 t0, t1, a0, a1;
        for (int k = 0; k < N; ++k) {
          const __m512i w = _mm512_set1_epi32((int)cur[k][q][g]);
          const __m512 u0 = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(_mm512_sllv_epi32(w, sh_lo), sign, nc[k], 0x6A));
          const __m512 u1 = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(_mm512_sllv_epi32(w, sh_hi), sign, nc[k], 0x6A));
          t0 = k % kSumGroup == 0 ? u0 : _mm512_add_ps(t0, u0);
          t1 = k % kSumGroup == 0 ? u1 : _mm512_add_ps(t1, u1);
          if (k % kSumGroup == kSumGroup - 1 || k == N - 1) {  // end of a group: acc = acc + T_g
            if (k < kSumGroup) {
              if (kZeroAdd) {  // acc = 0 + T_0 must be formed explicitly (signed zeros)
                t0 = _mm512_add_ps(_mm512_setzero_ps(), t0);
                t1 = _mm512_add_ps(_mm512_setzero_ps(), t1);
              }
              a0 = t0;
              a1 = t1;
            } else {
              a0 = _mm512_add_ps(a0, t0);
              a1 = _mm512_add_ps(a1, t1);
            }
          }
        }
        t0 = a0;
        t1 = a1;
        if (kPairs) {
          finalize32_bf16_avx512(p, eb + 32 * q, t0, t1, kDecay, d);
          continue;
        }
        if (!kF32) {  // float16: the avx2 path's 8-element update and rounding store
          const int64_t e = eb + 32 * q;
          finalize8(p, dt, e, _mm512_castps512_ps256(t0), kDecay, dv);
          finalize8(p, dt, e + 8, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(t0), 1)), kDecay, dv);
          finalize8(p, dt, e + 16, _mm512_castps512_ps256(t1), kDecay, dv);
          finalize8(p, dt, e + 24, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(t1), 1)), kDecay, dv);
          continue;
        }
        __m512 x0 = _mm512_loadu_ps(xb + 32 * q), x1 = _mm512_loadu_ps(xb + 32 * q + 16);
        if (kDecay) {
          x0 = _mm512_mul_ps(x0, d);
          x1 = _mm512_mul_ps(x1, d);
        }
        _mm512_storeu_ps(xb + 32 * q, _mm512_add_ps(x0, t0));
        _mm512_storeu_ps(xb + 32 * q + 16, _mm512_add_ps(x1, t1));
      }
    }
  }
}

template <int N, int DT>
ZO_AVX512 inline void rademacher_small_avx512_n(void* p, int dt, uint64_t block0, int64_t nblocks,
                                                const uint64_t* seeds, const float* coeffs,
                                                float decay) {
  bool nonzero = false;  // in group 0
  for (int k = 0; k < std::min(N, kSumGroup); ++k) nonzero |= coeffs[k] != 0.0f;
  if (decay != 1.0f) {
    if (nonzero) rademacher_small_avx512_t<N, true, false, DT>(p, dt, block0, nblocks, seeds, coeffs, decay);
    else rademacher_small_avx512_t<N, true, true, DT>(p, dt, block0, nblocks, seeds, coeffs, decay);
  } else {
    if (nonzero) rademacher_small_avx512_t<N, false, false, DT>(p, dt, block0, nblocks, seeds, coeffs, decay);
    else rademacher_small_avx512_t<N, false, true, DT>(p, dt, block0, nblocks, seeds, coeffs, decay);
  }
}

template <int DT>
ZO_AVX512 inline void rademacher_small_avx512_dt(void* p, int dt, uint64_t block0, int64_t nblocks,
                                                 const uint64_t* seeds, const float* coeffs, int K,
                                                 float decay) {
  switch (K) {
    case 1: rademacher_small_avx512_n<1, DT>(p, dt, block0, nblocks, seeds, coeffs, decay); break;
    case 2: rademacher_small_avx512_n<2, DT>(p, dt, block0, nblocks, seeds, coeffs, decay); break;
    case 3: rademacher_small_avx512_n<3, DT>(p, dt, block0, nblocks, seeds, coeffs, decay); break;
    case 4: rademacher_small_avx512_n<4, DT>(p, dt, block0, nblocks, seeds, coeffs, decay); break;
    case 5: rademacher_small_avx512_n<5, DT>(p, dt, block0, nblocks, seeds, coeffs, decay); break;
    case 6: rademacher_small_avx512_n<6, DT>(p, dt, block0, nblocks, seeds, coeffs, decay); break;
    case 7: rademacher_small_avx512_n<7, DT>(p, dt, block0, nblocks, seeds, coeffs, decay); break;
    default: rademacher_small_avx512_n<8, DT>(p, dt, block0, nblocks, seeds, coeffs, decay); break;
  }
}

// K in 1..kSmallMaxK, any dtype.
ZO_AVX512 inline void rademacher_small_avx512(void* p, int dt, uint64_t block0, int64_t nblocks,
                                              const uint64_t* seeds, const float* coeffs, int K,
                                              float decay) {
  if (dt == F32) rademacher_small_avx512_dt<F32>(p, dt, block0, nblocks, seeds, coeffs, K, decay);
  else if (dt == BF16) rademacher_small_avx512_dt<BF16>(p, dt, block0, nblocks, seeds, coeffs, K, decay);
  else rademacher_small_avx512_dt<F16>(p, dt, block0, nblocks, seeds, coeffs, K, decay);
}

// AVX-512 fast path (grouped order). Per group of up to 16 blocks and batch of up to 64 seeds:
// Philox words into wbuf[g][q][k] (seeds contiguous, zero past the batch up to a multiple of 16),
// then per block the bit transpose and the table sums described at the top of this file.
ZO_AVX512G void rademacher_blocks_avx512(void* p, int dt, uint64_t block0, int64_t nblocks,
                                         const uint64_t* seeds, const float* tables, int K,
                                         float decay) {
  alignas(64) uint32_t wbuf[kGroup][4][kSeedBatch];
  alignas(64) uint32_t klo[kSeedBatch], khi[kSeedBatch];
  alignas(64) float accbuf[kGroup][zo::kBlock];
  alignas(64) __m512i rk[kSeedBatch / 16][2 * zo::kRounds];
  for (int64_t g0 = 0; g0 < nblocks; g0 += kGroup) {
    const int G = (int)std::min<int64_t>(kGroup, nblocks - g0);
    const uint64_t bfirst = block0 + (uint64_t)g0;
    for (int kb = 0; kb < K || (K == 0 && kb == 0); kb += kSeedBatch) {
      const int KB = std::min(kSeedBatch, K - kb);
      const int nv = (KB + 15) / 16;  // 16-seed vectors of words per (block, word)
      for (int k = 0; k < KB; ++k) {
        klo[k] = zo::key_lo(seeds[kb + k]);
        khi[k] = zo::key_hi(seeds[kb + k]);
      }
      if (KB >= 16) {
        // Lanes over seeds; round keys of the batch precomputed (lanes past KB: zero keys, their
        // words are stored as zeros), shared by every block of the group.
        for (int v = 0; v < nv; ++v) {
          const __mmask16 m = (__mmask16)((KB - 16 * v) >= 16 ? 0xffff : ((1u << (KB - 16 * v)) - 1u));
          __m512i k0 = _mm512_maskz_loadu_epi32(m, klo + 16 * v);
          __m512i k1 = _mm512_maskz_loadu_epi32(m, khi + 16 * v);
          for (int r = 0; r < zo::kRounds; ++r) {
            rk[v][2 * r] = k0;
            rk[v][2 * r + 1] = k1;
            k0 = _mm512_add_epi32(k0, _mm512_set1_epi32((int)zo::kKeyA));
            k1 = _mm512_add_epi32(k1, _mm512_set1_epi32((int)zo::kKeyB));
          }
        }
        Philox16SeedPart sp[kSeedBatch / 16];
        uint64_t sp_c1 = ~uint64_t(0);  // the c1 the seed parts were made for
        for (int g = 0; g < G; ++g) {
          const uint64_t b = bfirst + (uint64_t)g;
          if ((b >> 32) != sp_c1) {
            sp_c1 = b >> 32;
            for (int v = 0; v < nv; ++v) sp[v] = philox16_seed_part(rk[v], (uint32_t)sp_c1);
          }
          const uint64_t pa = (uint64_t)zo::kRoundA * (uint64_t)(uint32_t)(b & 0xffffffffu);
          const __m512i hA1 = _mm512_set1_epi32((int)(uint32_t)(pa >> 32));
          const __m512i lA1 = _mm512_set1_epi32((int)(uint32_t)pa);
          __m512i outs[4][4];
          int v = 0;
          for (; v + 4 <= nv; v += 4) philox16_multi_r2<4>(hA1, lA1, rk + v, sp + v, outs + v);
          for (; v + 2 <= nv; v += 2) philox16_multi_r2<2>(hA1, lA1, rk + v, sp + v, outs + v);
          for (; v < nv; ++v) philox16_multi_r2<1>(hA1, lA1, rk + v, sp + v, outs + v);
          for (v = 0; v < nv; ++v) {
            const __mmask16 m = (__mmask16)((KB - 16 * v) >= 16 ? 0xffff : ((1u << (KB - 16 * v)) - 1u));
            for (int q = 0; q < 4; ++q)
              _mm512_store_si512(wbuf[g][q] + 16 * v, _mm512_maskz_mov_epi32(m, outs[v][q]));
          }
        }
      } else if (KB > 0) {
        // Lanes over 16 blocks (counter = bfirst + lane, 64-bit), one seed at a time.
        alignas(64) uint32_t lo[16], hi[16], o[4][16];
        for (int l = 0; l < 16; ++l) {
          const uint64_t b = bfirst + (uint64_t)l;
          lo[l] = (uint32_t)(b & 0xffffffffu);
          hi[l] = (uint32_t)(b >> 32);
        }
        for (int g = 0; g < G; ++g)
          for (int q = 0; q < 4; ++q) _mm512_store_si512(wbuf[g][q], _mm512_setzero_si512());
        const __m512i cl = _mm512_load_si512(lo), ch = _mm512_load_si512(hi);
        for (int k = 0; k < KB; ++k) {
          __m512i out[4];
          philox16(cl, ch, _mm512_set1_epi32((int)klo[k]), _mm512_set1_epi32((int)khi[k]), out);
          for (int q = 0; q < 4; ++q) _mm512_store_si512(o[q], out[q]);
          for (int g = 0; g < G; ++g)
            for (int q = 0; q < 4; ++q) wbuf[g][q][k] = o[q][g];
        }
      }
      const bool first = kb == 0, last = kb + kSeedBatch >= K;
      const int ngb = (KB + kSumGroup - 1) / kSumGroup;  // groups in this batch
      const float* Tb = tables + 16 * (kb / kSumGroup);
      for (int g = 0; g < G; ++g) {
        // 2. Transpose the block's sign bits into per-element table indices.
        const uint32_t* const words[4] = {wbuf[g][0], wbuf[g][1], wbuf[g][2], wbuf[g][3]};
        __m512i idx[8][2];
        seed_bit_indices(words, nv, idx);
        // 3. acc = acc + T_g[nibble], groups in order, 8 independent element vectors per step.
        __m512 acc[8];
        for (int v = 0; v < 8; ++v)
          acc[v] = first ? _mm512_setzero_ps() : _mm512_load_ps(accbuf[g] + 16 * v);
        for (int gi = 0; gi < ngb; ++gi) {
          const __m512 T = _mm512_loadu_ps(Tb + 16 * gi);
          const int u = gi >> 3, sh = 4 * (gi & 7);
          for (int ev = 0; ev < 8; ++ev) {
            const __m512i ix = _mm512_srli_epi32(idx[ev][u], (unsigned)sh);
            acc[ev] = _mm512_add_ps(acc[ev], _mm512_permutexvar_ps(ix, T));
          }
        }
        if (last) {
          finalize_block_avx512(p, dt, (g0 + g) * (int64_t)zo::kBlock, acc, decay);
        } else {
          for (int v = 0; v < 8; ++v) _mm512_store_ps(accbuf[g] + 16 * v, acc[v]);
        }
      }
      if (K == 0) break;
    }
  }
}
}  // namespace zo_cpu
#endif

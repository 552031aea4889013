// AVX2 (x86-64-v3) path of the CPU kernel: float32, bfloat16 and float16, any K, same bits as every
// other path (grouped order, docs/DESIGN.md, Grouped summation order).
//
//  - Philox4x32-10 on 8 lanes: 32x32->64 products with vpmuludq on even and odd lanes, recombined with
//    vpblendd; four independent evaluations interleaved (benchmarks/bench_cpu_variants.py, thread CPU
//    time: 27.8 ns per 16 lanes with four, 31.4 with two, 38.7 one at a time). Rounds 1 and 2 are
//    built from a per-block and a per-seed product shared across the call (Philox8State in
//    avx2_blocks.h): one product per (block, seed) instead of four. K = 64: 9% less time.
//  - K < 16 ("direct"): lanes over 8 blocks of one seed. Per element the group sum
//    T_g = ((s_0 c_0 + s_1 c_1) + s_2 c_2) + s_3 c_3 is computed, not looked up: it is the expression
//    that defines the table entry T_g[idx_g], so the bits are the table's. s_k c_k is one vpsllvd (bit
//    j of the word into the sign position) and one vblendvps between -c_k and c_k. No transpose, so
//    small K costs little more than the memory traffic.
//  - K >= 16 ("table"): lanes over 8 seeds of one block. The sign bits are transposed into per-element
//    32-bit words of seed bits with vpshufb + vpunpck + vpmovmskb (32 seeds x 32 elements per 16
//    vector ops and 32 movemasks), and every group adds one table entry: the 16-entry table is two
//    8-entry halves looked up with vpermps and chosen by bit 3 with vblendvps.
#pragma once

#if defined(__x86_64__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "../philox.h"
#include "avx2_blocks.h"
#include "kernel_common.h"

namespace zo_cpu {

constexpr int kDirectMaxK = 15;  // K <= 15: direct; K >= 16: tables + transpose

// 8 elements of dtype dt at element e of p, as float32.
ZO_AVX2 inline __attribute__((always_inline)) __m256 load8(const void* p, int dt, int64_t e) {
  if (dt == F32) return _mm256_loadu_ps(static_cast<const float*>(p) + e);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + e));
  if (dt == BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

// Stores 8 float32 values rounded to dtype dt exactly as c10's scalar conversions do (round to
// nearest even; bfloat16 NaN -> 0x7fc0, float16 NaN -> sign | 0x7e00).
ZO_AVX2 inline __attribute__((always_inline)) void store8(void* p, int dt, int64_t e, __m256 v) {
  if (dt == F32) {
    _mm256_storeu_ps(static_cast<float*>(p) + e, v);
    return;
  }
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  __m128i h;
  if (dt == BF16) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)),
                                          _mm256_set1_epi32(0x7fff));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
    h = _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
  } else {
    h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m128i n16 = _mm_packs_epi32(_mm256_castsi256_si128(nan), _mm256_extracti128_si256(nan, 1));
    const __m128i canon = _mm_or_si128(_mm_and_si128(h, _mm_set1_epi16((short)0x8000)),
                                       _mm_set1_epi16(0x7e00));
    h = _mm_blendv_epi8(h, canon, n16);
  }
  _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + e), h);
}

// x = x * decay + acc (decay == 1: no multiply) for 8 elements.
ZO_AVX2 inline __attribute__((always_inline)) void finalize8(void* p, int dt, int64_t e, __m256 acc, bool dec,
                                                           __m256 dv) {
  __m256 x = load8(p, dt, e);
  if (dec) x = _mm256_mul_ps(x, dv);
  store8(p, dt, e, _mm256_add_ps(x, acc));
}

// bfloat16 bits of 8 floats in the high half of each lane (the low half is left over), rounded as
// c10 does: to nearest even, NaN -> 0x7fc0.
ZO_AVX2 inline __attribute__((always_inline)) __m256i bf16_round_hi8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)),
                                        _mm256_set1_epi32(0x7fff));
  return _mm256_blendv_epi8(_mm256_add_epi32(u, bias), _mm256_set1_epi32(0x7fc00000),
                            _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}

// 16 bfloat16 elements at e: x = x * decay + acc, with the even elements' acc in ae and the odd
// ones' in ao. One 32-byte load and store and no lane-crossing shuffle: the even elements are the
// low halves of the 32-bit lanes (moved up by a shift), the odd ones the high halves (masked).
ZO_AVX2 inline __attribute__((always_inline)) void finalize16_bf16(void* p, int64_t e, __m256 ae,
                                                                  __m256 ao, bool dec, __m256 dv) {
  __m256i* q = reinterpret_cast<__m256i*>(static_cast<uint16_t*>(p) + e);
  const __m256i x = _mm256_loadu_si256(q);
  __m256 xe = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
  __m256 xo = _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32((int)0xffff0000u)));
  if (dec) {
    xe = _mm256_mul_ps(xe, dv);
    xo = _mm256_mul_ps(xo, dv);
  }
  const __m256i re = bf16_round_hi8(_mm256_add_ps(xe, ae)), ro = bf16_round_hi8(_mm256_add_ps(xo, ao));
  _mm256_storeu_si256(q, _mm256_blend_epi16(_mm256_srli_epi32(re, 16), ro, 0xAA));
}

// K <= 15 (see the top of the file). Full blocks [block0, block0 + nblocks) at p. The dtype is a
// template argument (DT), so each dtype's loads and stores are compiled into the loop without a
// run-time branch (measured: bfloat16 K = 1 at 1.23 cycles per element with the run-time dtype).
template <int DT>
ZO_AVX2 void rademacher_direct_avx2_t(void* p, uint64_t block0, int64_t nblocks,
                                     const uint64_t* seeds, const float* coeffs, int K, float decay) {
  constexpr int dt = DT;
  alignas(32) uint32_t W[kDirectMaxK + 1][4][kGroup];  // [seed][word][block]
  __m256i rk[kDirectMaxK + 1][2 * zo::kRounds];
  __m256 cpos[kDirectMaxK + 1], cneg[kDirectMaxK + 1];
  for (int k = 0; k < K; ++k) {
    round_keys8(zo::key_lo(seeds[k]), zo::key_hi(seeds[k]), rk[k]);
    cpos[k] = _mm256_set1_ps(coeffs[k]);
    cneg[k] = _mm256_set1_ps(-coeffs[k]);
  }
  // A nonzero coefficient in group 0: then T_0 is never -0 and acc = 0 + T_0 is T_0.
  bool g0_nonzero = false;
  for (int k = 0; k < std::min(K, kSumGroup); ++k) g0_nonzero |= coeffs[k] != 0.0f;
  // Lane i of sh[v] = 31 - (8v + i): vpsllvd moves bit 8v + i of a word into the sign position.
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  // bfloat16: acc[2m] holds the even and acc[2m + 1] the odd elements of 16 (finalize16_bf16), so
  // lane i of sh[2m + o] = 31 - (16m + 2i + o); other dtypes: lane i of sh[v] = 31 - (8v + i).
  constexpr bool kPairs = DT == BF16;
  __m256i sh[4];
  for (int v = 0; v < 4; ++v)
    sh[v] = kPairs ? _mm256_sub_epi32(_mm256_set1_epi32(31 - 16 * (v / 2) - v % 2),
                                      _mm256_add_epi32(iota, iota))
                   : _mm256_sub_epi32(_mm256_set1_epi32(31 - 8 * v), iota);
  const bool dec = decay != 1.0f;
  const __m256 dv = _mm256_set1_ps(decay);
  const __m256i A = _mm256_set1_epi32((int)zo::kRoundA);
  for (int64_t g0 = 0; g0 < nblocks; g0 += kGroup) {
    const int G = (int)std::min<int64_t>(kGroup, nblocks - g0);
    // Lanes over 16 blocks (two vectors): rounds 1 and 2 from the block part A c0 (shared by the
    // seeds) and the seed part A (c1 ^ k0) (see Philox8State).
    __m256i cl[2], ch[2], hA1[2], lA1[2];
    block_counters8(block0 + (uint64_t)g0, cl[0], ch[0]);
    block_counters8(block0 + (uint64_t)g0 + 8, cl[1], ch[1]);
    for (int i = 0; i < 2; ++i) mul_hi_lo8(cl[i], A, hA1[i], lA1[i]);
    const bool one_c1 = ((block0 + (uint64_t)g0) >> 32) == ((block0 + (uint64_t)g0 + 15) >> 32);
    int k = 0;
    for (; k + 2 <= K; k += 2) {  // two seeds x two 8-block halves: 4 chains interleaved
      const __m256i* rks[4] = {rk[k], rk[k], rk[k + 1], rk[k + 1]};
      Philox8State st[4];
      for (int s = 0; s < 2; ++s) {
        const Philox8SeedPart sp0 = philox8_seed_part(rk[k + s], ch[0]);
        const Philox8SeedPart sp1 = one_c1 ? sp0 : philox8_seed_part(rk[k + s], ch[1]);
        st[2 * s] = philox8_after_round2(hA1[0], lA1[0], rk[k + s], sp0);
        st[2 * s + 1] = philox8_after_round2(hA1[1], lA1[1], rk[k + s], sp1);
      }
      philox8_rounds<4, 2>(st, rks);
      for (int s = 0; s < 2; ++s) {
        const __m256i* o0 = &st[2 * s].x0;
        const __m256i* o1 = &st[2 * s + 1].x0;
        for (int q = 0; q < 4; ++q) {
          _mm256_store_si256(reinterpret_cast<__m256i*>(W[k + s][q]), o0[q]);
          _mm256_store_si256(reinterpret_cast<__m256i*>(W[k + s][q] + 8), o1[q]);
        }
      }
    }
    if (k < K) {
      const __m256i* rks[2] = {rk[k], rk[k]};
      Philox8State st[2];
      const Philox8SeedPart sp0 = philox8_seed_part(rk[k], ch[0]);
      const Philox8SeedPart sp1 = one_c1 ? sp0 : philox8_seed_part(rk[k], ch[1]);
      st[0] = philox8_after_round2(hA1[0], lA1[0], rk[k], sp0);
      st[1] = philox8_after_round2(hA1[1], lA1[1], rk[k], sp1);
      philox8_rounds<2, 2>(st, rks);
      const __m256i* o0 = &st[0].x0;
      const __m256i* o1 = &st[1].x0;
      for (int q = 0; q < 4; ++q) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(W[k][q]), o0[q]);
        _mm256_store_si256(reinterpret_cast<__m256i*>(W[k][q] + 8), o1[q]);
      }
    }
    for (int g = 0; g < G; ++g) {
      const int64_t eb = (g0 + g) * (int64_t)zo::kBlock;
      for (int q = 0; q < 4; ++q) {
        __m256 acc[4];
        for (int v = 0; v < 4; ++v) acc[v] = _mm256_setzero_ps();  // K = 0: decay only
        for (int k0 = 0; k0 < K; k0 += kSumGroup) {
          const int n = std::min(kSumGroup, K - k0);
          __m256 T[4];
          {
            const __m256i w = _mm256_set1_epi32((int)W[k0][q][g]);
            for (int v = 0; v < 4; ++v)
              T[v] = _mm256_blendv_ps(cneg[k0], cpos[k0],
                                      _mm256_castsi256_ps(_mm256_sllv_epi32(w, sh[v])));
          }
          for (int s = 1; s < n; ++s) {
            const __m256i w = _mm256_set1_epi32((int)W[k0 + s][q][g]);
            for (int v = 0; v < 4; ++v)
              T[v] = _mm256_add_ps(T[v], _mm256_blendv_ps(cneg[k0 + s], cpos[k0 + s],
                                                          _mm256_castsi256_ps(_mm256_sllv_epi32(w, sh[v]))));
          }
          if (k0 > 0) {
            for (int v = 0; v < 4; ++v) acc[v] = _mm256_add_ps(acc[v], T[v]);
          } else if (g0_nonzero) {
            for (int v = 0; v < 4; ++v) acc[v] = T[v];
          } else {
            for (int v = 0; v < 4; ++v) acc[v] = _mm256_add_ps(_mm256_setzero_ps(), T[v]);
          }
        }
        if constexpr (kPairs) {
          for (int m = 0; m < 2; ++m) finalize16_bf16(p, eb + 32 * q + 16 * m, acc[2 * m], acc[2 * m + 1], dec, dv);
        } else {
          for (int v = 0; v < 4; ++v) finalize8(p, dt, eb + 32 * q + 8 * v, acc[v], dec, dv);
        }
      }
    }
  }
}

ZO_AVX2 inline void rademacher_direct_avx2(void* p, int dt, uint64_t block0, int64_t nblocks,
                                          const uint64_t* seeds, const float* coeffs, int K,
                                          float decay) {
  if (dt == F32) rademacher_direct_avx2_t<F32>(p, block0, nblocks, seeds, coeffs, K, decay);
  else if (dt == BF16) rademacher_direct_avx2_t<BF16>(p, block0, nblocks, seeds, coeffs, K, decay);
  else rademacher_direct_avx2_t<F16>(p, block0, nblocks, seeds, coeffs, K, decay);
}

// K >= 16 (see the top of the file). tables: the call's subset-sum tables (16 floats per group).
ZO_AVX2 void rademacher_table_avx2(void* p, int dt, uint64_t block0, int64_t nblocks,
                                  const uint64_t* seeds, const float* tables, int K, float decay) {
  alignas(32) uint32_t wbuf[kGroup][4][kSeedBatch];  // [block][word][seed]
  alignas(32) float accbuf[kGroup][zo::kBlock];
  alignas(32) uint32_t idx[kSeedBatch / 32][zo::kBlock];  // [32-seed chunk][element]
  alignas(32) uint32_t klo[kSeedBatch], khi[kSeedBatch];
  __m256i rk[kSeedBatch / 8][2 * zo::kRounds];
  Philox8SeedPart sp[kSeedBatch / 8];
  const bool dec = decay != 1.0f;
  const __m256 dv = _mm256_set1_ps(decay);
  for (int64_t g0 = 0; g0 < nblocks; g0 += kGroup) {
    const int G = (int)std::min<int64_t>(kGroup, nblocks - g0);
    const uint64_t bfirst = block0 + (uint64_t)g0, blast = bfirst + (uint64_t)(G - 1);
    const bool one_c1 = (bfirst >> 32) == (blast >> 32);  // else the seed parts change inside
    for (int kb = 0; kb < K; kb += kSeedBatch) {
      const int KB = std::min(kSeedBatch, K - kb);
      const int nv = (KB + 7) / 8, nu = (KB + 31) / 32;
      for (int k = 0; k < KB; ++k) {
        klo[k] = zo::key_lo(seeds[kb + k]);
        khi[k] = zo::key_hi(seeds[kb + k]);
      }
      for (int k = KB; k < 8 * nv; ++k) klo[k] = khi[k] = 0;
      for (int v = 0; v < nv; ++v) {
        __m256i k0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(klo + 8 * v));
        __m256i k1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(khi + 8 * v));
        for (int r = 0; r < zo::kRounds; ++r) {
          rk[v][2 * r] = k0;
          rk[v][2 * r + 1] = k1;
          k0 = _mm256_add_epi32(k0, _mm256_set1_epi32((int)zo::kKeyA));
          k1 = _mm256_add_epi32(k1, _mm256_set1_epi32((int)zo::kKeyB));
        }
        if (one_c1) sp[v] = philox8_seed_part(rk[v], _mm256_set1_epi32((int)(uint32_t)(bfirst >> 32)));
      }
      // Seeds past the batch (lanes of the last, partial vector and the rest of the last 32-seed
      // chunk) get zero words: their bits fall in nibbles no group reads or, for a short last group,
      // in index bits its table ignores (T_g[m] = T_g[m & (2**n_g - 1)]).
      const int tail = KB - 8 * (nv - 1);
      alignas(32) int32_t tm[8];
      for (int i = 0; i < 8; ++i) tm[i] = i < tail ? -1 : 0;
      const __m256i tailmask = _mm256_load_si256(reinterpret_cast<const __m256i*>(tm));
      // 1. Philox: per block, 8 seeds per vector, up to 4 vectors interleaved, from round 2 on.
      for (int g = 0; g < G; ++g) {
        const uint64_t b = bfirst + (uint64_t)g;
        if (!one_c1)
          for (int v = 0; v < nv; ++v) sp[v] = philox8_seed_part(rk[v], _mm256_set1_epi32((int)(uint32_t)(b >> 32)));
        const uint64_t pa = (uint64_t)zo::kRoundA * (uint64_t)(uint32_t)(b & 0xffffffffu);
        const __m256i hA1 = _mm256_set1_epi32((int)(uint32_t)(pa >> 32));
        const __m256i lA1 = _mm256_set1_epi32((int)(uint32_t)pa);
        Philox8State st[kSeedBatch / 8];
        int v = 0;
        for (; v + 4 <= nv; v += 4) {
          const __m256i* rks[4] = {rk[v], rk[v + 1], rk[v + 2], rk[v + 3]};
          for (int m = 0; m < 4; ++m) st[v + m] = philox8_after_round2(hA1, lA1, rk[v + m], sp[v + m]);
          philox8_rounds<4, 2>(st + v, rks);
        }
        for (; v + 2 <= nv; v += 2) {
          const __m256i* rks[2] = {rk[v], rk[v + 1]};
          for (int m = 0; m < 2; ++m) st[v + m] = philox8_after_round2(hA1, lA1, rk[v + m], sp[v + m]);
          philox8_rounds<2, 2>(st + v, rks);
        }
        for (; v < nv; ++v) {
          const __m256i* rks[1] = {rk[v]};
          st[v] = philox8_after_round2(hA1, lA1, rk[v], sp[v]);
          philox8_rounds<1, 2>(st + v, rks);
        }
        st[nv - 1].x0 = _mm256_and_si256(st[nv - 1].x0, tailmask);
        st[nv - 1].x1 = _mm256_and_si256(st[nv - 1].x1, tailmask);
        st[nv - 1].x2 = _mm256_and_si256(st[nv - 1].x2, tailmask);
        st[nv - 1].x3 = _mm256_and_si256(st[nv - 1].x3, tailmask);
        for (v = 0; v < nv; ++v) {
          _mm256_store_si256(reinterpret_cast<__m256i*>(wbuf[g][0] + 8 * v), st[v].x0);
          _mm256_store_si256(reinterpret_cast<__m256i*>(wbuf[g][1] + 8 * v), st[v].x1);
          _mm256_store_si256(reinterpret_cast<__m256i*>(wbuf[g][2] + 8 * v), st[v].x2);
          _mm256_store_si256(reinterpret_cast<__m256i*>(wbuf[g][3] + 8 * v), st[v].x3);
        }
        for (v = nv; v < 4 * nu; ++v)  // rest of the last 32-seed chunk
          for (int q = 0; q < 4; ++q)
            _mm256_store_si256(reinterpret_cast<__m256i*>(wbuf[g][q] + 8 * v), _mm256_setzero_si256());
      }
      const bool first = kb == 0, last = kb + kSeedBatch >= K;
      const int ngb = (KB + kSumGroup - 1) / kSumGroup;
      const float* Tb = tables + 16 * (kb / kSumGroup);
      for (int g = 0; g < G; ++g) {
        // 2. Transpose the block's sign bits into per-element words of seed bits.
        for (int u = 0; u < nu; ++u)
          for (int q = 0; q < 4; ++q) transpose32_avx2(wbuf[g][q] + 32 * u, idx[u] + 32 * q);
        // 3. acc = acc + T_g[nibble], groups in order; 64 elements (8 vectors) at a time.
        const int64_t eb = (g0 + g) * (int64_t)zo::kBlock;
        for (int h = 0; h < 2; ++h) {
          __m256 acc[8];
          for (int v = 0; v < 8; ++v)
            acc[v] = first ? _mm256_setzero_ps() : _mm256_load_ps(accbuf[g] + 64 * h + 8 * v);
          for (int u = 0; u < nu; ++u)
            table_chunk(idx[u] + 64 * h, Tb + 128 * u, std::min(8, ngb - 8 * u), acc);
          if (last) {
            for (int v = 0; v < 8; ++v) finalize8(p, dt, eb + 64 * h + 8 * v, acc[v], dec, dv);
          } else {
            for (int v = 0; v < 8; ++v) _mm256_store_ps(accbuf[g] + 64 * h + 8 * v, acc[v]);
          }
        }
      }
    }
  }
}

}  // namespace zo_cpu
#endif

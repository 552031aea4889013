// Micro-benchmark of inner-loop variants of the CPU kernel's K >= 16 paths (AVX-512 and AVX2), single
// thread, data in L1: why apply_seeds_ with K = 64 is compute-bound where it is. Built and run by
// benchmarks/bench_cpu_variants.py; prints one JSON object per line (field "isa" names the path).
//
// Part 1, "accumulate": per seed and 16 elements, turn a sign bit into +c or -c and add it to an fp32
// accumulator, in seed order (the arithmetic before the grouped order). Every variant is checked
// bit for bit against variant "test_xor_add". Variant "grouped4_gfni_permps" is the kernel's grouped
// order (subset-sum tables over groups of 4 seeds: bit transpose with vpermb + gf2p8affineqb +
// vpermt2b, then vpsrld + vpermps + vaddps per group), a different sum, checked bit for bit against a
// scalar implementation of that order instead. Part 2, "philox": Philox4x32-10 on 16 lanes, checked
// against the project's scalar Philox (csrc/philox.h); latency-bound (one evaluation at a time) and
// interleaved (4 independent). The AVX2 rows time the avx2 path's own code (csrc/cpu/avx2_blocks.h):
// "avx2_direct_sllv_blendv" (its K < 16 sums: one vpsllvd + vblendvps per seed and 8 elements, the
// group's terms added left to right), "avx2_transpose_permps2" (its K >= 16 sums: movemask transpose,
// two vpermps + vblendvps per group and 8 elements) and its 8-lane Philox.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "../../csrc/cpu/avx2_blocks.h"   // the avx2 path's Philox and bit transpose
#include "../../csrc/cpu/grouped_sum.h"   // the kernel's tables and the AVX-512 bit transpose
#include "../../csrc/philox.h"            // the one scalar Philox4x32-10
#include "timing.h"                       // thread CPU time, best of N, clock calibration

#define ZO_T __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bitalg,avx512vbmi,gfni"), noinline))

constexpr int G = 16, K = 64;
alignas(64) uint32_t planes[4][G * K];  // word q of the Philox output of (block g, seed k)
alignas(64) uint32_t ncb[K], pcb[K];    // bits of -c_k and +c_k
alignas(64) float out[G][128];

static uint32_t f2u(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
static float u2f_(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

#define ACC_BEGIN                                                         \
  for (int g = 0; g < G; ++g) {                                           \
    __m512 acc[8];                                                        \
    for (int v = 0; v < 8; ++v) acc[v] = _mm512_setzero_ps();             \
    for (int k = 0; k < K; ++k) {                                         \
      const __m512i nc = _mm512_set1_epi32((int)ncb[k]);                  \
      const __m512i pc = _mm512_set1_epi32((int)pcb[k]);                  \
      (void)pc;                                                           \
      for (int q = 0; q < 4; ++q) {
#define ACC_END                                                           \
        acc[2 * q] = _mm512_add_ps(acc[2 * q], _mm512_castsi512_ps(t0)); \
        acc[2 * q + 1] = _mm512_add_ps(acc[2 * q + 1], _mm512_castsi512_ps(t1)); \
      }                                                                   \
    }                                                                     \
    for (int v = 0; v < 8; ++v) _mm512_store_ps(out[g] + 16 * v, acc[v]); \
  }

struct Consts {
  __m512i iota, sign, bit_lo, bit_hi, sh_lo, sh_hi;
};
ZO_T static Consts consts() {
  Consts c;
  c.iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  c.sign = _mm512_set1_epi32((int)0x80000000u);
  c.bit_lo = _mm512_sllv_epi32(_mm512_set1_epi32(1), c.iota);
  c.bit_hi = _mm512_sllv_epi32(_mm512_set1_epi32(1 << 16), c.iota);
  c.sh_lo = _mm512_sub_epi32(_mm512_set1_epi32(31), c.iota);
  c.sh_hi = _mm512_sub_epi32(_mm512_set1_epi32(15), c.iota);
  return c;
}

// vptestmd + merge-masked vpxord (needs a register copy per use) + vaddps
ZO_T void acc_test_xor_add() {
  const Consts C = consts();
  ACC_BEGIN
  const __m512i w = _mm512_set1_epi32((int)planes[q][g * K + k]);
  const __m512i t0 = _mm512_mask_xor_epi32(nc, _mm512_test_epi32_mask(w, C.bit_lo), nc, C.sign);
  const __m512i t1 = _mm512_mask_xor_epi32(nc, _mm512_test_epi32_mask(w, C.bit_hi), nc, C.sign);
  ACC_END
}
// vptestmd + vpblendmd + vaddps (the kernel's choice)
ZO_T void acc_test_blend_add() {
  const Consts C = consts();
  ACC_BEGIN
  const __m512i w = _mm512_set1_epi32((int)planes[q][g * K + k]);
  const __m512i t0 = _mm512_mask_blend_epi32(_mm512_test_epi32_mask(w, C.bit_lo), nc, pc);
  const __m512i t1 = _mm512_mask_blend_epi32(_mm512_test_epi32_mask(w, C.bit_hi), nc, pc);
  ACC_END
}
// vpsllvd (bit j to the sign) + vpternlogd (-c with that sign bit flipped) + vaddps
ZO_T void acc_shift_ternlog_add() {
  const Consts C = consts();
  ACC_BEGIN
  const __m512i w = _mm512_set1_epi32((int)planes[q][g * K + k]);
  const __m512i t0 = _mm512_ternarylogic_epi32(_mm512_sllv_epi32(w, C.sh_lo), C.sign, nc, 0x6A);
  const __m512i t1 = _mm512_ternarylogic_epi32(_mm512_sllv_epi32(w, C.sh_hi), C.sign, nc, 0x6A);
  ACC_END
}
// mask loaded straight from memory (kmovw k, m16) + vpblendmd + vaddps
ZO_T void acc_kload_blend_add() {
  ACC_BEGIN
  __mmask16* h = reinterpret_cast<__mmask16*>(&planes[q][g * K + k]);
  const __m512i t0 = _mm512_mask_blend_epi32(_load_mask16(h), nc, pc);
  const __m512i t1 = _mm512_mask_blend_epi32(_load_mask16(h + 1), nc, pc);
  ACC_END
}
// vpshufbitqmb: 64 mask bits per instruction, kshiftrq for the 16-bit sub-masks
ZO_T void acc_bitshuffle_kshift() {
  alignas(64) uint8_t ib[64];
  for (int j = 0; j < 64; ++j) ib[j] = (uint8_t)j;
  const __m512i idx = _mm512_load_si512(ib);
  for (int g = 0; g < G; ++g) {
    __m512 acc[8];
    for (int v = 0; v < 8; ++v) acc[v] = _mm512_setzero_ps();
    for (int k = 0; k < K; ++k) {
      const __m512i nc = _mm512_set1_epi32((int)ncb[k]), pc = _mm512_set1_epi32((int)pcb[k]);
      for (int h = 0; h < 2; ++h) {
        const uint64_t half = (uint64_t)planes[2 * h][g * K + k] | ((uint64_t)planes[2 * h + 1][g * K + k] << 32);
        const __mmask64 m = _mm512_bitshuffle_epi64_mask(_mm512_set1_epi64((long long)half), idx);
        const __mmask16 ms[4] = {(__mmask16)m, (__mmask16)_kshiftri_mask64(m, 16),
                                 (__mmask16)_kshiftri_mask64(m, 32), (__mmask16)_kshiftri_mask64(m, 48)};
        for (int s = 0; s < 4; ++s)
          acc[4 * h + s] = _mm512_add_ps(acc[4 * h + s], _mm512_castsi512_ps(_mm512_mask_blend_epi32(ms[s], nc, pc)));
      }
    }
    for (int v = 0; v < 8; ++v) _mm512_store_ps(out[g] + 16 * v, acc[v]);
  }
}
// t = acc - c for every lane, then acc + c merged into the lanes whose bit is set (two adds, no select)
ZO_T void acc_two_adds() {
  const Consts C = consts();
  for (int g = 0; g < G; ++g) {
    __m512 acc[8];
    for (int v = 0; v < 8; ++v) acc[v] = _mm512_setzero_ps();
    for (int k = 0; k < K; ++k) {
      const __m512 nc = _mm512_castsi512_ps(_mm512_set1_epi32((int)ncb[k]));
      const __m512 pc = _mm512_castsi512_ps(_mm512_set1_epi32((int)pcb[k]));
      for (int q = 0; q < 4; ++q) {
        const __m512i w = _mm512_set1_epi32((int)planes[q][g * K + k]);
        const __m512 a0 = _mm512_add_ps(acc[2 * q], nc), a1 = _mm512_add_ps(acc[2 * q + 1], nc);
        acc[2 * q] = _mm512_mask_add_ps(a0, _mm512_test_epi32_mask(w, C.bit_lo), acc[2 * q], pc);
        acc[2 * q + 1] = _mm512_mask_add_ps(a1, _mm512_test_epi32_mask(w, C.bit_hi), acc[2 * q + 1], pc);
      }
    }
    for (int v = 0; v < 8; ++v) _mm512_store_ps(out[g] + 16 * v, acc[v]);
  }
}
// test + blend, half of the adds as fma(1, t, acc) (exact: 1 * t is exact) to use the FMA pipes
ZO_T void acc_test_blend_half_fma() {
  const Consts C = consts();
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int g = 0; g < G; ++g) {
    __m512 acc[8];
    for (int v = 0; v < 8; ++v) acc[v] = _mm512_setzero_ps();
    for (int k = 0; k < K; ++k) {
      const __m512i nc = _mm512_set1_epi32((int)ncb[k]), pc = _mm512_set1_epi32((int)pcb[k]);
      for (int q = 0; q < 4; ++q) {
        const __m512i w = _mm512_set1_epi32((int)planes[q][g * K + k]);
        const __m512i t0 = _mm512_mask_blend_epi32(_mm512_test_epi32_mask(w, C.bit_lo), nc, pc);
        const __m512i t1 = _mm512_mask_blend_epi32(_mm512_test_epi32_mask(w, C.bit_hi), nc, pc);
        acc[2 * q] = _mm512_add_ps(acc[2 * q], _mm512_castsi512_ps(t0));
        acc[2 * q + 1] = _mm512_fmadd_ps(one, _mm512_castsi512_ps(t1), acc[2 * q + 1]);
      }
    }
    for (int v = 0; v < 8; ++v) _mm512_store_ps(out[g] + 16 * v, acc[v]);
  }
}

// Grouped order: T_g[m] = sum over the group's 4 seeds of (bit j of m ? c : -c), left to right;
// acc = 0; acc = acc + T_g[nibble g of the element's seed bits], groups in order.
alignas(64) float tab[K / 4][16];
static void make_tables() {
  float c[K];
  for (int k = 0; k < K; ++k) c[k] = u2f_(pcb[k]);
  zo_cpu::group_tables(c, K, &tab[0][0]);
}
static void grouped_scalar(float (*o)[128]) {
  for (int g = 0; g < G; ++g)
    for (int e = 0; e < 128; ++e) {
      float acc = 0.0f;
      for (int gi = 0; gi < K / 4; ++gi) {
        int idx = 0;
        for (int j = 0; j < 4; ++j) idx |= ((planes[e / 32][g * K + 4 * gi + j] >> (e % 32)) & 1) << j;
        acc = acc + tab[gi][idx];
      }
      o[g][e] = acc;
    }
}
ZO_T void acc_grouped4() {
  for (int g = 0; g < G; ++g) {
    __m512i idx[8][2];
    const uint32_t* const words[4] = {&planes[0][g * K], &planes[1][g * K], &planes[2][g * K], &planes[3][g * K]};
    zo_cpu::seed_bit_indices(words, 4, idx);
    __m512 acc[8];
    for (int v = 0; v < 8; ++v) acc[v] = _mm512_setzero_ps();
    for (int gi = 0; gi < K / 4; ++gi) {
      const __m512 T = _mm512_load_ps(tab[gi]);
      for (int ev = 0; ev < 8; ++ev)
        acc[ev] = _mm512_add_ps(acc[ev], _mm512_permutexvar_ps(_mm512_srli_epi32(idx[ev][gi >> 3], 4 * (gi & 7)), T));
    }
    for (int v = 0; v < 8; ++v) _mm512_store_ps(out[g] + 16 * v, acc[v]);
  }
}

// ---- Philox ---------------------------------------------------------------------------------
constexpr uint32_t RA = zo::kRoundA, RB = zo::kRoundB, KA = zo::kKeyA, KB = zo::kKeyB;
static void philox_scalar(uint32_t c[4], uint32_t k0, uint32_t k1) {  // counter (c0, c1, 0, 0)
  zo::philox4x32_10(c[0], c[1], k0, k1, c);
}
// blend: products recombined with shifts + vpblendmd, keys bumped each round (previous kernel)
// shuffle: one merge-masked vpshufd per word, round keys from a table (the kernel's choice)
template <int M, bool kShuffle>
ZO_T void philox(const __m512i* c0, __m512i c1, const __m512i* rk, __m512i (*o)[4]) {
  __m512i x0[M], x1[M], x2[M], x3[M];
  for (int m = 0; m < M; ++m) { x0[m] = c0[m]; x1[m] = c1; x2[m] = _mm512_setzero_si512(); x3[m] = _mm512_setzero_si512(); }
  const __m512i A = _mm512_set1_epi64(RA), B = _mm512_set1_epi64(RB);
  __m512i k0 = rk[0], k1 = rk[1];
  for (int r = 0; r < 10; ++r) {
    for (int m = 0; m < M; ++m) {
      const __m512i ae = _mm512_mul_epu32(x0[m], A), ao = _mm512_mul_epu32(_mm512_srli_epi64(x0[m], 32), A);
      const __m512i be = _mm512_mul_epu32(x2[m], B), bo = _mm512_mul_epu32(_mm512_srli_epi64(x2[m], 32), B);
      __m512i hiA, loA, hiB, loB;
      if (kShuffle) {
        hiA = _mm512_mask_shuffle_epi32(ao, (__mmask16)0x5555, ae, (_MM_PERM_ENUM)0xF5);
        loA = _mm512_mask_shuffle_epi32(ae, (__mmask16)0xAAAA, ao, (_MM_PERM_ENUM)0xA0);
        hiB = _mm512_mask_shuffle_epi32(bo, (__mmask16)0x5555, be, (_MM_PERM_ENUM)0xF5);
        loB = _mm512_mask_shuffle_epi32(be, (__mmask16)0xAAAA, bo, (_MM_PERM_ENUM)0xA0);
        x0[m] = _mm512_ternarylogic_epi32(hiB, x1[m], rk[2 * r], 0x96);
        x2[m] = _mm512_ternarylogic_epi32(hiA, x3[m], rk[2 * r + 1], 0x96);
      } else {
        const __mmask16 odd = 0xAAAA;
        hiA = _mm512_mask_blend_epi32(odd, _mm512_srli_epi64(ae, 32), ao);
        loA = _mm512_mask_blend_epi32(odd, ae, _mm512_slli_epi64(ao, 32));
        hiB = _mm512_mask_blend_epi32(odd, _mm512_srli_epi64(be, 32), bo);
        loB = _mm512_mask_blend_epi32(odd, be, _mm512_slli_epi64(bo, 32));
        x0[m] = _mm512_ternarylogic_epi32(hiB, x1[m], k0, 0x96);
        x2[m] = _mm512_ternarylogic_epi32(hiA, x3[m], k1, 0x96);
      }
      x1[m] = loB; x3[m] = loA;
    }
    k0 = _mm512_add_epi32(k0, _mm512_set1_epi32((int)KA));
    k1 = _mm512_add_epi32(k1, _mm512_set1_epi32((int)KB));
  }
  for (int m = 0; m < M; ++m) { o[m][0] = x0[m]; o[m][1] = x1[m]; o[m][2] = x2[m]; o[m][3] = x3[m]; }
}

// shuffle, from round 2 on (the kernel's loop, philox16_multi_r2 in csrc/cpu/kernel_avx512.h): rounds
// 1 and 2 from the block's product A c0 (one per call, shared by the chains) and the seeds' part
// A (c1 ^ k0) (SP_*, computed once: the kernel shares it across blocks).
__m512i SP_H, SP_L;
ZO_T static void philox_seed_part_init(__m512i c1, const __m512i* rk) {
  const __m512i A = _mm512_set1_epi64(RA);
  const __m512i x = _mm512_xor_si512(rk[0], c1);
  const __m512i ae = _mm512_mul_epu32(x, A), ao = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), A);
  SP_H = _mm512_xor_si512(_mm512_mask_shuffle_epi32(ao, (__mmask16)0x5555, ae, (_MM_PERM_ENUM)0xF5), rk[3]);
  SP_L = _mm512_mask_shuffle_epi32(ae, (__mmask16)0xAAAA, ao, (_MM_PERM_ENUM)0xA0);
}
template <int M>
ZO_T void philox_r2(const __m512i* c0, __m512i c1, const __m512i* rk, __m512i (*o)[4]) {
  (void)c1;
  const __m512i A = _mm512_set1_epi64(RA), B = _mm512_set1_epi64(RB);
  const __m512i pe = _mm512_mul_epu32(c0[0], A);  // lanes hold one block: c0 is the same in every lane
  const __m512i hA1 = _mm512_permutexvar_epi32(_mm512_set1_epi32(1), pe), lA1 = _mm512_permutexvar_epi32(_mm512_setzero_si512(), pe);
  __m512i x0[M], x1[M], x2[M], x3[M];
  for (int m = 0; m < M; ++m) {
    const __m512i y = _mm512_xor_si512(hA1, rk[1]);
    const __m512i be = _mm512_mul_epu32(y, B), bo = _mm512_mul_epu32(_mm512_srli_epi64(y, 32), B);
    x0[m] = _mm512_xor_si512(_mm512_mask_shuffle_epi32(bo, (__mmask16)0x5555, be, (_MM_PERM_ENUM)0xF5), rk[2]);
    x1[m] = _mm512_mask_shuffle_epi32(be, (__mmask16)0xAAAA, bo, (_MM_PERM_ENUM)0xA0);
    x2[m] = _mm512_xor_si512(SP_H, lA1);
    x3[m] = SP_L;
  }
  for (int r = 2; r < 10; ++r) {
    for (int m = 0; m < M; ++m) {
      const __m512i ae = _mm512_mul_epu32(x0[m], A), ao = _mm512_mul_epu32(_mm512_srli_epi64(x0[m], 32), A);
      const __m512i be = _mm512_mul_epu32(x2[m], B), bo = _mm512_mul_epu32(_mm512_srli_epi64(x2[m], 32), B);
      const __m512i hiA = _mm512_mask_shuffle_epi32(ao, (__mmask16)0x5555, ae, (_MM_PERM_ENUM)0xF5);
      const __m512i loA = _mm512_mask_shuffle_epi32(ae, (__mmask16)0xAAAA, ao, (_MM_PERM_ENUM)0xA0);
      const __m512i hiB = _mm512_mask_shuffle_epi32(bo, (__mmask16)0x5555, be, (_MM_PERM_ENUM)0xF5);
      const __m512i loB = _mm512_mask_shuffle_epi32(be, (__mmask16)0xAAAA, bo, (_MM_PERM_ENUM)0xA0);
      x0[m] = _mm512_ternarylogic_epi32(hiB, x1[m], rk[2 * r], 0x96);
      x2[m] = _mm512_ternarylogic_epi32(hiA, x3[m], rk[2 * r + 1], 0x96);
      x1[m] = loB; x3[m] = loA;
    }
  }
  for (int m = 0; m < M; ++m) { o[m][0] = x0[m]; o[m][1] = x1[m]; o[m][2] = x2[m]; o[m][3] = x3[m]; }
}

// ---- AVX2 (the avx2 path's schemes) -------------------------------------------------------
#define ZO_T2 ZO_AVX2 __attribute__((noinline))
// K < 16 scheme: per group, T = s_0 c_0 + s_1 c_1 + ... (vpsllvd + vblendvps per seed), acc += T.
ZO_T2 void acc_avx2_direct() {
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256i sh[4];
  for (int v = 0; v < 4; ++v) sh[v] = _mm256_sub_epi32(_mm256_set1_epi32(31 - 8 * v), iota);
  for (int g = 0; g < G; ++g)
    for (int q = 0; q < 4; ++q) {
      __m256 acc[4];
      for (int v = 0; v < 4; ++v) acc[v] = _mm256_setzero_ps();
      for (int k0 = 0; k0 < K; k0 += 4) {
        __m256 T[4];
        for (int s = 0; s < 4; ++s) {
          const __m256i w = _mm256_set1_epi32((int)planes[q][g * K + k0 + s]);
          const __m256 pc = _mm256_castsi256_ps(_mm256_set1_epi32((int)pcb[k0 + s]));
          const __m256 nc = _mm256_castsi256_ps(_mm256_set1_epi32((int)ncb[k0 + s]));
          for (int v = 0; v < 4; ++v) {
            const __m256 t = _mm256_blendv_ps(nc, pc, _mm256_castsi256_ps(_mm256_sllv_epi32(w, sh[v])));
            T[v] = s == 0 ? t : _mm256_add_ps(T[v], t);
          }
        }
        for (int v = 0; v < 4; ++v) acc[v] = _mm256_add_ps(acc[v], T[v]);
      }
      for (int v = 0; v < 4; ++v) _mm256_store_ps(out[g] + 32 * q + 8 * v, acc[v]);
    }
}
// K >= 16 scheme (the kernel's code): transpose32_avx2, then per group and 8 elements two vpermps
// + vblendvps + vaddps with immediate shift counts (table_chunk).
alignas(32) uint32_t idx2[G][K / 32][128];  // the transposed words of every block (pieces below)
ZO_T2 void tr_avx2_movemask() {
  for (int g = 0; g < G; ++g)
    for (int u = 0; u < K / 32; ++u)
      for (int q = 0; q < 4; ++q) zo_cpu::transpose32_avx2(&planes[q][g * K + 32 * u], idx2[g][u] + 32 * q);
}
ZO_T2 void lk_avx2_permps2() {
  for (int g = 0; g < G; ++g)
    for (int h = 0; h < 2; ++h) {
      __m256 acc[8];
      for (int v = 0; v < 8; ++v) acc[v] = _mm256_setzero_ps();
      for (int u = 0; u < K / 32; ++u) zo_cpu::table_chunk(idx2[g][u] + 64 * h, tab[8 * u], 8, acc);
      for (int v = 0; v < 8; ++v) _mm256_store_ps(out[g] + 64 * h + 8 * v, acc[v]);
    }
}
ZO_T2 void acc_avx2_table() {
  alignas(32) uint32_t idx[K / 32][128];
  for (int g = 0; g < G; ++g) {
    for (int u = 0; u < K / 32; ++u)
      for (int q = 0; q < 4; ++q) zo_cpu::transpose32_avx2(&planes[q][g * K + 32 * u], idx[u] + 32 * q);
    for (int h = 0; h < 2; ++h) {
      __m256 acc[8];
      for (int v = 0; v < 8; ++v) acc[v] = _mm256_setzero_ps();
      for (int u = 0; u < K / 32; ++u) zo_cpu::table_chunk(idx[u] + 64 * h, tab[8 * u], 8, acc);
      for (int v = 0; v < 8; ++v) _mm256_store_ps(out[g] + 64 * h + 8 * v, acc[v]);
    }
  }
}
// The same with the shift counts in a register (vpsrld/vpslld ymm, xmm: the previous kernel's loop),
// optionally (kFma) each add as fma(1, t, acc) (exact: 1 * t is exact and the fma rounds once).
template <bool kFma>
ZO_T2 void acc_avx2_table_regshift() {
  alignas(32) uint32_t idx[K / 32][128];
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int g = 0; g < G; ++g) {
    for (int u = 0; u < K / 32; ++u)
      for (int q = 0; q < 4; ++q) zo_cpu::transpose32_avx2(&planes[q][g * K + 32 * u], idx[u] + 32 * q);
    for (int h = 0; h < 2; ++h) {
      __m256 acc[8];
      for (int v = 0; v < 8; ++v) acc[v] = _mm256_setzero_ps();
      for (int gi = 0; gi < K / 4; ++gi) {
        const int u = gi >> 3, gl = gi & 7, n = 4 * (gl & 1) + (gl >> 1);
        const __m128i shr = _mm_cvtsi32_si128(4 * n), shl = _mm_cvtsi32_si128(28 - 4 * n);
        const __m256 TL = _mm256_load_ps(tab[gi]), TH = _mm256_load_ps(tab[gi] + 8);
        for (int v = 0; v < 8; ++v) {
          const __m256i I = _mm256_load_si256(reinterpret_cast<const __m256i*>(idx[u] + 64 * h + 8 * v));
          const __m256i ix = _mm256_srl_epi32(I, shr);
          const __m256 t = _mm256_blendv_ps(_mm256_permutevar8x32_ps(TL, ix), _mm256_permutevar8x32_ps(TH, ix),
                                            _mm256_castsi256_ps(_mm256_sll_epi32(I, shl)));
          acc[v] = kFma ? _mm256_fmadd_ps(one, t, acc[v]) : _mm256_add_ps(acc[v], t);
        }
      }
      for (int v = 0; v < 8; ++v) _mm256_store_ps(out[g] + 64 * h + 8 * v, acc[v]);
    }
  }
}
// Symmetric tables: T_g[m ^ 15] = -T_g[m] (round to nearest is symmetric), so with the words of seeds
// 0..2 of each group xor-ed with seed 3's (3 vector ops per 8 seeds and word, timed here) the low 3
// index bits pick one of 8 entries (one vpermps) and bit 3 the sign (vpslld + vandps + vxorps).
alignas(32) float tab8[K / 4][8];
alignas(64) uint32_t planesX[4][G * K];
ZO_T2 void acc_avx2_table_sym() {
  const __m256i sel = _mm256_setr_epi32(-1, -1, -1, 0, -1, -1, -1, 0);
  for (int q = 0; q < 4; ++q)
    for (int i = 0; i < G * K; i += 8) {
      const __m256i w = _mm256_load_si256(reinterpret_cast<const __m256i*>(&planes[q][i]));
      _mm256_store_si256(reinterpret_cast<__m256i*>(&planesX[q][i]),
                         _mm256_xor_si256(w, _mm256_and_si256(_mm256_shuffle_epi32(w, 0xFF), sel)));
    }
  alignas(32) uint32_t idx[K / 32][128];
  const __m256 SIGNF = _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u));
  for (int g = 0; g < G; ++g) {
    for (int u = 0; u < K / 32; ++u)
      for (int q = 0; q < 4; ++q) zo_cpu::transpose32_avx2(&planesX[q][g * K + 32 * u], idx[u] + 32 * q);
    for (int h = 0; h < 2; ++h) {
      __m256 acc[8];
      for (int v = 0; v < 8; ++v) acc[v] = _mm256_setzero_ps();
      for (int u = 0; u < K / 32; ++u) {
#pragma GCC unroll 8
        for (int gl = 0; gl < 8; ++gl) {
          const int gi = 8 * u + gl, n = 4 * (gl & 1) + (gl >> 1);
          const __m256 TL = _mm256_load_ps(tab8[gi]);
#pragma GCC unroll 8
          for (int v = 0; v < 8; ++v) {
            const __m256i I = _mm256_load_si256(reinterpret_cast<const __m256i*>(idx[u] + 64 * h + 8 * v));
            const __m256 t = _mm256_permutevar8x32_ps(TL, _mm256_srli_epi32(I, 4 * n));
            const __m256 sg = _mm256_and_ps(_mm256_castsi256_ps(_mm256_slli_epi32(I, 28 - 4 * n)), SIGNF);
            acc[v] = _mm256_add_ps(acc[v], _mm256_xor_ps(t, sg));
          }
        }
      }
      for (int v = 0; v < 8; ++v) _mm256_store_ps(out[g] + 64 * h + 8 * v, acc[v]);
    }
  }
}
// Byte planes: 8 x 8 bit tiles transposed in qwords by three delta swaps (a word's byte c of 8
// seeds in, 8 elements' bytes of 8 seed bits out: two groups' nibbles), then per group and 32
// elements four vpshufb (the table's 4 byte planes, 16 entries each) and 8 unpacks rebuild the
// floats (in a fixed permuted order, undone once per block) for 4 vaddps.
alignas(32) uint8_t planes8[K / 4][4][32];  // [group][byte plane][both 128-bit lanes]
ZO_AVX2 static inline __m256i tile8x8_transpose(__m256i x) {
  __m256i t;
  t = _mm256_and_si256(_mm256_xor_si256(x, _mm256_srli_epi64(x, 7)), _mm256_set1_epi64x(0x00AA00AA00AA00AALL));
  x = _mm256_xor_si256(_mm256_xor_si256(x, t), _mm256_slli_epi64(t, 7));
  t = _mm256_and_si256(_mm256_xor_si256(x, _mm256_srli_epi64(x, 14)), _mm256_set1_epi64x(0x0000CCCC0000CCCCLL));
  x = _mm256_xor_si256(_mm256_xor_si256(x, t), _mm256_slli_epi64(t, 14));
  t = _mm256_and_si256(_mm256_xor_si256(x, _mm256_srli_epi64(x, 28)), _mm256_set1_epi64x(0x00000000F0F0F0F0LL));
  return _mm256_xor_si256(_mm256_xor_si256(x, t), _mm256_slli_epi64(t, 28));
}
ZO_AVX2 static inline void planes_lookup(const uint8_t (*P)[32], __m256i I, __m256 F[4]) {
  const __m256i p0 = _mm256_shuffle_epi8(_mm256_load_si256(reinterpret_cast<const __m256i*>(P[0])), I);
  const __m256i p1 = _mm256_shuffle_epi8(_mm256_load_si256(reinterpret_cast<const __m256i*>(P[1])), I);
  const __m256i p2 = _mm256_shuffle_epi8(_mm256_load_si256(reinterpret_cast<const __m256i*>(P[2])), I);
  const __m256i p3 = _mm256_shuffle_epi8(_mm256_load_si256(reinterpret_cast<const __m256i*>(P[3])), I);
  const __m256i l01 = _mm256_unpacklo_epi8(p0, p1), h01 = _mm256_unpackhi_epi8(p0, p1);
  const __m256i l23 = _mm256_unpacklo_epi8(p2, p3), h23 = _mm256_unpackhi_epi8(p2, p3);
  F[0] = _mm256_add_ps(F[0], _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23)));
  F[1] = _mm256_add_ps(F[1], _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23)));
  F[2] = _mm256_add_ps(F[2], _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23)));
  F[3] = _mm256_add_ps(F[3], _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23)));
}
alignas(32) uint8_t tiles[G][4][K / 8][32];  // the transposed tiles of every block (pieces below)
ZO_AVX2 static inline __m256i gather_tiles(const uint32_t* w8) {  // qword c = byte c of 8 seeds
  const __m256i shuf = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                        0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const __m256i W = _mm256_load_si256(reinterpret_cast<const __m256i*>(w8));
  return _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(W, shuf), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}
ZO_AVX2 static inline void store_planes_acc(float* o, const __m256 F[4]) {
  _mm256_store_ps(o, _mm256_permute2f128_ps(F[0], F[1], 0x20));
  _mm256_store_ps(o + 8, _mm256_permute2f128_ps(F[2], F[3], 0x20));
  _mm256_store_ps(o + 16, _mm256_permute2f128_ps(F[0], F[1], 0x31));
  _mm256_store_ps(o + 24, _mm256_permute2f128_ps(F[2], F[3], 0x31));
}
ZO_T2 void acc_avx2_tiles_pshufb() {
  const __m256i lo4 = _mm256_set1_epi8(0x0F);
  for (int g = 0; g < G; ++g)
    for (int q = 0; q < 4; ++q) {
      __m256 F[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int v = 0; v < K / 8; ++v) {
        const __m256i V = tile8x8_transpose(gather_tiles(&planes[q][g * K + 8 * v]));
        planes_lookup(planes8[2 * v], _mm256_and_si256(V, lo4), F);
        planes_lookup(planes8[2 * v + 1], _mm256_and_si256(_mm256_srli_epi16(V, 4), lo4), F);
      }
      store_planes_acc(out[g] + 32 * q, F);
    }
}
ZO_T2 void tr_avx2_tiles() {
  for (int g = 0; g < G; ++g)
    for (int q = 0; q < 4; ++q)
      for (int v = 0; v < K / 8; ++v)
        _mm256_store_si256(reinterpret_cast<__m256i*>(tiles[g][q][v]),
                           tile8x8_transpose(gather_tiles(&planes[q][g * K + 8 * v])));
}
ZO_T2 void lk_avx2_pshufb() {
  const __m256i lo4 = _mm256_set1_epi8(0x0F);
  for (int g = 0; g < G; ++g)
    for (int q = 0; q < 4; ++q) {
      __m256 F[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int v = 0; v < K / 8; ++v) {
        const __m256i V = _mm256_load_si256(reinterpret_cast<const __m256i*>(tiles[g][q][v]));
        planes_lookup(planes8[2 * v], _mm256_and_si256(V, lo4), F);
        planes_lookup(planes8[2 * v + 1], _mm256_and_si256(_mm256_srli_epi16(V, 4), lo4), F);
      }
      store_planes_acc(out[g] + 32 * q, F);
    }
}
alignas(32) __m256i RK8[4][20], C08[4], C18[4], OUT8[4][4];
template <int M>
ZO_T2 void philox8_loop(int N) {
  const __m256i* rks[4] = {RK8[0], RK8[1], RK8[2], RK8[3]};
  for (int i = 0; i < N; ++i) {
    zo_cpu::philox8_multi<M>(C08, C18, rks, OUT8);
    asm volatile("" ::: "memory");  // every evaluation is done and stored (nothing hoisted)
  }
}
// The kernel's loop (kernel_avx2.h, lanes over seeds): rounds 1 and 2 from the block's product A c0
// (scalar, per evaluation) and the seeds' part A (c1 ^ k0) (computed once, shared by every block),
// then rounds 3..10 on 4 interleaved states.
template <int M>
ZO_T2 void philox8_r2_loop(int N) {
  const __m256i* rks[4] = {RK8[0], RK8[1], RK8[2], RK8[3]};
  zo_cpu::Philox8SeedPart sp[4];
  for (int m = 0; m < M; ++m) sp[m] = zo_cpu::philox8_seed_part(RK8[m], _mm256_set1_epi32(5));
  for (int i = 0; i < N; ++i) {
    const uint64_t pa = (uint64_t)zo::kRoundA * 77u;  // block counter (77, 5)
    const __m256i hA1 = _mm256_set1_epi32((int)(uint32_t)(pa >> 32)), lA1 = _mm256_set1_epi32((int)(uint32_t)pa);
    zo_cpu::Philox8State st[4];
    for (int m = 0; m < M; ++m) st[m] = zo_cpu::philox8_after_round2(hA1, lA1, RK8[m], sp[m]);
    zo_cpu::philox8_rounds<M, 2>(st, rks);
    for (int m = 0; m < M; ++m) {
      OUT8[m][0] = st[m].x0; OUT8[m][1] = st[m].x1; OUT8[m][2] = st[m].x2; OUT8[m][3] = st[m].x3;
    }
    asm volatile("" ::: "memory");
  }
}
ZO_T2 static bool philox8_matches(int M) {
  bool ok = true;
  alignas(32) uint32_t o[4][8], k0[8], k1[8];
  for (int m = 0; m < M; ++m) {
    for (int q = 0; q < 4; ++q) _mm256_store_si256(reinterpret_cast<__m256i*>(o[q]), OUT8[m][q]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(k0), RK8[m][0]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(k1), RK8[m][1]);
    for (int l = 0; l < 8; ++l) {
      uint32_t c[4] = {77, 5, 0, 0};
      philox_scalar(c, k0[l], k1[l]);
      for (int q = 0; q < 4; ++q) ok &= c[q] == o[q][l];
    }
  }
  return ok;
}

using zo_bench::best_of;

alignas(64) __m512i RK[20], C0[4], OUT[4][4];
alignas(64) uint32_t k0s[16], k1s[16];
using PhiloxFn = void (*)(const __m512i*, __m512i, const __m512i*, __m512i (*)[4]);

ZO_T static bool philox_matches(int M) {
  bool ok = true;
  alignas(64) uint32_t o[4][16];
  for (int m = 0; m < M; ++m) {
    for (int q = 0; q < 4; ++q) _mm512_store_si512(o[q], OUT[m][q]);
    for (int l = 0; l < 16; ++l) {
      uint32_t c[4] = {77, 5, 0, 0};
      philox_scalar(c, k0s[l], k1s[l]);
      for (int q = 0; q < 4; ++q) ok &= c[q] == o[q][l];
    }
  }
  return ok;
}

// N evaluations (M at a time), each depending on the previous one's output (value unchanged).
ZO_T static void philox_loop(PhiloxFn f, int M, int N) {
  const __m512i c1 = _mm512_set1_epi32(5);
  for (int i = 0; i < N; ++i) {
    f(C0, c1, RK, OUT);
    asm volatile("" ::: "memory");  // every evaluation is done and stored (nothing hoisted)
  }
}

static double ghz = 1.0;
static void setup() {
  uint32_t x = 12345;
  for (int q = 0; q < 4; ++q)
    for (int i = 0; i < G * K; ++i) { x ^= x << 13; x ^= x >> 17; x ^= x << 5; planes[q][i] = x; }
  for (int k = 0; k < K; ++k) {
    const float c = 0.001f * (k + 1) * ((k & 1) ? 1.0f : -1.0f);
    pcb[k] = f2u(c); ncb[k] = f2u(-c);
  }
  make_tables();
  ghz = zo_bench::calibrate_ghz();  // a chain of dependent integer adds runs at one per cycle
  std::printf("{\"part\": \"clock\", \"ghz\": %.3f}\n", ghz);
}

static void print_acc(const char* isa, const char* name, double t, bool same, bool grouped) {
  const double groups = (double)G * K * 128 / 16;  // 16 element-seeds per 512-bit operation
  std::printf("{\"part\": \"accumulate\", \"isa\": \"%s\", \"variant\": \"%s\", "
              "\"ns_per_16_element_seeds\": %.4f, \"cycles_per_16_element_seeds\": %.3f, "
              "\"bit_exact\": %s%s}\n", isa, name, t / groups * 1e9, t / groups * 1e9 * ghz,
              same ? "true" : "false", grouped ? ", \"order\": \"grouped\"" : "");
}

ZO_T static void run_avx512() {
  static float ref[G][128];
  acc_test_xor_add();
  std::memcpy(ref, out, sizeof ref);
  struct V { const char* name; void (*f)(); } vs[] = {
      {"test_xor_add", acc_test_xor_add}, {"test_blend_add", acc_test_blend_add},
      {"shift_ternlog_add", acc_shift_ternlog_add}, {"kload_blend_add", acc_kload_blend_add},
      {"bitshuffle_kshift_blend_add", acc_bitshuffle_kshift}, {"two_adds_masked", acc_two_adds},
      {"test_blend_half_fma", acc_test_blend_half_fma}};
  for (const V& v : vs) {
    v.f();
    const bool same = std::memcmp(ref, out, sizeof ref) == 0;
    print_acc("avx512", v.name, best_of(v.f, 300), same, false);
  }
  {
    static float ref2[G][128];
    grouped_scalar(ref2);
    acc_grouped4();
    const bool same = std::memcmp(ref2, out, sizeof ref2) == 0;
    print_acc("avx512", "grouped4_gfni_permps", best_of(acc_grouped4, 300), same, true);
  }

  // Philox: 16 lanes = 16 seeds of one block
  for (int l = 0; l < 16; ++l) { k0s[l] = 0x1234567u * (l + 1); k1s[l] = 0xabcdef1u * (l + 3); }
  __m512i k0 = _mm512_load_si512(k0s), k1 = _mm512_load_si512(k1s);
  for (int r = 0; r < 10; ++r) {
    RK[2 * r] = _mm512_add_epi32(k0, _mm512_set1_epi32((int)(KA * (uint32_t)r)));
    RK[2 * r + 1] = _mm512_add_epi32(k1, _mm512_set1_epi32((int)(KB * (uint32_t)r)));
  }
  const __m512i c1 = _mm512_set1_epi32(5);
  const int N = 200000;
  struct P { const char* name; int M; PhiloxFn f; } ps[] = {
      {"blend_one_at_a_time", 1, philox<1, false>}, {"shuffle_one_at_a_time", 1, philox<1, true>},
      {"blend_4_interleaved", 4, philox<4, false>}, {"shuffle_4_interleaved", 4, philox<4, true>},
      {"shuffle_4_interleaved_r2shared", 4, philox_r2<4>}};
  philox_seed_part_init(c1, RK);
  for (const P& p : ps) {
    for (int m = 0; m < 4; ++m) C0[m] = _mm512_set1_epi32(77);
    p.f(C0, c1, RK, OUT);
    const bool ok = philox_matches(p.M);
    const double t = best_of([&] { philox_loop(p.f, p.M, N); }, 5);
    const double per = t / N / p.M;  // seconds per 16-lane Philox evaluation
    std::printf("{\"part\": \"philox\", \"isa\": \"avx512\", \"variant\": \"%s\", \"ns_per_16_lanes\": %.2f, "
                "\"cycles_per_16_lanes\": %.1f, \"cycles_per_16_element_seeds\": %.3f, \"bit_exact\": %s}\n",
                p.name, per * 1e9, per * 1e9 * ghz, per * 1e9 * ghz / 128.0, ok ? "true" : "false");
  }
}

ZO_AVX2 static void run_avx2() {
  static float ref2[G][128];
  grouped_scalar(ref2);
  for (int gi = 0; gi < K / 4; ++gi)
    for (int m = 0; m < 8; ++m) tab8[gi][m] = tab[gi][m];
  for (int gi = 0; gi < K / 4; ++gi)
    for (int b = 0; b < 4; ++b)
      for (int i = 0; i < 32; ++i) planes8[gi][b][i] = (uint8_t)(f2u(tab[gi][i & 15]) >> (8 * b));
  struct V { const char* name; void (*f)(); } vs[] = {
      {"avx2_direct_sllv_blendv", acc_avx2_direct}, {"avx2_transpose_permps2", acc_avx2_table},
      {"avx2_transpose_permps2_regshift", acc_avx2_table_regshift<false>},
      {"avx2_transpose_permps2_fma", acc_avx2_table_regshift<true>},
      {"avx2_transpose_sym_permps", acc_avx2_table_sym},
      {"avx2_tiles_pshufb_planes", acc_avx2_tiles_pshufb}};
  for (const V& v : vs) {
    std::memset(out, 0, sizeof out);
    v.f();
    const bool same = std::memcmp(ref2, out, sizeof ref2) == 0;
    print_acc("avx2", v.name, best_of(v.f, 300), same, true);
  }
  // The two halves of the table schemes alone (data in L1 between them): which one costs what.
  struct P2 { const char* name; void (*f)(); void (*check)(); } pieces[] = {
      {"avx2_piece_transpose_movemask", tr_avx2_movemask, lk_avx2_permps2},
      {"avx2_piece_lookup_permps2", lk_avx2_permps2, nullptr},
      {"avx2_piece_transpose_tiles", tr_avx2_tiles, lk_avx2_pshufb},
      {"avx2_piece_lookup_pshufb_planes", lk_avx2_pshufb, nullptr}};
  bool piece_ok = true;
  for (const P2& pc : pieces) {
    pc.f();
    if (pc.check) {
      std::memset(out, 0, sizeof out);
      pc.check();
      piece_ok = std::memcmp(ref2, out, sizeof ref2) == 0;
    }
    const double t = best_of(pc.f, 300);
    const double groups = (double)G * K * 128 / 16;
    std::printf("{\"part\": \"piece\", \"isa\": \"avx2\", \"variant\": \"%s\", "
                "\"ns_per_16_element_seeds\": %.4f, \"cycles_per_16_element_seeds\": %.3f, "
                "\"bit_exact\": %s}\n", pc.name, t / groups * 1e9, t / groups * 1e9 * ghz,
                piece_ok ? "true" : "false");
  }
  for (int m = 0; m < 4; ++m) {
    zo_cpu::round_keys8(0x1234567u * (m + 1), 0xabcdef1u * (m + 3), RK8[m]);
    C08[m] = _mm256_set1_epi32(77);
    C18[m] = _mm256_set1_epi32(5);
  }
  const int N = 200000;
  struct P { const char* name; int M; void (*f)(int); } ps[] = {
      {"avx2_one_at_a_time", 1, philox8_loop<1>}, {"avx2_2_interleaved", 2, philox8_loop<2>},
      {"avx2_4_interleaved", 4, philox8_loop<4>}, {"avx2_4_interleaved_r2shared", 4, philox8_r2_loop<4>}};
  for (const P& p : ps) {
    p.f(1);
    const bool ok = philox8_matches(p.M);
    const double t = best_of([&] { p.f(N); }, 5);
    const double per16 = 2.0 * t / N / p.M;  // two 8-lane evaluations = 16 lanes
    std::printf("{\"part\": \"philox\", \"isa\": \"avx2\", \"variant\": \"%s\", \"ns_per_16_lanes\": %.2f, "
                "\"cycles_per_16_lanes\": %.1f, \"cycles_per_16_element_seeds\": %.3f, \"bit_exact\": %s}\n",
                p.name, per16 * 1e9, per16 * 1e9 * ghz, per16 * 1e9 * ghz / 128.0, ok ? "true" : "false");
  }
}

int main() {
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("f16c");
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512bitalg") && __builtin_cpu_supports("avx512vbmi") &&
                      __builtin_cpu_supports("gfni");
  if (!avx2) {
    std::printf("{\"part\": \"skipped\", \"why\": \"this CPU lacks AVX2 (x86-64-v3)\"}\n");
    return 0;
  }
  setup();
  if (avx512) run_avx512();
  run_avx2();
  return 0;
}

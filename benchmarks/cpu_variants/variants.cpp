// Micro-benchmark of inner-loop variants of the CPU kernel's K >= 16 path (AVX-512), single thread,
// data in L1: why apply_seeds_ with K = 64 is compute-bound where it is. Built and run by
// benchmarks/bench_cpu_variants.py; prints one JSON object per line.
//
// Part 1, "accumulate": per seed and 16 elements, turn a sign bit into +c or -c and add it to an fp32
// accumulator, in seed order (the exact arithmetic of DESIGN section 4). Every variant is checked
// bit for bit against variant "test_xor_add". Variant "grouped4_gfni_permps" is the kernel's grouped
// order (subset-sum tables over groups of 4 seeds: bit transpose with vpermb + gf2p8affineqb +
// vpermt2b, then vpsrld + vpermps + vaddps per group), a different sum, checked bit for bit against a
// scalar implementation of that order instead. Part 2, "philox": Philox4x32-10 on 16 lanes, checked
// against a scalar Philox; latency-bound (one evaluation at a time) and interleaved (4 independent).
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "../../csrc/cpu/grouped_sum.h"  // the kernel's tables and bit transpose

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
constexpr uint32_t RA = 0xD2511F53u, RB = 0xCD9E8D57u, KA = 0x9E3779B9u, KB = 0xBB67AE85u;
static void philox_scalar(uint32_t c[4], uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    const uint64_t pa = (uint64_t)RA * c[0], pb = (uint64_t)RB * c[2];
    const uint32_t n0 = (uint32_t)(pb >> 32) ^ c[1] ^ k0, n2 = (uint32_t)(pa >> 32) ^ c[3] ^ k1;
    c[1] = (uint32_t)pb; c[3] = (uint32_t)pa; c[0] = n0; c[2] = n2;
    k0 += KA; k1 += KB;
  }
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

template <class Fn> static double best_of(Fn f, int reps) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

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
    C0[0] = _mm512_xor_si512(C0[0], _mm512_and_si512(OUT[M - 1][0], _mm512_setzero_si512()));
  }
}

ZO_T int run() {
  uint32_t x = 12345;
  for (int q = 0; q < 4; ++q)
    for (int i = 0; i < G * K; ++i) { x ^= x << 13; x ^= x >> 17; x ^= x << 5; planes[q][i] = x; }
  for (int k = 0; k < K; ++k) {
    const float c = 0.001f * (k + 1) * ((k & 1) ? 1.0f : -1.0f);
    pcb[k] = f2u(c); ncb[k] = f2u(-c);
  }
  // calibration: a chain of dependent integer adds runs at one per cycle
  const long n_add = 100000000L;
  const double t_add = best_of([&] { uint64_t y = 1; for (long i = 0; i < n_add; ++i) asm volatile("add $1, %0" : "+r"(y)); }, 9);
  const double ghz = n_add / t_add / 1e9;
  std::printf("{\"part\": \"clock\", \"ghz\": %.3f}\n", ghz);

  static float ref[G][128];
  acc_test_xor_add();
  std::memcpy(ref, out, sizeof ref);
  struct V { const char* name; void (*f)(); } vs[] = {
      {"test_xor_add", acc_test_xor_add}, {"test_blend_add", acc_test_blend_add},
      {"shift_ternlog_add", acc_shift_ternlog_add}, {"kload_blend_add", acc_kload_blend_add},
      {"bitshuffle_kshift_blend_add", acc_bitshuffle_kshift}, {"two_adds_masked", acc_two_adds},
      {"test_blend_half_fma", acc_test_blend_half_fma}};
  const double groups = (double)G * K * 128 / 16;  // 16 element-seeds per vector operation
  for (const V& v : vs) {
    v.f();
    const bool same = std::memcmp(ref, out, sizeof ref) == 0;
    const double t = best_of(v.f, 300);
    std::printf("{\"part\": \"accumulate\", \"variant\": \"%s\", \"ns_per_16_element_seeds\": %.4f, "
                "\"cycles_per_16_element_seeds\": %.3f, \"bit_exact\": %s}\n",
                v.name, t / groups * 1e9, t / groups * 1e9 * ghz, same ? "true" : "false");
  }
  {
    static float ref2[G][128];
    make_tables();
    grouped_scalar(ref2);
    acc_grouped4();
    const bool same = std::memcmp(ref2, out, sizeof ref2) == 0;
    const double t = best_of(acc_grouped4, 300);
    std::printf("{\"part\": \"accumulate\", \"variant\": \"grouped4_gfni_permps\", \"ns_per_16_element_seeds\": %.4f, "
                "\"cycles_per_16_element_seeds\": %.3f, \"bit_exact\": %s, \"order\": \"grouped\"}\n",
                t / groups * 1e9, t / groups * 1e9 * ghz, same ? "true" : "false");
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
      {"blend_4_interleaved", 4, philox<4, false>}, {"shuffle_4_interleaved", 4, philox<4, true>}};
  for (const P& p : ps) {
    for (int m = 0; m < 4; ++m) C0[m] = _mm512_set1_epi32(77);
    p.f(C0, c1, RK, OUT);
    const bool ok = philox_matches(p.M);
    const double t = best_of([&] { philox_loop(p.f, p.M, N); }, 5);
    const double per = t / N / p.M;  // seconds per 16-lane Philox evaluation
    std::printf("{\"part\": \"philox\", \"variant\": \"%s\", \"ns_per_16_lanes\": %.2f, "
                "\"cycles_per_16_lanes\": %.1f, \"cycles_per_16_element_seeds\": %.3f, \"bit_exact\": %s}\n",
                p.name, per * 1e9, per * 1e9 * ghz, per * 1e9 * ghz / 128.0, ok ? "true" : "false");
  }
  return 0;
}

int main() {
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
      !__builtin_cpu_supports("avx512dq") || !__builtin_cpu_supports("avx512vl") ||
      !__builtin_cpu_supports("avx512bitalg") || !__builtin_cpu_supports("avx512vbmi") ||
      !__builtin_cpu_supports("gfni")) {
    std::printf("{\"part\": \"skipped\", \"why\": \"this CPU lacks AVX-512 F/BW/DQ/VL/BITALG/VBMI or GFNI\"}\n");
    return 0;
  }
  return run();
}

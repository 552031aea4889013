// Micro-benchmark of the portable path (csrc/cpu/kernel_portable.h), compiled for the baseline target
// (no -march: SSE2 on x86-64, NEON on aarch64) with the extension's flags: what its sums cost per
// element and seed, and what bounds the ZO step's passes on this path. Built and run by
// benchmarks/bench_cpu_variants.py; prints one JSON object per line (field "isa" is "portable").
//
// Part "portable", one thread, 16 blocks (2,048 float32, in L1), per K:
//   - "spread_shift K=k": the path's own block function (rademacher_blocks_portable: Philox, spread
//     words, group sums, the update of x), the kernel's code;
//   - "bit_test K=k": the same function with the sums written the earlier way (per element j, a bit
//     test of the word with 1 << j, a compare, two logic operations); the two are checked bit for
//     bit against each other (both rows say whether they agreed; exit status 1 if not);
//   - "philox": the path's Philox alone (16 blocks of one seed), per element-seed.
// Figures per element and seed (ns and cycles); the clock is calibrated by a chain of dependent
// integer adds (x86-64 only; elsewhere cycles are left out).
#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "../../csrc/cpu/kernel_portable.h"
#include "timing.h"

namespace {

using namespace zo_cpu;

// ---- the earlier sums: a bit test per element j (kept here for comparison) ----------------------
struct BitMasks {
  uint32_t m[32];
};
constexpr BitMasks make_bit_masks() {
  BitMasks b{};
  for (int j = 0; j < 32; ++j) b.m[j] = 1u << j;
  return b;
}
alignas(64) constexpr BitMasks kBitMasks = make_bit_masks();

template <int N, int kFirst, bool kToX>
inline void bit_test_terms32(float* __restrict a, float* __restrict x, const uint32_t* w,
                             const uint32_t* cb) {
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
    if (kToX) x[j] = x[j] + v;
    else a[j] = v;
  }
}

template <int kFirst, bool kToX>
inline void bit_test_any(int n, float* __restrict a, float* __restrict x, const uint32_t* w,
                         const uint32_t* cb) {
  switch (n) {
    case 1: bit_test_terms32<1, kFirst, kToX>(a, x, w, cb); break;
    case 2: bit_test_terms32<2, kFirst, kToX>(a, x, w, cb); break;
    case 3: bit_test_terms32<3, kFirst, kToX>(a, x, w, cb); break;
    default: bit_test_terms32<4, kFirst, kToX>(a, x, w, cb); break;
  }
}

// float32, decay 1, K <= 64, 16 blocks: the kernel's block function with the earlier sums.
__attribute__((noinline)) void bit_test_blocks(float* xp, uint64_t block0, const uint64_t* seeds,
                                               const float* coeffs, int K) {
  alignas(64) float acc[16 * zo::kBlock];
  alignas(64) uint32_t words[kSeedBatch][4][16];
  alignas(64) uint32_t cbits[kSeedBatch];
  alignas(64) uint32_t wg[kSumGroup];
  bool g0_nonzero = false;
  for (int k = 0; k < std::min(K, kSumGroup); ++k) g0_nonzero |= coeffs[k] != 0.0f;
  for (int k = 0; k < K; ++k) {
    philox_blocks16_portable(block0, seeds[k], words[k]);
    cbits[k] = f2u(coeffs[k]);
  }
  for (int g = 0; g < 16; ++g)
    for (int q = 0; q < 4; ++q) {
      float* a = acc + g * zo::kBlock + 32 * q;
      float* x = xp + g * zo::kBlock + 32 * q;
      for (int k0 = 0; k0 < K; k0 += kSumGroup) {
        const int n = std::min(kSumGroup, K - k0);
        for (int s = 0; s < n; ++s) wg[s] = words[k0 + s][q][g];
        const bool first = k0 == 0, last = k0 + kSumGroup >= K;
        if (first && last) {
          if (g0_nonzero) bit_test_any<2, true>(n, a, x, wg, cbits + k0);
          else bit_test_any<1, true>(n, a, x, wg, cbits + k0);
        } else if (first) {
          if (g0_nonzero) bit_test_any<2, false>(n, a, x, wg, cbits + k0);
          else bit_test_any<1, false>(n, a, x, wg, cbits + k0);
        } else if (last) {
          bit_test_any<0, true>(n, a, x, wg, cbits + k0);
        } else {
          bit_test_any<0, false>(n, a, x, wg, cbits + k0);
        }
      }
    }
}

__attribute__((noinline)) void kernel_blocks(float* xp, uint64_t block0, const uint64_t* seeds,
                                             const float* coeffs, int K) {
  rademacher_blocks_portable(xp, F32, block0, 16, seeds, coeffs, K, 1.0f);
}

using zo_bench::best_of;

double ghz = 0.0;  // 0: not calibrated (cycles left out)

void print_row(const char* variant, double s_per_elem_seed, bool exact) {
  std::printf("{\"part\": \"portable\", \"isa\": \"portable\", \"variant\": \"%s\", "
              "\"ns_per_element_seed\": %.5f, \"ns_per_16_element_seeds\": %.4f", variant,
              s_per_elem_seed * 1e9, 16 * s_per_elem_seed * 1e9);
  if (ghz > 0)
    std::printf(", \"cycles_per_element_seed\": %.4f, \"cycles_per_16_element_seeds\": %.3f",
                s_per_elem_seed * 1e9 * ghz, 16 * s_per_elem_seed * 1e9 * ghz);
  std::printf(", \"bit_exact\": %s}\n", exact ? "true" : "false");
}

}  // namespace

int main() {
  ghz = zo_bench::calibrate_ghz();
  if (ghz > 0) std::printf("{\"part\": \"clock\", \"ghz\": %.3f}\n", ghz);
  constexpr int n = 16 * zo::kBlock;
  alignas(64) static float x0[n], xa[n], xb[n];
  uint64_t seeds[64];
  float coeffs[64];
  uint32_t r = 12345;
  for (int i = 0; i < n; ++i) {
    r ^= r << 13; r ^= r >> 17; r ^= r << 5;
    x0[i] = (float)(r >> 8) * 0x1.0p-24f - 0.5f;
  }
  for (int k = 0; k < 64; ++k) {
    seeds[k] = 0x9E3779B97F4A7C15ull * (uint64_t)(k + 1);
    coeffs[k] = 1e-6f * (float)(k + 1) * ((k & 1) ? 1.0f : -1.0f);
  }
  bool all_same = true;
  for (int K : {1, 2, 4, 5, 8, 64}) {
    // bit for bit: the earlier sums against the kernel, from the same weights
    std::memcpy(xa, x0, sizeof x0);
    std::memcpy(xb, x0, sizeof x0);
    kernel_blocks(xa, 1000, seeds, coeffs, K);
    bit_test_blocks(xb, 1000, seeds, coeffs, K);
    const bool same = std::memcmp(xa, xb, sizeof xa) == 0;
    const int reps = std::max(20, 4000 / K);
    const double es = (double)n * K * reps;
    // small coefficients keep x near its start over many calls; the data stays in L1
    const double tk = best_of([&] { for (int i = 0; i < reps; ++i) kernel_blocks(xa, 1000 + i, seeds, coeffs, K); }, 7);
    const double tb = best_of([&] { for (int i = 0; i < reps; ++i) bit_test_blocks(xb, 1000 + i, seeds, coeffs, K); }, 7);
    char name[64];
    std::snprintf(name, sizeof name, "spread_shift K=%d", K);
    print_row(name, tk / es, same);
    std::snprintf(name, sizeof name, "bit_test K=%d", K);
    print_row(name, tb / es, same);
    all_same &= same;
  }
  // Philox alone: 16 blocks of one seed per call (2,048 element-seeds)
  uint32_t out[4][16];
  uint32_t sink = 0;
  const int reps = 100000;
  const double tp = best_of([&] {
    for (int i = 0; i < reps; ++i) {
      philox_blocks16_portable((uint64_t)i * 16, seeds[i & 63], out);
      sink += out[i & 3][i & 15];
      asm volatile("" ::: "memory");
    }
  }, 7);
  print_row("philox", tp / ((double)reps * 2048), true);
  if (sink == 0xdeadbeef) std::printf("\n");  // keeps the sink alive
  return all_same ? 0 : 1;  // the two sums disagree: not the kernel's bits
}

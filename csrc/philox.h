// Noise stream v1: Philox4x32-10 and the Rademacher / Gaussian maps built on it.
//
// One header for every compiled backend (C++ CPU and CUDA), so the bits cannot drift apart. The
// contract (docs/DESIGN.md, Noise stream): seed -> key (seed & 0xffffffff, seed >> 32); Rademacher
// element with global index i uses block b = i / 128, counter (b_lo, b_hi, 0, 0), bit (i % 32) of word (i % 128) / 32;
// Gaussian element i uses counter (i_lo, i_hi, 0, 0) and Box-Muller on words 0 and 1. The round
// structure, constants and output order are Triton's (`tl.philox` with uint32 counters).
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define ZO_HD __host__ __device__ __forceinline__
#else
#define ZO_HD inline __attribute__((always_inline))
#endif

namespace zo {

constexpr uint32_t kRoundA = 0xD2511F53u;
constexpr uint32_t kRoundB = 0xCD9E8D57u;
constexpr uint32_t kKeyA = 0x9E3779B9u;
constexpr uint32_t kKeyB = 0xBB67AE85u;
constexpr int kRounds = 10;
constexpr int kBlock = 128;            // elements served by one Philox call (4 words x 32 bits)
constexpr float kUniformScale = 4.6566127342e-10f;
constexpr float kTwoPi = 6.283185307179586f;

ZO_HD uint32_t key_lo(uint64_t seed) { return (uint32_t)(seed & 0xffffffffu); }
ZO_HD uint32_t key_hi(uint64_t seed) { return (uint32_t)(seed >> 32); }

// One Philox4x32 round in Triton's form; written on scalars so compilers can vectorize callers
// across lanes (the CPU kernel runs it over 16 independent counters at once).
ZO_HD void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0,
                        uint32_t k1) {
  const uint64_t pb = (uint64_t)kRoundB * (uint64_t)c2;
  const uint64_t pa = (uint64_t)kRoundA * (uint64_t)c0;
  const uint32_t n0 = (uint32_t)(pb >> 32) ^ c1 ^ k0;
  const uint32_t n2 = (uint32_t)(pa >> 32) ^ c3 ^ k1;
  c1 = (uint32_t)pb;
  c3 = (uint32_t)pa;
  c0 = n0;
  c2 = n2;
}

// Philox4x32-10 of counter (c0, c1, 0, 0) under key (k0, k1); writes the four output words.
ZO_HD void philox4x32_10(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1, uint32_t out[4]) {
  uint32_t c2 = 0, c3 = 0;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < kRounds; ++r) {
    philox_round(c0, c1, c2, c3, k0, k1);
    k0 += kKeyA;
    k1 += kKeyB;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// The four words that carry the 128 signs of Rademacher block `block` for `seed`.
ZO_HD void rademacher_words(uint64_t seed, uint64_t block, uint32_t out[4]) {
  philox4x32_10((uint32_t)(block & 0xffffffffu), (uint32_t)(block >> 32), key_lo(seed),
                key_hi(seed), out);
}

// True (z = +1) when bit (j % 32) of word j / 32 is set, for j = i % 128.
ZO_HD bool rademacher_positive(const uint32_t w[4], uint32_t j) {
  return ((w[j >> 5] >> (j & 31u)) & 1u) != 0u;
}

// Triton's uint_to_uniform_float for 32-bit words: bitcast to int32, x < 0 ? -x - 1 : x, scale.
ZO_HD float uniform_from_word(uint32_t x) {
  int32_t s = (int32_t)x;
  s = s < 0 ? -s - 1 : s;
  return (float)s * kUniformScale;
}

// Gaussian value of stream v1 from words x0, x1 of Philox(counter = element index): Box-Muller as
// Triton's tl.randn computes it (u1 clamped below at 1e-7). Math in float32; backends agree to about
// 1e-6 relative (libm and CUDA's logf/cosf differ in the last ulp), not bit for bit.
ZO_HD float gaussian_from_words(uint32_t x0, uint32_t x1) {
  float u1 = uniform_from_word(x0);
  u1 = u1 < 1.0e-7f ? 1.0e-7f : u1;
  const float u2 = uniform_from_word(x1);
  const float th = kTwoPi * u2;
  const float r = sqrtf(-2.0f * logf(u1));
  return r * cosf(th);
}

ZO_HD float gaussian_value(uint64_t seed, uint64_t index) {
  uint32_t w[4];
  philox4x32_10((uint32_t)(index & 0xffffffffu), (uint32_t)(index >> 32), key_lo(seed), key_hi(seed),
                w);
  return gaussian_from_words(w[0], w[1]);
}

}  // namespace zo

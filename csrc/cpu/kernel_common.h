// Shared pieces of the CPU kernel's paths: work sizes, dtype codes, scalar element access.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#include "../philox.h"
#include "grouped_sum.h"

namespace zo_cpu {

constexpr int kGroup = 16;          // blocks per group in the block paths
constexpr int kSeedBatch = 64;      // seeds whose words are held at once (16 KiB with kGroup = 16)
constexpr int64_t kChunk = 1 << 15; // elements per OpenMP work item (multiple of 128 * kGroup)
static_assert(kSeedBatch % kSumGroup == 0, "seed batches must hold whole groups");

enum DType : int { F32 = 0, BF16 = 1, F16 = 2 };

inline uint32_t f2u(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float u2f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline float load_elem(const void* p, int dt, int64_t e) {
  switch (dt) {
    case F32: return static_cast<const float*>(p)[e];
    case BF16: return static_cast<float>(static_cast<const c10::BFloat16*>(p)[e]);
    default: return static_cast<float>(static_cast<const c10::Half*>(p)[e]);
  }
}

inline void store_elem(void* p, int dt, int64_t e, float v) {
  switch (dt) {
    case F32: static_cast<float*>(p)[e] = v; break;
    case BF16: static_cast<c10::BFloat16*>(p)[e] = c10::BFloat16(v); break;  // round to nearest even
    default: static_cast<c10::Half*>(p)[e] = c10::Half(v); break;
  }
}

}  // namespace zo_cpu

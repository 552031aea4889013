// Shared pieces of the CPU kernel's paths: work sizes, dtype codes, bit casts. No torch dependency
// (the portable path and its micro-benchmark compile without it).
#pragma once

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

}  // namespace zo_cpu

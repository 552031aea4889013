// CPU kernel of zo_kernels::apply_seeds_ (no torch dependency beyond c10's Half/BFloat16): K seeded
// noise directions applied in one pass.
//
// Rademacher, grouped order (docs/DESIGN.md, Grouped summation order; every backend does the same):
//   T_g[m] = (m&1 ? c_4g : -c_4g) + (m&2 ? c_4g+1 : -c_4g+1) + ...   (fp32, left to right, n_g terms)
//   idx_g(i) = sum_j [z_{4g+j}(i) = +1] << j
//   acc = 0.0f; for g in 0..ceil(K/4)-1: acc = acc + T_g[idx_g(i)]   (fp32, this order)
//   p   = to_dtype(float(p) * decay + acc)                           (decay == 1: no multiply)
// Gaussian: acc = 0.0f; for k: acc = acc + c_k * z_k(i), then the same update.
//
// Layout of the work: the tensors form one flat vector (each starts on a 128-element block, global
// index base_t + e). Work items are fixed-size chunks of elements; OpenMP splits them across threads,
// and every element's arithmetic is independent of the split, so results do not depend on the thread
// count. Inside a chunk, full blocks go through one of the block paths; a block cut by the tensor's
// ends (only when the caller's offset is not 128-aligned, or the last partial block) goes element by
// element.
//
// Block paths (isa.h picks one at run time; all give the same bits):
//   avx512   kernel_avx512.h  (K <= 8 loop; grouped loop with VBMI + GFNI)
//   avx2     kernel_avx2.h    (direct sums for K < 16, transpose + tables for K >= 16)
//   portable kernel_portable.h (auto-vectorized plain C++)
// Compiled with -ffp-contract=off: contracting `p * decay + acc` into an FMA would change the bits.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../philox.h"
#include "grouped_sum.h"
#include "isa.h"
#include "kernel_avx2.h"
#include "kernel_avx512.h"
#include "kernel_common.h"
#include "kernel_portable.h"

namespace zo_cpu {

// Full 128-element blocks [block0, block0 + nblocks) of one tensor, elements at p (dtype dt), on
// the selected path.
inline void rademacher_blocks(void* p, int dt, uint64_t block0, int64_t nblocks,
                              const uint64_t* seeds, const float* coeffs, const float* tables, int K,
                              float decay, int isa) {
#if defined(__x86_64__)
  if (isa == ISA_AVX512) {
    if (K >= 1 && K <= kSmallMaxK) {
      rademacher_small_avx512(p, dt, block0, nblocks, seeds, coeffs, K, decay);
      return;
    }
    if (machine_isa().avx512_gfni) {
      rademacher_blocks_avx512(p, dt, block0, nblocks, seeds, tables, K, decay);
      return;
    }
    isa = ISA_AVX2;  // AVX-512 without VBMI/GFNI: the avx2 loops for the rest
  }
  if (isa == ISA_AVX2) {
    if (K <= kDirectMaxK)
      rademacher_direct_avx2(p, dt, block0, nblocks, seeds, coeffs, K, decay);
    else
      rademacher_table_avx2(p, dt, block0, nblocks, seeds, tables, K, decay);
    return;
  }
#endif
  (void)tables;
  rademacher_blocks_portable(p, dt, block0, nblocks, seeds, coeffs, K, decay);
}

// Scalar element access (the pieces of blocks cut by a tensor's ends), through c10's conversions.
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

// Elements [e0, e1) of a tensor whose element 0 has global index base, element by element (the
// pieces of blocks cut by a tensor's ends): one Philox per (block, seed), then per element the same
// table sums as the block paths.
inline void rademacher_elements(void* p, int dt, uint64_t base, int64_t e0, int64_t e1,
                                const uint64_t* seeds, const float* tables, int K, float decay) {
  float acc[zo::kBlock];
  uint32_t w[kSumGroup][4];
  int64_t e = e0;
  while (e < e1) {
    const uint64_t i0 = base + (uint64_t)e, blk = i0 >> 7;
    const int64_t n = std::min<int64_t>(e1 - e, (int64_t)(128u - (uint32_t)(i0 & 127u)));
    const uint32_t j0 = (uint32_t)(i0 & 127u);
    for (int64_t r = 0; r < n; ++r) acc[r] = 0.0f;
    for (int g = 0; g < num_groups(K); ++g) {
      const int ng = std::min(kSumGroup, K - kSumGroup * g);
      for (int j = 0; j < ng; ++j) zo::rademacher_words(seeds[kSumGroup * g + j], blk, w[j]);
      for (int64_t r = 0; r < n; ++r) {
        uint32_t idx = 0;
        for (int j = 0; j < ng; ++j)
          idx |= (zo::rademacher_positive(w[j], j0 + (uint32_t)r) ? 1u : 0u) << j;
        acc[r] = acc[r] + tables[16 * g + idx];
      }
    }
    for (int64_t r = 0; r < n; ++r) {
      float x = load_elem(p, dt, e + r);
      if (decay != 1.0f) x = x * decay;
      store_elem(p, dt, e + r, x + acc[r]);
    }
    e += n;
  }
}

inline void gaussian_elements(void* p, int dt, uint64_t base, int64_t e0, int64_t e1,
                              const uint64_t* seeds, const float* coeffs, int K, float decay) {
  for (int64_t e = e0; e < e1; ++e) {
    const uint64_t i = base + (uint64_t)e;
    float acc = 0.0f;
    for (int k = 0; k < K; ++k) acc = acc + coeffs[k] * zo::gaussian_value(seeds[k], i);
    float x = load_elem(p, dt, e);
    if (decay != 1.0f) x = x * decay;
    store_elem(p, dt, e, x + acc);
  }
}

struct Job {
  void* ptr;
  int dt;
  uint64_t base;
  int64_t e0, e1;
};

inline void run_job(const Job& j, const uint64_t* seeds, const float* coeffs, const float* tables,
                    int K, float decay, int dist, int isa) {
  if (dist != 0) {
    gaussian_elements(j.ptr, j.dt, j.base, j.e0, j.e1, seeds, coeffs, K, decay);
    return;
  }
  // Split [e0, e1) into: head up to the first block boundary, full blocks, tail.
  const uint64_t g0 = j.base + (uint64_t)j.e0, g1 = j.base + (uint64_t)j.e1;
  uint64_t fb = (g0 + 127u) & ~uint64_t(127u);  // first full-block start (global)
  uint64_t lb = g1 & ~uint64_t(127u);           // end of the last full block (global)
  if (fb >= lb) {
    rademacher_elements(j.ptr, j.dt, j.base, j.e0, j.e1, seeds, tables, K, decay);
    return;
  }
  const int64_t ef = (int64_t)(fb - j.base), el = (int64_t)(lb - j.base);
  if (ef > j.e0) rademacher_elements(j.ptr, j.dt, j.base, j.e0, ef, seeds, tables, K, decay);
  const size_t esz = j.dt == F32 ? 4 : 2;
  void* pf = static_cast<char*>(j.ptr) + (size_t)ef * esz;
  rademacher_blocks(pf, j.dt, fb >> 7, (el - ef) / zo::kBlock, seeds, coeffs, tables, K, decay, isa);
  if (el < j.e1) rademacher_elements(j.ptr, j.dt, j.base, el, j.e1, seeds, tables, K, decay);
}

}  // namespace zo_cpu

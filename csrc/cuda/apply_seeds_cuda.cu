// CUDA backend of zo_kernels::apply_seeds_. Same Philox/Rademacher header as the CPU kernel.
//
// One warp owns one 128-element noise block: lane l holds elements j = l + 32 q (q = 0..3), i.e.
// bit l of word q, so loads and stores are coalesced. Philox is computed once per (block, seed) and
// shared through the warp: for seeds k0..k0+31, lane l computes the words of seed k0 + l, and the loop
// over those seeds broadcasts them with __shfl_sync.
//
// Accumulation order (DESIGN section 4; zo_kernels/reference.py is the executable form):
// - Rademacher, grouped order (groups of 4 seeds; 32 seeds per broadcast round = 8 whole groups):
//     tables[16 g + m] = subset sums of group g, computed on the host (reference.group_tables):
//       t = (bit 0 of m ? c_4g : -c_4g); t = t + (bit j of m ? c_4g+j : -c_4g+j) for j = 1..n_g-1
//     idx_g = sum_j [z_{4g+j} == +1] << j   (j < n_g; the last group may be short)
//     acc = 0; for g in order: acc = __fadd_rn(acc, tables[16 g + idx_g])
// - Gaussian, seed order: acc = 0; for k: acc = __fadd_rn(acc, __fmul_rn(c_k, z_k)).
// Then p = to_dtype(__fadd_rn(decay != 1 ? __fmul_rn(p, decay) : p, acc)). Arithmetic uses
// __fadd_rn / __fmul_rn (never contracted into FMA; the build also passes --fmad=false), so results
// equal the CPU's bit for bit.
// Only c10's CUDA headers (not ATen/cuda/CUDAContext.h, which pulls in cuSPARSE/cuBLAS headers that a
// minimal toolkit lacks).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/extension.h>

#include <vector>

#include "../philox.h"

namespace {

template <typename T>
__device__ __forceinline__ float to_f32(T v);
template <>
__device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

constexpr int kWarpsPerCta = 8;

template <typename T, bool kGaussian>
__global__ void __launch_bounds__(32 * kWarpsPerCta)
apply_seeds_kernel(T* __restrict__ x, int64_t n, int64_t base, const int64_t* __restrict__ seeds,
                   const float* __restrict__ coeffs, const float* __restrict__ tables, int K,
                   float decay, bool apply_decay, int64_t nblocks) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (int64_t)blockIdx.x * kWarpsPerCta + (threadIdx.x >> 5);
  const int64_t wstride = (int64_t)gridDim.x * kWarpsPerCta;
  const int64_t first_block = base / 128;
  for (int64_t wb = warp; wb < nblocks; wb += wstride) {
    const uint64_t b = (uint64_t)(first_block + wb);
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int k0 = 0; k0 < K; k0 += 32) {
      const int kn = min(32, K - k0);
      if (!kGaussian) {
        uint32_t w[4];
        zo::rademacher_words((uint64_t)seeds[k0 + min(lane, kn - 1)], b, w);
        // k0 is a multiple of 32 (8 groups of 4), so this round holds groups k0/4 ..
        // k0/4 + ceil(kn/4) - 1 whole; only the call's last group may be short (gn < 4). Loop
        // bounds are warp-uniform, so every lane takes part in each shuffle.
        for (int g0 = 0; g0 < kn; g0 += 4) {
          const float* tab = tables + 16 * ((k0 + g0) >> 2);
          unsigned idx[4] = {0u, 0u, 0u, 0u};
          const int gn = min(4, kn - g0);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            if (j < gn) {  // warp-uniform
#pragma unroll
              for (int q = 0; q < 4; ++q) {
                const uint32_t word = __shfl_sync(0xffffffffu, w[q], g0 + j);
                idx[q] |= ((word >> lane) & 1u) << j;
              }
            }
          }
#pragma unroll
          for (int q = 0; q < 4; ++q) acc[q] = __fadd_rn(acc[q], __ldg(tab + idx[q]));
        }
      } else {
        for (int kk = 0; kk < kn; ++kk) {
          const float c = coeffs[k0 + kk];
          const uint64_t s = (uint64_t)seeds[k0 + kk];
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const uint64_t i = b * 128u + (uint64_t)(lane + 32 * q);
            acc[q] = __fadd_rn(acc[q], __fmul_rn(c, zo::gaussian_value(s, i)));
          }
        }
      }
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t e = (int64_t)(b * 128u) + lane + 32 * q - base;
      if (e >= 0 && e < n) {
        float p = to_f32<T>(x[e]);
        if (apply_decay) p = __fmul_rn(p, decay);
        x[e] = from_f32<T>(__fadd_rn(p, acc[q]));
      }
    }
  }
}

template <typename T>
void launch(const at::Tensor& t, int64_t base, const at::Tensor& seeds, const at::Tensor& coeffs,
            const at::Tensor& tables, float decay, bool gaussian, cudaStream_t stream) {
  const int64_t n = t.numel();
  if (n == 0) return;
  const int64_t nblocks = (base + n - 1) / 128 - base / 128 + 1;
  const int64_t ctas = std::min<int64_t>((nblocks + kWarpsPerCta - 1) / kWarpsPerCta, 65535LL * 16);
  T* ptr = reinterpret_cast<T*>(t.data_ptr());
  const int K = (int)seeds.numel();
  const bool apply_decay = decay != 1.0f;
  if (gaussian) {
    apply_seeds_kernel<T, true><<<(unsigned)ctas, 32 * kWarpsPerCta, 0, stream>>>(
        ptr, n, base, seeds.data_ptr<int64_t>(), coeffs.data_ptr<float>(),
        tables.data_ptr<float>(), K, decay, apply_decay, nblocks);
  } else {
    apply_seeds_kernel<T, false><<<(unsigned)ctas, 32 * kWarpsPerCta, 0, stream>>>(
        ptr, n, base, seeds.data_ptr<int64_t>(), coeffs.data_ptr<float>(),
        tables.data_ptr<float>(), K, decay, apply_decay, nblocks);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// tensors: contiguous CUDA float32/bf16/fp16 on one device; seeds int64 and coeffs float32 on that
// device; tables: float32 on that device, the Rademacher subset-sum tables [ceil(K/4) * 16] from
// zo_kernels.reference.group_tables(coeffs) (ignored for Gaussian noise); bases: global index of
// each tensor's element 0; dist: 0 Rademacher, 1 Gaussian.
void apply_seeds(const std::vector<at::Tensor>& tensors, const at::Tensor& seeds,
                 const at::Tensor& coeffs, const at::Tensor& tables,
                 const std::vector<int64_t>& bases, double decay, int64_t dist) {
  TORCH_CHECK(seeds.is_cuda() && seeds.scalar_type() == at::kLong, "seeds must be CUDA int64");
  TORCH_CHECK(coeffs.is_cuda() && coeffs.scalar_type() == at::kFloat, "coeffs must be CUDA float32");
  TORCH_CHECK(seeds.numel() == coeffs.numel(), "len(seeds) != len(coeffs)");
  TORCH_CHECK(bases.size() == tensors.size(), "one base per tensor");
  TORCH_CHECK(dist == 0 || dist == 1, "dist must be 0 (Rademacher) or 1 (Gaussian)");
  const bool gaussian = dist == 1;
  if (!gaussian) {
    TORCH_CHECK(tables.is_cuda() && tables.scalar_type() == at::kFloat,
                "tables must be CUDA float32");
    TORCH_CHECK(tables.numel() == 16 * ((seeds.numel() + 3) / 4),
                "tables must hold 16 floats per group of 4 seeds (reference.group_tables)");
  }
  if (tensors.empty()) return;
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const at::Tensor sc = seeds.contiguous(), cc = coeffs.contiguous(), tc = tables.contiguous();
  TORCH_CHECK(gaussian || tc.device() == tensors[0].device(),
              "tables must be on the tensors' device");
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.is_cuda() && t.is_contiguous(), "tensors[", i, "] must be contiguous CUDA");
    TORCH_CHECK(t.device() == tensors[0].device(), "all tensors must be on one device");
    switch (t.scalar_type()) {
      case at::kFloat: launch<float>(t, bases[i], sc, cc, tc, (float)decay, gaussian, stream); break;
      case at::kBFloat16:
        launch<__nv_bfloat16>(t, bases[i], sc, cc, tc, (float)decay, gaussian, stream);
        break;
      case at::kHalf: launch<__half>(t, bases[i], sc, cc, tc, (float)decay, gaussian, stream); break;
      default: TORCH_CHECK(false, "unsupported dtype ", t.scalar_type());
    }
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "zo_kernels CUDA backend: fused seed-regenerated noise";
  m.def("apply_seeds", &apply_seeds, "In-place apply of K seeded noise directions (CUDA)",
        py::arg("tensors"), py::arg("seeds"), py::arg("coeffs"), py::arg("tables"),
        py::arg("bases"), py::arg("decay"), py::arg("dist"));
}

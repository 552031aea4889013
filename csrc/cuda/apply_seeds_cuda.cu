// CUDA backend of zo_kernels::apply_seeds_: ONE launch per call over the whole tensor list.
// Same Philox/Rademacher header as the CPU kernel (csrc/philox.h).
//
// Work split (docs/DESIGN.md, "The apply_seeds_ op and its backends"; docs/design/gpu_path.md):
// - The host (zo_kernels/_gpu.py) keeps, per parameter list, a device table of descriptors
//   desc[4 t + 0..3] = (data pointer, numel, base, dtype code 0 f32 / 1 bf16 / 2 f16) and
//   tile_start[t] (T + 1 entries): tensor t owns CTAs tile_start[t] .. tile_start[t+1]-1, each a
//   tile of kTileBlocks = 32 whole 128-element noise blocks (4096 elements) aligned to the block grid.
//   A CTA finds its tensor by binary search, so one launch covers every tensor.
// - Each thread owns kPerThread = 16 elements of the tile as 16-byte vectors (4 float or 8
//   bf16/fp16, consecutive), loaded with 128-bit loads BEFORE the noise is computed; tiles that are
//   not 16-byte aligned or not wholly inside the tensor take a scalar path with bounds checks.
// - Rademacher, grouped order (docs/DESIGN.md, "Grouped summation order"): seeds are taken in chunks
//   of kSeedChunk = 32. For a chunk, the CTA computes the Philox words of every (seed, block) pair
//   once (pairs spread over all 256 threads, so K < 32 does not idle lanes) into shared memory,
//   and builds the chunk's subset-sum tables in shared memory from the coefficients:
//     tab[g][m] = (bit 0 of m ? c_4g : -c_4g); tab[g][m] = tab[g][m] + (bit j of m ? c_4g+j : -c_4g+j)
//     for j = 1 .. n_g - 1 (a short last group adds only its n_g terms)
//   then every element adds one table entry per group:
//     idx_g = sum_j [z_{4g+j} == +1] << j;   acc = __fadd_rn(acc, tab[g][idx_g])   (groups in order)
// - Gaussian, seed order: acc = 0; for k: acc = __fadd_rn(acc, __fmul_rn(c_k, z_k)) (Philox per element).
// Then p = to_dtype(__fadd_rn(decay != 1 ? __fmul_rn(x, decay) : x, acc)). Arithmetic uses
// __fadd_rn / __fmul_rn (never contracted into FMA; the build also passes --fmad=false), and NaN
// results are written with the CPU kernel's bits (float32: the old NaN quieted, else x86's default
// NaN 0xFFC00000; bfloat16 0x7FC0; float16 sign | 0x7E00), so results equal the CPU's bit for bit.
//
// Only c10's CUDA headers (not ATen/cuda/CUDAContext.h, which pulls in cuSPARSE/cuBLAS headers that a
// minimal toolkit lacks).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/extension.h>

#include <stdint.h>

#include "apply_seeds_kernel.cuh"


using zo_cuda::apply_seeds_mt_kernel;
using zo_cuda::kThreads;
using zo_cuda::kTileBlocks;

// One launch over a tensor list described by the device tables of zo_kernels/_gpu.py (Plan.tiles):
// desc int64 [4 T] (pointer, numel, base, dtype code), tile_start int64 [T + 1], n_ctas =
// tile_start[T] (known on the host, so no read of device memory here); seeds int64 [K] and coeffs
// float32 [K] on the same device; dist 0 Rademacher, 1 Gaussian. Launched on the current stream
// of desc's device; no synchronization.
void apply_seeds_mt(const at::Tensor& desc, const at::Tensor& tile_start, int64_t T, int64_t n_ctas,
                    const at::Tensor& seeds, const at::Tensor& coeffs, int64_t K, double decay,
                    int64_t dist, int64_t dtype_code) {
  TORCH_CHECK(desc.is_cuda() && desc.scalar_type() == at::kLong && desc.is_contiguous() &&
                  desc.numel() == 4 * T,
              "desc must be a contiguous CUDA int64 tensor of 4 * T entries");
  TORCH_CHECK(tile_start.is_cuda() && tile_start.scalar_type() == at::kLong &&
                  tile_start.is_contiguous() && tile_start.numel() == T + 1,
              "tile_start must be a contiguous CUDA int64 tensor of T + 1 entries");
  TORCH_CHECK(seeds.is_cuda() && seeds.scalar_type() == at::kLong && seeds.is_contiguous() &&
                  seeds.numel() >= K,
              "seeds must be a contiguous CUDA int64 tensor of K entries");
  TORCH_CHECK(K == 0 || (coeffs.is_cuda() && coeffs.scalar_type() == at::kFloat &&
                         coeffs.is_contiguous() && coeffs.numel() >= K),
              "coeffs must be a contiguous CUDA float32 tensor of K entries");
  TORCH_CHECK(seeds.device() == desc.device() && coeffs.device() == desc.device() &&
                  tile_start.device() == desc.device(),
              "desc, tile_start, seeds and coeffs must be on one device");
  TORCH_CHECK(dist == 0 || dist == 1, "dist must be 0 (Rademacher) or 1 (Gaussian)");
  TORCH_CHECK(T >= 1 && T < (1LL << 31) && K >= 0 && K < (1LL << 31), "T or K out of range");
  TORCH_CHECK(n_ctas >= 1 && n_ctas < (1LL << 31), "n_ctas out of range");
  (void)dtype_code;  // the kernel reads each tensor's dtype from desc
  const c10::cuda::CUDAGuard guard(desc.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float d = (float)decay;
  const float* c = K ? coeffs.data_ptr<float>() : nullptr;
  if (dist == 1) {
    apply_seeds_mt_kernel<true><<<(unsigned)n_ctas, kThreads, 0, stream>>>(
        desc.data_ptr<int64_t>(), tile_start.data_ptr<int64_t>(), (int)T,
        seeds.data_ptr<int64_t>(), c, (int)K, d, d != 1.0f);
  } else {
    apply_seeds_mt_kernel<false><<<(unsigned)n_ctas, kThreads, 0, stream>>>(
        desc.data_ptr<int64_t>(), tile_start.data_ptr<int64_t>(), (int)T,
        seeds.data_ptr<int64_t>(), c, (int)K, d, d != 1.0f);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "zo_kernels CUDA backend: fused seed-regenerated noise, one launch per tensor list";
  m.def("apply_seeds_mt", &apply_seeds_mt,
        "In-place apply of K seeded noise directions to a tensor list (CUDA, one launch)",
        py::arg("desc"), py::arg("tile_start"), py::arg("T"), py::arg("n_ctas"), py::arg("seeds"),
        py::arg("coeffs"), py::arg("K"), py::arg("decay"), py::arg("dist"), py::arg("dtype_code"));
  m.attr("TILE_BLOCKS") = kTileBlocks;
}

// CPU backend of zo_kernels::apply_seeds_: the torch binding. The kernel is in apply_seeds_kernel.h.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <omp.h>

#include <string>
#include <vector>

#include "apply_seeds_kernel.h"

using namespace zo_cpu;

namespace {
int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return F32;
    case at::kBFloat16: return BF16;
    case at::kHalf: return F16;
    default:
      TORCH_CHECK(false, "apply_seeds_: unsupported dtype ", t.scalar_type(),
                  "; supported: float32, bfloat16, float16");
  }
  return -1;
}

}  // namespace

// Entry point. tensors: contiguous CPU float32/bf16/fp16; seeds: int64 CPU (uint64 bit patterns);
// coeffs: float32 CPU; bases: global index of each tensor's element 0; dist: 0 Rademacher, 1 Gaussian.
void apply_seeds(const std::vector<at::Tensor>& tensors, const at::Tensor& seeds,
                 const at::Tensor& coeffs, const std::vector<int64_t>& bases, double decay,
                 int64_t dist) {
  TORCH_CHECK(seeds.device().is_cpu() && seeds.scalar_type() == at::kLong && seeds.dim() == 1,
              "apply_seeds_: seeds must be a 1-D int64 CPU tensor");
  TORCH_CHECK(coeffs.device().is_cpu() && coeffs.scalar_type() == at::kFloat && coeffs.dim() == 1,
              "apply_seeds_: coeffs must be a 1-D float32 CPU tensor");
  TORCH_CHECK(seeds.numel() == coeffs.numel(), "apply_seeds_: len(seeds) != len(coeffs)");
  TORCH_CHECK(bases.size() == tensors.size(), "apply_seeds_: one base per tensor");
  TORCH_CHECK(dist == 0 || dist == 1, "apply_seeds_: dist must be 0 (rademacher) or 1 (gaussian)");
  const at::Tensor sc = seeds.contiguous(), cc = coeffs.contiguous();
  const uint64_t* sp = reinterpret_cast<const uint64_t*>(sc.data_ptr<int64_t>());
  const float* cp = cc.data_ptr<float>();
  const int K = (int)sc.numel();
  const float fdecay = (float)decay;
  std::vector<float> tables(16 * (size_t)num_groups(K) + 16);  // subset-sum tables (Rademacher)
  if (dist == 0) group_tables(cp, K, tables.data());

  std::vector<Job> jobs;
  int64_t total = 0;
  for (size_t t = 0; t < tensors.size(); ++t) {
    const at::Tensor& x = tensors[t];
    TORCH_CHECK(x.device().is_cpu(), "apply_seeds_: tensors[", t, "] is not on the CPU");
    TORCH_CHECK(x.is_contiguous(), "apply_seeds_: tensors[", t, "] is not contiguous");
    TORCH_CHECK(bases[t] >= 0, "apply_seeds_: negative base");
    const int dt = dtype_code(x);
    const int64_t n = x.numel();
    total += n;
    for (int64_t e = 0; e < n; e += kChunk) {
      jobs.push_back(Job{x.data_ptr(), dt, (uint64_t)bases[t], e, std::min(n, e + kChunk)});
    }
  }
  if (jobs.empty()) return;
  // Waking a second thread costs up to a few ms on a shared machine (measured: 0.4M elements took
  // 5.9 ms on 2 threads vs 0.85 ms on 1 after an idle pause), so small calls stay on one thread:
  // about one thread per 1M element-seeds of work. Results do not depend on the thread count.
  const int64_t work = total * std::max(K, 1) * (dist ? 8 : 1);
  const int64_t by_work = std::max<int64_t>(1, work >> 20);
  const int nthreads = (int)std::min<int64_t>(std::max(1, at::get_num_threads()), by_work);
  const int64_t njobs = (int64_t)jobs.size();
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t q = 0; q < njobs; ++q) run_job(jobs[q], sp, cp, tables.data(), K, fdecay, (int)dist);
}

// Name of the instruction-set level the dispatcher picks on this CPU (for benchmark reports).
std::string cpu_isa() {
  if (have_avx512_gfni()) return "avx512 (vbmi, gfni)";
  if (have_avx512()) return "avx512 (K = 1 float32 only; x86-64-v3 otherwise)";
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3 (AVX2)";
  return "x86-64 (baseline)";
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "zo_kernels CPU backend: fused seed-regenerated noise (OpenMP, SIMD Philox)";
  m.def("apply_seeds", &apply_seeds, "In-place apply of K seeded noise directions (CPU)",
        py::arg("tensors"), py::arg("seeds"), py::arg("coeffs"), py::arg("bases"),
        py::arg("decay"), py::arg("dist"), py::call_guard<py::gil_scoped_release>());
  m.def("cpu_isa", &cpu_isa, "Instruction-set level selected at run time");
}

// CPU backend of zo_kernels::apply_seeds_: the torch binding. The kernel is in apply_seeds_kernel.h.
//
// Two entries:
//  - apply_seeds(tensors, seeds, coeffs, bases, decay, dist): checked tensors in, no Python objects
//    parsed; used by the registered op and by the Python API's general path.
//  - apply_seeds_fast(tensors, seeds, coeffs, decay, dist, offset): the Python API's fast path for the
//    common call (a list of CPU tensors, lists of Python ints and floats). It checks everything the
//    Python validation checks, in C++, and returns false without touching anything when any check
//    fails or the input is of another kind; Python then runs its general path, which raises the
//    error message or handles the input. On success it bumps every tensor's version counter, as
//    torch's in-place ops do. About 2 us for a few tensors (see benchmarks/bench_kernels_cpu.py).
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <omp.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "apply_seeds_kernel.h"

using namespace zo_cpu;

namespace {
int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return F32;
    case at::kBFloat16: return BF16;
    case at::kHalf: return F16;
    default: return -1;
  }
}

// The work on checked inputs: tensors contiguous CPU float32/bf16/fp16 (non-empty or not), seeds
// as uint64 bit patterns, coeffs float32, bases[t] = global index of tensors[t]'s element 0.
void run_cpu(const std::vector<at::Tensor>& tensors, const uint64_t* sp, const float* cp, int K,
             const std::vector<int64_t>& bases, float fdecay, int dist) {
  std::vector<float> tables(16 * (size_t)num_groups(K) + 16);  // subset-sum tables (Rademacher)
  if (dist == 0) group_tables(cp, K, tables.data());
  std::vector<Job> jobs;
  int64_t total = 0;
  for (size_t t = 0; t < tensors.size(); ++t) {
    const at::Tensor& x = tensors[t];
    const int64_t n = x.numel();
    if (n == 0) continue;
    total += n;
    for (int64_t e = 0; e < n; e += kChunk)
      jobs.push_back(Job{x.data_ptr(), dtype_code(x), (uint64_t)bases[t], e, std::min(n, e + kChunk)});
  }
  if (jobs.empty()) return;
  const int isa = selected_isa().load(std::memory_order_relaxed);
  // Waking a second thread costs up to a few ms on a shared machine (measured: 0.4M elements took
  // 5.9 ms on 2 threads vs 0.85 ms on 1 after an idle pause), so small calls stay on one thread:
  // about one thread per 1M element-seeds of work. Results do not depend on the thread count.
  const int64_t work = total * std::max(K, 1) * (dist ? 8 : 1);
  const int64_t by_work = std::max<int64_t>(1, work >> 20);
  const int nthreads = (int)std::min<int64_t>(std::max(1, at::get_num_threads()), by_work);
  const int64_t njobs = (int64_t)jobs.size();
  if (nthreads == 1) {  // no OpenMP region: it costs about a microsecond even on one thread
    for (int64_t q = 0; q < njobs; ++q) run_job(jobs[q], sp, cp, tables.data(), K, fdecay, dist, isa);
    return;
  }
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t q = 0; q < njobs; ++q) run_job(jobs[q], sp, cp, tables.data(), K, fdecay, dist, isa);
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
  for (size_t t = 0; t < tensors.size(); ++t) {
    const at::Tensor& x = tensors[t];
    TORCH_CHECK(x.device().is_cpu(), "apply_seeds_: tensors[", t, "] is not on the CPU");
    TORCH_CHECK(x.is_contiguous(), "apply_seeds_: tensors[", t, "] is not contiguous");
    TORCH_CHECK(bases[t] >= 0, "apply_seeds_: negative base");
    TORCH_CHECK(dtype_code(x) >= 0, "apply_seeds_: unsupported dtype ", x.scalar_type(),
                "; supported: float32, bfloat16, float16");
  }
  const at::Tensor sc = seeds.contiguous(), cc = coeffs.contiguous();
  run_cpu(tensors, reinterpret_cast<const uint64_t*>(sc.data_ptr<int64_t>()), cc.data_ptr<float>(),
          (int)sc.numel(), bases, (float)decay, (int)dist);
}

namespace {
// Items of a list or tuple (borrowed), or false.
bool seq_items(PyObject* o, PyObject**& items, Py_ssize_t& n) {
  if (PyList_CheckExact(o)) {
    items = &PyList_GET_ITEM(o, 0);
    n = PyList_GET_SIZE(o);
    return true;
  }
  if (PyTuple_CheckExact(o)) {
    items = &PyTuple_GET_ITEM(o, 0);
    n = PyTuple_GET_SIZE(o);
    return true;
  }
  return false;
}

// A Python float or int (not bool) as a double, or false (errors cleared).
bool real_value(PyObject* o, double& d) {
  if (PyFloat_CheckExact(o)) {
    d = PyFloat_AS_DOUBLE(o);
    return true;
  }
  if (PyLong_CheckExact(o)) {
    d = PyLong_AsDouble(o);
    if (d == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
    return true;
  }
  return false;
}

constexpr int64_t kMaxIndex = INT64_MAX;  // global indices stay below 2**63
}  // namespace

bool apply_seeds_fast(py::handle tensors_h, py::handle seeds_h, py::handle coeffs_h,
                      py::handle decay_h, py::handle dist_h, py::handle offset_h) {
  // --- Python objects (GIL held) ---
  std::vector<at::Tensor> ts;
  PyObject* to = tensors_h.ptr();
  if (THPVariable_Check(to)) {
    ts.push_back(THPVariable_Unpack(to));
  } else {
    PyObject** items;
    Py_ssize_t n;
    if (!seq_items(to, items, n)) return false;
    ts.reserve((size_t)n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (!THPVariable_Check(items[i])) return false;
      ts.push_back(THPVariable_Unpack(items[i]));
    }
  }
  PyObject **sitems, **citems;
  Py_ssize_t ns, nc;
  if (!seq_items(seeds_h.ptr(), sitems, ns) || !seq_items(coeffs_h.ptr(), citems, nc) || ns != nc)
    return false;
  const int K = (int)ns;
  std::vector<uint64_t> seeds((size_t)K);
  std::vector<float> coeffs((size_t)K);
  for (int k = 0; k < K; ++k) {
    if (!PyLong_CheckExact(sitems[k])) return false;
    const unsigned long long v = PyLong_AsUnsignedLongLong(sitems[k]);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {  // negative or >= 2**64
      PyErr_Clear();
      return false;
    }
    seeds[k] = (uint64_t)v;
    double d;
    if (!real_value(citems[k], d)) return false;
    coeffs[k] = (float)d;  // rounded to float32 once, as the general path does
    if (!std::isfinite(coeffs[k])) return false;
  }
  double decay;
  if (!real_value(decay_h.ptr(), decay) || !std::isfinite(decay) || !std::isfinite((float)decay))
    return false;
  PyObject* dist_o = dist_h.ptr();
  if (!PyUnicode_Check(dist_o)) return false;
  int dist;
  if (PyUnicode_CompareWithASCIIString(dist_o, "rademacher") == 0) dist = 0;
  else if (PyUnicode_CompareWithASCIIString(dist_o, "gaussian") == 0) dist = 1;
  else return false;
  if (!PyLong_CheckExact(offset_h.ptr())) return false;
  int overflow = 0;
  const long long offset = PyLong_AsLongLongAndOverflow(offset_h.ptr(), &overflow);
  if (overflow || offset < 0) {
    if (PyErr_Occurred()) PyErr_Clear();
    return false;
  }
  // --- tensors (what _api._check_tensors checks) ---
  const bool grad = at::GradMode::is_enabled();
  const bool inference = c10::InferenceMode::is_enabled();
  std::vector<std::pair<uintptr_t, uintptr_t>> spans;
  std::vector<int64_t> bases(ts.size());
  int64_t pos = offset;
  for (size_t t = 0; t < ts.size(); ++t) {
    const at::Tensor& x = ts[t];
    if (!x.defined() || !x.device().is_cpu() || x.layout() != at::kStrided || dtype_code(x) < 0 ||
        !x.is_contiguous() || (x.is_inference() && !inference) || (grad && x.requires_grad()) ||
        x.key_set().has(c10::DispatchKey::Python) || !x.has_storage())
      return false;
    const int64_t n = x.numel();
    bases[t] = pos;
    const int64_t span = (n + zo::kBlock - 1) / zo::kBlock * zo::kBlock;
    if (span > kMaxIndex - pos) return false;  // offset + size must stay below 2**63
    pos += span;
    if (n > 0) {
      const uintptr_t s = reinterpret_cast<uintptr_t>(x.data_ptr());
      spans.emplace_back(s, s + (uintptr_t)n * (uintptr_t)x.element_size());
    }
  }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i)
    if (spans[i].first < spans[i - 1].second) return false;  // shared memory
  if (spans.empty() || (K == 0 && decay == 1.0)) return true;  // validated no-op
  {
    py::gil_scoped_release nogil;
    run_cpu(ts, seeds.data(), coeffs.data(), K, bases, (float)decay, dist);
  }
  for (const at::Tensor& x : ts) x.unsafeGetTensorImpl()->bump_version();
  return true;
}

// The path in use and what the machine supports, e.g. "avx512 (vbmi, gfni)" or
// "avx2 (x86-64-v3; forced, the CPU also runs avx512)". The first word is the path's name.
std::string cpu_isa() {
  const MachineIsa& m = machine_isa();
  const int s = selected_isa().load();
  std::string out = isa_name(s);
  if (s == ISA_AVX512) {
    out += m.avx512_gfni ? " (vbmi, gfni)" : " (no vbmi/gfni: K <= 8 only, avx2 loops otherwise)";
  } else if (s == ISA_AVX2) {
    out += " (x86-64-v3";
  } else {
#if defined(__x86_64__)
    out += " (x86-64 baseline";
#elif defined(__aarch64__)
    out += " (aarch64";
#else
    out += " (generic";
#endif
  }
  if (s != ISA_AVX512) {
    if (s < m.best) out += std::string("; forced, the CPU also runs ") + isa_name(m.best);
    out += ")";
  }
  return out;
}

// Paths this CPU executes, highest first.
std::vector<std::string> isa_paths() {
  std::vector<std::string> out;
  for (int i = machine_isa().best; i >= 0; --i) out.push_back(isa_name(i));
  return out;
}

std::string get_isa() { return isa_name(selected_isa().load()); }

// Selects the path for later calls; returns the previous one. ValueError for an unknown name or a
// path above what the CPU runs.
std::string set_isa(const std::string& name) {
  const int want = isa_from_name(name);
  if (want < 0)
    throw py::value_error("zo_kernels: unknown CPU path '" + name + "'; allowed: avx512, avx2, portable");
  if (want > machine_isa().best)
    throw py::value_error("zo_kernels: CPU path '" + name + "' is not supported by this CPU (it runs " +
                          isa_name(machine_isa().best) + " and below)");
  return isa_name(selected_isa().exchange(want));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "zo_kernels CPU backend: fused seed-regenerated noise (OpenMP, SIMD Philox)";
  m.def("apply_seeds", &apply_seeds, "In-place apply of K seeded noise directions (CPU)",
        py::arg("tensors"), py::arg("seeds"), py::arg("coeffs"), py::arg("bases"),
        py::arg("decay"), py::arg("dist"), py::call_guard<py::gil_scoped_release>());
  m.def("apply_seeds_fast", &apply_seeds_fast,
        "Checked apply_seeds_ for plain Python arguments; False (nothing touched) when it cannot",
        py::arg("tensors"), py::arg("seeds"), py::arg("coeffs"), py::arg("decay"), py::arg("dist"),
        py::arg("offset"));
  m.def("cpu_isa", &cpu_isa, "CPU path in use and what the machine supports");
  m.def("isa_paths", &isa_paths, "CPU paths this machine executes, highest first");
  m.def("get_isa", &get_isa, "Name of the CPU path in use");
  m.def("set_isa", &set_isa, "Select the CPU path (avx512, avx2, portable); returns the previous",
        py::arg("name"));
}

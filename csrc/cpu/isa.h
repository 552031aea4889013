// Which CPU path of the kernel runs: detection of what the machine can execute, and the run-time
// choice (ZO_KERNELS_ISA, or zo_kernels._C.set_isa) of a path no higher than that.
//
// Paths, highest first (docs/DESIGN.md, The apply_seeds_ op and its backends):
//   avx512   AVX-512 F/BW/DQ/VL; with VBMI and GFNI also the grouped loop (K > 8; without them
//            K > 8 runs the avx2 loops and only the K <= 8 loop is AVX-512)
//   avx2     x86-64-v3 (AVX2, FMA, BMI2, F16C)
//   portable plain C++ written for auto-vectorization, compiled for the baseline target
// Every path gives the same bits. One binary: the x86 paths are compiled with function target
// attributes and chosen at run time, so the extension runs on any x86-64 (and builds elsewhere).
#pragma once

#include <atomic>
#include <string>

namespace zo_cpu {

enum Isa : int { ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

inline const char* isa_name(int isa) {
  switch (isa) {
    case ISA_AVX512: return "avx512";
    case ISA_AVX2: return "avx2";
    default: return "portable";
  }
}

// -1 when `name` is not a path name.
inline int isa_from_name(const std::string& name) {
  if (name == "avx512") return ISA_AVX512;
  if (name == "avx2") return ISA_AVX2;
  if (name == "portable") return ISA_PORTABLE;
  return -1;
}

struct MachineIsa {
  int best = ISA_PORTABLE;  // highest path this CPU executes
  bool avx512_gfni = false; // AVX-512 VBMI + GFNI: the grouped AVX-512 loop
};

inline const MachineIsa& machine_isa() {
  static const MachineIsa m = [] {
    MachineIsa r;
#if defined(__x86_64__)
    __builtin_cpu_init();
    const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("f16c");
    const bool a512 = v3 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512vl");
    r.best = a512 ? ISA_AVX512 : v3 ? ISA_AVX2 : ISA_PORTABLE;
    r.avx512_gfni = a512 && __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("gfni");
#endif
    return r;
  }();
  return m;
}

// The path in use (process-wide; the Python side sets it from ZO_KERNELS_ISA at import). Reads are
// relaxed: a change applies to calls that start after it.
inline std::atomic<int>& selected_isa() {
  static std::atomic<int> s{machine_isa().best};
  return s;
}

}  // namespace zo_cpu

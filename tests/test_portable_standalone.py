"""The portable CPU path (csrc/cpu/kernel_portable.h), compiled alone with the build's own flags.

1. It is written for auto-vectorization: every loop marked ``#pragma omp simd`` must be vectorized
   by the compiler on the baseline x86-64 target, or the path that aarch64 and old x86 run silently
   becomes scalar (a float16 update written with ``?:`` on floats stayed a branch under GCC's
   trapping math and ran several times slower). A file that instantiates every loop is compiled
   with ``-fopt-info-vec-optimized``, which names each vectorized loop by its line, and without
   torch's include paths (the header needs none).
2. Its float16 conversions (integer bits and fp32 arithmetic, no branch) equal c10's on every one
   of the 65,536 halves (load) and of the 2**32 floats (store, round to nearest even, NaN ->
   sign | 0x7e00), checked by a C++ loop against ``c10::Half`` and, where the CPU has F16C, against
   its conversion instructions too (an implementation independent of c10's software one, which is
   the same algorithm; NaN there only needs the sign). About 20 s.

Skipped where no g++ is at hand (the build needs one anyway).
"""
from __future__ import annotations

import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "csrc" / "cpu" / "kernel_portable.h"
# The build's flags for the CPU kernel (setup.py), without -march: the baseline target.
FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-fno-fast-math"]

SOURCE = r"""
#include "kernel_portable.h"
// Every loop of the header, instantiated: Philox, the group sums (all accumulator modes and group
// sizes), the final update for each dtype with and without decay.
void use_all(void* p, int dt, float* acc, float* x, const uint32_t (*words)[4][16],
             uint32_t (*spread)[4][16][4], const uint32_t* ncb, uint64_t b, uint64_t seed,
             uint32_t (*out)[16], const uint64_t* seeds, const float* coeffs, int K, float d) {
  zo_cpu::philox_blocks16_portable(b, seed, out);
  zo_cpu::spread_words(words, K, spread);
  for (int n = 1; n <= 4; ++n)
    for (int first = 0; first < 3; ++first)
      for (int to_x = 0; to_x < 2; ++to_x)
        for (int dec = 0; dec < 2; ++dec)
          zo_cpu::group_blocks_any(n, first, to_x, dec, K, acc, x, spread, ncb, d);
  zo_cpu::finalize_portable(p, dt, 0, acc, K, d);
  zo_cpu::rademacher_blocks_portable(p, dt, b, 3, seeds, coeffs, K, d);
}
"""


CONVERSIONS = r"""
#include <c10/util/Half.h>
#include <cmath>
#include <cstdio>
#include "kernel_portable.h"
#if defined(__x86_64__)
#include <immintrin.h>
// The CPU's own conversion instructions (F16C), an implementation independent of c10's software one:
// round to nearest even; NaN payloads are the hardware's.
__attribute__((target("f16c"))) static uint16_t hw_round(float f) {
  return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
__attribute__((target("f16c"))) static float hw_load(uint16_t h) { return _cvtsh_ss(h); }
static bool has_f16c() { return __builtin_cpu_supports("f16c"); }
#else
static uint16_t hw_round(float) { return 0; }
static float hw_load(uint16_t) { return 0.0f; }
static bool has_f16c() { return false; }
#endif
static bool is_nan16(uint16_t h) { return (h & 0x7fff) > 0x7c00; }
int main() {
  const bool hw = has_f16c();
  long load_bad = 0, store_bad = 0, nan_payload = 0, stores = 0, hw_bad = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    const float a = zo_cpu::f16_load_portable((uint16_t)h);
    const float b = static_cast<float>(c10::Half((uint16_t)h, c10::Half::from_bits()));
    if (zo_cpu::f2u(a) != zo_cpu::f2u(b) && !(std::isnan(a) && std::isnan(b))) ++load_bad;
    if (hw) {
      const float c = hw_load((uint16_t)h);
      if (std::isnan(c) ? !(std::isnan(a) && std::signbit(a) == std::signbit(c))
                        : zo_cpu::f2u(a) != zo_cpu::f2u(c)) ++hw_bad;
    }
  }
  uint32_t u = 0;
  do {
    const float f = zo_cpu::u2f(u);
    const uint16_t a = zo_cpu::f16_round_portable(f), b = c10::Half(f).x;
    ++stores;
    if (a != b) {
      if (is_nan16(a) && is_nan16(b)) ++nan_payload;
      else ++store_bad;
    }
    if (hw) {
      const uint16_t c = hw_round(f);
      // NaN: a NaN of the same sign (the payload is the hardware's); else the same bits
      if (is_nan16(c) ? !(is_nan16(a) && (a & 0x8000) == (c & 0x8000)) : a != c) ++hw_bad;
    }
  } while (++u != 0);
  std::printf("%ld %ld %ld %ld %d %ld\n", load_bad, store_bad, nan_payload, stores, (int)hw, hw_bad);
  return 0;
}
"""


def _compile(tmp_path, source: str, name: str, extra: list[str], link: bool, torch: bool = True):
    """Compile ``source`` with the build's flags; ``torch=False`` leaves torch's include paths out
    (the portable header itself needs none: a c10 include creeping back in fails there)."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("no g++ here")
    src = tmp_path / f"{name}.cpp"
    src.write_text(source)
    out = tmp_path / (name if link else f"{name}.o")
    includes = [f"-I{HEADER.parent}"]
    if torch:
        torch_cpp = pytest.importorskip("torch.utils.cpp_extension")
        includes += [f"-I{p}" for p in torch_cpp.include_paths()]
    cmd = [gxx, *FLAGS, *includes, *extra, str(src), "-o", str(out)]
    if not link:
        cmd.insert(-3, "-c")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


def test_float16_conversions_equal_c10_on_every_value(tmp_path):
    exe, _ = _compile(tmp_path, CONVERSIONS, "conversions", [], link=True)
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    load_bad, store_bad, nan_payload, stores, hw, hw_bad = map(int, res.stdout.split())
    assert stores == 2**32  # guard: the loop saw every float
    assert load_bad == 0, f"{load_bad} of 65536 halves read differently from c10::Half"
    assert store_bad == 0, f"{store_bad} floats rounded differently from c10::Half"
    # c10's software conversion gives NaN -> sign | 0x7e00, as the portable code does
    assert nan_payload == 0, f"{nan_payload} NaNs converted with another payload than c10's"
    # the CPU's F16C instructions, where present: the same values, NaN with the same sign
    if hw:
        assert hw_bad == 0, f"{hw_bad} conversions differ from the CPU's F16C instructions"


def _simd_loop_lines() -> list[int]:
    """Line numbers (1-based) of the loops that follow ``#pragma omp simd`` in the header."""
    lines = HEADER.read_text().splitlines()
    return [i + 2 for i, line in enumerate(lines) if line.strip() == "#pragma omp simd"]


def test_every_simd_loop_is_marked():
    # guard: the scan finds the loops this test is about (Philox, spread, group sums, 6 final
    # updates)
    assert len(_simd_loop_lines()) >= 9
    for ln in _simd_loop_lines():
        assert HEADER.read_text().splitlines()[ln - 1].lstrip().startswith("for ("), ln


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                    reason="checked for the x86-64 baseline target")
def test_portable_loops_vectorize_on_the_baseline_target(tmp_path):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("no g++ here")
    ver = subprocess.run([gxx, "-dumpfullversion"], capture_output=True, text=True).stdout.strip()
    if not ver or int(ver.split(".")[0]) < 12:
        # the -fopt-info report format and what GCC vectorizes were checked with GCC 12
        pytest.skip(f"g++ {ver or '?'}: the vectorization report is checked with GCC >= 12")
    _, res = _compile(tmp_path, SOURCE, "use_portable", ["-fopt-info-vec-optimized"], link=False,
                      torch=False)
    vectorized = {int(m.group(1)) for m in re.finditer(
        r"kernel_portable\.h:(\d+):\d+: optimized: loop vectorized", res.stderr)}
    # GCC names a loop by its first statement: the ``for`` line itself, or the next one
    missed = [ln for ln in _simd_loop_lines() if not {ln, ln + 1} & vectorized]
    text = HEADER.read_text().splitlines()
    assert not missed, "not vectorized: " + "; ".join(
        f"line {ln}: {text[ln - 1].strip()}" for ln in missed)

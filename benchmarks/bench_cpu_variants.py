"""Inner-loop variants of the CPU kernel's paths (avx512, avx2, portable), timed one by one.

``apply_seeds_`` with many seeds is compute-bound. This benchmark compiles
``benchmarks/cpu_variants/variants.cpp`` with the extension's flags (``-O3 -ffp-contract=off``),
runs it ``--runs`` times in fresh processes and writes the median of each variant to
``benchmarks/results/cpu_variants.json``:

- ``accumulate``: ways to turn one sign bit into +c or -c and add it, in seed order, to an fp32
  accumulator, per 16 element-seeds, each checked bit for bit against the first; and the kernel's
  grouped order (``grouped4_gfni_permps``: subset-sum tables over 4 seeds, a different sum),
  checked bit for bit against a scalar implementation of that order. AVX-512 machines only.
- ``accumulate`` with ``isa = avx2``: the avx2 path's two schemes (``avx2_direct_sllv_blendv``,
  K < 16; ``avx2_transpose_permps2``, K >= 16), the kernel's own code (``csrc/cpu/avx2_blocks.h``),
  checked against the same scalar grouped order; and the K >= 16 alternatives tried for it: shift
  counts in a register (``_regshift``, the previous loop), every add as ``fma(1, t, acc)``
  (``_fma``), symmetric 8-entry tables (``avx2_transpose_sym_permps``: T[m ^ 15] = -T[m]) and
  byte-plane lookups (``avx2_tiles_pshufb_planes``: 8 x 8 bit tiles transposed by delta swaps, four
  vpshufb + eight unpacks per group and 32 elements).
- ``piece`` (avx2): the transposes and the lookups of the two table schemes timed alone.
- ``philox``: Philox4x32-10 on 16 lanes (one 128-element block and 16 seeds; avx2: two 8-lane
  evaluations), checked against the project's scalar Philox (``csrc/philox.h``), one evaluation at a
  time and 4 interleaved; ``*_r2shared`` are the kernels' loops, which build rounds 1 and 2 from a
  per-block and a per-seed product shared across blocks and seeds.

- ``portable``: the portable path (``benchmarks/cpu_variants/portable.cpp``, compiled for the
  baseline target with ``-fopenmp``), per element and seed for K = 1, 2, 4, 5, 8, 64 on 16 blocks:
  ``spread_shift`` (the kernel's own block function: Philox, spread words, group sums, the update),
  ``bit_test`` (the same with the earlier sums: a bit test, a compare and two logic operations per
  element and seed; checked bit for bit against the kernel) and its Philox alone. The summary
  scales each K to 100M float32 on 2 threads beside ``add_``: where that compute time is above
  ``add_``, the pass is compute-bound on this path.
- ``kernel``: the kernel itself, ``zo_kernels.apply_seeds_`` with K = 64 on 20M float32 forced to
  each CPU path, on 1 thread and on 2 threads (``--kernel-n``), in ns per 16 element-seeds per
  thread (wall time x threads): beside the floor it shows whether the kernel runs at its loops'
  speed, and how it scales to 2 threads on this machine.

The summary line per path adds the fastest bit-exact grouped ``accumulate`` and the fastest
``philox`` (per 16 element-seeds) and scales it to ``apply_seeds_`` K = 64 on 100M float32 on 2
threads, beside ``add_`` from ``benchmarks/results/kernels_cpu.json`` (same machine): the arithmetic
floor of the kernel's scheme, before any memory traffic.

Single thread, data in L1, timed in CPU time of the thread (``CLOCK_THREAD_CPUTIME_ID``: time slices
other processes take on a shared machine do not count); cycles use a clock calibrated the same way by
a chain of dependent integer adds.

Usage: ``python benchmarks/bench_cpu_variants.py [--runs 3] [--no-write]``
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import portable_ks, write_rows  # noqa: E402

SRC = Path(__file__).resolve().parent / "cpu_variants" / "variants.cpp"
SRC_PORTABLE = Path(__file__).resolve().parent / "cpu_variants" / "portable.cpp"
FLAGS = ["-O3", "-std=c++20", "-ffp-contract=off", "-fno-fast-math"]


def _add_ms() -> float | None:
    """Median add_ time of the last kernels_cpu run (100M float32), if there is one."""
    path = Path(__file__).resolve().parent / "results" / "kernels_cpu.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    rows = data if isinstance(data, list) else data.get("rows", [])
    for r in rows:
        c, f = r.get("config", {}), r.get("figures", {})
        if c.get("op") == "add_" and c.get("n") == 100_000_000 and "median_s" in f:
            return f["median_s"] * 1e3
    return None


def _kernel_rows(n: int, repeats: int = 7) -> list[dict]:
    """apply_seeds_ K = 64 on n float32 per CPU path, 1 and 2 threads: ns per 16 element-seeds per
    thread (median wall time x threads)."""
    try:
        import torch

        import zo_kernels
        from zo_kernels import _backends
    except ImportError:
        return []
    if _backends.cpu_extension() is None:
        return []
    seeds = [(0x9E3779B97F4A7C15 * (j + 1)) % (1 << 64) for j in range(64)]
    coeffs = [1e-3 * (1 if j % 2 == 0 else -1) for j in range(64)]
    x = torch.ones(n)
    prev_path, prev_threads = _backends.cpu_path(), torch.get_num_threads()
    rows = []
    try:
        for path in [p for p in ("avx512", "avx2", "portable") if p in _backends.cpu_paths()]:
            _backends.set_cpu_path(path)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                # warm-up for at least 0.5 s: a new pool thread can start on the caller's CPU and be
                # moved by the scheduler only later (a 2-thread run right after a 1-thread one measured
                # 1.1-1.2x the 1-thread speed, then 1.9-2x once settled)
                t_end = time.perf_counter() + 0.5
                while time.perf_counter() < t_end:
                    zo_kernels.apply_seeds_([x], seeds, coeffs)
                ts = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    zo_kernels.apply_seeds_([x], seeds, coeffs)
                    ts.append(time.perf_counter() - t0)
                t = statistics.median(ts)
                rows.append({"config": {"part": "kernel", "isa": path,
                                        "variant": f"apply_seeds_ K=64, {threads} thread(s)",
                                        "threads": threads, "n": n},
                             "figures": {"ns_per_16_element_seeds": t * threads / (n * 64 / 16) * 1e9,
                                         "median_s": t, "times": ts},
                             "command": "python benchmarks/bench_cpu_variants.py"})
    finally:
        if prev_path is not None:
            _backends.set_cpu_path(prev_path)
        torch.set_num_threads(prev_threads)
    return rows


def _portable_summary(rows: list[dict], add_ms: float | None) -> None:
    """Per K, the portable path's compute time on 100M float32 and 2 threads (in-cache figures
    scaled; no memory traffic) beside add_: where it is above ~1x add_, the pass is compute-bound."""
    per = {r["config"]["variant"]: r["figures"]["ns_per_element_seed"] for r in rows
           if r["config"]["part"] == "portable"}
    for k in portable_ks(per):
        ns, old = per.get(f"spread_shift K={k}"), per.get(f"bit_test K={k}")
        if ns is None or old is None:
            continue
        ms = 100e6 * k * ns * 1e-9 / 2 * 1e3
        tail = f" = {ms / add_ms:.2f}x add_ ({add_ms:.2f} ms, kernels_cpu.json)" if add_ms else ""
        print(f"portable K={k}: {ns:.4f} ns per element-seed (earlier bit-test sums "
              f"{old:.4f}, {old / ns:.2f}x): 100M float32 on 2 threads >= {ms:.1f} ms of compute{tail}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="fresh processes; medians are reported")
    ap.add_argument("--kernel-n", type=int, default=20_000_000,
                    help="elements of the kernel rows (0: skip them)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        print("bench_cpu_variants: no C++ compiler (g++ or c++) on PATH", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as d:
        exes = []
        if platform.machine() in ("x86_64", "AMD64"):
            exes.append(Path(d) / "variants")
            subprocess.run([cxx, *FLAGS, str(SRC), "-o", str(exes[-1])], check=True)
        # the portable path for the baseline target (no -march), with the build's -fopenmp (its
        # loops are marked `#pragma omp simd`)
        exes.append(Path(d) / "portable")
        subprocess.run([cxx, *FLAGS, "-fopenmp", str(SRC_PORTABLE), "-o", str(exes[-1])], check=True)
        runs = []
        for _ in range(max(1, args.runs)):
            run = []
            for exe in exes:
                res = subprocess.run([str(exe)], capture_output=True, text=True)
                if res.returncode not in (0, 1):  # 1: ran, but a variant was not bit-exact
                    raise subprocess.CalledProcessError(res.returncode, str(exe), res.stdout,
                                                        res.stderr)
                out = res.stdout
                got = [json.loads(line) for line in out.splitlines() if line.strip()]
                if got and got[0].get("part") == "skipped":
                    print(f"bench_cpu_variants: {exe.name} skipped: {got[0]['why']}")
                    continue
                run += got
            runs.append(run)
    clocks = [r["ghz"] for run in runs for r in run if r["part"] == "clock"]
    ghz = statistics.median(clocks) if clocks else None  # calibrated on x86-64 only
    keys = [(r["part"], r.get("isa"), r["variant"]) for r in runs[0] if r["part"] != "clock"]
    rows = []
    for part, isa, variant in keys:
        got = [r for run in runs for r in run if r.get("part") == part and r.get("variant") == variant
               and r.get("isa") == isa]
        fig = {"bit_exact": all(r["bit_exact"] for r in got), "runs": len(got), "clock_ghz": ghz}
        if got[0].get("order"):
            fig["order"] = got[0]["order"]
        for k in got[0]:
            if k.startswith(("ns_", "cycles_")):
                fig[k] = statistics.median(r[k] for r in got)
        flags = " ".join(FLAGS + (["-fopenmp"] if part == "portable" else []))
        rows.append({"config": {"part": part, "isa": isa, "variant": variant, "threads": 1,
                                "flags": flags},
                     "figures": fig, "command": "python benchmarks/bench_cpu_variants.py"})
    if args.kernel_n > 0:
        rows += _kernel_rows(args.kernel_n)
    print((f"clock ~{ghz:.2f} GHz (calibrated), " if ghz else "") + f"{len(runs)} runs, medians")
    for r in rows:
        f = r["figures"]
        ns = f.get("ns_per_16_element_seeds", f.get("ns_per_16_lanes"))
        unit = "ns/16 element-seeds" if "ns_per_16_element_seeds" in f else "ns/16 lanes"
        if r["config"]["part"] == "kernel":
            unit = "ns/16 element-seeds per thread"
        print(f"{r['config']['part']:<11}{r['config']['isa'] or '':<10}{r['config']['variant']:<34}"
              f"{ns:8.3f} {unit:<22}"
              f"{'' if f.get('bit_exact', True) else 'NOT BIT-EXACT'}")
    add_ms = _add_ms()
    for isa in ("avx512", "avx2"):
        acc = [r["figures"]["ns_per_16_element_seeds"] for r in rows
               if r["config"]["part"] == "accumulate" and r["config"]["isa"] == isa
               and r["figures"]["bit_exact"] and r["figures"].get("order") == "grouped"]
        phx = [r["figures"]["ns_per_16_lanes"] / 128.0 for r in rows
               if r["config"]["part"] == "philox" and r["config"]["isa"] == isa
               and r["figures"]["bit_exact"]]
        if not acc or not phx:
            continue
        per16 = min(acc) + min(phx)
        k64_ms = 100e6 * 64 / 16 * per16 * 1e-9 / 2 * 1e3  # 100M elements, K = 64, 2 threads
        tail = f" = {k64_ms / add_ms:.1f}x add_ ({add_ms:.2f} ms, kernels_cpu.json)" if add_ms else ""
        print(f"{isa}: fastest grouped accumulate {min(acc):.3f} + fastest Philox {min(phx):.3f} = "
              f"{per16:.3f} ns per 16 element-seeds per thread: K = 64 on 100M float32 on 2 threads "
              f">= {k64_ms:.0f} ms{tail}")
        kern = {r["config"]["threads"]: r["figures"]["ns_per_16_element_seeds"] for r in rows
                if r["config"]["part"] == "kernel" and r["config"]["isa"] == isa}
        if kern.get(1) and kern.get(2):
            print(f"{isa}: the kernel itself, 1 thread {kern[1]:.3f} ({kern[1] / per16:.2f}x the floor), "
                  f"2 threads {kern[2]:.3f} per thread (2-thread speed-up {2 * kern[1] / kern[2]:.2f}x)")
    _portable_summary(rows, add_ms)
    if not args.no_write:
        print(f"wrote {write_rows('cpu_variants', rows)}")
    inexact = [r["config"]["variant"] for r in rows if not r["figures"].get("bit_exact", True)]
    if inexact:
        print(f"bench_cpu_variants: not bit-exact: {inexact}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

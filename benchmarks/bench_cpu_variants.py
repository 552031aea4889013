"""Inner-loop variants of the CPU kernel's many-seed paths (avx512 and avx2), timed one by one.

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
  checked against the same scalar grouped order.
- ``philox``: Philox4x32-10 on 16 lanes (one 128-element block and 16 seeds; avx2: two 8-lane
  evaluations), checked against the project's scalar Philox (``csrc/philox.h``), one evaluation at a
  time and 4 interleaved.

Single thread, data in L1, timed in CPU time of the thread (``CLOCK_THREAD_CPUTIME_ID``: time slices
other processes take on a shared machine do not count); cycles use a clock calibrated the same way by
a chain of dependent integer adds.

Usage: ``python benchmarks/bench_cpu_variants.py [--runs 3] [--no-write]``
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_rows  # noqa: E402

SRC = Path(__file__).resolve().parent / "cpu_variants" / "variants.cpp"
FLAGS = ["-O3", "-std=c++20", "-ffp-contract=off", "-fno-fast-math"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="fresh processes; medians are reported")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        print("bench_cpu_variants: no C++ compiler (g++ or c++) on PATH", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as d:
        exe = Path(d) / "variants"
        subprocess.run([cxx, *FLAGS, str(SRC), "-o", str(exe)], check=True)
        runs = []
        for _ in range(max(1, args.runs)):
            out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
            runs.append([json.loads(line) for line in out.splitlines() if line.strip()])
    if runs[0] and runs[0][0].get("part") == "skipped":
        print(f"bench_cpu_variants: skipped: {runs[0][0]['why']}")
        return 0
    ghz = statistics.median(r["ghz"] for run in runs for r in run if r["part"] == "clock")
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
        rows.append({"config": {"part": part, "isa": isa, "variant": variant, "threads": 1,
                                "flags": " ".join(FLAGS)},
                     "figures": fig, "command": "python benchmarks/bench_cpu_variants.py"})
    print(f"clock ~{ghz:.2f} GHz (calibrated), {len(runs)} runs, medians")
    for r in rows:
        f = r["figures"]
        ns = f.get("ns_per_16_element_seeds", f.get("ns_per_16_lanes"))
        unit = "ns/16 element-seeds" if "ns_per_16_element_seeds" in f else "ns/16 lanes"
        print(f"{r['config']['part']:<11}{r['config']['isa'] or '':<8}{r['config']['variant']:<30}"
              f"{ns:8.3f} {unit:<22}"
              f"{'' if f['bit_exact'] else 'NOT BIT-EXACT'}")
    if not args.no_write:
        print(f"wrote {write_rows('cpu_variants', rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak extra memory of the noise kernels on one large tensor, each method in a fresh subprocess.

For every method a new Python process allocates and touches ``x`` (default 100M float32 = 400 MB),
runs the op once on a tiny tensor (so libraries, OpenMP threads and lazy initialization are loaded
before the baseline), resets the kernel's peak-RSS counter (``/proc/self/clear_refs``), reads the
baseline RSS, runs the op once on ``x``, and reports ``peak RSS - baseline``: the memory the op
itself needed. In-place ops with regenerated noise should need ~0 (within allocator noise); the
MeZO-style approach materializes one noise tensor the size of the parameter.

Methods:

- ``apply_seeds_ K=64 (cpu)`` and ``perturb_ (cpu)``: the fused C++ backend. Target: extra memory
  <= ``NOISE_MIB`` MiB (allocator / thread-stack noise), i.e. ~0 % of the tensor.
- ``apply_seeds_ K=1 (reference)``: the pure-torch path works in chunks of ``reference.CHUNK`` elements;
  target: extra <= ``reference.chunk_bytes()`` + ``NOISE_MIB`` MiB, independent of n. K = 1 by
  default (the reference needs ~0.4 us per element per seed: 100M elements take ~40 s per seed).
- ``mezo_replay rademacher`` / ``gaussian``: per tensor ``torch.manual_seed``, noise drawn with
  torch's RNG into a new tensor, ``add_`` (see bench_kernels_cpu.mezo_replay_). No target: the
  comparison.

Writes ``benchmarks/results/kernels_memory.json`` (``--no-write`` to skip) and prints a table.
Usage::

    python benchmarks/mem_kernels.py                 # n = 100M; the reference run takes most of
                                                     # the time (~1 min idle, ~5 min under load)
    python benchmarks/mem_kernels.py --n 10000000 --skip-reference --no-write
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RSS_SNIPPET, peak_rss_subprocess, write_rows  # noqa: E402

RESULTS_NAME = "kernels_memory"
#: Allocator / thread-stack noise allowed for an in-place op, MiB (about 2 % of a 100M fp32 tensor).
NOISE_MIB = 8.0

# The child: {n, dtype, method, k, backend, bench_dir} arrive as a JSON literal in the code.
CHILD = RSS_SNIPPET + r'''
import gc, json, sys, time
cfg = json.loads(CFG_JSON)
sys.path.insert(0, cfg["bench_dir"])
import torch, zo_kernels
from bench_kernels_cpu import mezo_replay_, seeds_and_coeffs
dtype = getattr(torch, cfg["dtype"])
seeds, coeffs = seeds_and_coeffs(cfg["k"])
method, backend = cfg["method"], cfg["backend"]

def run(ts):
    if method == "apply_seeds_":
        zo_kernels.apply_seeds_(ts, seeds, coeffs, backend=backend)
    elif method == "perturb_":
        zo_kernels.perturb_(ts, seeds[0], coeffs[0], backend=backend)
    elif method == "mezo_replay":
        mezo_replay_(ts, seeds[0], coeffs[0], cfg["dist"])
    elif method == "none":
        pass
    else:
        raise ValueError(method)

x = torch.ones(cfg["n"], dtype=dtype)           # allocated and touched: part of the baseline
run([torch.ones(4096 + 7, dtype=dtype)])        # load libraries / thread pools before the baseline
gc.collect()
reset_ok = reset_peak()
base = rss_now_kb()
peak_before = hwm_kb() if reset_ok else rss_peak_kb()
t0 = time.perf_counter()
run([x])
dt = time.perf_counter() - t0
peak = hwm_kb() if reset_ok else rss_peak_kb()
ok = bool(torch.isfinite(x[:4096].float()).all())
print(json.dumps({"base_kb": base, "peak_kb": peak, "peak_before_kb": peak_before,
                  "reset_peak": reset_ok, "seconds": dt, "finite": ok,
                  "threads": torch.get_num_threads()}))
'''


def child_code(cfg: dict) -> str:
    """The child's source with ``cfg`` embedded (no argv or file needed)."""
    return f"CFG_JSON = {json.dumps(json.dumps(cfg))}\n" + CHILD


def methods(args) -> list[dict]:
    """The measured methods, in order, as child configs."""
    out = [
        {"label": "none (baseline noise)", "method": "none", "backend": "-", "k": 1},
        {"label": f"apply_seeds_ K=64 ({args.backend})", "method": "apply_seeds_",
         "backend": args.backend, "k": 64},
        {"label": f"perturb_ ({args.backend})", "method": "perturb_", "backend": args.backend, "k": 1},
    ]
    if not args.skip_reference:
        out.append({"label": f"apply_seeds_ K={args.reference_k} (reference)",
                    "method": "apply_seeds_", "backend": "reference", "k": args.reference_k})
    if not args.skip_mezo:
        out += [{"label": "mezo_replay rademacher", "method": "mezo_replay", "backend": "torch",
                 "k": 1, "dist": "rademacher"},
                {"label": "mezo_replay gaussian", "method": "mezo_replay", "backend": "torch",
                 "k": 1, "dist": "gaussian"}]
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000_000, help="elements (default 100_000_000)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--backend", default="cpu", choices=["cpu", "reference"],
                    help="backend of the fused-op rows (default cpu; 'reference' for a dev check "
                         "without the C++ build: use a small --n)")
    ap.add_argument("--reference-k", type=int, default=1,
                    help="K for the reference-backend run (default 1; its time grows with K)")
    ap.add_argument("--skip-reference", action="store_true", help="skip the slow reference run")
    ap.add_argument("--skip-mezo", action="store_true", help="skip the MeZO-style runs")
    ap.add_argument("--no-write", action="store_true", help="print only; do not write results")
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error(f"--n must be >= 1, got {args.n}")
    if args.reference_k < 1:
        ap.error(f"--reference-k must be >= 1, got {args.reference_k}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import zo_kernels
    from zo_kernels import reference

    if not zo_kernels.backends()[args.backend]["usable"]:
        print(f"mem_kernels: the {args.backend!r} backend is not usable: "
              f"{zo_kernels.backends()[args.backend]['why']}; build it first "
              "(pip install --no-build-isolation -e .) or pass --backend reference", file=sys.stderr)
        return 2
    esize = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    tensor_mib = args.n * esize / 2**20
    bench_dir = str(Path(__file__).resolve().parent)
    rows = []
    print(f"n = {args.n:,} {args.dtype} ({tensor_mib:.0f} MiB); peak-RSS delta in a fresh process "
          "per method")
    print(f"{'method':<32}{'extra MiB':>11}{'x tensor':>10}{'time s':>9}  target")
    t_start = time.perf_counter()
    for m in methods(args):
        cfg = {"n": args.n, "dtype": args.dtype, "bench_dir": bench_dir, **m}
        res = peak_rss_subprocess(child_code(cfg))
        extra_mib = max(0, res["peak_kb"] - res["base_kb"]) / 1024
        fig = {"extra_mib": extra_mib, "ratio_to_tensor": extra_mib / tensor_mib,
               "tensor_mib": tensor_mib, "seconds": res["seconds"], "base_rss_mib": res["base_kb"] / 1024,
               "peak_rss_mib": res["peak_kb"] / 1024, "peak_reset": res["reset_peak"]}
        target = None
        if m["method"] in ("apply_seeds_", "perturb_"):
            limit = NOISE_MIB + (reference.chunk_bytes() / 2**20 if m["backend"] == "reference" else 0)
            why = ("chunk bound + allocator noise, independent of n" if m["backend"] == "reference"
                   else "~0: allocator noise only")
            target = {"figure": "extra_mib", "cmp": "<=", "value": limit,
                      "text": f"<= {limit:.0f} MiB ({why})"}
            fig["meets_target"] = extra_mib <= limit and res["finite"]
        fig["target"] = target
        if not res["finite"]:
            fig["error"] = "x not finite after the op"
        rows.append({"config": {"op": m["method"], "label": m["label"], "n": args.n, "K": m["k"],
                                "dtype": args.dtype, "backend": m["backend"],
                                "threads": res["threads"], **({"dist": m["dist"]} if "dist" in m
                                                              else {})},
                     "figures": fig,
                     "command": "python benchmarks/mem_kernels.py " + " ".join(
                         sys.argv[1:] if argv is None else argv)})
        tgt = ("" if target is None else
               f"{target['text']}: {'pass' if fig['meets_target'] else 'FAIL'}")
        print(f"{m['label']:<32}{extra_mib:>11.1f}{fig['ratio_to_tensor']:>10.3f}"
              f"{res['seconds']:>9.2f}  {tgt}", flush=True)
    print(f"total {time.perf_counter() - t_start:.1f} s")
    if not args.no_write:
        print(f"wrote {write_rows(RESULTS_NAME, rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

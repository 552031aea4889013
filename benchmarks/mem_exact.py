"""Memory of the exact ZO evaluation mode against inference: peak RSS in fresh processes.

A client that keeps its own model must probe ``w +- eps c z`` without moving ``w`` (exact
agreement with the server, issue 5). Three ways, each measured in a fresh Python process that
builds the model and a batch, runs one inference forward (libraries, thread pools and lazy
initialization loaded before the baseline), resets the kernel's peak-RSS counter
(``/proc/self/clear_refs``), runs the method once and reports the peak RSS during it (``VmHWM``)
and its growth over the RSS just before (glibc's mmap threshold is fixed at 128 KiB in the
children, so RSS follows the live tensors):

- ``inference``: one forward of the batch under ``torch.no_grad()``;
- ``exact``: ``zowarmup.optim.exact.exact_estimate`` with S seeds (2S forwards; every weight a
  forward reads made perturbed on the fly, Linear rows / Conv output channels in chunks of at
  most 4 MiB, stored weights untouched; ``scratch_mib`` is that chunk bound);
- ``inplace``: ``ZOOptimizer.estimate`` with S seeds (in place +eps/-2eps/+eps; not bit-exact);
- ``snapshot``: a copy of the parameters, ``ZOOptimizer.estimate``, restore (bit-exact).

Models: ``resnet18`` (CIFAR-style, 3x32x32, BatchNorm in eval mode as ZO clients use it, batch
32; 11.2M parameters, 44.7 MB, largest layer 9.4 MB), ``mlp_digits`` (the CPU-scale default: 64
-> 128 -> 10 on 8x8 digits, batch 64; 9.6 KB of parameters: RSS cannot resolve it, reported for
completeness) and ``mlp_wide`` (1024 -> 8192 -> 8192 -> 10, batch 32: the worst case, one layer
is 80% of the model).

Writes ``benchmarks/results/exact_memory.json`` (``--no-write`` to skip). Usage::

    python benchmarks/mem_exact.py                       # all models, ~1 min
    python benchmarks/mem_exact.py --models resnet18 --samples 2
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RSS_SNIPPET, peak_rss_subprocess, write_rows  # noqa: E402

RESULTS_NAME = "exact_memory"

CHILD = RSS_SNIPPET + r'''
import gc, json, time
import torch
from torch import nn
import torch.nn.functional as F
cfg = json.loads(CFG_JSON)
torch.manual_seed(0)
if cfg["model"] == "resnet18":
    from zowarmup.models import build_model
    model = build_model("resnet18", 10, 3, 32, norm="bn")
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
elif cfg["model"] == "mlp_digits":
    from zowarmup.models import build_model
    model = build_model("mlp", 10, 1, 8, norm="none", hidden=(128,))
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
elif cfg["model"] == "mlp_wide":
    model = nn.Sequential(nn.Flatten(), nn.Linear(1024, 8192), nn.ReLU(), nn.Linear(8192, 8192),
                          nn.ReLU(), nn.Linear(8192, 10))
    x, y = torch.randn(32, 1024), torch.randint(0, 10, (32,))
model.eval()
params = list(model.parameters())
from zowarmup import ZOOptimizer
from zowarmup.optim.exact import ScratchPerturbation, exact_estimate
seeds = [1234 + s for s in range(cfg["S"])]
eps, c = 1e-3, 0.75

def closure():
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))

opt = ZOOptimizer(params, lr=1e-4, eps=eps, scale=c, num_samples=cfg["S"], seed=0)
closure()                                  # warm-up forward, every method
sp = ScratchPerturbation(model)
gc.collect()
reset_ok = reset_peak()
base = rss_now_kb()
t0 = time.perf_counter()
m = cfg["method"]
if m == "inference":
    closure()
elif m == "exact":
    exact_estimate(model, closure, seeds, eps, c, perturbation=sp)
elif m == "inplace":
    opt.estimate(closure, seeds=seeds)
elif m == "snapshot":
    saved = [p.detach().clone() for p in params]
    opt.estimate(closure, seeds=seeds)
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    del saved
else:
    raise ValueError(m)
dt = time.perf_counter() - t0
peak = hwm_kb() if reset_ok else rss_peak_kb()
print(json.dumps({"base_kb": base, "peak_kb": peak, "reset_peak": reset_ok, "seconds": dt,
                  "threads": torch.get_num_threads(),
                  "n_params": sum(p.numel() for p in params),
                  "largest_param": max(p.numel() for p in params),
                  "scratch_bytes": sp.scratch_bytes}))
'''

#: glibc malloc with a fixed mmap threshold: every block of 128 KiB or more is mapped on
#: allocation and unmapped on free, so RSS follows the live tensors instead of the heap's history
#: (with the default dynamic threshold the baseline RSS of identical processes varied by ~25 MiB
#: for ResNet-18 and swamped the 9 MiB being measured).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}

METHODS = [("inference", "inference forward"),
           ("exact", "exact: chunked on-the-fly ZO estimate"),
           ("inplace", "in place ZOOptimizer.estimate (not bit-exact)"),
           ("snapshot", "snapshot + in-place estimate + restore")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet18,mlp_digits,mlp_wide")
    ap.add_argument("--samples", type=int, default=1, help="S, seeds per estimate")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per cell (median)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    print(f"{'model':11s} {'method':46s} {'peak MiB':>9s} {'growth MiB':>10s} "
          f"{'- infer MiB':>11s} {'x infer':>8s}")
    for model in args.models.split(","):
        res = {}
        for key, _ in METHODS:
            runs = []
            for _ in range(args.repeats):
                cfg = {"model": model, "method": key, "S": args.samples}
                runs.append(peak_rss_subprocess(CHILD.replace("CFG_JSON", repr(json.dumps(cfg))),
                                                env=MALLOC_ENV))
            runs.sort(key=lambda r: r["peak_kb"] - r["base_kb"])
            res[key] = runs[len(runs) // 2]
        inf = res["inference"]
        for key, label in METHODS:
            r = res[key]
            growth = (r["peak_kb"] - r["base_kb"]) / 1024
            over = growth - (inf["peak_kb"] - inf["base_kb"]) / 1024
            figures = {"peak_mib": r["peak_kb"] / 1024, "base_mib": r["base_kb"] / 1024,
                       "growth_mib": growth, "extra_over_inference_mib": over,
                       "ratio_to_inference": r["peak_kb"] / inf["peak_kb"],
                       "seconds": r["seconds"], "reset_peak": r["reset_peak"]}
            rows.append({"config": {"label": label, "model": model, "method": key,
                                    "num_samples": args.samples, "threads": r["threads"],
                                    "n_params": r["n_params"],
                                    "param_mib": r["n_params"] * 4 / 2**20,
                                    "largest_param_mib": r["largest_param"] * 4 / 2**20,
                                    "scratch_mib": r["scratch_bytes"] / 2**20,
                                    "repeats": args.repeats},
                         "figures": figures,
                         "command": "python benchmarks/mem_exact.py"
                                    + (f" --models {args.models}"
                                       if args.models != "resnet18,mlp_digits,mlp_wide" else "")
                                    + (f" --samples {args.samples}" if args.samples != 1 else "")})
            print(f"{model:11s} {label:46s} {figures['peak_mib']:9.1f} {growth:10.1f} "
                  f"{over:11.1f} {figures['ratio_to_inference']:8.3f}")
        print(f"{model}: {inf['n_params'] / 1e6:.2f}M params ({inf['n_params'] * 4 / 2**20:.1f} "
              f"MiB), scratch buffer {inf['scratch_bytes'] / 2**20:.2f} MiB")
    if not args.no_write:
        print("wrote", write_rows(RESULTS_NAME, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

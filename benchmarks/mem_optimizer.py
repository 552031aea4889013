"""Memory parity of a ZO step: peak RSS of one training step against one inference forward.

For each model and each method a fresh Python process builds the model and a batch, runs one
inference forward under ``no_grad`` (so libraries, thread pools and lazy initialization are loaded
before the baseline), resets the kernel's peak-RSS counter (``/proc/self/clear_refs``), runs the
method once, and reports the peak RSS during it (``VmHWM``: the memory the process needed, the
model and the torch runtime included) and its growth above the RSS just before.

Methods (issue 3, section 4):

- (a) ``inference``: one forward of the batch under ``torch.no_grad()`` (the loss included).
- (b) ``ZOOptimizer.step``: one step, S = 1, Rademacher noise regenerated inside the kernels.
- (c) ``MeZO-style step``: the same SPSA step written as MeZO does, one parameter at a time:
  ``torch.manual_seed(seed)``; ``z = torch.normal(...)`` into a new tensor; ``p.add_(z, alpha)``
  (in place: MeZO's own ``p.data = p.data + c * z * eps`` would hold two more temporaries). It
  needs one extra tensor the size of the largest parameter.
- (d) ``SGD step``: forward with autograd, ``backward()``, ``torch.optim.SGD.step()``: activations
  saved for the backward plus one gradient per parameter.

Models: ``mlp50m`` (1024 -> 8192 -> 8192 -> 10; the 8192x8192 layer has 67.1M parameters, 256 MiB,
batch 32) and ``convnet`` (a small 4-conv net for 3x32x32 images, batch 64, ~0.3M parameters).

Each method runs in ``--runs`` (3) fresh processes and the run with the median peak is reported
(the peak of a process holding a small model varies by ~15 MiB from one process to the next).

**Target: (b)/(a) <= 1.02** on peak RSS. Writes ``benchmarks/results/optimizer_memory.json``
(``--no-write`` to skip) and prints a table. Usage::

    python benchmarks/mem_optimizer.py                    # both models, 3 runs each, ~3 min
    python benchmarks/mem_optimizer.py --models convnet --no-write
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RSS_SNIPPET, peak_rss_subprocess, write_rows  # noqa: E402

RESULTS_NAME = "optimizer_memory"
TARGET_RATIO = 1.02

#: Model and data builders; executed in the children and imported by bench_optimizer.py.
MODELS_SRC = r'''
import torch
from torch import nn

def build(kind, seed=0):
    """(model, x, y) for 'mlp50m' or 'convnet' (float32, CPU), deterministic."""
    torch.manual_seed(seed)
    if kind == "mlp50m":
        model = nn.Sequential(nn.Linear(1024, 8192), nn.ReLU(), nn.Linear(8192, 8192), nn.ReLU(),
                              nn.Linear(8192, 10))
        x = torch.randn(32, 1024)
        y = torch.randint(0, 10, (32,))
    elif kind == "convnet":
        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]
        model = nn.Sequential(*block(3, 32), nn.MaxPool2d(2), *block(32, 64), nn.MaxPool2d(2),
                              *block(64, 128), nn.MaxPool2d(2), *block(128, 256),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10))
        x = torch.randn(64, 3, 32, 32)
        y = torch.randint(0, 10, (64,))
    else:
        raise ValueError(f"unknown model {kind!r}")
    return model, x, y

def mezo_step(params, closure, seeds, lr, eps):
    """MeZO-style SPSA step (Malladi et al. 2023), written in place: per sample, perturb +eps,
    -2eps, +eps with torch's RNG re-seeded per pass and Gaussian noise materialized one
    parameter at a time, then one more replay per sample for the update (4 passes per sample)."""
    def replay(seed, scale):
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(0.0, 1.0, size=p.shape, dtype=p.dtype)
            p.add_(z, alpha=scale)
            del z
    grads = []
    with torch.no_grad():
        for s in seeds:
            replay(s, eps)
            lp = float(closure())
            replay(s, -2 * eps)
            lm = float(closure())
            replay(s, eps)
            grads.append((lp - lm) / (2 * eps))
        for s, g in zip(seeds, grads):
            replay(s, -lr * g / len(seeds))
    return (lp + lm) / 2
'''

CHILD = RSS_SNIPPET + MODELS_SRC + r'''
import gc, json, sys, time
cfg = json.loads(CFG_JSON)
from zowarmup import ZOOptimizer
rss_torch = rss_now_kb()
if cfg["preload_dynamo"]:
    import torch._dynamo                            # the runtime every torch.optim process loads
rss_runtime = rss_now_kb()
model, x, y = build(cfg["model"])
loss_fn = nn.functional.cross_entropy
closure = lambda: loss_fn(model(x), y)
params = list(model.parameters())
method = cfg["method"]
if method == "zo":
    opt = ZOOptimizer(params, lr=1e-4, eps=1e-3, num_samples=cfg["S"], seed=0,
                      backend=cfg["backend"])
elif method == "sgd":
    opt = torch.optim.SGD(params, lr=1e-4)
with torch.no_grad():                               # warm-up: one inference forward, every method
    closure()
gc.collect()
reset_ok = reset_peak()
base = rss_now_kb()
t0 = time.perf_counter()
if method == "inference":
    with torch.no_grad():
        loss = float(closure())
elif method == "zo":
    loss = opt.step(closure)
elif method == "mezo":
    loss = mezo_step(params, closure, [1234 + s for s in range(cfg["S"])], 1e-4, 1e-3)
elif method == "sgd":
    opt.zero_grad(set_to_none=True)
    out = closure()
    out.backward()
    opt.step()
    loss = float(out)
else:
    raise ValueError(method)
dt = time.perf_counter() - t0
peak = hwm_kb() if reset_ok else rss_peak_kb()
print(json.dumps({"base_kb": base, "peak_kb": peak, "reset_peak": reset_ok, "seconds": dt,
                  "dynamo_import_kb": rss_runtime - rss_torch,
                  "dynamo_loaded_after": "torch._dynamo" in sys.modules,
                  "loss": loss, "threads": torch.get_num_threads(),
                  "n_params": sum(p.numel() for p in params),
                  "largest_param": max(p.numel() for p in params),
                  "backend": __import__("zo_kernels").backends()["cpu"]["usable"]}))
'''

# (key, method, label, preload torch._dynamo, ZOOptimizer backend)
METHODS = [("inference", "inference", "(a) inference forward", True, None),
           ("zo", "zo", "(b) ZOOptimizer.step", True, None),
           ("mezo", "mezo", "(c) MeZO-style step", True, None),
           ("sgd", "sgd", "(d) SGD step (backprop)", True, None),
           ("inference0", "inference", "(a0) inference, no torch._dynamo", False, None),
           ("zo0", "zo", "(b0) ZO step backend='cpu', no torch._dynamo", False, "cpu")]
#: Which row each ratio is taken against.
BASELINE = {"inference": "inference", "zo": "inference", "mezo": "inference", "sgd": "inference",
            "inference0": "inference0", "zo0": "inference0"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="mlp50m,convnet")
    ap.add_argument("--samples", type=int, default=1, help="S for the ZO and MeZO steps")
    ap.add_argument("--runs", type=int, default=3,
                    help="fresh processes per method; the run with the median peak is reported "
                         "(peak RSS of a small model swings by ~15 MiB from process to process)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error(f"--runs must be >= 1, got {args.runs}")
    rows = []
    print(f"{'model':9s} {'method':44s} {'peak MiB':>9s} {'growth MiB':>10s} {'x (a)':>7s} {'s':>6s}")
    for model in args.models.split(","):
        res = {}
        for key, method, label, preload, backend in METHODS:
            cfg = {"model": model, "method": method, "S": args.samples, "preload_dynamo": preload,
                   "backend": backend}
            runs = [peak_rss_subprocess(CHILD.replace("CFG_JSON", repr(json.dumps(cfg))))
                    for _ in range(args.runs)]
            runs.sort(key=lambda r: r["peak_kb"])
            res[key] = dict(runs[(len(runs) - 1) // 2], all_peak_kb=[r["peak_kb"] for r in runs])
        for key, method, label, preload, backend in METHODS:
            r = res[key]
            ratio = r["peak_kb"] / res[BASELINE[key]]["peak_kb"]
            figures = {"peak_mib": r["peak_kb"] / 1024, "base_mib": r["base_kb"] / 1024,
                       "growth_mib": (r["peak_kb"] - r["base_kb"]) / 1024,
                       "ratio_to_inference": ratio, "seconds": r["seconds"],
                       "reset_peak": r["reset_peak"], "runs": len(r["all_peak_kb"]),
                       "peak_mib_all_runs": [k / 1024 for k in r["all_peak_kb"]],
                       "dynamo_import_mib": r["dynamo_import_kb"] / 1024,
                       "dynamo_loaded_after": r["dynamo_loaded_after"]}
            if method == "zo":
                figures["target"] = {"text": f"peak <= {TARGET_RATIO} x inference",
                                     "ratio": TARGET_RATIO}
                figures["meets_target"] = ratio <= TARGET_RATIO
            rows.append({"config": {"label": label, "model": model, "method": method,
                                    "num_samples": args.samples, "threads": r["threads"],
                                    "preload_dynamo": preload, "backend": backend,
                                    "baseline": BASELINE[key],
                                    "n_params": r["n_params"], "largest_param": r["largest_param"],
                                    "param_mib": r["n_params"] * 4 / 2**20,
                                    "largest_param_mib": r["largest_param"] * 4 / 2**20,
                                    "cpu_backend_built": r["backend"]},
                         "figures": figures,
                         "command": "python benchmarks/mem_optimizer.py"
                                    + (f" --models {args.models}" if args.models != "mlp50m,convnet"
                                       else "")
                                    + (f" --samples {args.samples}" if args.samples != 1 else "")
                                    + (f" --runs {args.runs}" if args.runs != 3 else "")})
            print(f"{model:9s} {label:44s} {figures['peak_mib']:9.1f} {figures['growth_mib']:10.1f} "
                  f"{ratio:7.3f} {r['seconds']:6.2f}"
                  + (f"  target <= {TARGET_RATIO}: {'pass' if ratio <= TARGET_RATIO else 'FAIL'}"
                     if method == "zo" else ""))
        n, big = res["inference"]["n_params"], res["inference"]["largest_param"]
        print(f"{model}: {n / 1e6:.1f}M params ({n * 4 / 2**20:.0f} MiB), largest "
              f"{big * 4 / 2**20:.0f} MiB; importing torch._dynamo costs "
              f"{res['inference']['dynamo_import_kb'] / 1024:.0f} MiB of RSS")
    if not args.no_write:
        print(f"wrote {write_rows(RESULTS_NAME, rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Step time of ZOOptimizer against the forward passes it needs, and against a MeZO-style step.

A ZO step with S samples runs 2S forwards of one batch; everything else (2S+1 passes over the
weights with regenerated noise, Python bookkeeping) is overhead. For each model and S in (1, 4)
the benchmark times, interleaved in every repeat so that drift on a shared machine hits all three
alike:

- ``2S forwards``: the closure (forward + loss) called 2S times under ``torch.no_grad()``;
- ``ZOOptimizer.step``: one step with the same closure (backend chosen automatically);
- ``MeZO-style step``: the same SPSA step written as MeZO does (torch RNG re-seeded per pass,
  Gaussian noise materialized per parameter, 4 passes per sample; ``mem_optimizer.mezo_step``);

and reports medians, the overhead ``step / 2S forwards - 1``, the ratio ``MeZO / step``, and the
time per weight pass ``(step - 2S forwards) / (2S + 1)`` beside one ``add_`` over all parameters
(the machine's own memory-bound limit, measured in the same run).

**Target: overhead <= 10 %** for the conv net (``convnet``: 4 conv layers, 3x32x32 inputs, batch 64,
~0.4M parameters). ``mlp50m`` (75.6M parameters, batch 32) is reported without a target: with so
few activations per weight the weight passes are a visible share of the step there.

Writes ``benchmarks/results/optimizer_step_time.json`` (``--no-write`` to skip). Usage::

    python benchmarks/bench_optimizer.py                       # ~2 min on 2 cores
    python benchmarks/bench_optimizer.py --models convnet --repeats 5 --no-write
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median_time, write_rows  # noqa: E402
from mem_optimizer import MODELS_SRC  # noqa: E402

RESULTS_NAME = "optimizer_step_time"
TARGET_OVERHEAD = 0.10
TARGET_MODELS = ("convnet",)


def _models():
    ns: dict = {}
    exec(compile(MODELS_SRC, "mem_optimizer.MODELS_SRC", "exec"), ns)
    return ns["build"], ns["mezo_step"]


def bench(model_name: str, S: int, repeats: int, warmup: int) -> dict:
    import torch
    from torch import nn

    import zo_kernels
    from zowarmup import ZOOptimizer

    build, mezo_step = _models()
    model, x, y = build(model_name)
    params = list(model.parameters())

    def closure():
        return nn.functional.cross_entropy(model(x), y)

    opt = ZOOptimizer(params, lr=1e-5, eps=1e-3, num_samples=S, seed=0)

    def forwards():
        with torch.no_grad():
            for _ in range(2 * S):
                closure()

    mezo_seeds = [[1000 * t + s for s in range(S)] for t in range(repeats + warmup)]
    fns = {"forwards": forwards, "zo_step": lambda: opt.step(closure),
           "mezo_step": lambda t: mezo_step(params, closure, mezo_seeds[t], 1e-5, 1e-3)}
    times: dict = {k: [] for k in fns}
    for t in range(warmup + repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn(t) if k == "mezo_step" else fn()
            dt = time.perf_counter() - t0
            if t >= warmup:
                times[k].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    flat = [p.detach() for p in params]

    def add_all():
        for p in flat:
            p.add_(0.0)
    add_s, _ = median_time(add_all, repeats=max(5, repeats), warmup=1)
    passes = 2 * S + 1
    per_pass = (med["zo_step"] - med["forwards"]) / passes
    overhead = med["zo_step"] / med["forwards"] - 1.0
    backend = "cpu" if zo_kernels.backends()["cpu"]["usable"] else "reference"
    return {"config": {"label": f"{model_name} S={S}", "model": model_name, "num_samples": S,
                       "batch": int(x.shape[0]), "n_params": sum(p.numel() for p in params),
                       "threads": torch.get_num_threads(), "backend": backend,
                       "repeats": repeats, "warmup": warmup},
            "figures": {"forwards_2S_s": med["forwards"], "zo_step_s": med["zo_step"],
                        "mezo_step_s": med["mezo_step"], "overhead": overhead,
                        "mezo_over_zo": med["mezo_step"] / med["zo_step"],
                        "weight_pass_s": per_pass, "add_all_s": add_s,
                        "weight_pass_over_add": per_pass / add_s if add_s > 0 else None,
                        "times": {k: v for k, v in times.items()},
                        **({"target": {"text": f"overhead <= {TARGET_OVERHEAD:.0%}",
                                       "overhead": TARGET_OVERHEAD},
                            "meets_target": overhead <= TARGET_OVERHEAD}
                           if model_name in TARGET_MODELS else {})}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="convnet,mlp50m")
    ap.add_argument("--samples", default="1,4")
    ap.add_argument("--repeats", type=int, default=15, help="timed repeats (convnet)")
    ap.add_argument("--repeats-large", type=int, default=3, help="timed repeats (mlp50m)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    print(f"{'config':16s} {'2S fwd ms':>10s} {'step ms':>9s} {'overhead':>9s} {'MeZO ms':>9s} "
          f"{'MeZO/step':>9s} {'pass ms':>8s} {'add_ ms':>8s}")
    for model in args.models.split(","):
        for S in (int(s) for s in args.samples.split(",")):
            reps = args.repeats_large if model == "mlp50m" else args.repeats
            row = bench(model, S, reps, args.warmup)
            f = row["figures"]
            row["command"] = "python benchmarks/bench_optimizer.py" + (
                " " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
            rows.append(row)
            verdict = ""
            if "meets_target" in f:
                verdict = f"  target <= {TARGET_OVERHEAD:.0%}: " + ("pass" if f["meets_target"]
                                                                    else "FAIL")
            print(f"{row['config']['label']:16s} {1e3 * f['forwards_2S_s']:10.2f} "
                  f"{1e3 * f['zo_step_s']:9.2f} {f['overhead']:9.1%} {1e3 * f['mezo_step_s']:9.2f} "
                  f"{f['mezo_over_zo']:9.2f} {1e3 * f['weight_pass_s']:8.3f} "
                  f"{1e3 * f['add_all_s']:8.3f}{verdict}", flush=True)
    if not args.no_write:
        print(f"wrote {write_rows(RESULTS_NAME, rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

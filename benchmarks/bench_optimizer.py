"""Step time of ZOOptimizer against the forward passes it needs, and against a MeZO-style step.

A ZO step with S samples runs 2S forwards of one batch; everything else (2S+1 passes over the
weights with regenerated noise, Python bookkeeping) is overhead. For each model and S in (1, 4)
the benchmark times, in every repeat:

- ``2S forwards``: the closure (forward + loss) called 2S times under ``torch.no_grad()``;
- ``ZOOptimizer.step``: one step with the same closure, once per CPU path;
- the step's ``2S+1 kernel passes`` alone (the same K per pass, no forward between them), per path;
- ``add_`` over all parameters (the machine's own memory-bound limit);
- ``MeZO-style step``: the same SPSA step written as MeZO does (torch RNG re-seeded per pass,
  Gaussian noise materialized per parameter, 4 passes per sample; ``mem_optimizer.mezo_step``);

as ``F C1 F C2 F ... Cn F``: the 2S forwards run before and after every other config, and the
configs' order rotates each repeat. **The overhead** (the verdict) is, per repeat, the step's time
over the mean of the two forwards beside it, minus 1, median over repeats: on a VM whose forwards
drift by +-20% within a run, the step and its reference are measured seconds apart, so the drift
cancels. The same paired ratio gives the passes' share (``overhead_of_passes_alone``: the floor of an
in-place step on that path), ``overhead_memory_floor`` (one ``add_`` over the weights, paired, times
``2S+1``: for weights larger than the caches no in-place step can cost less, since each of its
passes reads and writes every weight, so when this floor is above a target the target is out of
reach on that run whatever the kernel does, up to the scatter of the paired ratios; for
cache-resident weights the per-tensor ``add_`` loop pays dispatch and is no floor) and the CPU-time
overhead; ``overhead_of_medians``
(median step / median forwards - 1) is kept beside it. Also reported: the ratio ``MeZO / step`` and the
time per weight pass ``(step - 2S forwards) / (2S + 1)`` beside one ``add_``.

**Targets: overhead <= 10 %** for the conv net (``convnet``: 4 conv layers, 3x32x32 inputs, batch
64, ~0.4M parameters), and for ``mlp50m`` (75.6M parameters, batch 32: so few activations per weight
that the weight passes are a visible share of the step) **<= 40 % with S = 1 and <= 20 % with
S = 4**, on every CPU path (issue 11).

CPU paths: the ZO step is timed once per path of the C++ backend this machine runs (``avx512``,
``avx2``, ``portable``; ``--cpu-paths`` to choose), side by side in the same repeats against the same
forwards, and each row names its path and ``zo_kernels._C.cpu_isa()``. The MeZO-style step does not
depend on the path; it is timed once per config.

Writes ``benchmarks/results/optimizer_step_time.json`` (``--no-write`` to skip). Usage::

    python benchmarks/bench_optimizer.py                       # ~9 min on 2 cores, every path
    python benchmarks/bench_optimizer.py --models convnet --repeats 5 --no-write
    python benchmarks/bench_optimizer.py --cpu-paths avx2      # one path
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_rows  # noqa: E402
from mem_optimizer import MODELS_SRC  # noqa: E402

RESULTS_NAME = "optimizer_step_time"
#: overhead targets per (model, S); S not listed: the model's "*" entry.
TARGETS = {("convnet", "*"): 0.10, ("mlp50m", 1): 0.40, ("mlp50m", 4): 0.20}


def target_for(model: str, S: int):
    return TARGETS.get((model, S), TARGETS.get((model, "*")))


def _models():
    ns: dict = {}
    exec(compile(MODELS_SRC, "mem_optimizer.MODELS_SRC", "exec"), ns)
    return ns["build"], ns["mezo_step"]


def bench(model_name: str, S: int, repeats: int, warmup: int, paths: list,
          mezo: bool = True) -> list[dict]:
    """One row per CPU path in ``paths`` (``[None]``: the default backend, no path forcing)."""
    import torch
    from torch import nn

    import zo_kernels
    from zo_kernels import _backends
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

    def zo_step(path):
        if path is not None:
            _backends.set_cpu_path(path)
        opt.step(closure)

    flat = [p.detach() for p in params]
    passes = 2 * S + 1
    # The step's own kernel passes alone, with no forward between them (the K of each pass: +eps z_0,
    # -2eps z_0, then restore z_i / perturb z_i+1 pairs, then restore + update over the S seeds, the
    # restore merged into the last seed's term as functional.final_pass does): what the weight
    # passes cost at this machine's memory speed, beside add_ over the same weights.
    ks = [1, 1] + [2, 1] * (S - 1) + [S]

    def kernel_passes(path):
        old_path = _backends.set_cpu_path(path) if path is not None else None
        try:
            for j, k in enumerate(ks):
                zo_kernels.apply_seeds_(flat, [77 + j + i for i in range(k)],
                                        [(-1e-12) ** (i + 1) for i in range(k)])
        finally:
            if path is not None:
                _backends.set_cpu_path(old_path)

    def add_all():
        for p in flat:
            p.add_(0.0)

    mezo_seeds = [[1000 * t + s for s in range(S)] for t in range(repeats + warmup)]
    fns = {}
    for path in paths:
        fns[("zo_step", path)] = lambda t, path=path: zo_step(path)
        fns[("passes", path)] = lambda t, path=path: kernel_passes(path)
    fns["add_all"] = lambda t: add_all()
    if mezo:
        fns["mezo_step"] = lambda t: mezo_step(params, closure, mezo_seeds[t], 1e-5, 1e-3)
    prev = _backends.cpu_path()
    keys = list(fns)
    times: dict = {k: [] for k in ["forwards", *keys]}
    cpu: dict = {k: [] for k in ["forwards", *keys]}
    # Per timed config, the mean of the 2S forwards run just before and just after it: the step and
    # its reference are measured seconds apart, so the VM's drift (its forwards vary by +-20% within
    # a run) cancels in the ratio.
    fwd_pair: dict = {k: [] for k in keys}
    fwd_pair_cpu: dict = {k: [] for k in keys}
    load_start = os.getloadavg()[0]

    def timed(fn, t):
        c0, t0 = time.process_time(), time.perf_counter()
        fn(t)
        return time.perf_counter() - t0, time.process_time() - c0
    try:
        for t in range(warmup + repeats):
            # F C1 F C2 F ... Cn F; the configs' order rotates each repeat, so each config is timed
            # at every position of the round (first, last, after the MeZO step, ...).
            order = keys[t % len(keys):] + keys[:t % len(keys)]
            f_prev = timed(lambda t: forwards(), t)
            fw = [f_prev]
            for k in order:
                dt, dc = timed(fns[k], t)
                f_next = timed(lambda t: forwards(), t)
                fw.append(f_next)
                if t >= warmup:
                    times[k].append(dt)
                    cpu[k].append(dc)
                    fwd_pair[k].append(0.5 * (f_prev[0] + f_next[0]))
                    fwd_pair_cpu[k].append(0.5 * (f_prev[1] + f_next[1]))
                f_prev = f_next
            if t >= warmup:
                times["forwards"].extend(f[0] for f in fw)
                cpu["forwards"].extend(f[1] for f in fw)
    finally:
        if prev is not None:
            _backends.set_cpu_path(prev)
    med = {k: statistics.median(v) for k, v in times.items()}

    def paired(k, cpu_time=False):
        """Median over repeats of config k's time over its adjacent forwards' (wall or CPU time)."""
        src, ref = (cpu, fwd_pair_cpu) if cpu_time else (times, fwd_pair)
        return statistics.median(a / f for a, f in zip(src[k], ref[k]))
    add_s = med["add_all"]
    # The memory floor of any in-place step: 2S+1 read-modify-write passes over the weights, each at
    # least an add_ over them (8 bytes per float32 weight), paired with the forwards like the step.
    # A floor only for weights beyond the caches (the add_ loop is one call per tensor).
    memory_floor = passes * paired("add_all")
    pass_s = {path: med[("passes", path)] for path in paths}
    backend = "cpu" if zo_kernels.backends()["cpu"]["usable"] else "reference"
    target = target_for(model_name, S)
    rows = []
    for path in paths:
        zs = med[("zo_step", path)]
        per_pass = (zs - med["forwards"]) / passes
        # The verdict: per repeat, the step over the 2S forwards run just before and after it
        # (drift cancels), median over repeats.
        overhead = paired(("zo_step", path)) - 1.0
        # Medians of all steps over all forwards of the run (drift does not cancel).
        overhead_of_medians = zs / med["forwards"] - 1.0
        # The same paired ratio in CPU time of the process (all threads): not inflated by time
        # slices other processes take on a loaded machine.
        cpu_overhead = paired(("zo_step", path), cpu_time=True) - 1.0
        isa = None
        if path is not None:
            old = _backends.set_cpu_path(path)
            isa = _backends.cpu_extension().cpu_isa()
            _backends.set_cpu_path(old)
        label = f"{model_name} S={S}" + (f" [{path}]" if path is not None else "")
        rows.append({
            "config": {"label": label, "model": model_name, "num_samples": S,
                       "batch": int(x.shape[0]), "n_params": sum(p.numel() for p in params),
                       "threads": torch.get_num_threads(), "backend": backend,
                       "cpu_path": path, "cpu_isa": isa, "repeats": repeats, "warmup": warmup},
            "conditions": {"load_avg_1min_start": load_start,
                           "load_avg_1min_end": os.getloadavg()[0]},
            "figures": {"forwards_2S_s": med["forwards"], "zo_step_s": zs,
                        "mezo_step_s": med.get("mezo_step"), "overhead": overhead,
                        "overhead_of_medians": overhead_of_medians,
                        "overhead_cpu_time": cpu_overhead,
                        "mezo_over_zo": med["mezo_step"] / zs if "mezo_step" in med else None,
                        "weight_pass_s": per_pass, "add_all_s": add_s,
                        "weight_pass_over_add": per_pass / add_s if add_s > 0 else None,
                        "kernel_passes_s": pass_s[path], "kernel_pass_ks": ks,
                        "kernel_passes_over_add": pass_s[path] / (passes * add_s) if add_s > 0 else None,
                        "overhead_of_passes_alone": paired(("passes", path)),
                        "overhead_memory_floor": memory_floor,
                        "cpu_times": {(k[0] if isinstance(k, tuple) else k): v
                                      for k, v in cpu.items()
                                      if not isinstance(k, tuple) or k[1] == path},
                        "times": {(k[0] if isinstance(k, tuple) else k): v
                                  for k, v in times.items()
                                  if not isinstance(k, tuple) or k[1] == path},
                        "forwards_beside_step": fwd_pair[("zo_step", path)],
                        **({"target": {"text": f"overhead <= {target:.0%}", "overhead": target},
                            "meets_target": overhead <= target}
                           if target is not None else {})}})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="convnet,mlp50m")
    ap.add_argument("--samples", default="1,4")
    ap.add_argument("--repeats", type=int, default=15, help="timed repeats (convnet)")
    ap.add_argument("--repeats-large", type=int, default=11, help="timed repeats (mlp50m)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--cpu-paths", default="all",
                    help="comma-separated CPU paths to time the ZO step on (default: every path "
                         "this machine runs; 'default' = no forcing)")
    ap.add_argument("--no-mezo", action="store_true", help="skip the (slow) MeZO-style step")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    from zo_kernels import _backends
    if args.cpu_paths == "default" or not _backends.cpu_paths():
        paths = [None]
    elif args.cpu_paths == "all":
        paths = _backends.cpu_paths()
    else:
        paths = [p.strip() for p in args.cpu_paths.split(",") if p.strip()]
        bad = [p for p in paths if p not in _backends.cpu_paths()]
        if bad:
            ap.error(f"--cpu-paths: {bad} not run by this CPU (it runs {_backends.cpu_paths()})")
    rows = []
    print(f"{'config':26s} {'2S fwd ms':>10s} {'step ms':>9s} {'overhead':>9s} {'cpu-time':>9s} "
          f"{'MeZO ms':>9s} {'MeZO/step':>9s} {'pass ms':>8s} {'add_ ms':>8s} {'passes':>7s} "
          f"{'floor':>6s}")
    for model in args.models.split(","):
        for S in (int(s) for s in args.samples.split(",")):
            reps = args.repeats_large if model == "mlp50m" else args.repeats
            for row in bench(model, S, reps, args.warmup, paths, mezo=not args.no_mezo):
                f = row["figures"]
                row["command"] = "python benchmarks/bench_optimizer.py" + (
                    " " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
                rows.append(row)
                verdict = ""
                if "meets_target" in f:
                    verdict = f"  {f['target']['text']}: " + ("pass" if f["meets_target"] else "FAIL")
                mz = f["mezo_step_s"]
                print(f"{row['config']['label']:26s} {1e3 * f['forwards_2S_s']:10.2f} "
                      f"{1e3 * f['zo_step_s']:9.2f} {f['overhead']:9.1%} "
                      f"{f['overhead_cpu_time']:9.1%} "
                      f"{1e3 * mz if mz else float('nan'):9.2f} "
                      f"{f['mezo_over_zo'] or float('nan'):9.2f} "
                      f"{1e3 * f['weight_pass_s']:8.3f} {1e3 * f['add_all_s']:8.3f} "
                      f"{f['overhead_of_passes_alone']:7.1%} {f['overhead_memory_floor']:6.1%}"
                      f"{verdict}",
                      flush=True)
    if not args.no_write:
        print(f"wrote {write_rows(RESULTS_NAME, rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

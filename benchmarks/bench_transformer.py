"""ZO steps on an OPT-125m-shaped transformer: memory against inference, step time, bf16 drift.

The model is ``transformers.OPTForCausalLM`` built from a config with OPT-125m's shape (vocabulary
50,272, 12 layers, hidden 768, FFN 3072, 12 heads; 125,239,296 weights, the output head tied to
the token embedding), random init, in ``eval()`` mode (no dropout), float32 or bfloat16; the batch
is 8 x 128 random tokens with ``labels=input_ids`` (the loss is part of every forward). Nothing is
downloaded.

Three parts (``--parts``):

- ``memory``: peak memory of one step of each method against one inference forward. On the CPU
  each method runs in a fresh process (peak RSS, ``VmHWM``, reset after a warm-up forward); on a
  GPU (``--device cuda``) in one process, ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats``. Methods: ``inference`` (forward + loss under ``no_grad``), ``zo``
  (``ZOOptimizer.step``, S = 1, in place), ``zo_exact`` (``ZOOptimizer(exact=True).step``: perturbed
  weights made chunk by chunk inside the forward), ``mezo`` (the MeZO-style step: per-parameter
  ``torch.normal`` noise, ``mem_optimizer.mezo_step``), ``adamw`` (forward, ``backward``,
  ``torch.optim.AdamW.step``). **Target: ZO / inference <= 1.02** (in place and exact). The
  children run with glibc's mmap threshold at 128 KiB, so RSS follows the live tensors.
- ``time``: medians over interleaved repeats of the 2S plain forwards, the ZO step (in place and
  exact) and the MeZO-style step. **Target: overhead = step / 2S forwards - 1 <= 10 %.**
- ``drift``: bfloat16 weights, 100 calls of ``ZOOptimizer.estimate`` (no update) in place and in
  exact mode; max |w - w0| over all weights and the share of weights that moved. **Exact must be
  0.** The drift is a property of the weight passes, not of the loss, so this part uses a batch of
  1 x 8 tokens (``--drift-batch``) to keep 200 forwards affordable on a CPU.

Writes ``benchmarks/results/transformer_memory.json``, ``transformer_step_time.json`` and
``transformer_drift.json`` (CPU runs; a GPU run writes ``*_gpu.json``; ``--no-write`` to skip).
Usage::

    python benchmarks/bench_transformer.py                              # CPU, all parts
    python benchmarks/bench_transformer.py --parts drift --dtypes bfloat16
    python benchmarks/bench_transformer.py --device cuda                # a lent GPU
    python benchmarks/bench_transformer.py --tiny --no-write            # smoke test, seconds
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RSS_SNIPPET, peak_rss_subprocess, write_rows  # noqa: E402
from mem_optimizer import MODELS_SRC  # noqa: E402  (mezo_step: the MeZO-style reference step)

TARGET_MEMORY = 1.02
# glibc returns every block above 128 KiB to the system when freed, so RSS follows the live tensors
# (as in mem_exact.py)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
TARGET_OVERHEAD = 0.10

#: Model builder, executed in the children and in this process.
OPT_SRC = r'''
import torch

OPT125M = dict(vocab_size=50272, hidden_size=768, ffn_dim=3072, num_hidden_layers=12,
               num_attention_heads=12, max_position_embeddings=2048, word_embed_proj_dim=768,
               dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0)
TINY = dict(OPT125M, vocab_size=512, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
            num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=128)

def build_opt(dtype_name, device, batch, seq, tiny=False, seed=0):
    """(model, input_ids): an OPT-125m-shaped OPTForCausalLM, random init, eval mode."""
    from transformers import OPTConfig, OPTForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = OPTConfig(**(TINY if tiny else OPT125M))
    cfg.use_cache = False
    model = OPTForCausalLM(cfg).to(device=device, dtype=getattr(torch, dtype_name)).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    return model, ids.to(device)

def lm_closure(model, ids):
    return lambda: model(input_ids=ids, labels=ids).loss
'''

CHILD = RSS_SNIPPET + MODELS_SRC + OPT_SRC + r'''
import gc, json, sys, time
cfg = json.loads(CFG_JSON)
torch.set_grad_enabled(True)
from zowarmup import ZOOptimizer
model, ids = build_opt(cfg["dtype"], "cpu", cfg["batch"], cfg["seq"], cfg["tiny"])
closure = lm_closure(model, ids)
params = list(model.parameters())
method = cfg["method"]
if method in ("zo", "zo_exact"):
    opt = ZOOptimizer(params, lr=1e-6, eps=1e-3, num_samples=1, seed=0,
                      **({"exact": True} if method == "zo_exact" else {}))
elif method == "adamw":
    opt = torch.optim.AdamW(params, lr=1e-5)
    import torch._dynamo  # torch.optim imports it lazily at the first step: load it before the baseline
with torch.no_grad():                               # warm-up: one inference forward, every method
    closure()
gc.collect()
from zowarmup.memory import measure_peak
def run():
    global loss
    if method == "inference":
        with torch.no_grad():
            loss = float(closure())
    elif method in ("zo", "zo_exact"):
        loss = opt.step(closure)
    elif method == "mezo":
        loss = mezo_step(params, closure, [1234], 1e-6, 1e-3)
    elif method == "adamw":
        opt.zero_grad(set_to_none=True)
        out = closure()
        out.backward()
        opt.step()
        loss = float(out)
reset_ok = reset_peak()
base = rss_now_kb()
t0 = time.perf_counter()
if method in ("inference", "zo", "zo_exact"):
    tensor_peak = measure_peak(run)   # bytes of tensors live at once, created during run()
else:                                 # (the tracker's per-op bookkeeping is slow: targets only)
    run()
    tensor_peak = None
dt = time.perf_counter() - t0
peak = hwm_kb() if reset_ok else rss_peak_kb()
weights = sum(p.numel() * p.element_size() for p in params)
print(json.dumps({"base_kb": base, "peak_kb": peak, "reset_peak": reset_ok, "seconds": dt,
                  "tensor_peak_b": None if tensor_peak is None else weights + tensor_peak,
                  "weights_b": weights,
                  "loss": loss, "threads": torch.get_num_threads(),
                  "n_params": sum(p.numel() for p in params)}))
'''

METHODS = [("inference", "(a) inference forward"), ("zo", "(b) ZOOptimizer.step, in place"),
           ("zo_exact", "(b') ZOOptimizer.step, exact"), ("mezo", "(c) MeZO-style step"),
           ("adamw", "(d) backprop + AdamW step")]


def _ns() -> dict:
    ns: dict = {}
    exec(compile(MODELS_SRC + OPT_SRC, "bench_transformer", "exec"), ns)
    return ns


def _cpu_isa():
    import zo_kernels
    ext = zo_kernels._backends.cpu_extension()
    return ext.cpu_isa() if ext is not None and hasattr(ext, "cpu_isa") else None


# -- memory ---------------------------------------------------------------------------------------
def _methods(args):
    return [m for m in METHODS if args.methods is None or m[0] in args.methods.split(",")]


def _earlier(name: str) -> dict:
    """(dtype, method) -> row of the results file already written (for --methods subsets)."""
    from _common import read_rows
    return {(r["config"]["dtype"], r["config"]["method"]): r for r in read_rows(name)}


def memory_cpu(dtype: str, args) -> list[dict]:
    res = {}
    for method, label in _methods(args):
        cfg = {"dtype": dtype, "method": method, "batch": args.batch, "seq": args.seq,
               "tiny": args.tiny}
        res[method] = peak_rss_subprocess(CHILD.replace("CFG_JSON", repr(json.dumps(cfg))),
                                          env=MALLOC_ENV, timeout=3600)
        r = res[method]
        tp = r.get("tensor_peak_b")
        print(f"  {dtype:8s} {label:34s} peak {r['peak_kb'] / 1024:8.1f} MiB, tensors "
              f"{tp / 2**20 if tp else float('nan'):8.1f} MiB ({r['seconds']:.1f} s)", flush=True)
    if "inference" not in res:  # a --methods subset: the inference peak of the earlier run
        old = _earlier("transformer_memory")[(dtype, "inference")]
        res["inference"] = {"peak_kb": old["figures"]["peak_mib"] * 1024, "seconds": None,
                            "n_params": old["config"]["n_params"]}
        if "tensor_peak_mib" in old["figures"]:
            res["inference"]["tensor_peak_b"] = old["figures"]["tensor_peak_mib"] * 2**20
    return _memory_rows(res, dtype, args, "peak RSS (fresh process per method)", "peak_kb", 1024)


def memory_cuda(dtype: str, args) -> list[dict]:
    import torch
    from zowarmup import ZOOptimizer
    ns = _ns()
    res = {}
    for method, label in METHODS:
        model, ids = ns["build_opt"](dtype, "cuda", args.batch, args.seq, args.tiny)
        closure = ns["lm_closure"](model, ids)
        params = list(model.parameters())
        opt = None
        if method in ("zo", "zo_exact"):
            opt = ZOOptimizer(params, lr=1e-6, eps=1e-3, num_samples=1, seed=0,
                              **({"exact": True} if method == "zo_exact" else {}))
        elif method == "adamw":
            opt = torch.optim.AdamW(params, lr=1e-5)
        with torch.no_grad():
            closure()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        if method == "inference":
            with torch.no_grad():
                float(closure())
        elif method in ("zo", "zo_exact"):
            opt.step(closure)
        elif method == "mezo":
            ns["mezo_step"](params, closure, [1234], 1e-6, 1e-3)
        else:
            opt.zero_grad(set_to_none=True)
            out = closure()
            out.backward()
            opt.step()
        torch.cuda.synchronize()
        res[method] = {"peak_b": torch.cuda.max_memory_allocated(), "base_b": base,
                       "seconds": time.perf_counter() - t0,
                       "n_params": sum(p.numel() for p in params)}
        del model, ids, closure, params, opt
        torch.cuda.empty_cache()
        r = res[method]
        print(f"  {dtype:8s} {label:34s} peak {r['peak_b'] / 2**20:8.1f} MiB  "
              f"x inference {r['peak_b'] / res['inference']['peak_b']:.3f}", flush=True)
    return _memory_rows(res, dtype, args, "torch.cuda.max_memory_allocated", "peak_b", 2**20)


def _memory_rows(res, dtype, args, measure, key, unit) -> list[dict]:
    rows = []
    for method, label in METHODS:
        if method not in res:
            continue
        r = res[method]
        ratio = r[key] / res["inference"][key]
        fig = {"peak_mib": r[key] / unit, "ratio_to_inference": ratio, "seconds": r["seconds"]}
        if r.get("tensor_peak_b") and res["inference"].get("tensor_peak_b"):
            # the tensors alone (weights + every op output live at once): no allocator noise
            fig["tensor_peak_mib"] = r["tensor_peak_b"] / 2**20
            fig["tensor_ratio_to_inference"] = r["tensor_peak_b"] / res["inference"]["tensor_peak_b"]
        if method in ("zo", "zo_exact"):
            # judged on the tensors (CPU) or max_memory_allocated (GPU): the RSS of a fresh
            # process also holds runtime pages loaded lazily, which differ from process to process
            judged = fig.get("tensor_ratio_to_inference", ratio)
            fig["target"] = {"text": f"tensors <= {TARGET_MEMORY} x inference"
                             if "tensor_ratio_to_inference" in fig else
                             f"peak <= {TARGET_MEMORY} x inference", "ratio": TARGET_MEMORY}
            fig["meets_target"] = judged <= TARGET_MEMORY
        rows.append({"config": {"label": label, "method": method, "dtype": dtype,
                                "model": "tiny OPT" if args.tiny else "OPT-125m shape",
                                "n_params": r["n_params"], "batch": f"{args.batch}x{args.seq}",
                                "device": args.device, "measure": measure},
                     "figures": fig})
    return rows


# -- time -----------------------------------------------------------------------------------------
def step_time(dtype: str, args) -> list[dict]:
    import torch
    from zowarmup import ZOOptimizer
    ns = _ns()
    model, ids = ns["build_opt"](dtype, args.device, args.batch, args.seq, args.tiny)
    closure = ns["lm_closure"](model, ids)
    params = list(model.parameters())
    S = args.samples
    zo = ZOOptimizer(params, lr=0.0, eps=1e-3, num_samples=S, seed=0)
    zx = ZOOptimizer(params, lr=0.0, eps=1e-3, num_samples=S, seed=0, exact=True)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def forwards():
        with torch.no_grad():
            for _ in range(2 * S):
                float(closure())

    ops = {"forwards": forwards, "zo_step": lambda: zo.step(closure),
           "zo_exact_step": lambda: zx.step(closure),
           "mezo_step": lambda: ns["mezo_step"](params, closure, list(range(1234, 1234 + S)),
                                                0.0, 1e-3)}
    times = {k: [] for k in ops}
    for r in range(args.warmup + args.repeats):
        for k, fn in ops.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if r >= args.warmup:
                times[k].append(time.perf_counter() - t0)
        print(f"  {dtype} round {r}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()
                                                  if v), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for k, label in (("zo_step", "ZOOptimizer.step, in place"),
                     ("zo_exact_step", "ZOOptimizer.step, exact")):
        over = med[k] / med["forwards"] - 1.0
        rows.append({"config": {"label": label, "dtype": dtype, "num_samples": S,
                                "model": "tiny OPT" if args.tiny else "OPT-125m shape",
                                "batch": f"{args.batch}x{args.seq}", "device": args.device,
                                "repeats": args.repeats, "threads": torch.get_num_threads()},
                     "figures": {"forwards_2S_s": med["forwards"], "step_s": med[k],
                                 "overhead": over, "mezo_step_s": med["mezo_step"],
                                 "mezo_overhead": med["mezo_step"] / med["forwards"] - 1.0,
                                 "all_s": {kk: v for kk, v in times.items()},
                                 "target": {"text": f"overhead <= {TARGET_OVERHEAD:.0%}",
                                            "overhead": TARGET_OVERHEAD},
                                 "meets_target": over <= TARGET_OVERHEAD}})
    return rows


# -- drift ----------------------------------------------------------------------------------------
def judge_time(rows: list[dict]) -> list[dict]:
    """Per-round overheads from the interleaved rounds; the target is judged only when the rounds
    agree within the target itself (else the machine's load, not the step, decides the figure)."""
    for r in rows:
        f = r["figures"]
        key = "zo_exact_step" if "exact" in r["config"]["label"] else "zo_step"
        per = [s / fw - 1.0 for s, fw in zip(f["all_s"][key], f["all_s"]["forwards"])]
        f["overhead_per_round"] = per
        if len(per) > 1 and max(per) - min(per) > TARGET_OVERHEAD:
            f["meets_target"] = None
            f["target"]["text"] = (f"overhead <= {TARGET_OVERHEAD:.0%} (not judged: the rounds' "
                                   f"overheads range {min(per):+.0%} to {max(per):+.0%})")
    return rows


def drift(args) -> list[dict]:
    import torch
    from zowarmup import ZOOptimizer
    ns = _ns()
    rows = []
    for exact in (False, True):
        model, ids = ns["build_opt"]("bfloat16", args.device, 1, args.drift_tokens, args.tiny)
        closure = ns["lm_closure"](model, ids)
        params = list(model.parameters())
        w0 = [p.detach().clone() for p in params]
        opt = ZOOptimizer(params, lr=0.0, eps=1e-3, num_samples=1, seed=0,
                          **({"exact": True} if exact else {}))
        t0 = time.perf_counter()
        for t in range(args.drift_calls):
            opt.estimate(closure, seeds=opt.sample_seeds(t))
        dt = time.perf_counter() - t0
        with torch.no_grad():
            mx = max(float((p.float() - q.float()).abs().max()) for p, q in zip(params, w0))
            moved = sum(int((p != q).sum()) for p, q in zip(params, w0))
        n = sum(p.numel() for p in params)
        label = "exact" if exact else "in place"
        print(f"  drift {label:8s}: max |w - w0| = {mx:.3g}, {moved / n:.2%} of weights moved "
              f"({dt:.0f} s)", flush=True)
        fig = {"max_abs_drift": mx, "moved_fraction": moved / n, "moved": moved, "seconds": dt}
        if exact:
            fig["target"] = {"text": "max abs(w - w0) == 0", "max": 0.0}
            fig["meets_target"] = mx == 0.0
        rows.append({"config": {"label": f"ZOOptimizer.estimate, {label}", "dtype": "bfloat16",
                                "calls": args.drift_calls, "eps": 1e-3, "scale": 0.75,
                                "batch": f"1x{args.drift_tokens}", "device": args.device,
                                "model": "tiny OPT" if args.tiny else "OPT-125m shape",
                                "n_params": n},
                     "figures": fig})
        del model, params, w0, opt
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="memory,time,drift")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--time-dtypes", default=None, help="dtypes of the time part (default --dtypes)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--samples", type=int, default=1, help="S of the timed steps")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--drift-calls", type=int, default=100)
    ap.add_argument("--drift-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--methods", default=None,
                    help="memory part: a subset of " + ",".join(m for m, _ in METHODS)
                         + " (rows of the other methods are kept from the results file)")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer toy config: smoke test")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_transformer: --device cuda but no GPU is visible; nothing measured")
        return 0
    parts = args.parts.split(",")
    dtypes = args.dtypes.split(",")
    suffix = "_gpu" if args.device == "cuda" else ""
    command = "python benchmarks/bench_transformer.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    print(f"cpu_isa: {_cpu_isa()}, threads: {torch.get_num_threads()}", flush=True)
    out = {}
    if "memory" in parts:
        fn = memory_cuda if args.device == "cuda" else memory_cpu
        out["transformer_memory"] = [r for d in dtypes for r in fn(d, args)]
    if "time" in parts:
        tds = (args.time_dtypes or args.dtypes).split(",")
        out["transformer_step_time"] = judge_time([r for d in tds for r in step_time(d, args)])
    if "drift" in parts:
        out["transformer_drift"] = drift(args)
    if not args.no_write and not args.tiny:
        for name, rows in out.items():
            for r in rows:
                r["command"] = command
                r["config"]["cpu_isa"] = _cpu_isa()
            if name == "transformer_memory" and args.methods is not None:
                keep = _earlier(name + suffix)
                new = {(r["config"]["dtype"], r["config"]["method"]) for r in rows}
                order = [m for m, _ in METHODS]
                rows = sorted([r for k, r in keep.items() if k not in new] + rows,
                              key=lambda r: (r["config"]["dtype"],
                                             order.index(r["config"]["method"])))
                rows = [{k: v for k, v in r.items() if k not in ("benchmark", "date", "machine")}
                        for r in rows]
            print("wrote", write_rows(name + suffix, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

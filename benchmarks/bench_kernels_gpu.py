"""GPU cost of ``apply_seeds_`` (Triton and CUDA backends) beside the device's own ``copy_``.

Two tensor lists with the same number of elements: ``flat`` (one tensor) and ``opt125m`` (the 196
parameter tensors of OPT-125m, 125.2M elements: what a ZO step on a transformer passes). Per list,
dtype and backend, four ops: ``perturb_`` (K = 1), ``apply_seeds_`` K = 2 (the optimizer's
restore + perturb pass), K = 64, and the ``copy_`` baseline (one flat tensor of the same bytes).

Figures per row:

- ``kernel_us``: device time alone, from a CUDA graph of the call (device seeds/coeffs) replayed
  ``--inner`` times between two CUDA events (no host work in the interval);
- ``call_us``: end-to-end time of an eager call as a user makes it (Python ints/floats for seeds and
  coefficients), CUDA events around ``--inner`` back-to-back calls (host work that the GPU waits
  for is included; an idle GPU shows host-bound calls);
- ``host_us``: host time until the call returns (perf_counter, no synchronization);
- ``gbps`` (one read + one write per element, from ``kernel_us``) and ``x_copy`` (kernel time /
  ``copy_`` time, median of per-round ratios).

Targets (issue 15): perturb_ >= 0.9 of ``copy_`` bandwidth (float32, bfloat16); K = 64 <= 3x
``copy_``; host time per call <= 50 us for the 196-tensor list.

Without a CUDA GPU (or with ``--dry-run``) the script still runs end to end: every GPU row is
written with ``"measured": false`` and the reason, and the one thing a CPU can measure is added:
the host-side cost of a call on this CPU with the kernel launch replaced by a no-op (rows with
``device: "cpu (launch stubbed)"``: validation, plan lookup, tables, staging; not a GPU number).
Writes ``benchmarks/results/kernels_gpu.json`` (``--no-write`` to skip).

    python benchmarks/bench_kernels_gpu.py                    # a GPU: both lists, fp32 + bf16
    python benchmarks/bench_kernels_gpu.py --dry-run          # anywhere: rows "not measured"
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

RESULTS_NAME = "kernels_gpu"
PERTURB_MIN_BW_FRACTION = 0.9
APPLY64_MAX_RATIO = 3.0
HOST_MAX_US = 50.0
DTYPES = ("float32", "bfloat16")
SEED_BASE = 0x9E3779B97F4A7C15
#: (op label, K)
OPS = (("perturb_", 1), ("apply_seeds_ K=2", 2), ("apply_seeds_ K=64", 64))


def opt125m_shapes() -> list[tuple]:
    """Parameter shapes of OPT-125m in ``model.parameters()`` order (196 tensors, 125,239,296
    elements): token and position embeddings, 12 decoder layers (q/k/v/out projections with
    biases, two LayerNorms, fc1/fc2 with biases), the final LayerNorm; the LM head is tied."""
    d, ffn, vocab, pos, layers = 768, 3072, 50272, 2050, 12
    shapes = [(vocab, d), (pos, d)]
    for _ in range(layers):
        for _proj in "kvqo":
            shapes += [(d, d), (d,)]
        shapes += [(d,), (d,)]                       # self_attn_layer_norm
        shapes += [(ffn, d), (ffn,), (d, ffn), (d,)]  # fc1, fc2
        shapes += [(d,), (d,)]                       # final_layer_norm of the layer
    shapes += [(d,), (d,)]                           # decoder.final_layer_norm
    return shapes


def seeds_and_coeffs(k: int) -> tuple[list[int], list[float]]:
    """K distinct 64-bit seeds and K alternating-sign coefficients (as bench_kernels_cpu)."""
    seeds = [(SEED_BASE * (j + 1)) % (1 << 64) for j in range(k)]
    coeffs = [(1e-3 if j % 2 == 0 else -1e-3) * (1 + j / 64) for j in range(k)]
    return seeds, coeffs


def make_list(kind: str, dtype, device, empty: bool = False):
    import torch
    shapes = opt125m_shapes()
    n = sum(int(torch.Size(s).numel()) for s in shapes)
    make = torch.empty if empty else torch.zeros
    if kind == "flat":
        return [make(n, dtype=dtype, device=device)]
    return [make(s, dtype=dtype, device=device) for s in shapes]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", default="triton,cuda", help="comma-separated (default triton,cuda)")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated of float32,bfloat16,"
                    "float16 (default float32,bfloat16)")
    ap.add_argument("--lists", default="flat,opt125m", help="comma-separated of flat,opt125m")
    ap.add_argument("--repeats", type=int, default=30, help="timed rounds (default 30)")
    ap.add_argument("--inner", type=int, default=20, help="calls or replays per sample (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds (default 3; the first "
                    "compiles the Triton kernels and builds the plans)")
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU timing even if a GPU is present: rows 'not measured' plus the "
                         "host cost on this CPU with stubbed launches")
    ap.add_argument("--host-repeats", type=int, default=200,
                    help="calls timed for the stubbed host cost (default 200)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not write results")
    args = ap.parse_args(argv)
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    args.backends, args.dtypes, args.lists = split(args.backends), split(args.dtypes), split(args.lists)
    for name, vals, allowed in (("--backends", args.backends, ("triton", "cuda")),
                                ("--dtypes", args.dtypes, ("float32", "bfloat16", "float16")),
                                ("--lists", args.lists, ("flat", "opt125m"))):
        bad = [v for v in vals if v not in allowed]
        if bad or not vals:
            ap.error(f"{name}: unknown {bad}; choose from {', '.join(allowed)}")
    if args.repeats < 1 or args.inner < 1 or args.warmup < 0 or args.host_repeats < 1:
        ap.error("--repeats, --inner and --host-repeats must be >= 1 and --warmup >= 0")
    return args


# --------------------------------------------------------------------------------------------
# GPU measurement
# --------------------------------------------------------------------------------------------
def _events_time(fn, inner: int) -> float:
    """Seconds per call: CUDA events around ``inner`` calls of ``fn`` on an idle device."""
    import torch
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(inner):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / inner


def _verify(backend: str, dtype) -> str:
    """"" when ``backend`` on the GPU equals the CPU reference bit for bit on small odd and aligned
    sizes (K = 1, 7, 64), else what differs."""
    import torch
    import zo_kernels
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(n, generator=g).to(dtype) for n in (4097, 129, 1000, 4096, 8208)]
    for k in (1, 7, 64):
        seeds, coeffs = seeds_and_coeffs(k)
        a = [t.cuda() for t in base]
        b = [t.clone() for t in base]
        zo_kernels.apply_seeds_(a, seeds, coeffs, 0.999, backend=backend)
        zo_kernels.apply_seeds_(b, seeds, coeffs, 0.999, backend="reference")
        for i, (u, v) in enumerate(zip(a, b)):
            if not torch.equal(u.cpu(), v):
                return f"K={k}: tensor {i} differs from the reference"
    return ""


def measure_gpu(args, backend: str, dtype_name: str, kind: str, command: str) -> list[dict]:
    import torch
    import zo_kernels
    dtype = getattr(torch, dtype_name)
    ts = make_list(kind, dtype, "cuda")
    n = sum(t.numel() for t in ts)
    nbytes = 2 * n * ts[0].element_size()
    x, y = torch.zeros(n, dtype=dtype, device="cuda"), torch.empty(n, dtype=dtype, device="cuda")
    graphs, eager = {}, {}
    for label, k in OPS:
        seeds, coeffs = seeds_and_coeffs(k)
        s_dev = torch.tensor([s - (1 << 64) if s >= 1 << 63 else s for s in seeds], device="cuda")
        c_dev = torch.tensor(coeffs, device="cuda")
        zo_kernels.apply_seeds_(ts, s_dev, c_dev, backend=backend)        # compile, plan
        zo_kernels.apply_seeds_(ts, seeds, coeffs, backend=backend)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            zo_kernels.apply_seeds_(ts, s_dev, c_dev, backend=backend)
        graphs[label] = g
        eager[label] = (lambda seeds=seeds, coeffs=coeffs:
                        zo_kernels.apply_seeds_(ts, seeds, coeffs, backend=backend))
    gc = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gc):
        y.copy_(x)
    kern = {lab: [] for lab, _ in OPS}
    call = {lab: [] for lab, _ in OPS}
    host = {lab: [] for lab, _ in OPS}
    copy_t, ratios = [], {lab: [] for lab, _ in OPS}
    for rnd in range(args.warmup + args.repeats):
        c = _events_time(gc.replay, args.inner)
        row_k = {}
        for label, _k in OPS:
            row_k[label] = _events_time(graphs[label].replay, args.inner)
            call_s = _events_time(eager[label], args.inner)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            eager[label]()
            h = time.perf_counter() - t0
            if rnd >= args.warmup:
                kern[label].append(row_k[label])
                call[label].append(call_s)
                host[label].append(h)
                ratios[label].append(row_k[label] / c)
        if rnd >= args.warmup:
            copy_t.append(c)
    torch.cuda.synchronize()
    dev_name = torch.cuda.get_device_name()
    rows = []
    cmed = statistics.median(copy_t)
    rows.append(_row("copy_", 0, "torch", dtype_name, kind, n, dev_name, command, {
        "measured": True, "kernel_us": cmed * 1e6, "gbps": nbytes / cmed / 1e9, "x_copy": 1.0}))
    for label, k in OPS:
        km, cm, hm = (statistics.median(kern[label]), statistics.median(call[label]),
                      statistics.median(host[label]))
        ratio = statistics.median(ratios[label])
        fig = {"measured": True, "kernel_us": km * 1e6, "call_us": cm * 1e6, "host_us": hm * 1e6,
               "gbps": nbytes / km / 1e9, "x_copy": ratio, "bw_fraction_of_copy": 1.0 / ratio,
               "ns_per_elem_per_seed": km / (n * k) * 1e9}
        fig["targets"] = _targets(label, dtype_name, kind, fig)
        if fig["targets"]:  # the make_tables convention: one text, one verdict
            fig["target"] = {"text": "; ".join(t["text"] for t in fig["targets"])}
            fig["meets_target"] = all(t["pass"] for t in fig["targets"])
        rows.append(_row(label, k, backend, dtype_name, kind, n, dev_name, command, fig))
    del ts, x, y
    torch.cuda.empty_cache()
    return rows


def _targets(label: str, dtype_name: str, kind: str, fig: dict) -> list[dict]:
    out = []
    if label == "perturb_" and dtype_name in ("float32", "bfloat16"):
        out.append({"text": f"GB/s >= {PERTURB_MIN_BW_FRACTION} x copy_",
                    "pass": fig["bw_fraction_of_copy"] >= PERTURB_MIN_BW_FRACTION})
    if label == "apply_seeds_ K=64":
        out.append({"text": f"time <= {APPLY64_MAX_RATIO:g} x copy_",
                    "pass": fig["x_copy"] <= APPLY64_MAX_RATIO})
    if kind == "opt125m":
        out.append({"text": f"host time per call <= {HOST_MAX_US:g} us",
                    "pass": fig["host_us"] <= HOST_MAX_US})
    return out


def _row(op, k, backend, dtype_name, kind, n, device, command, figures) -> dict:
    return {"config": {"op": op, "K": k, "backend": backend, "dtype": dtype_name, "list": kind,
                       "tensors": 1 if kind == "flat" else len(opt125m_shapes()), "n": n,
                       "device": device},
            "figures": figures, "command": command}


# --------------------------------------------------------------------------------------------
# without a GPU: rows "not measured", and the host cost with stubbed launches
# --------------------------------------------------------------------------------------------
def not_measured_rows(args, why: str, command: str) -> list[dict]:
    n = None
    rows = []
    for dtype_name in args.dtypes:
        for kind in args.lists:
            rows.append(_row("copy_", 0, "torch", dtype_name, kind, n, "cuda", command,
                             {"measured": False, "status": f"not measured: {why}"}))
            for backend in args.backends:
                for label, k in OPS:
                    rows.append(_row(label, k, backend, dtype_name, kind, n, "cuda", command,
                                     {"measured": False, "status": f"not measured: {why}"}))
    return rows


class _NoLaunch:
    """A Triton kernel or CUDA extension stand-in whose launches do nothing."""

    def __getitem__(self, grid):
        return lambda *a, **k: None

    def apply_seeds_mt(self, *a, **k):
        return None


def host_cost_rows(args, command: str) -> list[dict]:
    """Host time per call on this CPU with the launch stubbed: the public call with the Triton
    backend (validation + plan lookup + tables + staging + argument preparation) and the CUDA
    backend's host path in ``_gpu`` alone. Tensors are allocated with ``torch.empty`` (never
    touched), so the OPT-125m list costs no memory traffic."""
    import torch
    import zo_kernels
    from zo_kernels import _gpu
    from zo_kernels import triton_kernels as tk
    real = (tk.apply_seeds_kernel, tk.tables_kernel)
    tk.apply_seeds_kernel = tk.tables_kernel = _NoLaunch()
    rows = []
    try:
        for kind in args.lists:
            ts = make_list(kind, torch.float32, "cpu", empty=True)
            n = sum(t.numel() for t in ts)
            bases = zo_kernels.offsets(ts)
            for label, k in OPS:
                seeds, coeffs = seeds_and_coeffs(k)
                s_t = torch.tensor([s - (1 << 64) if s >= 1 << 63 else s for s in seeds])
                c_t = torch.tensor(coeffs, dtype=torch.float32)
                calls = {
                    "triton": lambda: zo_kernels.apply_seeds_(ts, seeds, coeffs, backend="triton"),
                    "cuda (_gpu host path only)": lambda: _gpu.run_cuda(
                        _NoLaunch(), ts, s_t, c_t, bases, 1.0, "rademacher"),
                }
                for be, fn in calls.items():
                    for _ in range(5):
                        fn()
                    times = []
                    for _ in range(args.host_repeats):
                        t0 = time.perf_counter()
                        fn()
                        times.append(time.perf_counter() - t0)
                    med = statistics.median(times)
                    rows.append(_row(label, k, be, "float32", kind, n, "cpu (launch stubbed)",
                                     command, {"measured": True, "host_us": med * 1e6,
                                               "note": "host-side cost on this CPU with the "
                                                       "kernel launch replaced by a no-op; "
                                                       "not a GPU measurement"}))
    finally:
        tk.apply_seeds_kernel, tk.tables_kernel = real
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    command = "python benchmarks/bench_kernels_gpu.py " + " ".join(sys.argv[1:] if argv is None
                                                                   else argv)
    gpu = torch.cuda.is_available() and not args.dry_run
    if gpu and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("bench_kernels_gpu: TRITON_INTERPRET is set, so Triton would run in the CPU "
              "interpreter; unset it for GPU timings.", file=sys.stderr)
        return 2
    rows = []
    if gpu:
        import zo_kernels
        report = zo_kernels.backends()
        for be in args.backends:
            if not (report[be]["usable"] and "cuda" in report[be]["devices"]):
                why = report[be]["why"] or "not usable on CUDA tensors"
                print(f"skipping backend {be!r}: {why}")
                rows.append({"config": {"op": "-", "backend": be}, "figures": {"measured": False,
                                                                              "status": why}})
                continue
            for d in args.dtypes:
                bad = _verify(be, getattr(torch, d))
                if bad:
                    print(f"WARNING: {be} {d}: {bad}; its rows are marked unverified",
                          file=sys.stderr)
                for kind in args.lists:
                    new = measure_gpu(args, be, d, kind, command)
                    for r in new:
                        r["verified_against_reference"] = not bad if r["config"]["backend"] != \
                            "torch" else None
                    rows += new
    else:
        why = "--dry-run" if args.dry_run else (
            "torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU here")
        print(f"bench_kernels_gpu: {why}: GPU rows are written as not measured; measuring the "
              "host-side cost with stubbed launches on this CPU instead.")
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton path then accepts CPU tensors
        rows += not_measured_rows(args, why, command)
        rows += host_cost_rows(args, command)

    print(f"{'op':<20}{'backend':<28}{'dtype':>9}{'list':>9}{'kernel us':>11}{'call us':>10}"
          f"{'host us':>9}{'GB/s':>8}{'x copy_':>8}  targets")
    for r in rows:
        c, f = r["config"], r["figures"]
        if not f.get("measured"):
            print(f"{c['op']:<20}{c['backend']:<28}{c.get('dtype', ''):>9}{c.get('list', ''):>9}  "
                  f"{f.get('status', '')}")
            continue

        def num(key, fmt):
            v = f.get(key)
            return "" if v is None else format(v, fmt)
        tg = "; ".join(f"{t['text']}: {'pass' if t['pass'] else 'FAIL'}" for t in f.get("targets", []))
        print(f"{c['op']:<20}{c['backend']:<28}{c['dtype']:>9}{c['list']:>9}"
              f"{num('kernel_us', '.1f'):>11}{num('call_us', '.1f'):>10}{num('host_us', '.1f'):>9}"
              f"{num('gbps', '.0f'):>8}{num('x_copy', '.2f'):>8}  {tg}")
    if not args.no_write:
        print(f"wrote {write_rows(RESULTS_NAME, rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

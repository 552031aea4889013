"""GPU throughput of the Triton and CUDA backends beside the device's own copy_/add_ bandwidth.

For a machine with a CUDA GPU (not run in CI). One process, one tensor per dtype (default 100M
float32 = 400 MB on the device), ops interleaved round by round, each timed with CUDA events around
the call (the launch and the Python-side argument checks included, as a user sees them), medians
over rounds; ratios are medians of (op / add_) within the same round.

Ops: ``copy_`` (``y.copy_(x)``) and ``add_`` (``x.add_(1.0)``) as the bandwidth baselines (GB/s =
one read + one write per element), then for each usable backend in ``--backends``
(``triton``, ``cuda``): ``perturb_`` (target: >= 0.9 of add_'s GB/s, as on the CPU) and
``apply_seeds_`` with K = 1 and 64 (target for K = 64: <= 8x one add_), with ns per element per
seed. A backend that is not usable gives a row with ``skipped`` and the reason.

Without CUDA it prints why and exits 0 without writing anything (``--require`` makes that exit 1).
Writes ``benchmarks/results/kernels_gpu.json`` (``--no-write`` to skip).

    python benchmarks/bench_kernels_gpu.py                        # n = 100M fp32, 50 rounds
    python benchmarks/bench_kernels_gpu.py --dtypes float32,bfloat16 --ks 1,8,64
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_rows  # noqa: E402

import torch  # noqa: E402

RESULTS_NAME = "kernels_gpu"
PERTURB_MIN_BW_FRACTION = 0.9
APPLY64_MAX_RATIO = 8.0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SEED_BASE = 0x9E3779B97F4A7C15


def seeds_and_coeffs(k: int) -> tuple[list[int], list[float]]:
    """K distinct 64-bit seeds and K alternating-sign coefficients (same as bench_kernels_cpu)."""
    seeds = [(SEED_BASE * (j + 1)) % (1 << 64) for j in range(k)]
    coeffs = [(1e-3 if j % 2 == 0 else -1e-3) * (1 + j / 64) for j in range(k)]
    return seeds, coeffs


def cuda_time(fn, inner: int = 1) -> float:
    """Seconds per call of ``fn``: CUDA events around ``inner`` back-to-back calls, divided by inner.

    The device is idle when the first event is recorded, so host work that the GPU waits for (argument
    checks, launches, synchronizing copies) counts; with ``inner > 1`` an asynchronous op's host
    work overlaps the previous call's kernel, as in a training loop.
    """
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(inner):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / inner  # elapsed_time is in milliseconds


def verify(backend: str, dtype: torch.dtype, device: str) -> str:
    """Compare ``backend`` on the GPU with the CPU reference on small odd sizes; "" if bit-equal."""
    import zo_kernels
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(n, generator=g).to(dtype) for n in (4097, 129, 1000)]
    for k in (1, 8):
        seeds, coeffs = seeds_and_coeffs(k)
        a = [t.to(device) for t in base]
        b = [t.clone() for t in base]
        zo_kernels.apply_seeds_(a, seeds, coeffs, decay=0.999, backend=backend)
        zo_kernels.apply_seeds_(b, seeds, coeffs, decay=0.999, backend="reference")
        for i, (u, v) in enumerate(zip(a, b)):
            u = u.cpu()
            if not torch.equal(u, v):
                return f"K={k}: tensor {i} differs from the CPU reference in {int((u != v).sum())} elements"
    return ""


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000_000, help="elements (default 100_000_000)")
    ap.add_argument("--repeats", type=int, default=50, help="timed rounds (default 50)")
    ap.add_argument("--inner", type=int, default=10,
                    help="back-to-back calls per timed sample (default 10; 1 = isolated calls, "
                         "host overhead fully exposed)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3; "
                    "the first compiles the Triton kernels)")
    ap.add_argument("--backends", default="triton,cuda", help="comma-separated (default triton,cuda)")
    ap.add_argument("--dtypes", default="float32", help="comma-separated of float32,bfloat16,float16")
    ap.add_argument("--ks", default="1,64", help="K values for apply_seeds_ (default 1,64)")
    ap.add_argument("--device", default="cuda", help="CUDA device (default cuda = current)")
    ap.add_argument("--require", action="store_true",
                    help="exit 1 (instead of 0) when no CUDA device is available")
    ap.add_argument("--no-write", action="store_true", help="print only; do not write results")
    args = ap.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = [b for b in args.backends if b not in ("triton", "cuda")]
    if bad:
        ap.error(f"--backends: unknown {bad}; choose from triton, cuda")
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in args.dtypes if d not in DTYPES]
    if bad:
        ap.error(f"--dtypes: unknown {bad}; choose from {', '.join(DTYPES)}")
    try:
        args.ks = sorted({int(k) for k in args.ks.split(",") if k.strip()})
    except ValueError:
        ap.error(f"--ks must be comma-separated integers, got {args.ks!r}")
    if any(k < 1 for k in args.ks):
        ap.error(f"--ks values must be >= 1, got {args.ks}")
    if args.n < 1 or args.repeats < 1 or args.inner < 1 or args.warmup < 0:
        ap.error("--n, --repeats and --inner must be >= 1 and --warmup >= 0")
    return args


def bench_dtype(args, dtype_name: str, usable: dict, mismatch: dict, command: str) -> list[dict]:
    """Rows for one dtype: baselines, then each backend's perturb_ and apply_seeds_ K in args.ks."""
    import zo_kernels
    dtype = DTYPES[dtype_name]
    n, dev = args.n, torch.device(args.device)
    esize = torch.empty((), dtype=dtype).element_size()
    bytes_moved = 2 * esize * n
    x = torch.ones(n, dtype=dtype, device=dev)
    y = torch.empty_like(x)
    flip = {"s": 1}

    def sign() -> int:
        flip["s"] = -flip["s"]
        return flip["s"]

    # label -> (callable, backend, K, op)
    ops = {"copy_": (lambda: y.copy_(x), "torch", 1, "copy_"),
           "add_": (lambda: x.add_(1.0 if sign() > 0 else -1.0), "torch", 1, "add_")}
    for be in args.backends:
        if not usable[be]:
            continue
        s1, c1 = seeds_and_coeffs(1)
        ops[f"{be} perturb_"] = (lambda be=be, s1=s1, c1=c1:
                                 zo_kernels.perturb_([x], s1[0], sign() * c1[0], backend=be), be, 1,
                                 "perturb_")
        for k in args.ks:
            sk, ck = seeds_and_coeffs(k)
            # Seeds/coeffs are prepared once as tensors so the timing is the op, not list parsing.
            st = torch.tensor([s - (1 << 64) if s >= 1 << 63 else s for s in sk], dtype=torch.int64)
            ct, ctn = torch.tensor(ck, dtype=torch.float32), -torch.tensor(ck, dtype=torch.float32)
            ops[f"{be} apply_seeds_ K={k}"] = (
                lambda be=be, st=st, ct=ct, ctn=ctn:
                zo_kernels.apply_seeds_([x], st, ct if sign() > 0 else ctn, backend=be), be, k,
                "apply_seeds_")

    times = {name: [] for name in ops}
    for rnd in range(args.warmup + args.repeats):
        for name, (fn, _be, _k, _op) in ops.items():
            t = cuda_time(fn, args.inner)
            if rnd >= args.warmup:
                times[name].append(t)
    torch.cuda.synchronize()
    finite = bool(torch.isfinite(x[:4096].float()).all())
    add_t = times["add_"]
    rows = []
    for name, (_fn, be, k, op) in ops.items():
        ts = times[name]
        med = statistics.median(ts)
        ratio = statistics.median(t / a for t, a in zip(ts, add_t))
        fig = {"median_s": med, "times": ts, "gbps": bytes_moved / med / 1e9, "ratio_to_add": ratio,
               "bw_fraction_of_add": 1.0 / ratio}
        if op in ("perturb_", "apply_seeds_"):
            fig["ns_per_elem_per_seed"] = med / (n * k) * 1e9
        target = None
        if op == "perturb_":
            target = {"figure": "bw_fraction_of_add", "cmp": ">=", "value": PERTURB_MIN_BW_FRACTION,
                      "text": f"GB/s >= {PERTURB_MIN_BW_FRACTION} x add_"}
            fig["meets_target"] = fig["bw_fraction_of_add"] >= PERTURB_MIN_BW_FRACTION
        elif op == "apply_seeds_" and k == 64:
            target = {"figure": "ratio_to_add", "cmp": "<=", "value": APPLY64_MAX_RATIO,
                      "text": f"time <= {APPLY64_MAX_RATIO:g} x add_"}
            fig["meets_target"] = ratio <= APPLY64_MAX_RATIO
        if target is not None and (mismatch.get((be, dtype_name)) or not finite):
            fig["meets_target"] = False
        fig["target"] = target
        rows.append({"config": {"op": op, "label": name, "n": n, "K": k, "dtype": dtype_name,
                                "backend": be, "device": torch.cuda.get_device_name(dev),
                                "inner": args.inner},
                     "figures": fig,
                     "verified_against_reference": (None if be == "torch"
                                                    else not mismatch.get((be, dtype_name))),
                     "command": command})
    del x, y
    torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        why = ("torch was built without CUDA" if torch.version.cuda is None
               else "no CUDA device is visible")
        print(f"bench_kernels_gpu: no CUDA GPU here ({why}); nothing measured, nothing written.",
              file=sys.stderr if args.require else sys.stdout)
        return 1 if args.require else 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("bench_kernels_gpu: TRITON_INTERPRET is set, so Triton would run in the CPU "
              "interpreter; unset it for GPU timings.", file=sys.stderr)
        return 2
    import zo_kernels
    report = zo_kernels.backends()
    usable = {be: report[be]["usable"] and "cuda" in report[be]["devices"] for be in args.backends}
    command = "python benchmarks/bench_kernels_gpu.py " + " ".join(sys.argv[1:] if argv is None
                                                                   else argv)
    rows, mismatch = [], {}
    for be in args.backends:
        if not usable[be]:
            print(f"skipping backend {be!r}: {report[be]['why'] or 'not usable on CUDA tensors'}")
            rows.append({"config": {"op": "-", "label": f"{be} (skipped)", "backend": be,
                                    "n": args.n},
                         "figures": {}, "skipped": report[be]["why"] or "not usable on CUDA"})
            continue
        for d in args.dtypes:
            mismatch[(be, d)] = verify(be, DTYPES[d], args.device)
            if mismatch[(be, d)]:
                print(f"WARNING: {be} {d} does not match the reference: {mismatch[(be, d)]}",
                      file=sys.stderr)
    for d in args.dtypes:
        rows += bench_dtype(args, d, usable, mismatch, command)

    dev_name = torch.cuda.get_device_name(torch.device(args.device))
    print(f"{dev_name}: n = {args.n:,}, {args.repeats} rounds of {args.inner} calls after "
          f"{args.warmup} warm-up rounds")
    print(f"{'op':<30}{'dtype':>9}{'median us':>11}{'GB/s':>9}{'x add_':>8}{'ns/el/seed':>12}  target")
    for r in rows:
        c, f = r["config"], r["figures"]
        if r.get("skipped"):
            print(f"{c['label']:<30}  skipped: {r['skipped']}")
            continue
        tgt = ("" if not f.get("target") else
               f"{f['target']['text']}: {'pass' if f['meets_target'] else 'FAIL'}")
        nsps = f.get("ns_per_elem_per_seed")
        print(f"{c['label']:<30}{c['dtype']:>9}{f['median_s'] * 1e6:>11.1f}{f['gbps']:>9.1f}"
              f"{f['ratio_to_add']:>8.2f}{'' if nsps is None else f'{nsps:.5f}':>12}  {tgt}")
    if not args.no_write:
        print(f"wrote {write_rows(RESULTS_NAME, rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CPU throughput of the fused noise kernels beside the machine's own memory-bandwidth limit, on
every CPU path of the C++ backend this machine runs (avx512, avx2, portable), side by side.

Everything runs in ONE process on ONE float32 tensor (default: 100M = 400 MB; the half-dtype rows
use one tensor per half dtype), and the timed ops are interleaved round by round (add_, then per CPU
path perturb_ and apply_seeds_ K=1/8/16/64, then 64 sequential perturb_ calls and the MeZO-style
replay, then per half dtype its add_, perturb_ and K=8 per path, then the call-overhead timings, then
the next round), so the drift of a shared machine hits every op alike. Every op is paired with an
``add_`` on the same tensor timed just before it in the same round (so the state the previous op
leaves, caches and clocks, hits both alike); ratios are the median over rounds of (op time / that
add_'s time); ``cpu_time_ratio_to_add`` is the same ratio in CPU time of the process (all threads),
which time slices lost to other processes on a loaded machine do not inflate. Each row names its CPU
path (``config.cpu_path``) and ``zo_kernels._C.cpu_isa()`` for it.

Ops (tensor ``x`` of ``n`` elements, ``e`` bytes per element):

- ``add_``: ``x.add_(1.0)``, the baseline; GB/s = 2 * e * n / t (one read + one write per element).
- ``perturb_ [path]``: ``zo_kernels.perturb_([x], seed, alpha)``; same bytes as add_, so its share of
  the add_ bandwidth is ``t_add / t_perturb``. Target (issues 2, 11): >= 0.9 on avx512 and avx2.
- ``apply_seeds_ K=k [path]``: one pass applying K directions; ``ratio_to_add = t / t_add``.
  Target for K = 64: <= 8 on avx512 and avx2 (issue 11: avx512 toward 3). Also reported: ns per
  element per seed = t / (n * K) * 1e9.
- ``perturb_ x64``: 64 sequential perturb_ calls on the default path (what the fused op replaces).
- ``mezo_replay``: MeZO-style replay of ONE seed with torch's own RNG: ``torch.manual_seed(seed)``,
  the noise materialized as a tensor (Rademacher via ``torch.randint(0, 2) * 2 - 1``, or Gaussian via
  ``torch.normal``), then ``add_``. One pass; replaying K seeds costs K such passes.
- ``add_ / perturb_ / apply_seeds_ K=8`` on bfloat16 and float16 (``--half-dtypes``): the same ops on
  an n-element tensor of that dtype, each ratio over that dtype's own ``add_`` in the same round; no
  target (they show the cost of rounding to a half type on each path).
- ``call overhead [path]``: microseconds per ``apply_seeds_`` call from Python on 4 small float32
  tensors (10, 100, 128 and 300 elements, K = 1: the work itself is well under a microsecond),
  the median over rounds of the mean of 2000 calls, beside ``torch add_ x4`` (four ``add_`` calls on
  the same tensors) and, once, the general Python path (seeds and coefficients given as tensors,
  which the C++ fast entry does not take). Target (issue 11): < 15 us.

Writes ``benchmarks/results/kernels_cpu.json`` (``--no-write`` to skip) and prints a table.
Usage::

    python benchmarks/bench_kernels_cpu.py                  # full: n = 100M, every path, ~2 min
    python benchmarks/bench_kernels_cpu.py --quick          # n = 10M, 3 rounds
    python benchmarks/bench_kernels_cpu.py --cpu-paths avx2 # one path
    python benchmarks/bench_kernels_cpu.py --backend reference --n 200000 --no-write   # no C++ build
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median_time, write_rows  # noqa: E402

import torch  # noqa: E402

RESULTS_NAME = "kernels_cpu"
#: issues 2 and 11: perturb_ reaches >= 0.9 of add_'s bandwidth and apply_seeds_ K=64 takes <= 8 add_
#: times, on the avx512 and avx2 paths; a call from Python costs < 15 us (every path).
PERTURB_MIN_BW_FRACTION = 0.9
APPLY64_MAX_RATIO = 8.0
CALL_OVERHEAD_MAX_US = 15.0
TARGET_PATHS = ("avx512", "avx2", None)  # None: no path forcing (the reference backend)
#: Tensors of the call-overhead rows (float32) and calls per timing.
OVERHEAD_SIZES = (10, 100, 128, 300)
OVERHEAD_CALLS = 2000
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Fixed seeds spanning the whole 64-bit range (incl. >= 2**63), so the benchmark is reproducible.
SEED_BASE = 0x9E3779B97F4A7C15


def seeds_and_coeffs(k: int, sign: int = 1) -> tuple[list[int], list[float]]:
    """K distinct 64-bit seeds and K small coefficients whose sum is ~0 (keeps x bounded)."""
    seeds = [(SEED_BASE * (j + 1)) % (1 << 64) for j in range(k)]
    coeffs = [sign * (1e-3 if j % 2 == 0 else -1e-3) * (1 + j / 64) for j in range(k)]
    return seeds, coeffs


def mezo_replay_(tensors: list[torch.Tensor], seed: int, coeff: float, dist: str) -> None:
    """MeZO-style replay of one seed: per tensor, torch.manual_seed, materialize z, add_ (in place).

    This is the cheapest faithful version (noise drawn straight into the tensor's dtype, ``mul_``/
    ``sub_``/``add_`` in place): one noise tensor of the parameter's size exists at a time.
    """
    for p in tensors:
        torch.manual_seed(seed % (1 << 63))
        if dist == "rademacher":
            z = torch.randint(0, 2, p.shape, dtype=p.dtype)
            z.mul_(2).sub_(1)
        else:
            z = torch.normal(0.0, 1.0, p.shape, dtype=p.dtype)
        p.add_(z, alpha=coeff)
        del z


def verify_backend(backend: str, dtype: torch.dtype) -> str:
    """Bit-compare ``backend`` with the reference on a small odd-sized list (K = 1 and 8).

    Returns "" if equal, else a description. Timing a wrong kernel is meaningless, so the rows
    carry the result.
    """
    import zo_kernels
    if backend == "reference":
        return ""
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(n, generator=g).to(dtype) for n in (4097, 129, 1000)]
    for k in (1, 8):
        seeds, coeffs = seeds_and_coeffs(k)
        a = [t.clone() for t in base]
        b = [t.clone() for t in base]
        zo_kernels.apply_seeds_(a, seeds, coeffs, decay=0.999, backend=backend)
        zo_kernels.apply_seeds_(b, seeds, coeffs, decay=0.999, backend="reference")
        for i, (u, v) in enumerate(zip(a, b)):
            if not torch.equal(u.view(torch.int16 if dtype != torch.float32 else torch.int32),
                               v.view(torch.int16 if dtype != torch.float32 else torch.int32)):
                bad = int((u != v).sum())
                return f"K={k}: tensor {i} differs from the reference in {bad} elements"
    return ""


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=None,
                    help="elements in the tensor (default 100_000_000; 10_000_000 with --quick)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed rounds (default 15; 3 with --quick); one untimed warm-up round first")
    ap.add_argument("--mezo-repeats", type=int, default=None,
                    help="rounds that also time the slow MeZO-style replay (default min(3, repeats))")
    ap.add_argument("--quick", action="store_true", help="n = 10M and 3 rounds unless given")
    ap.add_argument("--backend", default="cpu", choices=["cpu", "reference"],
                    help="zo_kernels backend to time (default cpu; 'reference' works without the "
                         "C++ build but is hundreds of times slower: use a small --n)")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--half-dtypes", default="bfloat16,float16",
                    help="comma-separated half dtypes that also get add_, perturb_ and "
                         "apply_seeds_ K=8 rows per path on an n-element tensor of their own "
                         "('' to skip)")
    ap.add_argument("--ks", default="1,8,16,64",
                    help="comma-separated K values for apply_seeds_ (default 1,8,16,64)")
    ap.add_argument("--sequential", type=int, default=64,
                    help="number of sequential perturb_ calls to time (default 64; 0 skips)")
    ap.add_argument("--no-mezo", action="store_true", help="skip the MeZO-style replay")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads(N) first (default: leave torch's setting)")
    ap.add_argument("--cpu-paths", default="all",
                    help="comma-separated CPU paths of the cpu backend to time (default: every path "
                         "this machine runs)")
    ap.add_argument("--no-overhead", action="store_true", help="skip the call-overhead rows")
    ap.add_argument("--no-write", action="store_true", help="print only; do not write results")
    args = ap.parse_args(argv)
    if args.n is None:
        args.n = 10_000_000 if args.quick else 100_000_000
    if args.repeats is None:
        args.repeats = 3 if args.quick else 15  # add_ alone swings 10-18 ms here: medians need rounds
    if args.mezo_repeats is None:
        args.mezo_repeats = min(3, args.repeats)
    try:
        args.ks = sorted({int(k) for k in args.ks.split(",") if k.strip()})
    except ValueError:
        ap.error(f"--ks must be comma-separated integers, got {args.ks!r}")
    if args.n < 1:
        ap.error(f"--n must be >= 1, got {args.n}")
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    if not 0 <= args.mezo_repeats <= args.repeats:
        ap.error(f"--mezo-repeats must be in [0, repeats={args.repeats}], got {args.mezo_repeats}")
    if any(k < 1 for k in args.ks):
        ap.error(f"--ks values must be >= 1, got {args.ks}")
    if args.sequential < 0:
        ap.error(f"--sequential must be >= 0, got {args.sequential}")
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    return args


def _call_overhead_us(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def main(argv=None) -> int:
    args = parse_args(argv)
    import zo_kernels
    from zo_kernels import _backends

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    info = zo_kernels.backends()[args.backend]
    if not info["usable"] or "cpu" not in info["devices"]:
        print(f"bench_kernels_cpu: backend {args.backend!r} is not usable on CPU tensors here: "
              f"{info['why'] or info}. Build the extension (pip install --no-build-isolation -e .) "
              "or pass --backend reference with a small --n.", file=sys.stderr)
        return 2
    if args.backend == "cpu":
        avail = _backends.cpu_paths()
        paths = avail if args.cpu_paths == "all" else [
            p.strip() for p in args.cpu_paths.split(",") if p.strip()]
        bad = [p for p in paths if p not in avail]
        if bad:
            print(f"bench_kernels_cpu: --cpu-paths {bad}: this CPU runs only {avail}",
                  file=sys.stderr)
            return 2
    else:
        paths = [None]
    prev_path = _backends.cpu_path()

    def use(path):
        if path is not None:
            _backends.set_cpu_path(path)

    isa_of = {}
    for path in paths:
        use(path)
        isa_of[path] = _backends.cpu_extension().cpu_isa() if path is not None else None
    dtype = DTYPES[args.dtype]
    n = args.n
    esize = torch.empty((), dtype=dtype).element_size()
    bytes_moved = 2 * esize * n  # one read + one write of every element

    halves = [h.strip() for h in args.half_dtypes.split(",") if h.strip() and h.strip() != args.dtype]
    bad_h = [h for h in halves if h not in DTYPES]
    if bad_h:
        print(f"bench_kernels_cpu: --half-dtypes {bad_h}: choose from {sorted(DTYPES)}",
              file=sys.stderr)
        return 2
    mismatch = {}  # (path, dtype name) -> what differs from the reference ("" = nothing)
    for path in paths:
        use(path)
        for dname in [args.dtype, *halves]:
            mismatch[(path, dname)] = verify_backend(args.backend, DTYPES[dname])
            if mismatch[(path, dname)]:
                print(f"WARNING: backend {args.backend!r} path {path} {dname} does not match the "
                      f"reference: {mismatch[(path, dname)]}", file=sys.stderr)

    x = torch.ones(n, dtype=dtype)  # allocated and touched before any timing
    be = args.backend
    seed1, coef1 = seeds_and_coeffs(1)

    # Signs alternate from call to call to keep x bounded: one alternation for the ops, one for the
    # add_ baselines (each op is paired with an add_, so one shared alternation would give every
    # add_ the same sign).
    flip = {"s": 1, "a": 1}

    def nxt(key: str = "s") -> int:
        flip[key] = -flip[key]
        return flip[key]

    def tag(path):
        return f" [{path}]" if path is not None else ""

    # name -> (callable, rounds, K, path, dtype name); each timing is paired with the add_ of its
    # own dtype in the same round.
    ops: dict[str, tuple] = {"add_": (lambda: x.add_(1.0 if nxt("a") > 0 else -1.0), args.repeats, 1,
                                      None, args.dtype)}
    for path in paths:
        def run_perturb(path=path):
            use(path)
            zo_kernels.perturb_([x], seed1[0], nxt() * coef1[0], backend=be)
        ops["perturb_" + tag(path)] = (run_perturb, args.repeats, 1, path, args.dtype)
        for k in args.ks:
            sk, ck = seeds_and_coeffs(k)
            ck_neg = [-c for c in ck]

            def run_apply(sk=sk, ck=ck, ck_neg=ck_neg, path=path):
                use(path)
                zo_kernels.apply_seeds_([x], sk, ck if nxt() > 0 else ck_neg, backend=be)
            ops[f"apply_seeds_ K={k}" + tag(path)] = (run_apply, args.repeats, k, path, args.dtype)
    if args.sequential:
        ss, cs = seeds_and_coeffs(args.sequential)

        def run_seq(path=paths[0]):
            use(path)
            s = nxt()
            for sd, c in zip(ss, cs):
                zo_kernels.perturb_([x], sd, s * c, backend=be)
        ops[f"perturb_ x{args.sequential}" + tag(paths[0])] = (run_seq, args.repeats,
                                                               args.sequential, paths[0],
                                                               args.dtype)
    if not args.no_mezo and args.mezo_repeats > 0:
        for dist in ("rademacher", "gaussian"):
            ops[f"mezo_replay {dist}"] = (
                lambda dist=dist: mezo_replay_([x], seed1[0], nxt() * coef1[0], dist),
                args.mezo_repeats, 1, None, args.dtype)
    # Half dtypes: a tensor of their own, its own add_ baseline, perturb_ and K = 8 per path.
    xh = {h: torch.ones(n, dtype=DTYPES[h]) for h in halves}
    s8, c8 = seeds_and_coeffs(8)
    for h in halves:
        ops[f"add_ {h}"] = (lambda h=h: xh[h].add_(1.0 if nxt("a") > 0 else -1.0), args.repeats, 1,
                            None, h)
        for path in paths:
            def run_perturb_h(path=path, h=h):
                use(path)
                zo_kernels.perturb_([xh[h]], seed1[0], nxt() * coef1[0], backend=be)

            def run_k8_h(path=path, h=h):
                use(path)
                sgn = nxt()
                zo_kernels.apply_seeds_([xh[h]], s8, [sgn * c for c in c8], backend=be)
            ops[f"perturb_ {h}" + tag(path)] = (run_perturb_h, args.repeats, 1, path, h)
            ops[f"apply_seeds_ K=8 {h}" + tag(path)] = (run_k8_h, args.repeats, 8, path, h)

    # Per-call overhead: tiny tensors, many calls per timing (the work is well under 1 us).
    small = [torch.randn(m) for m in OVERHEAD_SIZES]
    s_small, c_small = seeds_and_coeffs(1)
    ov_ops: dict[str, tuple] = {}
    if not args.no_overhead:
        ov_ops["torch add_ x4"] = (lambda: [t.add_(1e-3) for t in small], None)
        for path in paths:
            def call(path=path):
                zo_kernels.apply_seeds_(small, s_small, c_small, backend=be)
            ov_ops["call overhead" + tag(path)] = (call, path)
        if be == "cpu":
            st, ct = torch.tensor([s_small[0] - (1 << 64)]), torch.tensor(c_small)
            ov_ops["call overhead, general path" + tag(paths[0])] = (
                lambda: zo_kernels.apply_seeds_(small, st, ct, backend=be), paths[0])

    times: dict[str, list[float]] = {name: [] for name in list(ops) + list(ov_ops)}
    cpu_times: dict[str, list[float]] = {name: [] for name in ops}
    add_names = {args.dtype: "add_", **{h: f"add_ {h}" for h in halves}}
    # per op: the add_ of its dtype timed just before it in each round
    pair_add: dict[str, list[float]] = {name: [] for name in ops}
    pair_add_cpu: dict[str, list[float]] = {name: [] for name in ops}
    load_start = os.getloadavg()[0]  # other processes on a shared machine skew absolute GB/s
    t_start = time.perf_counter()
    try:
        for rnd in range(args.repeats + 1):  # round 0 is the untimed warm-up
            for name, (fn, rounds, _k, _p, dname) in ops.items():
                if rnd > rounds:
                    continue
                base = add_names[dname]
                if name != base:  # the same dtype's add_ just before the op: its pair
                    c0, t0 = time.process_time(), time.perf_counter()
                    ops[base][0]()
                    ta, ca = time.perf_counter() - t0, time.process_time() - c0
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                t, c = time.perf_counter() - t0, time.process_time() - c0
                if rnd > 0:
                    times[name].append(t)
                    cpu_times[name].append(c)
                    if name != base:
                        pair_add[name].append(ta)
                        pair_add_cpu[name].append(ca)
            for name, (fn, path) in ov_ops.items():
                use(path)
                us = _call_overhead_us(fn, OVERHEAD_CALLS if rnd > 0 else 200)
                if rnd > 0:
                    times[name].append(us)
    finally:
        if prev_path is not None:
            _backends.set_cpu_path(prev_path)
    if not torch.isfinite(x[:1024].float()).all():
        print("WARNING: x is no longer finite after the benchmark", file=sys.stderr)
    elapsed = time.perf_counter() - t_start
    load = {"load_avg_1min_start": load_start, "load_avg_1min_end": os.getloadavg()[0]}

    threads = torch.get_num_threads()
    command = "python benchmarks/bench_kernels_cpu.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    rows = []
    for name, (_fn, _rounds, k, path, dname) in ops.items():
        ts = times[name]
        med = statistics.median(ts)
        if name == add_names[dname]:
            add_in_round, add_cpu_in_round = ts, cpu_times[name]
        else:
            add_in_round, add_cpu_in_round = pair_add[name], pair_add_cpu[name]
        # Pair each timing with the add_ of its dtype timed just before it in the same round, so
        # slow drift and the state the previous op leaves (caches, clocks) cancel in the ratio.
        ratio = statistics.median(t / a for t, a in zip(ts, add_in_round))
        op = name.split(" ")[0]
        # The same ratio in CPU time of this process (all its threads): time slices lost to other
        # processes on a loaded machine do not count, so it tracks the idle-machine ratio better.
        cpu_ratio = statistics.median(t / a for t, a in zip(cpu_times[name], add_cpu_in_round)
                                      if a > 0)
        moved = 2 * n * torch.empty((), dtype=DTYPES[dname]).element_size()
        fig = {"median_s": med, "times": ts, "gbps": moved / med / 1e9,
               "ratio_to_add": ratio, "bw_fraction_of_add": 1.0 / ratio,
               "cpu_time_ratio_to_add": cpu_ratio, "cpu_times": cpu_times[name],
               "ns_per_elem_per_seed": med / (n * k) * 1e9}
        target = None
        bad = bool(mismatch.get((path, dname))) if op in ("perturb_", "apply_seeds_") else False
        if dname != args.dtype:
            pass  # half-dtype rows: no target (issue 11's targets are on float32)
        elif op == "perturb_" and k == 1 and not name.startswith("perturb_ x") and path in TARGET_PATHS:
            target = {"figure": "bw_fraction_of_add", "cmp": ">=", "value": PERTURB_MIN_BW_FRACTION,
                      "text": f"GB/s >= {PERTURB_MIN_BW_FRACTION} x add_"}
            fig["meets_target"] = fig["bw_fraction_of_add"] >= PERTURB_MIN_BW_FRACTION and not bad
        elif op == "apply_seeds_" and k == 64 and path in TARGET_PATHS:
            target = {"figure": "ratio_to_add", "cmp": "<=", "value": APPLY64_MAX_RATIO,
                      "text": f"time <= {APPLY64_MAX_RATIO:g} x add_"}
            fig["meets_target"] = ratio <= APPLY64_MAX_RATIO and not bad
        fig["target"] = target
        if op == "add_":
            fig.pop("ns_per_elem_per_seed")
        cfg = {"op": op, "label": name, "n": n, "K": k, "dtype": dname,
               "backend": "torch" if op in ("add_", "mezo_replay") else be, "threads": threads,
               "cpu_path": path, "cpu_isa": isa_of.get(path),
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
        if op == "mezo_replay":
            cfg["dist"] = name.split(" ")[1]
        rows.append({"config": cfg, "figures": fig,
                     "verified_against_reference": (None if op in ("add_", "mezo_replay")
                                                    else not mismatch.get((path, dname))),
                     "conditions": load, "command": command})
    for name, (_fn, path) in ov_ops.items():
        ts = times[name]
        med = statistics.median(ts)
        fig = {"us_per_call": med, "times_us": ts, "target": None}
        is_api = name.startswith("call overhead") and "general" not in name
        if is_api:
            fig["target"] = {"figure": "us_per_call", "cmp": "<", "value": CALL_OVERHEAD_MAX_US,
                             "text": f"< {CALL_OVERHEAD_MAX_US:g} us per call"}
            fig["meets_target"] = med < CALL_OVERHEAD_MAX_US
        rows.append({"config": {"op": "call_overhead" if "torch" not in name else "add_",
                                "label": name, "tensor_sizes": list(OVERHEAD_SIZES), "K": 1,
                                "dtype": "float32", "calls_per_timing": OVERHEAD_CALLS,
                                "backend": "torch" if "torch" in name else be,
                                "threads": threads, "cpu_path": path, "cpu_isa": isa_of.get(path)},
                     "figures": fig, "verified_against_reference": None, "conditions": load,
                     "command": command})

    print(f"n = {n:,} {args.dtype} ({bytes_moved / 2 / 1e6:.0f} MB), backend {be}, {threads} threads, "
          f"{args.repeats} rounds (MeZO {args.mezo_repeats}), {elapsed:.1f} s, 1-min load average "
          f"{load['load_avg_1min_start']:.2f} -> {load['load_avg_1min_end']:.2f}")
    for path in paths:
        if path is not None:
            print(f"  path {path}: cpu_isa() = {isa_of[path]!r}")
    print(f"{'op':<34}{'median ms':>11}{'GB/s':>9}{'x add_':>10}{'cpu-time x':>11}{'ns/el/seed':>12}"
          "  target")
    for r in rows:
        f, c = r["figures"], r["config"]
        tgt = ""
        if f.get("target"):
            tgt = f"{f['target']['text']}: {'pass' if f['meets_target'] else 'FAIL'}"
        if "us_per_call" in f:
            print(f"{c['label']:<34}{f['us_per_call']:>9.2f} us per call  {tgt}")
            continue
        nsps = f.get("ns_per_elem_per_seed")
        print(f"{c['label']:<34}{f['median_s'] * 1e3:>11.2f}{f['gbps']:>9.1f}{f['ratio_to_add']:>10.2f}"
              f"{f['cpu_time_ratio_to_add']:>11.2f}{'' if nsps is None else f'{nsps:.4f}':>12}  {tgt}")
    if any(mismatch.values()):
        print(f"NOTE: paths failed verification ({mismatch}); their targets are marked FAIL")
    if not args.no_write:
        path = write_rows(RESULTS_NAME, rows)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

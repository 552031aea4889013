"""Regenerate the results tables in README files from ``benchmarks/results/*.json``.

A README marks each generated region with two marker lines, each on a line of its own::

    <!-- table:kernels_cpu -->
    (everything here is replaced)
    <!-- /table:kernels_cpu -->

``NAME`` is a results file (``benchmarks/results/NAME.json``, written by ``_common.write_rows``).
The text between the markers is replaced by ``FORMATTERS[NAME](rows)`` when a formatter is registered,
else by :func:`generic_table` (one row per result: its config and scalar figures); everything
outside the markers is left byte for byte. The tables are computed from the files alone (machine,
date, commands, medians, ratios, targets, pass/fail), so running this twice changes nothing.

To add a table for a new benchmark, write its rows as ``{"config": {...}, "figures": {...}}``
(``figures.target = {"text": ..., ...}`` and ``figures.meets_target`` give the target columns), and
either rely on the generic table or register a formatter::

    FORMATTERS["optimizer_memory"] = column_table([
        Col("method", "config.label"), Col("peak MiB", "figures.peak_mib", "{:.1f}"),
        TARGET, RESULT])

Usage::

    python benchmarks/make_tables.py            # rewrite README.md and benchmarks/README.md
    python benchmarks/make_tables.py --check    # exit 1 if any table is stale (CI)
    python benchmarks/make_tables.py --readme /tmp/README.md --results /tmp/results
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import portable_ks  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
DEFAULT_RESULTS = BENCH_DIR / "results"
DEFAULT_READMES = [REPO / "README.md", BENCH_DIR / "README.md"]

START_RE = re.compile(r"^\s*<!--\s*table:([A-Za-z0-9_.\-]+)\s*-->\s*$")
END_RE = re.compile(r"^\s*<!--\s*/table:([A-Za-z0-9_.\-]+)\s*-->\s*$")

#: How to produce each results file, shown when it does not exist yet.
RUN_HINTS = {
    "kernels_cpu": "python benchmarks/bench_kernels_cpu.py",
    "kernels_memory": "python benchmarks/mem_kernels.py",
    "kernels_gpu": "python benchmarks/bench_kernels_gpu.py",
    "communication": "python benchmarks/bench_comm.py",
    "exact_memory": "python benchmarks/mem_exact.py",
    "cpu_variants": "python benchmarks/bench_cpu_variants.py",
}

_MISSING = object()


# --------------------------------------------------------------------------------------------
# cell formatting
# --------------------------------------------------------------------------------------------
def lookup(row: dict, path: str):
    """``row["a"]["b"]`` for path ``"a.b"``; a missing key gives the sentinel ``_MISSING``."""
    cur = row
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return _MISSING
        cur = cur[part]
    return cur


def fmt_value(v, spec: str | Callable | None = None) -> str:
    """One table cell: ``spec`` is a format string, a callable, or None for a sensible default."""
    if v is _MISSING or v is None:
        return ""
    if callable(spec):
        return spec(v)
    if spec is not None:
        try:
            return spec.format(v)
        except (ValueError, TypeError):
            return str(v)
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return human_int(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict) and "text" in v:
        return str(v["text"])
    return str(v).replace("|", "\\|").replace("\n", " ")


def human_int(v: int) -> str:
    """100000000 -> '100M', 4096 -> '4,096' (exact multiples of 1e6/1e9 get a suffix)."""
    for div, suf in ((10**9, "G"), (10**6, "M")):
        if abs(v) >= div and v % div == 0:
            return f"{v // div}{suf}"
    return f"{v:,}"


def pass_fail(v) -> str:
    """meets_target as a cell: 'pass', '**FAIL**', or '' when the row has no target."""
    if v is _MISSING or v is None:
        return ""
    return "pass" if v else "**FAIL**"


def ms(v) -> str:
    """Seconds shown as milliseconds with 3-4 significant digits."""
    x = v * 1e3
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def us(v) -> str:
    """Seconds shown as microseconds."""
    x = v * 1e6
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


@dataclass
class Col:
    """A table column: header, dotted path into a row (or a function of the row), and a cell
    format (see :func:`fmt_value`)."""
    header: str
    path: str | Callable[[dict], object]
    fmt: str | Callable | None = None


TARGET = Col("target", "figures.target", lambda t: t.get("text", "") if isinstance(t, dict) else str(t))
RESULT = Col("result", "figures.meets_target", pass_fail)


def markdown_table(headers: list[str], cells: list[list[str]]) -> str:
    """A GitHub markdown table; numeric-looking columns are right-aligned."""
    def numeric(col: int) -> bool:
        vals = [r[col] for r in cells if r[col]]
        return bool(vals) and all(re.fullmatch(r"[-+]?[\d,.]+(e[-+]?\d+)?[kMG]?", v) for v in vals)
    align = ["---:" if numeric(i) else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(lines)


def provenance(rows: list[dict]) -> str:
    """One line naming the machine(s), versions, date(s) and command(s) behind ``rows``."""
    machines, dates, commands = [], [], []
    for r in rows:
        m = r.get("machine") or {}
        parts = [m.get("cpu") or "unknown CPU"]
        if m.get("cpu_count"):
            parts[0] += f" ({m['cpu_count']} cores"
            parts[0] += f", {m['torch_threads']} torch threads)" if m.get("torch_threads") else ")"
        if m.get("cuda_device"):
            parts.append(f"GPU {m['cuda_device']}")
        if m.get("cpu_isa"):
            parts.append(f"kernel ISA {m['cpu_isa']}")
        vers = ", ".join(f"{k} {m[k]}" for k in ("torch", "triton", "zo_kernels") if m.get(k))
        if vers:
            parts.append(vers)
        desc = "; ".join(parts)
        if desc not in machines:
            machines.append(desc)
        d = r.get("date")
        if d and d[:10] not in dates:
            dates.append(d[:10])
        c = r.get("command")
        if c and c.strip() not in commands:
            commands.append(c.strip())
    out = "Machine: " + " / ".join(machines) if machines else "Machine: not recorded"
    out += ". Date: " + (", ".join(dates) if dates else "not recorded") + "."
    if commands:
        out += " Command: " + ", ".join(f"`{c}`" for c in commands) + "."
    return out


def column_table(cols: list[Col], notes: Callable[[list[dict]], list[str]] | None = None,
                 skip: Callable[[dict], bool] | None = None) -> Callable[[list[dict]], str]:
    """A formatter: provenance line, a table with ``cols``, then optional note lines."""
    def fmt(rows: list[dict]) -> str:
        shown = [r for r in rows if not (skip and skip(r))]
        cells = [[fmt_value(lookup(r, c.path) if isinstance(c.path, str) else c.path(r), c.fmt)
                  for c in cols] for r in shown]
        parts = [provenance(rows), "", markdown_table([c.header for c in cols], cells)]
        extra = notes(rows) if notes else []
        for note in extra:  # one paragraph each
            parts += ["", note]
        return "\n".join(parts)
    return fmt


# --------------------------------------------------------------------------------------------
# formatters, one per results name
# --------------------------------------------------------------------------------------------
def _find(rows: list[dict], label: str):
    return next((r for r in rows if lookup(r, "config.label") == label), None)


def _kernels_cpu_notes(rows: list[dict]) -> list[str]:
    notes = []
    add = _find(rows, "add_")
    mezo = _find(rows, "mezo_replay rademacher")
    seq = next((r for r in rows if str(lookup(r, "config.label")).startswith("perturb_ x")), None)
    k64s = [r for r in rows if lookup(r, "config.op") == "apply_seeds_" and lookup(r, "config.K") == 64]
    if add and k64s:
        parts = [f"{r['figures']['ratio_to_add']:.2f}x one `add_` on {_path_name(r)} "
                 f"({r['figures']['ns_per_elem_per_seed']:.4f} ns per element per seed)" for r in k64s]
        line = "`apply_seeds_` with 64 seeds takes " + ", ".join(parts)
        if seq:
            line += (f"; {seq['config']['K']} sequential `perturb_` calls take "
                     f"{seq['figures']['ratio_to_add']:.1f}x")
        if mezo:
            line += (f"; replaying 64 seeds MeZO-style (torch RNG, noise materialized) would take "
                     f"64 passes of {mezo['figures']['ratio_to_add']:.0f}x each")
        notes.append(line + ".")
    notes.append("Times are medians over interleaved rounds in one process; `x add_` is the median "
                 "of per-round ratios to an in-place `add_` on the same tensor (GB/s counts one "
                 "read and one write per element). MeZO replay rows are one seed, one pass. "
                 "`path` is the C++ backend's CPU path (forced in turn, same process); `us/call`: "
                 "microseconds per `apply_seeds_` call from Python on 4 small tensors (K = 1), "
                 "beside four torch `add_` calls.")
    isas = sorted({f"{lookup(r, 'config.cpu_path')}: `{lookup(r, 'config.cpu_isa')}`" for r in rows
                   if isinstance(lookup(r, "config.cpu_isa"), str)})
    if isas:
        notes.append("`zo_kernels._C.cpu_isa()` per path: " + "; ".join(isas) + ".")
    loads = [lookup(r, "conditions.load_avg_1min_start") for r in rows]
    loads = [x for x in loads if isinstance(x, (int, float))]
    if loads:
        notes.append(f"1-minute load average when the run started: {max(loads):.2f} on "
                     f"{(rows[0].get('machine') or {}).get('cpu_count', '?')} cores (other "
                     "processes on the machine lower absolute GB/s; ratios are less affected).")
    if any(r.get("verified_against_reference") is False for r in rows):
        notes.append("**Warning: the timed backend did not match the reference bit for bit in this "
                     "run.**")
    return notes


def _path_name(r: dict) -> str:
    p = lookup(r, "config.cpu_path")
    return str(p) if isinstance(p, str) else "the default path"


def _kernels_cpu_by_path(rows: list[dict]) -> str:
    """One row per CPU path: perturb_, K = 8 and K = 64 against add_, the call overhead, targets."""
    paths = []
    for r in rows:
        p = lookup(r, "config.cpu_path")
        if isinstance(p, str) and p not in paths:
            paths.append(p)
    if not paths:
        return column_table([Col("op", "config.label")])(rows)

    def get(path, pred):
        return next((r for r in rows if lookup(r, "config.cpu_path") == path and pred(r)), None)

    def cell(r, figure, spec, with_target=True):
        if r is None:
            return ""
        v = fmt_value(lookup(r, figure), spec)
        if with_target and lookup(r, "figures.meets_target") is not _MISSING:
            v += " " + pass_fail(lookup(r, "figures.meets_target"))
        return v

    headers = ["path", "perturb_ share of add_ GB/s (>= 0.9)", "K=8 x add_",
               "K=64 x add_ (<= 8)", "K=64, CPU time", "us per call, 4 tensors (< 15)",
               "perturb_ bf16 x add_ bf16", "perturb_ fp16 x add_ fp16"]
    cells = []
    for p in paths:
        pert = get(p, lambda r: lookup(r, "config.label") == f"perturb_ [{p}]")
        k8 = get(p, lambda r: lookup(r, "config.label") == f"apply_seeds_ K=8 [{p}]")
        k64 = get(p, lambda r: lookup(r, "config.label") == f"apply_seeds_ K=64 [{p}]")
        ov = get(p, lambda r: lookup(r, "config.label") == f"call overhead [{p}]")
        pbf = get(p, lambda r: lookup(r, "config.label") == f"perturb_ bfloat16 [{p}]")
        pfp = get(p, lambda r: lookup(r, "config.label") == f"perturb_ float16 [{p}]")
        cells.append([p, cell(pert, "figures.bw_fraction_of_add", "{:.2f}"),
                      cell(k8, "figures.ratio_to_add", "{:.2f}", False),
                      cell(k64, "figures.ratio_to_add", "{:.2f}"),
                      cell(k64, "figures.cpu_time_ratio_to_add", "{:.2f}", False),
                      cell(ov, "figures.us_per_call", "{:.1f}"),
                      cell(pbf, "figures.ratio_to_add", "{:.2f}", False),
                      cell(pfp, "figures.ratio_to_add", "{:.2f}", False)])
    torch_add = _find(rows, "torch add_ x4")
    general = next((r for r in rows if "general path" in str(lookup(r, "config.label"))), None)
    parts = [provenance(rows), "", markdown_table(headers, cells), ""]
    n = lookup(rows[0], "config.n")
    size = f"{n / 1e6:g}M-element" if isinstance(n, int) else "same"
    line = ("Ratios: median over interleaved rounds of the op's time over an in-place `add_` on the "
            f"same {size} float32 tensor timed just before it, every path in one process; "
            "`CPU time`: the same "
            "ratio in CPU time of the process, which time slices taken by other processes on a "
            "loaded machine do not inflate. Targets (issue 11) apply to the avx512 and avx2 paths "
            "(on wall time); the portable path has the call-overhead target only. The bf16 and "
            "fp16 columns: `perturb_` on a tensor of that dtype (as many elements) over an `add_` "
            "on the same tensor timed just before it (no target).")
    if torch_add:
        line += f" Four torch `add_` calls on the same small tensors: {torch_add['figures']['us_per_call']:.1f} us"
        if general:
            line += (f"; the general Python path (seeds and coefficients as tensors): "
                     f"{general['figures']['us_per_call']:.1f} us")
        line += "."
    parts.append(line)
    loads = [lookup(r, "conditions.load_avg_1min_start") for r in rows]
    loads = [x for x in loads if isinstance(x, (int, float))]
    if loads:
        cores = (rows[0].get('machine') or {}).get('cpu_count')
        busy = isinstance(cores, int) and max(loads) >= 0.75 * cores
        parts += ["", f"1-minute load average when the run started: {max(loads):.1f} on "
                      f"{cores if cores else '?'} cores" + (
                          ": other processes had most of the machine, so every figure here is "
                          "approximate." if busy else ".")]
    parts += ["", "Every row, with GB/s and K = 1/16, in [benchmarks/README.md](benchmarks/README.md)."]
    return "\n".join(parts)


def _kernels_memory_notes(rows: list[dict]) -> list[str]:
    return ["Extra memory = peak RSS during the op minus RSS just before it, each method in a fresh "
            "process with the tensor already allocated; `x tensor` divides by the tensor's size."]


def _kernels_gpu_notes(rows: list[dict]) -> list[str]:
    return ["`kernel us`: a CUDA graph of the call replayed (device time alone); `call us`: eager "
            "calls between CUDA events; `host us`: time until the call returns; `x copy_`: median "
            "per-round ratio to a `copy_` of the same bytes. Rows on `cpu (launch stubbed)` are the "
            "host-side cost on a CPU with the kernel launch replaced by a no-op, not GPU figures."]


def _optimizer_memory_notes(rows: list[dict]) -> list[str]:
    return ["Peak RSS of each method in a fresh process (same model, same batch); `x inference` "
            "divides by the inference forward's peak. (c) holds one materialized noise tensor of "
            "the largest parameter, (d) gradients and activations."]


#: weights below this many bytes can sit in the caches: there a per-tensor add_ loop is no floor
MEMORY_FLOOR_MIN_BYTES = 64 * 2**20


def _memory_floor(row: dict):
    """The add_ floor of a step-time row, shown only where the float32 weights exceed the caches."""
    n = lookup(row, "config.n_params")
    if not isinstance(n, int) or 4 * n < MEMORY_FLOOR_MIN_BYTES:
        return None
    return lookup(row, "figures.overhead_memory_floor")


def _optimizer_step_notes(rows: list[dict]) -> list[str]:
    out = ["`overhead` = ZOOptimizer.step time / time of the 2S plain forwards it must run, minus 1 "
           "(the cost of the 2S+1 weight passes); each step is paired with the mean of the 2S "
           "forwards timed just before and just after it, and the ratio is the median over "
           "repeats (the VM's drift cancels). `passes alone`: the step's 2S+1 kernel passes "
           "timed without forwards, paired the same way: the floor of an in-place step on that "
           "path. `add_ floor`: one `add_` over the weights, paired the same way, times 2S+1: "
           "for weights larger than the caches (shown above 64 MiB) the floor of any in-place "
           "step on this machine, each of its passes reading and writing every weight; where it "
           "is above the target, no kernel can meet the target on that run (up to the 2-3 points "
           "the paired ratios scatter). For cache-resident weights (convnet) a one-tensor-at-a-time "
           "`add_` loop is no floor, and the column is left empty. "
           "`2S forwards ms` and `ZO step ms` are plain medians."]
    # the memory floor: an in-place step must read and write every weight 2S+1 times; the step's
    # kernel passes timed alone (no forward between them) are what those passes cost here
    for r in rows:
        f, c = r["figures"], r["config"]
        if not isinstance(f.get("kernel_passes_s"), (int, float)) or c.get("model") != "mlp50m":
            continue
        out.append(f"{c['label']}: the step's {2 * c['num_samples'] + 1} kernel passes alone "
                   f"(K = {f['kernel_pass_ks']}) take {1e3 * f['kernel_passes_s']:.1f} ms (median) = "
                   f"{f['kernel_passes_over_add']:.2f}x as many add_ passes over the weights"
                   + (" (within 10% of add_: memory-bound)" if f['kernel_passes_over_add'] <= 1.10
                      else " (more than 10% slower than add_: compute, or this run's noise, on "
                           "top of the memory traffic)")
                   + f"; paired with the forwards timed beside them, {f['overhead_of_passes_alone']:.1%}"
                   " of the 2S forwards: an estimate of the overhead's floor on this path (the "
                   "step's overhead can land a little below it, both being medians of noisy ratios).")
    return out


def _federated_notes(rows: list[dict]) -> list[str]:
    wall = next((lookup(r, "figures.wall_s_all_runs") for r in rows), None)
    out = ["Final test accuracy (%) as mean(std) over seeds; bytes are per participating client "
           "per round (medians), counted from the serialized messages. The ZO downlink is the "
           "client's seeds plus the round's (seed, coefficient) list."]
    if isinstance(wall, (int, float)):
        out.append(f"Wall time of the whole run (every method and seed, one process): {wall:.0f} s.")
    return out


def _comm_notes(rows: list[dict]) -> list[str]:
    out = ["Bytes per client per round, from the serialized messages (embedded: the runner's binary "
           "messages; Flower: the `RecordDict`s serialized as Flower sends them). ZO rounds carry "
           "no arrays. A client that missed rounds gets the seed log replayed or the weights, "
           "whichever is smaller (`chosen`)."]
    for r in rows:
        if lookup(r, "config.kind") == "catch_up_crossover":
            out.append(f"{r['config']['model']}: replaying the log is cheaper than a download for up "
                       f"to {r['figures']['max_missed_rounds_for_replay']:,} missed rounds "
                       f"({r['figures']['per_round_entry_bytes']:,} B per round against "
                       f"{r['figures']['download_bytes']:,} B of weights).")
    return out


def _exact_notes(rows: list[dict]) -> list[str]:
    return ["Peak RSS of one ZO estimate (S = 1) in a fresh process against one inference forward "
            "of the same batch. `exact` makes the perturbed weights inside the forward, Linear "
            "rows and Conv output channels in chunks of at most 4 MiB (stored weights untouched, "
            "bit-exact agreement); `inplace` is ZOOptimizer's +eps/-2eps/+eps (a few ulp of "
            "drift); `snapshot` copies every parameter."]


def _cpu_variants_notes(rows: list[dict]) -> list[str]:
    def isa_of(r):
        v = lookup(r, "config.isa")
        return v if isinstance(v, str) else "avx512"

    def acc_rows(isa: str, grouped: bool):
        return [lookup(r, "figures.ns_per_16_element_seeds") for r in rows
                if lookup(r, "config.part") == "accumulate" and lookup(r, "figures.bit_exact") is True
                and isa_of(r) == isa
                and (lookup(r, "figures.order") == "grouped"
                     or "grouped" in str(lookup(r, "config.variant"))) == grouped]
    out = ["`kernel` rows: the kernel itself (`apply_seeds_` K = 64 on 20M float32, 1 and 2 "
           "threads, after a 0.5 s warm-up), wall time x threads per 16 element-seeds: per thread, "
           "beside the loops' floor below. Every other row: "
           "single thread, data in L1, medians over fresh runs; `bit exact`: the variant's sums equal "
           "the first variant's bit for bit (accumulate, seed order), a scalar implementation of the "
           "grouped order (`grouped4_gfni_permps`, the avx512 kernel's loop; the `avx2_*` rows, the "
           "avx2 kernel's loops and the alternatives tried for them; `piece`: a transpose alone is "
           "checked through the lookup it feeds), or the project's scalar Philox4x32-10 (philox). One 16-lane Philox "
           "serves 128 elements x 16 seeds, i.e. 128 groups of 16 element-seeds. `~cycles` uses a "
           "clock calibrated in the same run (a chain of dependent adds), so it also absorbs the share "
           "of the core other processes took."]
    for isa in ("avx512", "avx2"):
        phx = [lookup(r, "figures.ns_per_16_lanes") for r in rows
               if lookup(r, "config.part") == "philox" and lookup(r, "figures.bit_exact") is True
               and isa_of(r) == isa]
        if not phx:
            continue
        for label, grouped in (("seed order (the old contract)", False), ("grouped order", True)):
            acc = acc_rows(isa, grouped)
            if acc:
                floor = min(acc) + min(phx) / 128
                out.append(f"{isa}: fastest accumulate in {label} + fastest Philox: {floor:.3f} ns "
                           f"per 16 element-seeds per thread = {floor / 16:.4f} ns per element per "
                           "seed per thread, before any memory traffic.")
    port = {lookup(r, "config.variant"): r for r in rows if lookup(r, "config.part") == "portable"}
    if port:
        out.append("`portable` rows: the portable path compiled for the baseline target (SSE2 on "
                   "x86-64), 16 blocks of float32 in L1, one thread, per 16 element-seeds of the "
                   "whole block function (Philox, sums, update of the weights): `spread_shift K=k` "
                   "is the kernel's own code, `bit_test K=k` the same with the earlier sums (a bit "
                   "test, a compare and two logic operations per element and seed); `bit exact`: "
                   "the two gave the same bits. `philox`: the path's Philox alone.")
        for k in portable_ks(port):
            a, b = port.get(f"spread_shift K={k}"), port.get(f"bit_test K={k}")
            na = lookup(a, "figures.ns_per_16_element_seeds") if a else None
            nb = lookup(b, "figures.ns_per_16_element_seeds") if b else None
            if isinstance(na, (int, float)) and isinstance(nb, (int, float)) and na > 0:
                out.append(f"portable K={k}: {na:.3f} ns per 16 element-seeds ({na / 16:.4f} per "
                           f"element-seed), {nb / na:.2f}x faster than the earlier sums.")
    return out


#: results name -> formatter(rows) -> markdown. Register new benchmarks here (see module doc).
FORMATTERS: dict[str, Callable[[list[dict]], str]] = {
    "kernels_cpu": column_table([
        Col("op", "config.label"), Col("path", "config.cpu_path"), Col("n", "config.n"),
        Col("dtype", "config.dtype"), Col("backend", "config.backend"),
        Col("threads", "config.threads"),
        Col("median ms", "figures.median_s", ms), Col("GB/s", "figures.gbps", "{:.1f}"),
        Col("x add_", "figures.ratio_to_add", "{:.2f}"),
        Col("CPU-time x add_", "figures.cpu_time_ratio_to_add", "{:.2f}"),
        Col("ns/elem/seed", "figures.ns_per_elem_per_seed", "{:.4f}"),
        Col("us/call", "figures.us_per_call", "{:.2f}"), TARGET, RESULT],
        notes=_kernels_cpu_notes),
    "kernels_cpu.by_path": _kernels_cpu_by_path,
    "kernels_memory": column_table([
        Col("method", "config.label"), Col("n", "config.n"), Col("dtype", "config.dtype"),
        Col("extra MiB", "figures.extra_mib", "{:.1f}"),
        Col("x tensor", "figures.ratio_to_tensor", "{:.3f}"),
        Col("time s", "figures.seconds", "{:.2f}"), TARGET, RESULT],
        notes=_kernels_memory_notes),
    "kernels_gpu": column_table([
        Col("op", "config.op"), Col("backend", "config.backend"), Col("list", "config.list"),
        Col("dtype", "config.dtype"), Col("device", "config.device"),
        Col("kernel us", "figures.kernel_us", "{:.1f}"), Col("call us", "figures.call_us", "{:.1f}"),
        Col("host us", "figures.host_us", "{:.1f}"), Col("GB/s", "figures.gbps", "{:.0f}"),
        Col("x copy_", "figures.x_copy", "{:.2f}"), Col("status", "figures.status"), TARGET,
        RESULT], notes=_kernels_gpu_notes),
    "optimizer_memory": column_table([
        Col("model", "config.model"), Col("method", "config.label"),
        Col("params", "config.n_params"), Col("peak MiB", "figures.peak_mib", "{:.1f}"),
        Col("x inference", "figures.ratio_to_inference", "{:.3f}"), TARGET, RESULT],
        notes=_optimizer_memory_notes),
    "optimizer_step_time": column_table([
        Col("config", "config.label"), Col("path", "config.cpu_path"),
        Col("2S forwards ms", "figures.forwards_2S_s", ms),
        Col("ZO step ms", "figures.zo_step_s", ms), Col("overhead", "figures.overhead", "{:.1%}"),
        Col("overhead, CPU time", "figures.overhead_cpu_time", "{:.1%}"),
        Col("passes alone", "figures.overhead_of_passes_alone", "{:.1%}"),
        Col("add_ floor", _memory_floor, "{:.1%}"),
        Col("MeZO step ms", "figures.mezo_step_s", ms),
        Col("MeZO / ZO", "figures.mezo_over_zo", "{:.2f}"), TARGET, RESULT],
        notes=_optimizer_step_notes),
    "federated_default": column_table([
        Col("method", "config.label"), Col("setting", "config.setting"),
        Col("mean acc", "figures.mean_acc", "{:.1f}"), Col("std", "figures.std_acc", "{:.1f}"),
        Col("seeds", "figures.n_seeds"),
        Col("gain vs High Res Only", "figures.gain_vs_high_res_only", "{:+.1f}"),
        Col("warm-up up/down B", "figures.warmup_up_B", "{:.0f}"),
        Col("ZO up B", "figures.zo_up_B", "{:.0f}"), Col("ZO down B", "figures.zo_down_B", "{:.0f}"),
        TARGET, RESULT],
        notes=_federated_notes),
    "communication": column_table([
        Col("model", "config.model"), Col("round", "config.kind"),
        Col("transport", "config.transport"), Col("missed rounds", "config.missed_rounds"),
        Col("down B", "figures.bytes_down", "{:,}"), Col("up B", "figures.bytes_up", "{:,}"),
        Col("chosen", "figures.chosen")],
        notes=_comm_notes,
        skip=lambda r: (lookup(r, "config.kind") == "catch_up_crossover"
                        or (lookup(r, "config.kind") == "catch_up"
                            and lookup(r, "config.missed_rounds") not in (1, 10, 100)))),
    "cpu_variants": column_table([
        Col("part", "config.part"), Col("isa", "config.isa"), Col("variant", "config.variant"),
        Col("ns / 16 element-seeds", "figures.ns_per_16_element_seeds", "{:.3f}"),
        Col("ns / 16-lane Philox", "figures.ns_per_16_lanes", "{:.1f}"),
        Col("~cycles / 16 element-seeds", "figures.cycles_per_16_element_seeds", "{:.2f}"),
        Col("bit exact", "figures.bit_exact")],
        notes=_cpu_variants_notes),
    "exact_memory": column_table([
        Col("model", "config.model"), Col("params", "config.n_params"),
        Col("method", "config.label"), Col("peak MiB", "figures.peak_mib", "{:.1f}"),
        Col("extra MiB", "figures.extra_over_inference_mib", "{:.1f}"),
        Col("x inference", "figures.ratio_to_inference", "{:.3f}")],
        notes=_exact_notes),
}


# -- issue 13: OPT-125m-shaped transformer (bench_transformer.py) and the LM example ----------------
def _transformer_formatters() -> dict:
    """Tables of ``transformer_memory``, ``transformer_step_time``, ``transformer_drift`` (CPU; the
    ``*_gpu`` names are a lent GPU's run of the same script) and ``lm_zo_continue``."""
    def mem_notes(rows):
        return ["One step of each method against one inference forward of the same model and batch "
                "(8 x 128 tokens, `labels=input_ids`: the loss and its logits included). CPU: peak "
                "RSS in a fresh process per method (`peak MiB`), and the peak of the weights plus "
                "every tensor an op created that is alive at once (`tensors`, "
                "`zowarmup.memory.measure_peak`: no allocator or runtime noise); GPU: "
                "`torch.cuda.max_memory_allocated`. "
                "`exact` makes the perturbed weights inside the forward, in chunks of at most 4 "
                "MiB (Linear/Embedding rows), never writing the stored ones."]

    def time_notes(rows):
        return ["Medians over interleaved repeats. `overhead` = step time / time of the 2S plain "
                "forwards it must run, minus 1; `MeZO overhead` the same for the MeZO-style step "
                "(per-parameter `torch.normal`, 4 passes per sample). `overhead per round`: each "
                "round's step over the forwards of the same round; a target is judged only when "
                "the rounds agree within it."]

    def drift_notes(rows):
        return ["bfloat16 weights after 100 `ZOOptimizer.estimate` calls and no update: in place "
                "(+eps, -2eps, +eps) the weights walk away; exact mode never writes them."]

    def lm_notes(rows):
        return ["Validation perplexity (bytes) as mean(std) over seeds; the plot is "
                "`examples/results/lm_zo_continue.png`, every curve in "
                "`examples/results/lm_zo_continue.json`."]

    mem = column_table([
        Col("dtype", "config.dtype"), Col("method", "config.label"),
        Col("params", "config.n_params"), Col("peak MiB", "figures.peak_mib", "{:.1f}"),
        Col("x inference", "figures.ratio_to_inference", "{:.3f}"),
        Col("tensors MiB", "figures.tensor_peak_mib", "{:.1f}"),
        Col("tensors x inference", "figures.tensor_ratio_to_inference", "{:.3f}"),
        TARGET, RESULT],
        notes=mem_notes)
    step = column_table([
        Col("dtype", "config.dtype"), Col("step", "config.label"), Col("S", "config.num_samples"),
        Col("2S forwards ms", "figures.forwards_2S_s", ms), Col("step ms", "figures.step_s", ms),
        Col("overhead", "figures.overhead", "{:.1%}"),
        Col("overhead per round", "figures.overhead_per_round",
            lambda v: ", ".join(f"{x:+.1%}" for x in v) if isinstance(v, list) else ""),
        Col("MeZO step ms", "figures.mezo_step_s", ms),
        Col("MeZO overhead", "figures.mezo_overhead", "{:.1%}"), TARGET, RESULT],
        notes=time_notes)
    drift = column_table([
        Col("mode", "config.label"), Col("calls", "config.calls"), Col("batch", "config.batch"),
        Col("max abs drift", "figures.max_abs_drift", "{:.3g}"),
        Col("weights moved", "figures.moved_fraction", "{:.2%}"), TARGET, RESULT],
        notes=drift_notes)
    lm = column_table([
        Col("continuation", "config.label"), Col("steps after pivot", "config.steps"),
        Col("ppl at pivot", "figures.pivot_ppl"), Col("final ppl", "figures.final_ppl"),
        Col("seeds", "figures.n_seeds")], notes=lm_notes)
    return {"transformer_memory": mem, "transformer_memory_gpu": mem,
            "transformer_step_time": step, "transformer_step_time_gpu": step,
            "transformer_drift": drift, "transformer_drift_gpu": drift, "lm_zo_continue": lm}


FORMATTERS.update(_transformer_formatters())
RUN_HINTS.update({"transformer_memory": "python benchmarks/bench_transformer.py --parts memory",
                  "transformer_step_time": "python benchmarks/bench_transformer.py --parts time",
                  "transformer_drift": "python benchmarks/bench_transformer.py --parts drift",
                  "lm_zo_continue": "python examples/lm_zo_continue.py"})

#: Row keys that are bookkeeping, not figures, in the generic table.
_META_KEYS = {"benchmark", "date", "machine", "command"}


def generic_table(rows: list[dict]) -> str:
    """Fallback formatter: config columns, then every scalar figure (lists and dicts left out).

    Rows shaped ``{"config": {...}, "figures": {...}}`` give ``config.*`` then ``figures.*``
    columns; flat rows give one column per scalar top-level key. Columns appear in first-seen order.
    """
    paths: list[str] = []

    def add(path):
        if path not in paths:
            paths.append(path)
    for r in rows:
        for sect in ("config", "figures"):
            for k, v in (r.get(sect) or {}).items():
                if k == "target" and isinstance(v, dict):
                    add(f"{sect}.target")
                elif not isinstance(v, (list, dict)):
                    add(f"{sect}.{k}")
        for k, v in r.items():
            if k not in _META_KEYS and k not in ("config", "figures") and not isinstance(v, (list, dict)):
                add(k)
    # target and pass/fail go last, as in the registered tables
    for p in ("figures.target", "figures.meets_target"):
        if p in paths:
            paths.remove(p)
            paths.append(p)
    cols = []
    for p in paths:
        if p == "figures.target":
            cols.append(TARGET)
        elif p == "figures.meets_target":
            cols.append(RESULT)
        else:
            cols.append(Col(p.split(".", 1)[-1], p))
    return column_table(cols)(rows)


def render(name: str, results_dir: Path) -> str:
    """The markdown for results ``name``: its formatter's table, or a placeholder if no file.

    ``NAME.VIEW`` (e.g. ``kernels_cpu.by_path``) renders ``results/NAME.json`` with the formatter
    registered as ``NAME.VIEW``: another view of the same rows.
    """
    file_name = name.split(".", 1)[0]
    path = results_dir / f"{file_name}.json"
    if not path.exists():
        hint = RUN_HINTS.get(file_name)
        return (f"_No results yet: `{path.name}` is missing"
                + (f"; run `{hint}`._" if hint else "._"))
    rows = json.loads(path.read_text())
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
    if not rows:
        return f"_`{path.name}` holds no rows._"
    return FORMATTERS.get(name, generic_table)(rows)


def rewrite(text: str, results_dir: Path, where: str = "README") -> tuple[str, list[str]]:
    """``text`` with every marked region regenerated; also the names of the regions found.

    Raises ValueError for a start marker without its end marker, a stray end marker, or a nested
    start marker, naming the line.
    """
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    names: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        m_end = END_RE.match(line)
        if m_end:
            raise ValueError(f"{where}:{i + 1}: end marker for {m_end.group(1)!r} without a start")
        m = START_RE.match(line)
        if not m:
            out.append(line)
            i += 1
            continue
        name = m.group(1)
        j = i + 1
        while j < len(lines):
            if START_RE.match(lines[j]):
                raise ValueError(f"{where}:{j + 1}: table marker inside the region of {name!r} "
                                 f"(opened on line {i + 1})")
            m2 = END_RE.match(lines[j])
            if m2:
                if m2.group(1) != name:
                    raise ValueError(f"{where}:{j + 1}: end marker {m2.group(1)!r} closes "
                                     f"{name!r} (opened on line {i + 1})")
                break
            j += 1
        else:
            raise ValueError(f"{where}:{i + 1}: table {name!r} has no end marker "
                             f"'<!-- /table:{name} -->'")
        nl = "\r\n" if line.endswith("\r\n") else "\n"
        body = render(name, results_dir).replace("\n", nl)
        # The start line has a line ending (a line follows it); the end line is kept as it is.
        out += [line, nl, body + nl, nl, lines[j]]
        names.append(name)
        i = j + 1
    return "".join(out), names


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--readme", action="append", type=Path, default=None,
                    help="file to update (repeatable; default: README.md and benchmarks/README.md, "
                         "those that exist)")
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS,
                    help=f"folder of results JSON (default {DEFAULT_RESULTS})")
    ap.add_argument("--check", action="store_true",
                    help="change nothing; exit 1 if any table differs from what the results give")
    ap.add_argument("--print", dest="print_name", metavar="NAME",
                    help="print the table for results NAME and exit")
    args = ap.parse_args(argv)

    if args.print_name:
        print(render(args.print_name, args.results))
        return 0
    readmes = args.readme or [p for p in DEFAULT_READMES if p.exists()]
    if args.readme:
        missing = [str(p) for p in args.readme if not p.exists()]
        if missing:
            print(f"make_tables: no such file: {', '.join(missing)}", file=sys.stderr)
            return 2
    if not args.results.is_dir():
        print(f"make_tables: note: results folder {args.results} does not exist; every table will "
              "say so", file=sys.stderr)
    stale, seen = [], set()
    for path in readmes:
        old = path.read_bytes().decode("utf-8")  # bytes: keep CRLF/LF exactly as they are
        try:
            new, names = rewrite(old, args.results, str(path))
        except (ValueError, json.JSONDecodeError) as exc:
            print(f"make_tables: {exc}", file=sys.stderr)
            return 2
        seen.update(names)
        if new == old:
            print(f"{path}: {len(names)} table(s) up to date")
            continue
        if args.check:
            stale.append(str(path))
            diff = difflib.unified_diff(old.splitlines(), new.splitlines(), str(path),
                                        f"{path} (regenerated)", lineterm="", n=1)
            print("\n".join(list(diff)[:60]))
        else:
            path.write_bytes(new.encode("utf-8"))
            print(f"{path}: rewrote {len(names)} table(s): {', '.join(names)}")
    unused = sorted(p.stem for p in args.results.glob("*.json")) if args.results.is_dir() else []
    unused = [u for u in unused if u not in seen]
    if unused:
        print(f"results without a marked table in {', '.join(map(str, readmes)) or 'any README'}: "
              f"{', '.join(unused)} (add <!-- table:NAME --> ... <!-- /table:NAME --> to show them)")
    if stale:
        print(f"make_tables --check: stale tables in {', '.join(stale)}; run "
              "`python benchmarks/make_tables.py`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

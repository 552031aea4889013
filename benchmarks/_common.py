"""Shared helpers for benchmarks: timing, peak RSS in fresh subprocesses, and JSON result rows.

Every benchmark appends rows to ``benchmarks/results/<name>.json`` (a JSON list). Each row carries
the machine, the versions, the date, the config and the figures, so README tables can be generated
from the files alone (``benchmarks/make_tables.py``).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    """CPU model, core count, memory, OS, and the versions of python/torch/triton/zo_kernels."""
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["mem_total_kb"] = int(f.readline().split()[1])
    except OSError:
        pass
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # pragma: no cover
        pass
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    try:
        import zo_kernels
        info["zo_kernels"] = zo_kernels.__version__
        ext = zo_kernels._backends.cpu_extension()
        info["cpu_isa"] = ext.cpu_isa() if ext is not None and hasattr(ext, "cpu_isa") else None
    except Exception:
        pass
    return info


def median_time(fn, repeats: int = 7, warmup: int = 1, sync=None) -> tuple[float, list[float]]:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs (after ``warmup`` runs)."""
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def write_rows(name: str, rows: list[dict], replace: bool = True) -> Path:
    """Write ``rows`` (each gets ``machine``, ``date`` and ``benchmark``) to results/<name>.json.

    ``replace=True`` overwrites the file, so it always holds the latest complete run.
    """
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    mach = machine_info()
    full = [{"benchmark": name, "date": stamp, "machine": mach, **r} for r in rows]
    if not replace and path.exists():
        full = json.loads(path.read_text()) + full
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(full, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path


def read_rows(name: str) -> list[dict]:
    """Rows of results/<name>.json, or [] if it does not exist."""
    path = RESULTS_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else []


def peak_rss_subprocess(code: str, env: dict | None = None, timeout: float = 600) -> dict:
    """Run ``code`` in a fresh Python; it must print one JSON line. Returns that dict.

    Helper for memory measurements: the child should measure its own baseline RSS after imports and
    setup (``rss_now_kb()``), do the work, and report ``ru_maxrss`` deltas.
    """
    e = dict(os.environ)
    if env:
        e.update(env)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e,
                         timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# Snippet for children: current and peak RSS in kB (Linux).
RSS_SNIPPET = '''
import resource
def rss_now_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
def rss_peak_kb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
def reset_peak():
    # Linux >= 4.0: writing 5 to clear_refs resets the peak RSS (VmHWM) of this process.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
def hwm_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
'''


def portable_ks(variants) -> list[int]:
    """The K of the portable rows of ``bench_cpu_variants`` (variants ``spread_shift K=k``),
    ascending: the set ``cpu_variants/portable.cpp`` times, read from the rows themselves."""
    import re
    return sorted(int(m.group(1)) for v in variants
                  if (m := re.fullmatch(r"spread_shift K=(\d+)", str(v))))

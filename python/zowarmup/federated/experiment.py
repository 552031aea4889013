"""Experiments (a method and its baselines over several seeds) and the comparison table.

``run_experiment`` creates ``<out>/<name>-<timestamp>/`` holding ``experiment.json`` (the config and
the list of runs), one folder per (method, seed) run (see :mod:`.loop`), and, once all runs are done,
``comparison.txt`` / ``comparison.json`` (the table :func:`compare` prints) and ``accuracy.png``
(mean accuracy per method against rounds, pivot marked).

:func:`compare` reads any run folders (or experiment folders, expanded to their runs) and builds a
table like the paper's Table 2: one row per method, one column per setting (dataset, model,
Dirichlet alpha, hi/lo split), cells ``mean(std)`` of the final test accuracy in percent over the
seeds found (std: sample standard deviation, ddof = 1; 0.0 for a single seed), plus the
communication per client per round in each phase.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Callable

from .._safeio import UnsafeFileError, read_json_object
from . import accounting
from .checkpoint import read_summary
from .checkpoint import atomic_write_text
from .config import METHOD_LABELS, RunConfig, from_dict, validate
from .loop import CONFIG, SUMMARY, Runner, read_metrics, resume_run

EXPERIMENT = "experiment.json"
COMPARISON_TXT = "comparison.txt"
COMPARISON_JSON = "comparison.json"
PLOT = "accuracy.png"


def _new_dir(out: Path, name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    d = out / f"{name}-{stamp}"
    k = 1
    while d.exists():
        d = out / f"{name}-{stamp}-{k}"
        k += 1
    d.mkdir(parents=True)
    return d


def plan_runs(cfg: RunConfig) -> list[tuple[str, int, str]]:
    """(method, seed, folder name) of every run of the experiment, in execution order."""
    out = []
    for s in range(cfg.seed, cfg.seed + cfg.num_seeds):
        for m in [cfg.method] + list(cfg.baselines):
            out.append((m, s, f"{m}-seed{s}"))
    return out


def run_experiment(cfg: RunConfig, out: str | Path = "runs", exp_dir: str | Path | None = None,
                   dataset=None, progress: bool | None = None,
                   echo: Callable[[str], None] | None = print) -> Path:
    """Train ``cfg.method`` and ``cfg.baselines`` for ``cfg.num_seeds`` seeds, then compare.

    Args:
        cfg: validated experiment config.
        out: parent folder of the experiment folder.
        exp_dir: use this folder instead of a new timestamped one (it must not hold another
            experiment).
        dataset: a preloaded dataset shared by all runs (loaded once here when None).
        progress: override ``cfg.progress``.
        echo: where to print progress lines and the final table (None: silent).

    Returns:
        The experiment folder.
    """
    cfg = validate(cfg)
    if dataset is None:  # bad data is refused before any folder is made
        from .. import data as zdata
        dataset = zdata.load_dataset(cfg.data.name, cfg.data.root)
    if exp_dir is None:
        exp_dir = _new_dir(Path(out), cfg.name)
    exp_dir = Path(exp_dir)
    exp_dir.mkdir(parents=True, exist_ok=True)
    runs = plan_runs(cfg)
    meta = {"config": cfg.to_dict(), "runs": [r[2] for r in runs]}
    p = exp_dir / EXPERIMENT
    if p.exists() and json.loads(p.read_text()) != meta:
        raise ValueError(f"{exp_dir} already holds a different experiment")
    atomic_write_text(p, json.dumps(meta, indent=2) + "\n")
    return _run_all(exp_dir, cfg, runs, dataset, progress, echo)


def _run_all(exp_dir: Path, cfg: RunConfig, runs, dataset, progress, echo) -> Path:
    if dataset is None:
        from .. import data as zdata
        dataset = zdata.load_dataset(cfg.data.name, cfg.data.root)
    t0 = time.perf_counter()
    if echo:
        methods = list(dict.fromkeys(METHOD_LABELS[m] for m, _, _ in runs))
        seeds = sorted({s for _, s, _ in runs})
        echo(f"{' vs '.join(methods)} on {cfg.data.name} ({cfg.data.num_clients} clients, "
             f"Dirichlet alpha {cfg.data.alpha:g}, hi/lo {round(100 * cfg.data.hi_fraction)}/"
             f"{100 - round(100 * cfg.data.hi_fraction)}, {cfg.rounds} rounds, pivot "
             f"{cfg.for_run(cfg.method, cfg.seed).pivot}), seeds {seeds} -> {exp_dir}")
    for method, seed, name in runs:
        rd = exp_dir / name
        if read_summary(rd / SUMMARY) is not None:  # finished (an unreadable summary is rebuilt)
            continue
        t1 = time.perf_counter()
        if (rd / CONFIG).exists():
            summary = resume_run(rd, progress=progress, dataset=dataset)
        else:
            summary = Runner(cfg.for_run(method, seed), rd, dataset=dataset, progress=progress).run()
        if echo:
            acc = summary["final_accuracy"]
            echo(f"{METHOD_LABELS[method]:<28} seed {seed}: final accuracy "
                 f"{100 * acc:.1f}%  ({time.perf_counter() - t1:.0f} s)  -> {rd}")
    table = compare([exp_dir / r[2] for r in runs])
    text = format_table(table)
    atomic_write_text(exp_dir / COMPARISON_TXT, text)
    atomic_write_text(exp_dir / COMPARISON_JSON, json.dumps(table, indent=2) + "\n")
    try:
        from .plotting import plot_experiment
        curves: dict = {}
        for method, seed, name in runs:
            curves.setdefault(METHOD_LABELS[method], []).append(read_metrics(exp_dir / name))
        plot_experiment(curves, exp_dir / PLOT, cfg.for_run(cfg.method, cfg.seed).pivot,
                        f"{cfg.data.name}: {cfg.data.num_clients} clients, alpha={cfg.data.alpha}, "
                        f"hi/lo {round(100 * cfg.data.hi_fraction)}/"
                        f"{100 - round(100 * cfg.data.hi_fraction)}")
    except Exception as e:  # pragma: no cover - plotting must not lose results
        if echo:
            echo(f"(could not write the plot: {e})")
    if echo:
        echo("")
        echo(text)
        echo(f"experiment folder: {exp_dir}  (total {time.perf_counter() - t0:.0f} s this process)")
    return exp_dir


def resume_experiment(exp_dir: str | Path, progress: bool | None = None, dataset=None,
                      echo: Callable[[str], None] | None = print) -> Path:
    """Finish an experiment folder: resume unfinished runs, run missing ones, then compare."""
    exp_dir = Path(exp_dir)
    p = exp_dir / EXPERIMENT
    if not p.exists():
        raise FileNotFoundError(f"{exp_dir} is not an experiment folder (no {EXPERIMENT})")
    meta = read_json_object(p, ("config",), "experiment file")
    cfg = validate(from_dict(meta["config"]))
    return _run_all(exp_dir, cfg, plan_runs(cfg), dataset, progress, echo)


# ------------------------------------------------------------------------------------------------
# comparison
# ------------------------------------------------------------------------------------------------
def expand_run_dirs(paths) -> list[Path]:
    """Run folders from a mix of run folders and experiment folders (their runs, in order).

    Raises FileNotFoundError naming a path that is neither.
    """
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / EXPERIMENT).exists():
            meta = read_json_object(p / EXPERIMENT, ("runs",), "experiment file")
            if not isinstance(meta["runs"], list) or not all(
                    isinstance(r, str) and r and "/" not in r and r not in (".", "..")
                    for r in meta["runs"]):
                raise UnsafeFileError(f"{p / EXPERIMENT}: 'runs' must be a list of run folder "
                                      "names")
            out.extend(p / r for r in meta["runs"])
        elif (p / CONFIG).exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p} is neither a run folder (with {CONFIG}) nor an "
                                    f"experiment folder (with {EXPERIMENT})")
    return out


def _setting(cfg: dict) -> str:
    d = cfg["data"]
    hi = round(100 * d["hi_fraction"])
    return f"{d['name']}/{cfg['model']['name']} a={d['alpha']:g} {hi}/{100 - hi}"


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = statistics.fmean(xs)
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return m, s


def _read_finished_run(rd: Path) -> tuple[dict, dict]:
    """(config, summary) of a finished run folder, checked for what :func:`compare` uses;
    :class:`~zowarmup._safeio.UnsafeFileError` naming the file and the problem otherwise."""
    cfg = read_json_object(rd / CONFIG, ("method", "seed", "data.name", "data.alpha",
                                         "data.hi_fraction", "model.name"), "run config")
    d = cfg["data"]
    if not isinstance(cfg["method"], str) or not isinstance(d["name"], str) \
            or not isinstance(cfg["model"]["name"], str):
        raise UnsafeFileError(f"{rd / CONFIG}: 'method', 'data.name' and 'model.name' must be "
                              "strings")
    for k in ("alpha", "hi_fraction"):
        if isinstance(d[k], bool) or not isinstance(d[k], (int, float)):
            raise UnsafeFileError(f"{rd / CONFIG}: 'data.{k}' must be a number, got {d[k]!r:.40}")
    summ = read_json_object(rd / SUMMARY, ("final_accuracy", "communication"), "run summary")
    acc = summ["final_accuracy"]
    if acc is not None and (isinstance(acc, bool) or not isinstance(acc, (int, float))
                            or not 0 <= acc <= 1):
        raise UnsafeFileError(f"{rd / SUMMARY}: 'final_accuracy' must be null or a number in "
                              f"[0, 1], got {acc!r:.40}")
    comm = summ["communication"]
    keys = ("bytes_up_per_client_median", "bytes_down_per_client_median")
    if not isinstance(comm, dict) or not all(
            isinstance(v, dict) and all(isinstance(v.get(k), (int, float))
                                        and not isinstance(v.get(k), bool) for k in keys)
            for v in comm.values()):
        raise UnsafeFileError(f"{rd / SUMMARY}: 'communication' must map each phase to "
                              f"{' and '.join(keys)}")
    return cfg, summ


def compare(paths) -> dict:
    """Collect finished runs and tabulate final accuracy mean(std) per method and setting.

    Returns a dict with ``settings`` (column labels), ``rows`` (per method label: per setting
    ``{"mean", "std", "n", "seeds", "accuracies"}`` in percent), ``communication`` (per method:
    per phase median bytes per participating client per round, up and down), ``unfinished``
    (run folders without a summary) and ``gains`` (ZOWarmUp-family minus High Res Only per setting).
    """
    runs = expand_run_dirs(paths)
    cells: dict = {}
    comm: dict = {}
    settings: list[str] = []
    order: list[str] = []
    unfinished = []
    for rd in runs:
        if not (rd / SUMMARY).exists():
            unfinished.append(str(rd))
            continue
        cfg, summ = _read_finished_run(rd)
        label = METHOD_LABELS.get(cfg["method"], cfg["method"])
        st = _setting(cfg)
        if st not in settings:
            settings.append(st)
        if label not in order:
            order.append(label)
        if summ["final_accuracy"] is None:
            continue
        cell = cells.setdefault(label, {}).setdefault(st, {"accuracies": [], "seeds": []})
        cell["accuracies"].append(100 * summ["final_accuracy"])
        cell["seeds"].append(cfg["seed"])
        c = comm.setdefault(label, {})
        for phase, v in summ["communication"].items():
            c.setdefault(phase, {"up": [], "down": []})
            c[phase]["up"].append(v["bytes_up_per_client_median"])
            c[phase]["down"].append(v["bytes_down_per_client_median"])
    rows = {}
    for label in order:
        rows[label] = {}
        for st, cell in cells.get(label, {}).items():
            m, s = _mean_std(cell["accuracies"])
            rows[label][st] = {"mean": m, "std": s, "n": len(cell["accuracies"]), **cell}
    communication = {label: {ph: {"up": statistics.median(v["up"]), "down": statistics.median(v["down"])}
                             for ph, v in phases.items()} for label, phases in comm.items()}
    gains = {}
    base = rows.get(METHOD_LABELS["high_res_only"], {})
    for label, r in rows.items():
        if label == METHOD_LABELS["high_res_only"]:
            continue
        for st, cell in r.items():
            if st in base:
                gains.setdefault(label, {})[st] = cell["mean"] - base[st]["mean"]
    return {"metric": "final test accuracy (%)", "settings": settings, "rows": rows,
            "communication": communication, "gains_vs_high_res_only": gains,
            "unfinished": unfinished}


def format_table(table: dict) -> str:
    """Plain-text rendering of :func:`compare`'s result (mean(std) [n] per cell)."""
    settings = table["settings"]
    rows = table["rows"]
    w0 = max([len("method")] + [len(k) for k in rows]) + 2
    cols = [max(len(s), 16) + 2 for s in settings]
    lines = [f"{table['metric']}, mean(std) over seeds [n]"]
    lines.append("method".ljust(w0) + "".join(s.ljust(w) for s, w in zip(settings, cols)))
    lines.append("-" * (w0 + sum(cols)))
    for label, r in rows.items():
        cells = []
        for s, w in zip(settings, cols):
            c = r.get(s)
            cells.append((f"{c['mean']:.1f}({c['std']:.1f}) [{c['n']}]" if c else "-").ljust(w))
        lines.append(label.ljust(w0) + "".join(cells))
    for label, g in table["gains_vs_high_res_only"].items():
        lines.append(f"{label} - High Res Only: " + ", ".join(f"{s}: {v:+.1f} points"
                                                               for s, v in g.items()))
    if table["communication"]:
        lines.append("")
        lines.append("communication per participating client per round (median; up / down):")
        for label, phases in table["communication"].items():
            parts = [f"{ph}: {accounting.human_bytes(v['up'])} / {accounting.human_bytes(v['down'])}"
                     for ph, v in phases.items()]
            lines.append(f"  {label}: " + "; ".join(parts))
    if table["unfinished"]:
        lines.append("")
        lines.append("unfinished runs (no summary.json): " + ", ".join(table["unfinished"]))
    return "\n".join(lines) + "\n"

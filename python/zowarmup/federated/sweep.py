"""``zowarmup sweep``: a grid over any config keys, each point over several seeds, selected on a
validation split carved from the training data (never the test split).

::

    zowarmup sweep -c configs/digits.toml zo.lr=[0.05,0.1,0.2] zo.num_seeds=[10,20] \\
        --set rounds=60 --validation 0.2 --out sweeps
    zowarmup sweep --resume sweeps/digits-sweep-<stamp>

Every grid point is an ordinary experiment folder (``point-<k>/``, :func:`.experiment.run_experiment`)
run with ``data.validation = --validation``: that fraction of every class of the training data is
held out as the evaluation set and no client holds it (:func:`.federation.validation_dataset`). The
score of a point is the mean over seeds of the selected method's final validation accuracy (ties:
the earlier point). The sweep folder holds ``sweep.json`` (base config, grid, points),
``sweep.txt`` / ``results.json`` (the mean(std) table) and ``best.json``: the base config with the
chosen point's values and ``data.validation = 0``, which ``zowarmup run -c best.json`` takes.
Interrupted sweeps resume: finished runs are kept, unfinished ones continue from their checkpoints.
"""
from __future__ import annotations

import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Callable

from .checkpoint import atomic_write_text
from .config import ConfigError, RunConfig, apply_overrides, from_dict, validate
from .experiment import EXPERIMENT, plan_runs, run_experiment
from .loop import SUMMARY

SWEEP = "sweep.json"
RESULTS = "results.json"
TABLE = "sweep.txt"
BEST = "best.json"

__all__ = ["parse_grid", "grid_points", "run_sweep", "resume_sweep", "sweep_table"]


def _toml_text(v) -> str:
    return json.dumps(v)  # a JSON scalar/list literal is valid TOML for the values a grid holds


def parse_grid(items: list[str]) -> dict[str, list]:
    """``key=[v1, v2, ...]`` strings -> {key: [values]} (TOML/JSON list literals; a list-valued key
    takes a list of lists). A bare value is an axis of one point."""
    from .config import _parse_value
    grid: dict[str, list] = {}
    for it in items:
        if "=" not in it:
            raise ConfigError(f"grid axis {it!r} is not of the form key=[v1, v2, ...]")
        k, text = it.split("=", 1)
        v = _parse_value(text)
        vals = v if isinstance(v, list) else [v]
        if not vals:
            raise ConfigError(f"grid axis {k!r} has no values")
        grid[k.strip()] = vals
    return grid


def grid_points(grid: dict[str, list]) -> list[dict]:
    """Every combination of the axes, the last axis varying fastest."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def _point_config(base: RunConfig, point: dict, validation: float) -> RunConfig:
    cfg = apply_overrides(base, [f"{k}={_toml_text(v)}" for k, v in point.items()])
    cfg.data.validation = float(validation)
    cfg.name = "point"
    return validate(cfg)


def run_sweep(base: RunConfig, grid: dict[str, list], out: str | Path = "sweeps",
              validation: float = 0.2, sweep_dir: str | Path | None = None,
              progress: bool = True, echo: Callable[[str], None] | None = print,
              jobs: int = 1) -> Path:
    """Run every grid point of ``grid`` on top of ``base`` (its ``method``, ``baselines`` and
    ``num_seeds``) with ``data.validation = validation``; write the table and ``best.json``.
    ``jobs`` > 1 trains that many runs at once in worker processes (same results).

    Returns the sweep folder."""
    base = validate(base)
    if not 0.0 < validation < 1.0:
        raise ConfigError(f"invalid value {validation!r} for '--validation'; allowed range: (0, 1)")
    points = grid_points(grid)
    cfgs = [_point_config(base, p, validation) for p in points]  # validates every point first
    if sweep_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        sweep_dir = Path(out) / f"{base.name}-{base.method}-sweep-{stamp}"
        k = 1
        while sweep_dir.exists():
            sweep_dir = Path(out) / f"{base.name}-{base.method}-sweep-{stamp}-{k}"
            k += 1
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    meta = {"base": base.to_dict(), "grid": grid, "validation": validation,
            "points": [f"point-{i}" for i in range(len(points))]}
    p = sweep_dir / SWEEP
    if p.exists() and json.loads(p.read_text()) != json.loads(json.dumps(meta)):
        raise ValueError(f"{sweep_dir} already holds a different sweep")
    atomic_write_text(p, json.dumps(meta, indent=2) + "\n")
    total = sum(len(plan_runs(c)) for c in cfgs)
    done = sum((sweep_dir / f"point-{i}" / r[2] / SUMMARY).exists()
               for i, c in enumerate(cfgs) for r in plan_runs(c))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=done, desc="sweep", unit="run", mininterval=10)
    if echo:
        echo(f"sweep: {len(points)} points x {base.num_seeds} seeds x "
             f"{1 + len(base.baselines)} methods = {total} runs ({done} done), evaluated on "
             f"{100 * validation:g}% of the training data -> {sweep_dir}")
    if jobs > 1:
        from .parallel import run_jobs
        todo = [(cfg.for_run(m, s), sweep_dir / f"point-{i}" / name)
                for i, cfg in enumerate(cfgs) for m, s, name in plan_runs(cfg)]
        run_jobs(todo, jobs, done=lambda rd, s: bar.update(1) if bar is not None else None)
    dataset = None
    for i, cfg in enumerate(cfgs):
        ed = sweep_dir / f"point-{i}"
        if all((ed / r[2] / SUMMARY).exists() for r in plan_runs(cfg)) and (ed / EXPERIMENT).exists():
            continue
        if dataset is None:
            from .. import data as zdata
            dataset = zdata.load_dataset(cfg.data.name, cfg.data.root)
        run_experiment(cfg, exp_dir=ed, dataset=dataset, progress=False,
                       echo=_counting(bar, echo))
    if bar is not None:
        bar.close()
    table = sweep_table(sweep_dir)
    text = format_sweep(table)
    atomic_write_text(sweep_dir / RESULTS, json.dumps(table, indent=2) + "\n")
    atomic_write_text(sweep_dir / TABLE, text)
    best = json.loads(json.dumps(meta["base"]))
    best_cfg = apply_overrides(from_dict(best), [f"{k}={_toml_text(v)}"
                                                 for k, v in table["best"]["point"].items()])
    best_cfg.data.validation = 0.0
    atomic_write_text(sweep_dir / BEST, json.dumps(validate(best_cfg).to_dict(), indent=2) + "\n")
    if echo:
        echo(text)
        echo(f"chosen point written to {sweep_dir / BEST} (zowarmup run -c {sweep_dir / BEST})")
    return sweep_dir


def _counting(bar, echo):
    """An echo for run_experiment that advances the bar once per finished run."""
    def f(line: str):
        if bar is not None and "final accuracy" in line:
            bar.update(1)
    return f


def resume_sweep(sweep_dir: str | Path, progress: bool = True,
                 echo: Callable[[str], None] | None = print, jobs: int = 1) -> Path:
    """Finish an interrupted sweep folder with its saved base config and grid."""
    sweep_dir = Path(sweep_dir)
    p = sweep_dir / SWEEP
    if not p.exists():
        raise FileNotFoundError(f"{sweep_dir} is not a sweep folder (no {SWEEP})")
    meta = json.loads(p.read_text())
    return run_sweep(from_dict(meta["base"]), meta["grid"], validation=meta["validation"],
                     sweep_dir=sweep_dir, progress=progress, echo=echo, jobs=jobs)


def sweep_table(sweep_dir: str | Path) -> dict:
    """Per point: its values and, per method, final validation accuracy mean(std) over seeds in
    percent; ``best``: the point with the highest mean for the base config's ``method``."""
    sweep_dir = Path(sweep_dir)
    meta = json.loads((sweep_dir / SWEEP).read_text())
    method = meta["base"]["method"]
    points = grid_points(meta["grid"])
    rows = []
    for i, point in enumerate(points):
        ed = sweep_dir / f"point-{i}"
        accs: dict[str, list] = {}
        if (ed / EXPERIMENT).exists():
            for name in json.loads((ed / EXPERIMENT).read_text())["runs"]:
                sp = ed / name / SUMMARY
                if sp.exists():
                    s = json.loads(sp.read_text())
                    if s["final_accuracy"] is not None:
                        accs.setdefault(s["method"], []).append(100 * s["final_accuracy"])
        cells = {m: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                     "n": len(v)} for m, v in accs.items()}
        rows.append({"point": point, "results": cells})
    scored = [(r["results"][method]["mean"], -i) for i, r in enumerate(rows) if method in r["results"]]
    best = None
    if scored:
        _, neg = max(scored)
        best = {"index": -neg, **rows[-neg]}
    return {"metric": "final validation accuracy (%), mean(std) over seeds", "method": method,
            "validation": meta["validation"], "grid": meta["grid"], "rows": rows, "best": best}


def format_sweep(table: dict) -> str:
    """Plain-text rendering of :func:`sweep_table`."""
    keys = list(table["grid"])
    methods = list(dict.fromkeys(m for r in table["rows"] for m in r["results"]))
    lines = [f"{table['metric']}; selection on {table['method']}"]
    head = [*keys, *methods]
    body = []
    for i, r in enumerate(table["rows"]):
        mark = " *" if table["best"] and table["best"]["index"] == i else ""
        vals = [json.dumps(r["point"][k]) for k in keys]
        for m in methods:
            c = r["results"].get(m)
            vals.append(f"{c['mean']:.1f}({c['std']:.1f}) [{c['n']}]" if c else "-")
        body.append((vals, mark))
    widths = [max(len(h), *(len(v[j]) for v, _ in body)) + 2 for j, h in enumerate(head)]
    lines.append("".join(h.ljust(w) for h, w in zip(head, widths)))
    lines.append("-" * sum(widths))
    for vals, mark in body:
        lines.append("".join(v.ljust(w) for v, w in zip(vals, widths)) + mark)
    if table["best"]:
        lines.append(f"chosen (*): {json.dumps(table['best']['point'])}")
    return "\n".join(lines) + "\n"

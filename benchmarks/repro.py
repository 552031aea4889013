"""Rerun the paper's tables at CPU scale on offline data and write
``benchmarks/results/repro_<table>.json`` (rendered into docs/reproduction.md by
``benchmarks/make_repro_doc.py``).

    python benchmarks/repro.py TABLE [TABLE ...] [--seeds 3] [--runs runs/repro]
    python benchmarks/repro.py --list

Every table is a list of *cells*: a config (``configs/repro_digits.toml``, the hyper-parameters
chosen by ``zowarmup sweep`` on digits' validation split, plus the cell's overrides), the methods it
trains and a data set. Each cell is an ordinary experiment folder under ``--runs`` (resumable:
finished runs are kept), so rerunning a table after an interruption continues it. The results file
holds, per cell and method, the final test accuracy of every seed and their mean and sample std,
plus the command, machine and date.

Data sets: ``digits`` (scikit-learn's handwritten digits, test split: held out from tuning, which
only saw a validation split of the training data) and ``fontdigits`` (printed digits rendered
offline by ``benchmarks/make_fontdigits.py``; nothing was tuned on it).
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
from _common import RESULTS_DIR, machine_info  # noqa: E402

BASE = REPO / "configs" / "repro_digits.toml"
FONT = BENCH / "data" / "fontdigits.npz"
DATA = {"digits": [], "fontdigits": ["data.name='npz'", f"data.root='{FONT}'"]}
JOBS = 1
PARTIAL = False
ALL = ["zowarmup", "high_res_only", "zo_only", "fedkseed", "zowarmup_fedkseed", "heterofl"]

#: table -> list of (cell label, data set, methods, overrides)
TABLES: dict[str, list] = {
    # Table 2: every method of the paper's main table, 10/90 and 30/70, both data sets. Cells of one
    # column are merged in the doc; FedKSeed from scratch samples 10 of 50 clients per round (its
    # many local steps do not fit the compute otherwise), the others use every client.
    "table2": [c for ds in ("digits", "fontdigits") for hi in (10, 30) for c in (
        (f"{ds} {hi}/{100 - hi}", ds, ["zowarmup", "high_res_only", "zo_only", "heterofl"],
         [f"data.hi_fraction={hi / 100}"]),
        (f"{ds} {hi}/{100 - hi} +fedkseed", ds, ["zowarmup_fedkseed"], [f"data.hi_fraction={hi / 100}"]),
        (f"{ds} {hi}/{100 - hi} +fedkseed10", ds, ["fedkseed"],
         [f"data.hi_fraction={hi / 100}", "zo.clients_per_round=10"]))],
    # BatchNorm in ZO rounds (the paper does not say): CNN with BatchNorm. It chooses a default,
    # so it is evaluated on the validation split of the training data, not the test split.
    # 60 rounds (pivot 24) instead of 100 to fit the compute.
    "bn": [(f"bn_stats={m}", "digits", ["zowarmup"],
            ["model.name='cnn'", "model.norm='bn'", "model.options={widths=[8, 16, 32]}",
             "zo.lr=0.1", "data.validation=0.2", "rounds=60", "pivot=24", "eval_every=10",
             f"zo.bn_stats='{m}'"])
           for m in ("frozen", "batch", "recompute")],
    # Table 3: local steps, one pass over the data per round split over the steps
    "table3": [(f"{k} step{'s' if k > 1 else ''}, c={c}", "digits", ["zowarmup"],
                [f"zo.local_steps={k}", f"zo.scale={c}", f"zo.epoch_split={'true' if k > 1 else 'false'}"])
               for k, c in ((1, 0.75), (2, 0.25), (4, 0.1), (6, 0.01))],
    # Table 6: Rademacher vs Gaussian noise
    "table6": [(d, "digits", ["zowarmup"], [f"zo.dist='{d}'"]) for d in ("rademacher", "gaussian")],
    # Table 7: high-resource clients keep FedAvg after the pivot
    "table7": [("hi+lo", "digits", ["zowarmup", "zowarmup_hilo", "high_res_only"], [])],
    # Figure 4: the pivot
    "pivot": [(f"pivot={p}", "digits", ["zowarmup"], [f"pivot={p}"]) for p in (10, 25, 40, 60, 80)],
    # FedAdam in both steps (the FedAdam tables), GroupNorm CNN
    "fedadam": [("FedAdam both steps, CNN-GN", "digits", ["zowarmup", "high_res_only"],
                 ["model.name='cnn'", "model.norm='gn'", "model.options={widths=[8, 16, 32]}",
                  "warmup.server_opt='fedadam'", "warmup.server_lr=0.01",
                  "zo.server_opt='fedadam'", "zo.server_lr=0.001"])],
}


#: the premise's protocol: the paper's (every client in every ZO round, one step on the whole local
#: data, c = 0.75) at 60 rounds (pivot 24, 40% as in the base) for compute; every method gets the
#: same rounds, ZO only spends all 60 on ZO. The ZO learning rate is chosen per size and per method
#: (ZOWarmUp and ZO only separately) from PREMISE_LRS by ``zowarmup sweep`` on a validation split of
#: the training data (one seed per point): a rate tuned on the 10k model diverges on the 1M one, and
#: the question is whether ZO from scratch works at its best rate, not at another model's.
PREMISE = ["rounds=60", "pivot=24", "eval_every=10"]
PREMISE_LRS = [0.2, 0.05, 0.0125]
PREMISE_TUNED = ("zowarmup", "zo_only")


def _premise_cells():
    cells = []
    for h in (128, 512, 2048, 13312):
        cells.append((f"mlp hidden={h}", "digits", ["zowarmup", "high_res_only", "zo_only"],
                      PREMISE + [f"model.options={{hidden=[{h}]}}"]))
    for w in ((8, 16, 32), (24, 48, 96), (48, 96, 192), (104, 208, 416)):
        cells.append((f"cnn widths={list(w)}", "digits", ["zowarmup", "high_res_only", "zo_only"],
                      PREMISE + ["model.name='cnn'", "model.norm='none'",
                                 f"model.options={{widths={list(w)}}}"]))
    return cells


def premise_tune(label: str, ds: str, overrides: list, runs: Path, extra: list) -> dict:
    """Per ZO method: the sweep over PREMISE_LRS on the validation split (resumable); returns
    {method: {"lr": chosen, "table": [(lr, validation accuracy), ...], "folder": ...}}."""
    from zowarmup.federated.config import load_config
    from zowarmup.federated.sweep import run_sweep, sweep_table
    slug = "".join(ch if ch.isalnum() else "_" for ch in label)
    out = {}
    for m in PREMISE_TUNED:
        sd = runs / "premise_tune" / slug / m
        if PARTIAL and not (sd / "sweep.json").exists():
            continue
        base = load_config(BASE, DATA[ds] + overrides + [f"method='{m}'", "baselines=[]",
                                                         "num_seeds=1", "progress=false"] + extra)
        if not PARTIAL:
            run_sweep(base, {"zo.lr": PREMISE_LRS}, validation=0.2, sweep_dir=sd,
                      progress=False, echo=None, jobs=JOBS)
        t = sweep_table(sd)
        if t["best"] is None:
            continue
        out[m] = {"lr": t["best"]["point"]["zo.lr"],
                  "table": [[r["point"]["zo.lr"], r["results"].get(m, {}).get("mean")]
                            for r in t["rows"]],
                  "folder": str(sd.relative_to(REPO)) if sd.is_relative_to(REPO) else str(sd)}
    return out


TABLES["premise"] = _premise_cells()


def run_cell(table: str, label: str, ds: str, methods: list, overrides: list, seeds: int,
             runs: Path, extra: list, per_method: dict | None = None) -> dict:
    """Train one cell (every method, ``seeds`` seeds) and collect its final test accuracies.
    ``per_method``: extra overrides per method; each method then trains in its own experiment
    folder (``<cell>/<method>``) since the methods no longer share one config."""
    from zowarmup.federated.config import load_config
    from zowarmup.federated.experiment import run_experiment
    from zowarmup.models import count_parameters
    if ds == "fontdigits" and not FONT.exists():
        import subprocess
        subprocess.run([sys.executable, str(BENCH / "make_fontdigits.py")], check=True)
    common = DATA[ds] + overrides + [f"num_seeds={seeds}", "progress=false"]
    slug = "".join(ch if ch.isalnum() else "_" for ch in label)
    ed = runs / table / slug
    if per_method is None:
        groups = [(ed, methods, [])]
    else:
        groups = [(ed / m, [m], per_method.get(m, [])) for m in methods]
    t0 = time.perf_counter()
    cfg = None
    for gdir, gm, gov in groups:
        cfg = load_config(BASE, common + gov + [f"method='{gm[0]}'",
                                                f"baselines={json.dumps(gm[1:])}"] + extra)
        if PARTIAL:
            continue
        if JOBS > 1:
            from zowarmup.federated.experiment import plan_runs
            from zowarmup.federated.parallel import run_jobs
            run_jobs([(cfg.for_run(m, s), gdir / name) for m, s, name in plan_runs(cfg)], JOBS)
        run_experiment(cfg, exp_dir=gdir, echo=None, progress=False)
    from zowarmup.federated.federation import Federation
    fed = Federation(cfg.for_run(methods[0], cfg.seed), clients=False)
    nparams = count_parameters(fed.model)
    res = {}
    for gdir, gm, _ in groups:
        for m in gm:
            accs, curves = [], []
            for s in range(cfg.seed, cfg.seed + seeds):
                rd = gdir / f"{m}-seed{s}"
                if not (rd / "summary.json").exists():
                    continue  # --partial: a run that did not finish
                summ = json.loads((rd / "summary.json").read_text())
                accs.append(100 * summ["final_accuracy"])
                curves.append([(r["round"], r["accuracy"]) for r in
                               map(json.loads, (rd / "metrics.jsonl").read_text().splitlines())
                               if r["accuracy"] is not None])
                rounds = summ["rounds"]
            if not accs:
                continue
            res[m] = {"accuracies": accs, "mean": statistics.fmean(accs),
                      "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "n": len(accs),
                      "rounds": rounds, "curves": curves}
    if not res:
        return None
    return {"partial": PARTIAL, "config": {"table": table, "cell": label, "data": ds, "overrides": overrides,
                       "params": nparams, "folder": str(ed.relative_to(REPO)) if ed.is_relative_to(REPO) else str(ed)},
            "figures": res, "seconds": time.perf_counter() - t0}


def _table_at_round(d: Path, rnd: int) -> dict:
    """A sweep table scored by the validation accuracy each run had at round ``rnd`` (for a sweep
    stopped before its runs finished)."""
    from zowarmup.federated.sweep import grid_points
    meta = json.loads((d / "sweep.json").read_text())
    method = meta["base"]["method"]
    rows = []
    for i, point in enumerate(grid_points(meta["grid"])):
        accs = []
        for rd in sorted((d / f"point-{i}").glob(f"{method}-seed*")):
            for line in (rd / "metrics.jsonl").read_text().splitlines():
                r = json.loads(line)
                if r["round"] == rnd and r["accuracy"] is not None:
                    accs.append(100 * r["accuracy"])
        cells = {method: {"mean": statistics.fmean(accs), "n": len(accs),
                          "std": statistics.stdev(accs) if len(accs) > 1 else 0.0}} if accs else {}
        rows.append({"point": point, "results": cells})
    scored = [(r["results"][method]["mean"], -i) for i, r in enumerate(rows) if r["results"]]
    best = None
    if scored:
        i = -max(scored)[1]
        best = {"index": i, **rows[i]}
    return {"metric": f"validation accuracy (%) at round {rnd} of {meta['base']['rounds']} (the "
                      "sweep was stopped there for time), mean(std) over seeds",
            "method": method, "validation": meta["validation"], "grid": meta["grid"], "rows": rows,
            "best": best}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tables", nargs="*")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--runs", default=str(REPO / "runs" / "repro"))
    ap.add_argument("--set", action="append", default=[], help="extra override for every cell")
    ap.add_argument("--only", default=None, help="run only these cells (labels, ';'-separated)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--jobs", "-j", type=int, default=1, help="runs of a cell trained at once")
    ap.add_argument("--collect", metavar="SWEEP_DIR", action="append", default=[],
                    help="copy a finished zowarmup sweep's table to results/repro_sweep_<method>.json")
    ap.add_argument("--partial", action="store_true",
                    help="train nothing: collect the finished runs of each cell (cells show n)")
    ap.add_argument("--at-round", type=int, default=None,
                    help="with --collect: score an unfinished sweep by the validation accuracy "
                         "evaluated at this round (the table says so)")
    a = ap.parse_args(argv)
    global JOBS, PARTIAL
    JOBS, PARTIAL = a.jobs, a.partial
    for d in a.collect:
        from zowarmup.federated.sweep import sweep_table
        t = sweep_table(d) if a.at_round is None else _table_at_round(Path(d), a.at_round)
        meta = json.loads((Path(d) / "sweep.json").read_text())
        grid = " ".join(shlex.quote(f"{k}={json.dumps(v)}") for k, v in meta["grid"].items())
        cpr = meta["base"]["zo"]["clients_per_round"]
        t["command"] = (f"zowarmup sweep -c {BASE.relative_to(REPO)} --set method={t['method']} "
                        f"--set baselines=[] " + (f"--set zo.clients_per_round={cpr} " if cpr else "")
                        + f"{grid} --validation {meta['validation']}")
        t["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        (RESULTS_DIR / f"repro_sweep_{t['method']}.json").write_text(json.dumps(t, indent=1) + "\n")
        print(f"{d}: best {t['best']['point'] if t['best'] else None}")
    if a.collect:
        return 0
    if a.list or not a.tables:
        for t, cells in TABLES.items():
            print(t, [c[0] for c in cells])
        return 0
    for t in a.tables:
        out = RESULTS_DIR / f"repro_{t}.json"
        prev = {r["config"]["cell"]: r for r in json.loads(out.read_text())["rows"]} if out.exists() else {}
        rows = []
        for label, ds, methods, overrides in TABLES[t]:
            if a.only and not any(o == label for o in a.only.split(";")):
                if label in prev:
                    rows.append(prev[label])
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {t}: {label} ...", flush=True)
            per_method = tuned = None
            if t == "premise":
                tuned = premise_tune(label, ds, overrides, Path(a.runs), a.set)
                if PARTIAL and set(tuned) != set(PREMISE_TUNED):
                    continue
                per_method = {m: [f"zo.lr={v['lr']}"] for m, v in tuned.items()}
                print("   tuned zo.lr: " + ", ".join(f"{m} {v['lr']}" for m, v in tuned.items()),
                      flush=True)
            row = run_cell(t, label, ds, methods, overrides, a.seeds, Path(a.runs), a.set,
                           per_method=per_method)
            if row is None:
                continue
            if tuned is not None:
                row["tuning"] = {"grid": {"zo.lr": PREMISE_LRS}, "validation": 0.2, "seeds": 1,
                                 "chosen": tuned}
            row["command"] = "python benchmarks/repro.py " + shlex.join(sys.argv[1:] if argv is None else argv)
            rows.append(row)
            print("   " + ", ".join(f"{m} {v['mean']:.1f}({v['std']:.1f})"
                                    for m, v in row["figures"].items()), flush=True)
            RESULTS_DIR.mkdir(parents=True, exist_ok=True)
            if out.exists():  # another process may have written other cells of this table
                prev.update({r["config"]["cell"]: r for r in json.loads(out.read_text())["rows"]})
            doc = {"table": t, "command": "python benchmarks/repro.py " + shlex.join(
                       sys.argv[1:] if argv is None else argv),
                   "base_config": str(BASE.relative_to(REPO)), "seeds": a.seeds,
                   "extra_overrides": a.set, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "machine": machine_info(), "rows": rows + [r for k, r in prev.items()
                                                              if k not in {x["config"]["cell"] for x in rows}]}
            out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

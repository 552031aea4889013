"""The command line: run (in process and as ``python -m zowarmup``), config errors before training,
compare's mean(std) table against an independent computation, and resume of a finished folder."""
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from zowarmup.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = ["rounds=4", "pivot=2", "data.num_clients=10", "data.hi_fraction=0.3", "zo.num_seeds=3",
        "zo.clients_per_round=4", "measure_memory=false", "threads=1", "model.options.hidden=[16]"]


def _env():
    """The subprocess's environment: this one, so it imports the installed package (the copy this
    process tests), with nothing put first on its path."""
    return dict(os.environ)


def test_run_writes_runs_and_compare_prints_mean_std_over_seeds(tmp_path, capsys):
    rc = main(["run", "--out", str(tmp_path), "--no-progress", "num_seeds=2", "name=t"] + TINY)
    assert rc == 0
    out = capsys.readouterr().out
    (exp,) = list(tmp_path.glob("t-*"))
    names = sorted(p.name for p in exp.iterdir() if p.is_dir())
    assert names == ["high_res_only-seed0", "high_res_only-seed1", "zowarmup-seed0", "zowarmup-seed1"]
    for n in names:
        for f in ("config.json", "metrics.jsonl", "summary.json", "accuracy.png"):
            assert (exp / n / f).exists()
        cfg = json.loads((exp / n / "config.json").read_text())
        assert cfg["baselines"] == [] and cfg["num_seeds"] == 1
    for f in ("experiment.json", "comparison.txt", "comparison.json", "accuracy.png"):
        assert (exp / f).exists()
    # the table printed by run and saved equals what compare prints
    assert (exp / "comparison.txt").read_text() in out

    rc = main(["compare", str(exp / "zowarmup-seed0"), str(exp / "zowarmup-seed1"),
               str(exp / "high_res_only-seed0"), str(exp / "high_res_only-seed1")])
    assert rc == 0
    text = capsys.readouterr().out
    # independent computation from the summaries
    for method, label in (("zowarmup", "ZOWarmUp"), ("high_res_only", "High Res Only")):
        accs = [100 * json.loads((exp / f"{method}-seed{s}" / "summary.json").read_text())
                ["final_accuracy"] for s in (0, 1)]
        cell = f"{statistics.mean(accs):.1f}({statistics.stdev(accs):.1f}) [2]"
        line = next(ln for ln in text.splitlines() if ln.startswith(label + " "))
        assert cell in line, (cell, line)
    assert "mean(std)" in text and "digits/mlp a=0.1 30/70" in text
    assert "ZOWarmUp - High Res Only" in text

    rc = main(["compare", "--json", str(exp)])
    table = json.loads(capsys.readouterr().out)
    assert table["rows"]["ZOWarmUp"]["digits/mlp a=0.1 30/70"]["n"] == 2

    # resuming a finished experiment is a no-op that prints the same table
    before = (exp / "zowarmup-seed0" / "metrics.jsonl").read_text()
    assert main(["run", "--resume", str(exp), "--no-progress"]) == 0
    assert (exp / "zowarmup-seed0" / "metrics.jsonl").read_text() == before


def test_bad_config_fails_before_training(tmp_path, capsys):
    rc = main(["run", "--out", str(tmp_path), "zo.dist=uniform"])
    err = capsys.readouterr().err
    assert rc == 2 and "'zo.dist'" in err and "'rademacher', 'gaussian'" in err
    rc = main(["run", "--out", str(tmp_path), "zo.sedes=3"])
    err = capsys.readouterr().err
    assert rc == 2 and "zo.sedes" in err and "num_seeds" in err
    assert main(["run", "--out", str(tmp_path), "--resume", str(tmp_path), "rounds=3"]) == 2
    assert main(["compare", str(tmp_path / "nothing")]) == 2
    assert list(tmp_path.iterdir()) == []  # nothing was created


def test_config_command_prints_resolved_config(capsys):
    assert main(["config", "zo.num_seeds=5"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["zo"]["num_seeds"] == 5 and cfg["data"]["name"] == "digits"


def test_python_dash_m_runs_the_cli(tmp_path):
    res = subprocess.run([sys.executable, "-m", "zowarmup", "--out", str(tmp_path), "--no-progress",
                          "baselines=[]", "num_seeds=1"] + TINY,
                         env=_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ZOWarmUp" in res.stdout and "mean(std)" in res.stdout
    (exp,) = list(tmp_path.iterdir())
    assert exp.name.startswith("digits-") and (exp / "zowarmup-seed0" / "summary.json").exists()

"""Kill and resume beyond FedAvg with broadcast sync: FedAdam in both phases, lazy sync, exact mode,
and a multi-method experiment with runs finished, partial (with and without a checkpoint) and not
started; and both refusal paths (another config; metrics inconsistent with the checkpoint).

How a run is killed here. ``test_federated.py`` already SIGKILLs a real ``zowarmup run`` process
and resumes it (FedAvg, broadcast sync). These tests stop the Runner in process instead: round k is
computed in full (server model, FedAdam moments, seed log and versions updated in memory), then an
injected exception stops the run before round k's metrics line is written, and a torn half line is
appended to ``metrics.jsonl`` (what a SIGKILL in the middle of that write leaves). That is
equivalent to a SIGKILL at that point for what resume sees: the Runner writes each metrics line
with a flush and each checkpoint atomically (temp file, fsync, rename), so the folder holds exactly
the k complete lines, the torn line and the checkpoint of the last multiple of ``checkpoint_every``
-- the same files a SIGKILL leaves -- and resume reads nothing but that folder (the RNG states come
from the checkpoint, and every round re-seeds torch). It is chosen because it kills at an exact
round on a loaded machine without polling files, and costs no process start-up per case. Kill
points are never on a checkpoint boundary, so resume always recomputes rounds.

Each resumed run must end with the uninterrupted run's ``metrics.jsonl`` (byte for byte), model
(``states_equal``) and server state (FedAdam moments, versions held, seed log).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from zowarmup import data as zdata
from zowarmup.federated.config import RunConfig, apply_overrides, validate
from zowarmup.federated.driver import RoundDriver
from zowarmup.federated.experiment import resume_experiment, run_experiment
from zowarmup.federated.loop import Runner, resume_run
from zowarmup.federated.state import states_equal

TINY = ["rounds=8", "pivot=4", "num_seeds=1", "baselines=[]", "data.num_clients=10",
        "data.hi_fraction=0.3", "zo.num_seeds=3", "zo.clients_per_round=4",
        "measure_memory=false", "progress=false", "checkpoint_every=2", "threads=1",
        "model.options.hidden=[16]"]


def cfg_for(*extra, method="zowarmup", seed=0):
    return validate(apply_overrides(RunConfig(), TINY + list(extra))).for_run(method, seed)


@pytest.fixture(scope="module")
def digits():
    return zdata.load_dataset("digits")


class Killed(Exception):
    """Stands for SIGKILL (see the module docstring)."""


def kill_at(monkeypatch, when):
    """Make the run stop right after computing the round for which ``when(cfg, r)`` is true, before
    its metrics line is written; a torn line is appended to the metrics file by :func:`killed`."""
    orig = RoundDriver.step

    def step(self, r):
        rec = orig(self, r)
        if when(self.cfg, r):
            raise Killed(f"{self.cfg.method} seed {self.cfg.seed} round {r}")
        return rec

    monkeypatch.setattr(RoundDriver, "step", step)
    return lambda: monkeypatch.setattr(RoundDriver, "step", orig)


def tear(run_dir: Path, r: int):
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"round": %d, "phase": "zo", "accur' % r)


def lines(run_dir: Path) -> int:
    return (run_dir / "metrics.jsonl").read_text().count("\n")


def server_state_equal(a, b):
    sa, sb = a.server.state_dict(), b.server.state_dict()
    for k in ("adam_warmup", "adam_zo"):
        assert (sa[k] is None) == (sb[k] is None), k
        if sa[k] is not None:
            assert sa[k]["steps"] == sb[k]["steps"] > 0, k
            for x, y in zip(sa[k]["m"] + sa[k]["v"], sb[k]["m"] + sb[k]["v"]):
                assert torch.equal(x.view(torch.int32), y.view(torch.int32)), k
    assert np.array_equal(sa["held"], sb["held"])
    assert sa["log"] == sb["log"]


CASES = {
    # name: (overrides, rounds at which a run is killed, one after the other); pivot 4, so a kill
    # at 3 resumes from the warm-up checkpoint (round 2) and a kill at 7 from the one after two
    # ZO rounds (round 6), where FedAdam's phase-2 moments and lazy clients' versions are non-trivial
    "fedadam_both_phases": (["warmup.server_opt=fedadam", "warmup.server_lr=0.01",
                             "zo.server_opt=fedadam", "zo.server_lr=0.01"], [3, 7]),
    "lazy_sync": (["zo.sync=lazy", "zo.clients_per_round=3"], [7]),
    "exact_mode": (["zo.exact=true"], [5]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_killed_run_resumes_to_the_uninterrupted_result(digits, tmp_path, monkeypatch, name):
    over, kills = CASES[name]
    cfg = cfg_for(*over)
    ref = Runner(cfg, tmp_path / "ref", dataset=digits)
    ref.run()
    run = tmp_path / "run"
    for k in kills:
        assert k % 2 == 1  # not a checkpoint boundary (checkpoint_every=2)
        restore = kill_at(monkeypatch, lambda c, r, k=k: r == k)
        with pytest.raises(Killed):
            if (run / "config.json").exists():
                resume_run(run, dataset=digits)
            else:
                Runner(cfg, run, dataset=digits).run()
        restore()
        assert lines(run) == k and not (run / "summary.json").exists()
        tear(run, k)
    resumed = Runner(cfg, run, dataset=digits)
    resumed.run()
    assert (run / "metrics.jsonl").read_text() == (tmp_path / "ref" / "metrics.jsonl").read_text()
    assert states_equal(resumed.model, ref.model)
    server_state_equal(resumed, ref)
    assert "resumed" in (run / "run.log").read_text()
    summ = json.loads((run / "summary.json").read_text())
    assert summ["final_accuracy"] == json.loads((tmp_path / "ref" / "summary.json").read_text())[
        "final_accuracy"]


EXP = ["rounds=6", "pivot=3", "data.num_clients=10", "data.hi_fraction=0.3", "zo.num_seeds=3",
       "zo.clients_per_round=4", "measure_memory=false", "progress=false", "checkpoint_every=2",
       "threads=1", "model.options.hidden=[16]", "num_seeds=2", "baselines=[\"high_res_only\"]",
       "name=exp"]


def test_experiment_resumes_in_every_state(digits, tmp_path, monkeypatch):
    """Runs in plan order: zowarmup-seed0, high_res_only-seed0, zowarmup-seed1,
    high_res_only-seed1. First kill: in high_res_only-seed0 at round 3 (zowarmup-seed0 finished,
    this one partial with a checkpoint, two not started). Second kill, on resume: in
    zowarmup-seed1 at round 1 (partial with config.json but no checkpoint yet). The second resume
    finishes; every run and the comparison equal an uninterrupted experiment's."""
    cfg = validate(apply_overrides(RunConfig(), EXP))
    ref = run_experiment(cfg, exp_dir=tmp_path / "ref", dataset=digits, echo=None)
    exp = tmp_path / "exp"
    restore = kill_at(monkeypatch, lambda c, r: (c.method, c.seed, r) == ("high_res_only", 0, 3))
    with pytest.raises(Killed):
        run_experiment(cfg, exp_dir=exp, dataset=digits, echo=None)
    restore()
    tear(exp / "high_res_only-seed0", 3)
    state = {d: ((exp / d / "summary.json").exists(), (exp / d / "config.json").exists())
             for d in ("zowarmup-seed0", "high_res_only-seed0", "zowarmup-seed1",
                       "high_res_only-seed1")}
    assert state == {"zowarmup-seed0": (True, True), "high_res_only-seed0": (False, True),
                     "zowarmup-seed1": (False, False), "high_res_only-seed1": (False, False)}
    finished = (exp / "zowarmup-seed0" / "metrics.jsonl").read_text()
    restore = kill_at(monkeypatch, lambda c, r: (c.method, c.seed, r) == ("zowarmup", 1, 1))
    with pytest.raises(Killed):
        resume_experiment(exp, dataset=digits, echo=None)
    restore()
    assert (exp / "high_res_only-seed0" / "summary.json").exists()
    assert (exp / "zowarmup-seed1" / "config.json").exists()
    assert not (exp / "zowarmup-seed1" / "summary.json").exists()
    assert lines(exp / "zowarmup-seed1") == 1
    tear(exp / "zowarmup-seed1", 1)
    resume_experiment(exp, dataset=digits, echo=None)
    for d in state:
        assert (exp / d / "metrics.jsonl").read_text() == (ref / d / "metrics.jsonl").read_text(), d
    assert (exp / "zowarmup-seed0" / "metrics.jsonl").read_text() == finished  # not rerun
    assert (exp / "comparison.json").read_text() == (ref / "comparison.json").read_text()
    assert (exp / "comparison.txt").read_text() == (ref / "comparison.txt").read_text()


# ------------------------------------------------------------------------------------------------
# refusals
# ------------------------------------------------------------------------------------------------
def _snapshot(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and p.name != "run.log"}


def test_resume_with_another_config_is_refused_and_changes_nothing(digits, tmp_path, monkeypatch):
    cfg = cfg_for()
    run = tmp_path / "run"
    restore = kill_at(monkeypatch, lambda c, r: r == 5)
    with pytest.raises(Killed):
        Runner(cfg, run, dataset=digits).run()
    restore()
    before = _snapshot(run)
    other = cfg_for("zo.lr=0.5")
    with pytest.raises(ValueError, match="different config"):
        Runner(other, run, dataset=digits).run()
    assert _snapshot(run) == before
    # killed before its first checkpoint: config.json alone refuses another config
    early = tmp_path / "early"
    restore = kill_at(monkeypatch, lambda c, r: r == 0)
    with pytest.raises(Killed):
        Runner(cfg, early, dataset=digits).run()
    restore()
    assert not (early / "checkpoint.pt").exists()
    before_early = _snapshot(early)
    with pytest.raises(ValueError, match="different config"):
        Runner(other, early, dataset=digits).run()
    assert _snapshot(early) == before_early
    # config.json swapped for the other config's: the checkpoint's own hash still refuses it
    (run / "config.json").write_text(json.dumps(other.to_dict(), indent=2) + "\n")
    with pytest.raises(ValueError, match="different config"):
        resume_run(run, dataset=digits)
    assert {k: v for k, v in _snapshot(run).items() if k != "config.json"} == \
        {k: v for k, v in before.items() if k != "config.json"}
    # an experiment folder refuses another experiment
    ecfg = validate(apply_overrides(RunConfig(), EXP + ["rounds=2", "pivot=1", "num_seeds=1"]))
    run_experiment(ecfg, exp_dir=tmp_path / "exp", dataset=digits, echo=None)
    eb = (tmp_path / "exp" / "experiment.json").read_text()
    with pytest.raises(ValueError, match="different experiment"):
        run_experiment(validate(apply_overrides(RunConfig(), EXP + ["rounds=3", "pivot=1",
                                                                     "num_seeds=1"])),
                       exp_dir=tmp_path / "exp", dataset=digits, echo=None)
    assert (tmp_path / "exp" / "experiment.json").read_text() == eb


def test_metrics_inconsistent_with_the_checkpoint_are_refused(digits, tmp_path, monkeypatch):
    """The checkpoint after round 4 expects 4 metrics lines and the previous one (after round 2)
    expects 2; a file with 1 complete line (and a torn one) is the history of neither: resume
    refuses and writes nothing. (Fewer lines than the newest checkpoint needs but enough for the
    previous one resumes from the previous one: tests/test_reliability.py.)"""
    cfg = cfg_for()
    run = tmp_path / "run"
    restore = kill_at(monkeypatch, lambda c, r: r == 5)
    with pytest.raises(Killed):
        Runner(cfg, run, dataset=digits).run()
    restore()
    text = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    assert len(text) == 5
    (run / "metrics.jsonl").write_text("".join(text[:1]) + text[1][:10])
    before = _snapshot(run)
    with pytest.raises(RuntimeError, match="inconsistent"):
        resume_run(run, dataset=digits)
    assert _snapshot(run) == before

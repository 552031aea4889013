"""ZOWarmUp on Flower: records (round trips, validation of every field), the simulation engine and
the deployment engine (a SuperLink and SuperNodes as separate processes on 127.0.0.1), each ending
bit-identical to the embedded runner for the same config and seed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr", reason="Flower is an extra: pip install '.[flower]'")

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict  # noqa: E402

from zowarmup import data as zdata  # noqa: E402
from zowarmup.federated import messages as M  # noqa: E402
from zowarmup.federated.config import RunConfig, apply_overrides, validate  # noqa: E402
from zowarmup.federated.loop import Runner  # noqa: E402
from zowarmup.federated.validation import Limits, Rejected  # noqa: E402
from zowarmup.flower.records import reply_from_records, task_from_records, to_records  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
N = 3
#: A run that touches every path in few rounds: round 0 warm-up (weights in an ArrayRecord),
#: round 1 ZO (a weights catch-up after the warm-up, seeds down, scalars up), the final sync
#: (a seed-log replay of round 1, checksums compared).
FLOWER_RUN = [f"data.num_clients={N}", "data.hi_fraction=0.34", "rounds=2", "pivot=1",
              "zo.num_seeds=4", f"zo.clients_per_round={N}", "model.options.hidden=[16]",
              "threads=1", "measure_memory=false", "progress=false", "baselines=[]",
              "num_seeds=1", "checkpoint_every=0"]


def run_cfg(overrides) -> RunConfig:
    cfg = validate(apply_overrides(RunConfig(), list(overrides)))
    return cfg.for_run(cfg.method, cfg.seed)


LIMITS = Limits(state_size=10, seeds_per_task=4, local_steps=1, num_clients=3, rounds=5,
                max_broadcast=12)


def _rd(**records):
    return RecordDict(records)


# ------------------------------------------------------------------------------------------------
# records
# ------------------------------------------------------------------------------------------------
def test_messages_round_trip_through_records_bit_exactly():
    seeds = np.array([0, 1, 2 ** 63, 2 ** 64 - 1], np.uint64)
    coeffs = np.array([1e-30, -3.25, np.float32(0.1), 7.0], np.float32)
    cu = M.ReplayMessage(3, [M.BroadcastMessage(1, seeds, coeffs), M.BroadcastMessage(2, [], [])],
                         checksum=77)
    task = [cu, M.SeedsMessage(3, seeds, 1, checksum=2 ** 32 - 1)]
    back = task_from_records(to_records(task), LIMITS)
    assert back[0].checksum == 77 and back[1].checksum == 2 ** 32 - 1
    assert np.array_equal(back[1].seeds, seeds) and back[1].seeds.dtype == np.uint64
    assert [e.round for e in back[0].entries] == [1, 2]
    assert np.array_equal(back[0].entries[0].coeffs.view(np.uint32), coeffs.view(np.uint32))
    w = M.WeightsMessage(4, np.arange(10, dtype=np.float32) / 3, 0, 5)
    st = M.StatusMessage(4, M.Status.OK, 4, "", 9)
    back = task_from_records(to_records([w, st]), LIMITS)
    assert np.array_equal(back[0].values, w.values) and back[1].code == M.Status.OK
    assert task_from_records(to_records([w]), LIMITS)[0].round == 4
    g = M.GradsMessage(3, np.array([1.5, -2e-20, 3e30, 0.1], np.float32), 31, 123)
    gb = reply_from_records(to_records([g]), LIMITS)[0]
    assert gb.values.tobytes() == g.values.tobytes() and gb.num_samples == 31 and gb.checksum == 123
    # ZO rounds carry no arrays: config and metric records only
    assert not any(isinstance(v, ArrayRecord) for v in to_records(task).values())
    assert not any(isinstance(v, ArrayRecord) for v in to_records([g]).values())


def _cfgrec(**kw):
    return ConfigRecord(kw)


BAD_RECORDS = {
    "not a record dict": (lambda: "seeds", "RecordDict"),
    "unknown record": (lambda: _rd(seeds=_cfgrec(round=1, steps=1, seeds=[1, 2, 3, 4]),
                                   evil=_cfgrec(x=1)), "unexpected"),
    "metric record for seeds": (lambda: _rd(seeds=MetricRecord({"round": 1, "steps": 1,
                                                                "seeds": [1, 2, 3, 4]})), "expected a ConfigRecord"),
    "missing field": (lambda: _rd(seeds=_cfgrec(round=1, seeds=[1, 2, 3, 4])), "missing"),
    "extra field": (lambda: _rd(seeds=_cfgrec(round=1, steps=1, seeds=[1, 2, 3, 4], x=0)), "unexpected"),
    "round of wrong type": (lambda: _rd(seeds=_cfgrec(round="1", steps=1, seeds=[1, 2, 3, 4])), "integer"),
    "round is a bool": (lambda: _rd(seeds=_cfgrec(round=True, steps=1, seeds=[1, 2, 3, 4])), "integer"),
    "negative seed": (lambda: _rd(seeds=_cfgrec(round=1, steps=1, seeds=[1, -2, 3, 4])), "out of range"),
    "seed of wrong type": (lambda: _rd(seeds=_cfgrec(round=1, steps=1, seeds=["a", "b"])), "wrong type"),
    "oversized seed list": (lambda: _rd(seeds=_cfgrec(round=1, steps=1, seeds=list(range(10 ** 4)))), "oversized"),
    "replay counts mismatch": (lambda: _rd(replay=_cfgrec(round=2, rounds=[1], counts=[3], seeds=[1],
                                                          coeffs=[0.5]),
                                           seeds=_cfgrec(round=2, steps=1, seeds=[1, 2, 3, 4])), "wrong count"),
    "two main messages": (lambda: _rd(seeds=_cfgrec(round=1, steps=1, seeds=[1, 2, 3, 4]),
                                      status=_cfgrec(round=1, code=0, version=1, reason="")), "one main"),
    "weights without meta": (lambda: _rd(weights=ArrayRecord({"state": Array(np.zeros(10, np.float32))})), "together"),
    "weights of wrong dtype": (lambda: _rd(weights=ArrayRecord({"state": Array(np.zeros(10, np.float64))}),
                                           **{"weights.meta": _cfgrec(round=1, num_samples=0)}), "dtype"),
    "weights of wrong shape": (lambda: _rd(weights=ArrayRecord({"state": Array(np.zeros((2, 5), np.float32))}),
                                           **{"weights.meta": _cfgrec(round=1, num_samples=0)}), "shape"),
    "checksum out of range": (lambda: _rd(seeds=_cfgrec(round=1, steps=1, seeds=[1, 2, 3, 4],
                                                        checksum=2 ** 40)), "out of range"),
}


@pytest.mark.parametrize("kind", list(BAD_RECORDS))
def test_malformed_task_records_are_rejected(kind):
    import re
    make, words = BAD_RECORDS[kind]
    with pytest.raises(Rejected) as e:
        task_from_records(make(), LIMITS)
    assert re.search(words, str(e.value)), str(e.value)


def test_malformed_reply_records_are_rejected():
    bad = [
        (_rd(grads=ConfigRecord({"round": 1, "num_samples": 3, "values": [1.0]})), "MetricRecord"),
        (_rd(grads=MetricRecord({"round": 1, "num_samples": 3, "values": [1.0] * 5})), "oversized"),
        (_rd(grads=MetricRecord({"round": 1, "num_samples": -3, "values": [1.0]})), "out of range"),
        (_rd(grads=MetricRecord({"round": 1, "num_samples": 3, "values": [1.0]}),
             status=ConfigRecord({"round": 1, "code": 0, "version": 1, "reason": ""})), "one of"),
        (_rd(status=ConfigRecord({"round": 1, "code": 0, "version": 1, "reason": "x" * 600})), "512"),
    ]
    for rd, words in bad:
        with pytest.raises(Rejected, match=words):
            reply_from_records(rd, LIMITS)
    # NaN values pass the record check and are rejected by the protocol validation (next layer)
    g = reply_from_records(_rd(grads=MetricRecord({"round": 1, "num_samples": 3,
                                                   "values": [float("nan")] * 4})), LIMITS)[0]
    assert np.isnan(g.values).all()


# ------------------------------------------------------------------------------------------------
# engines
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """The embedded runner's result for FLOWER_RUN (the reference for both engines)."""
    ds = zdata.load_dataset("digits")
    cfg = run_cfg(FLOWER_RUN)
    r = Runner(cfg, tmp_path_factory.mktemp("emb") / "run", dataset=ds)
    summary = r.run()
    return summary, {k: v.clone() for k, v in r.model.state_dict().items()}


def _assert_same_as_embedded(out: Path, embedded):
    summary, state = embedded
    s = json.loads((out / "summary.json").read_text())
    assert s["final_accuracy"] == summary["final_accuracy"]
    final = torch.load(out / "final_state.pt", weights_only=True)
    for k, v in state.items():
        assert torch.equal(final[k], v), k
    sync = s["final_sync"]
    assert sync["in_sync"] == list(range(N)) and not sync["mismatch"], sync
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in recs] == ["warmup", "zo"]
    zo = recs[1]
    assert zo["kept"] == N and zo["catch_up"]["weights"] == N  # first ZO contact after warm-up
    return s, recs


def test_simulation_engine_matches_embedded(embedded, tmp_path):
    """Flower's simulation engine (Ray backend) with the ZOWarmUp ServerApp and ClientApp, run
    through the documented command line ``python -m zowarmup.flower simulate --supernodes N
    --overrides ... --out DIR``: exit 0, the final-sync line printed, the run written to DIR."""
    pytest.importorskip("ray", reason="Flower's simulation engine needs flwr[simulation] (ray)")
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               RAY_DEDUP_LOGS="0", RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0")  # the installed package
    res = subprocess.run([sys.executable, "-m", "zowarmup.flower", "simulate", "--supernodes",
                          str(N), "--overrides", " ".join(FLOWER_RUN), "--out",
                          str(tmp_path / "out"), "--deadline", "600",
                          "--discovery-timeout", "600"],
                         capture_output=True, text=True, env=env,
                         timeout=900)  # only a hung run fails on time; speed is a benchmark's job
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    assert (tmp_path / "out" / "summary.json").exists(), res.stderr[-3000:]
    printed = json.loads(res.stdout.strip().splitlines()[-1])
    assert printed["in_sync"] == list(range(N)) and not printed["mismatch"], printed
    _assert_same_as_embedded(tmp_path / "out", embedded)


def test_deployment_engine_superlink_and_supernodes_match_embedded(embedded, tmp_path):
    """A SuperLink and 3 SuperNodes as separate processes (insecure, 127.0.0.1), `flwr run` of the
    ZOWarmUp app, `flwr list --format json` says finished:completed, the result is the embedded
    runner's bit for bit, and every process started here is gone afterwards."""
    from zowarmup.flower.local import LocalFederation
    fed = LocalFederation(N, tmp_path / "fed")
    try:
        fed.start()
        out = tmp_path / "out"
        res = fed.run({"overrides": " ".join(FLOWER_RUN), "deadline": 600.0, "out": str(out),
                       "discovery-timeout": 600.0}, timeout=900)  # only a hung run fails on time
        ls = fed.flwr("list", fed.connection, "--run-id", res["run_id"], "--format", "json")
        status = [r["status"] for r in json.loads(ls.stdout)["runs"]]
        assert status == ["finished:completed"], (res, (fed.workdir / "superlink.log").read_text()[-3000:])
        s, recs = _assert_same_as_embedded(out, embedded)
        # bytes from Flower's serialized messages: ZO uplink is one small MetricRecord
        assert 0 < recs[1]["bytes_up_per_client"] < 2000
        assert recs[0]["bytes_down_per_client"] > 4 * 1210  # the warm-up weights
    finally:
        fed.stop()
    for p in fed.procs:
        assert p.poll() is not None, f"process {p.pid} ({p.args[0]}) still running"
    assert fed.alive() == []  # nothing left in their process groups (helpers included)

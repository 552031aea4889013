"""HeteroFL, FedKSeed and ZOWarmUp + FedKSeed on Flower: their records (round trips, malformed
records rejected), Flower's simulation engine and its deployment engine (a SuperLink and
SuperNodes as separate processes on 127.0.0.1), each ending bit-identical to the embedded runner
(``zowarmup run``) for the same config and seed: final weights tensor by tensor, accuracy and loss
of every round, the clients kept, and every client in sync at the end.

Bytes on Flower are the serialized records (as for every method: tests/test_flower.py); the
in-memory deployment's byte counts against the embedded runner's are in
tests/test_deploy_methods.py."""
from __future__ import annotations

import json
import os
import re
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
from zowarmup.federated.loop import Runner, read_metrics  # noqa: E402
from zowarmup.federated.validation import Limits, Rejected  # noqa: E402
from zowarmup.flower.records import reply_from_records, task_from_records, to_records  # noqa: E402

N = 3
BASE = [f"data.num_clients={N}", "data.hi_fraction=0.34", "zo.num_seeds=4",
        "model.options.hidden=[16]", "threads=1", "measure_memory=false", "progress=false",
        "baselines=[]", "num_seeds=1", "checkpoint_every=0", "rounds=2", "pivot=1"]
#: Each touches its method's every path in few rounds: HeteroFL with BatchNorm (sub-network tasks
#: of both widths, the sBN statistics exchange); FedKSeed with 2 of 3 clients per round (the final
#: sync replays FedKSeed's Gaussian broadcasts); ZOWarmUp + FedKSeed (a warm-up round, a weights
#: catch-up, then FedKSeed rounds and replays).
METHODS = {
    "heterofl": ["method=heterofl", "model.norm=bn", "heterofl.budget_hi_fraction=0.34",
                 f"zo.clients_per_round={N}"],
    "fedkseed": ["method=fedkseed", "fedkseed.pool_size=16", "fedkseed.local_steps=2",
                 "zo.clients_per_round=2"],
    "zowarmup_fedkseed": ["method=zowarmup_fedkseed", "rounds=3", "fedkseed.pool_size=16",
                          "zo.clients_per_round=2"],
}
SAME = ("round", "phase", "accuracy", "loss", "clients", "kept", "dropped_clients")


def overrides(method: str) -> list[str]:
    return BASE + METHODS[method]


def run_cfg(method: str) -> RunConfig:
    cfg = validate(apply_overrides(RunConfig(), overrides(method)))
    return cfg.for_run(cfg.method, cfg.seed)


LIMITS = Limits(state_size=10, seeds_per_task=4, local_steps=1, num_clients=3, rounds=5,
                max_broadcast=16, pool_size=16, kseed_steps=3, pivot=0, phase2="heterofl",
                submodels=((0.5, 4), (1.0, 8)), num_classes=10, stats_size=6)


def _rd(**records):
    return RecordDict(records)


# ------------------------------------------------------------------------------------------------
# records
# ------------------------------------------------------------------------------------------------
def test_new_messages_round_trip_through_records_bit_exactly():
    vals = np.arange(4, dtype=np.float32) / 3
    t = M.SubModelTask(2, 0.5, vals)
    b = task_from_records(to_records([t]), LIMITS)[0]
    assert isinstance(b, M.SubModelTask) and b.rate == 0.5 and b.values.tobytes() == vals.tobytes()
    u = M.SubModelUpdate(2, np.arange(8, dtype=np.float32) / 7, np.arange(10) % 3 == 0, 31)
    b = reply_from_records(to_records([u]), LIMITS)[0]
    assert b.to_bytes() == u.to_bytes()
    sr = M.StatsRequest(2, np.linspace(-1, 1, 10, dtype=np.float32), 77)
    assert task_from_records(to_records([sr]), LIMITS)[0].to_bytes() == sr.to_bytes()
    st = M.StatsMessage(2, np.float32([1e-30, 2, 3, 4, 5, 0.1]), 31)
    assert reply_from_records(to_records([st]), LIMITS)[0].to_bytes() == st.to_bytes()
    cu = M.ReplayMessage(2, [M.BroadcastMessage(1, [1, 2 ** 64 - 1], [0.5, np.float32(0.1)])], 9)
    kt = M.KSeedTask(2, 3, 5)
    back = task_from_records(to_records([cu, kt]), LIMITS)
    assert [m.to_bytes() for m in back] == [cu.to_bytes(), kt.to_bytes()]
    ku = M.KSeedUpdate(2, [1, 15], [0.5, np.float32(-1e-3)], 31, 2 ** 32 - 1)
    assert reply_from_records(to_records([ku]), LIMITS)[0].to_bytes() == ku.to_bytes()
    # FedKSeed rounds carry no arrays: config and metric records only
    assert not any(isinstance(v, ArrayRecord) for v in to_records([cu, kt]).values())
    assert not any(isinstance(v, ArrayRecord) for v in to_records([ku]).values())


def _meta(**kw):
    return ConfigRecord(kw)


def _arr(n, dtype=np.float32, shape=None):
    return ArrayRecord({"values": Array(np.zeros(shape or (n,), dtype))})


BAD_TASK_RECORDS = {
    "submodel without meta": (lambda: _rd(submodel=_arr(4)), "together"),
    "submodel of a size of no width": (lambda: _rd(submodel=_arr(5), **{"submodel.meta": _meta(round=1, rate=0.5)}), "shape"),
    "submodel float64": (lambda: _rd(submodel=_arr(4, np.float64), **{"submodel.meta": _meta(round=1, rate=0.5)}), "dtype"),
    "submodel 2-D": (lambda: _rd(submodel=_arr(4, shape=(2, 2)), **{"submodel.meta": _meta(round=1, rate=0.5)}), "shape"),
    "submodel array named otherwise": (lambda: _rd(submodel=ArrayRecord({"state": Array(np.zeros(4, np.float32))}),
                                                   **{"submodel.meta": _meta(round=1, rate=0.5)}), "one array"),
    "submodel rate a string": (lambda: _rd(submodel=_arr(4), **{"submodel.meta": _meta(round=1, rate="half")}), "number"),
    "submodel rate a bool": (lambda: _rd(submodel=_arr(4), **{"submodel.meta": _meta(round=1, rate=True)}), "number"),
    "submodel missing rate": (lambda: _rd(submodel=_arr(4), **{"submodel.meta": _meta(round=1)}), "missing"),
    "submodel with seeds": (lambda: _rd(submodel=_arr(4), seeds=_meta(round=1, steps=1, seeds=[1, 2, 3, 4]),
                                        **{"submodel.meta": _meta(round=1, rate=0.5)}), "carries no"),
    "stats_request wrong size": (lambda: _rd(stats_request=ArrayRecord({"state": Array(np.zeros(9, np.float32))}),
                                             **{"stats_request.meta": _meta(round=1)}), "shape"),
    "stats_request extra field": (lambda: _rd(stats_request=ArrayRecord({"state": Array(np.zeros(10, np.float32))}),
                                              **{"stats_request.meta": _meta(round=1, x=2)}), "unexpected"),
    "kseed as a metric record": (lambda: _rd(kseed=MetricRecord({"round": 1, "steps": 3})), "ConfigRecord"),
    "kseed steps a float": (lambda: _rd(kseed=_meta(round=1, steps=3.0)), "integer"),
    "kseed steps too large": (lambda: _rd(kseed=_meta(round=1, steps=2 ** 20)), "out of range"),
    "kseed and seeds": (lambda: _rd(kseed=_meta(round=1, steps=3), seeds=_meta(round=1, steps=1, seeds=[1, 2, 3, 4])), "one main"),
    "kseed checksum out of range": (lambda: _rd(kseed=_meta(round=1, steps=3, checksum=-1)), "out of range"),
}


@pytest.mark.parametrize("kind", list(BAD_TASK_RECORDS))
def test_malformed_task_records_of_the_new_kinds_are_rejected(kind):
    make, words = BAD_TASK_RECORDS[kind]
    with pytest.raises(Rejected) as e:
        task_from_records(make(), LIMITS)
    assert re.search(words, str(e.value)), str(e.value)


def _kseed_rec(**kw):
    d = {"round": 1, "num_samples": 3, "indices": [1, 4], "values": [0.5, 0.25]}
    d.update(kw)
    return MetricRecord(d)


def _sub_meta(**kw):
    d = {"round": 1, "num_samples": 3, "labels": [True] * 10}
    d.update(kw)
    return ConfigRecord(d)


BAD_REPLY_RECORDS = {
    "kseed as a config record": (lambda: _rd(kseed=ConfigRecord({"round": 1, "num_samples": 3, "indices": [1], "values": [0.5]})), "MetricRecord"),
    "kseed negative index": (lambda: _rd(kseed=_kseed_rec(indices=[-1, 4])), "out of range"),
    "kseed counts differ": (lambda: _rd(kseed=_kseed_rec(values=[0.5])), "wrong count"),
    "kseed too many indices": (lambda: _rd(kseed=_kseed_rec(indices=[1, 2, 3, 4], values=[0.1] * 4)), "oversized"),
    "kseed float index": (lambda: _rd(kseed=_kseed_rec(indices=[1.0, 2.0])), "wrong type"),
    "submodel labels not bools": (lambda: _rd(submodel=_arr(4), **{"submodel.meta": _sub_meta(labels=[1] * 10)}), "wrong type"),
    "submodel labels too many": (lambda: _rd(submodel=_arr(4), **{"submodel.meta": _sub_meta(labels=[True] * 11)}), "oversized"),
    "submodel negative samples": (lambda: _rd(submodel=_arr(4), **{"submodel.meta": _sub_meta(num_samples=-3)}), "out of range"),
    "submodel wrong size": (lambda: _rd(submodel=_arr(6), **{"submodel.meta": _sub_meta()}), "shape"),
    "stats wrong size": (lambda: _rd(stats=_arr(7), **{"stats.meta": _meta(round=1, num_samples=3)}), "shape"),
    "stats and kseed": (lambda: _rd(kseed=_kseed_rec(), stats=_arr(6), **{"stats.meta": _meta(round=1, num_samples=3)}), "one of"),
}


@pytest.mark.parametrize("kind", list(BAD_REPLY_RECORDS))
def test_malformed_reply_records_of_the_new_kinds_are_rejected(kind):
    make, words = BAD_REPLY_RECORDS[kind]
    with pytest.raises(Rejected) as e:
        reply_from_records(make(), LIMITS)
    assert re.search(words, str(e.value)), str(e.value)


def test_nan_in_new_records_passes_the_record_layer_and_is_rejected_by_the_protocol():
    """Record checks are structural; values (NaN, wrong round) are the protocol checks' job, as
    for every message (tests/test_deploy_methods.py)."""
    u = reply_from_records(_rd(kseed=_kseed_rec(values=[float("nan"), 1.0])), LIMITS)[0]
    assert np.isnan(u.values[0])


# ------------------------------------------------------------------------------------------------
# engines
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """The embedded runner's result per method (the reference for both engines)."""
    ds = zdata.load_dataset("digits")
    out = {}
    for method in METHODS:
        d = tmp_path_factory.mktemp("emb") / method
        r = Runner(run_cfg(method), d, dataset=ds)
        s = r.run()
        out[method] = (s, {k: v.clone() for k, v in r.model.state_dict().items()},
                       read_metrics(d))
    return out


def _assert_same_as_embedded(out: Path, ref, method: str):
    summary, state, erecs = ref
    s = json.loads((out / "summary.json").read_text())
    assert s["method"] == method
    assert s["final_accuracy"] == summary["final_accuracy"]
    assert s["final_checksum"] == summary["final_checksum"]
    final = torch.load(out / "final_state.pt", weights_only=True)
    for k, v in state.items():
        assert torch.equal(final[k].view(-1).view(torch.uint8), v.view(-1).view(torch.uint8)), k
    sync = s["final_sync"]
    assert sync["in_sync"] == list(range(N)) and not sync["mismatch"], sync
    assert s["rejected_total"] == 0 and s["desync_total"] == 0, s["rejections"]
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [{k: r[k] for k in SAME} for r in recs] == [{k: r[k] for k in SAME} for r in erecs]
    for r in recs:  # bytes: Flower's serialized records
        assert r["bytes_up_total"] > 0 and r["bytes_down_total"] > 0
        if r["phase"] == "fedkseed":
            assert 0 < r["bytes_up_per_client"] < 2000  # one small MetricRecord, no arrays
        if r["phase"] == "heterofl":
            assert r["bytes_up_per_client"] > 4 * 100  # the trained sub-network's array
    return s, recs


@pytest.mark.slow  # about 20 s per method
@pytest.mark.parametrize("method", list(METHODS))
def test_simulation_engine_matches_embedded(embedded, tmp_path, method):
    """``python -m zowarmup.flower simulate`` (Flower's simulation engine, Ray backend) ends with
    the embedded runner's weights and metrics."""
    pytest.importorskip("ray", reason="Flower's simulation engine needs flwr[simulation] (ray)")
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               RAY_DEDUP_LOGS="0", RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0")
    res = subprocess.run([sys.executable, "-m", "zowarmup.flower", "simulate", "--supernodes",
                          str(N), "--overrides", " ".join(overrides(method)), "--out",
                          str(tmp_path / "out"), "--deadline", "600",
                          "--discovery-timeout", "600"],
                         capture_output=True, text=True, env=env,
                         timeout=900)  # only a hung run fails on time
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    printed = json.loads(res.stdout.strip().splitlines()[-1])
    assert printed["in_sync"] == list(range(N)) and not printed["mismatch"], printed
    _assert_same_as_embedded(tmp_path / "out", embedded[method], method)


@pytest.mark.slow  # about 3 minutes on the loaded 2-core machine (three runs, a process per message)
def test_deployment_engine_runs_the_three_methods_like_embedded(embedded, tmp_path):
    """One SuperLink and 3 SuperNodes (separate processes, insecure, 127.0.0.1); ``flwr run`` of
    the ZOWarmUp app once per method: each finished:completed and bit-identical to the embedded
    runner; every process started here is gone afterwards."""
    from zowarmup.flower.local import LocalFederation
    fed = LocalFederation(N, tmp_path / "fed")
    try:
        fed.start()
        for method in METHODS:
            out = tmp_path / f"out-{method}"
            res = fed.run({"overrides": " ".join(overrides(method)), "deadline": 600.0,
                           "out": str(out), "discovery-timeout": 600.0},
                          timeout=900)  # only a hung run fails on time
            assert res["status"] == "finished:completed", \
                (method, res, (fed.workdir / "superlink.log").read_text()[-3000:])
            _assert_same_as_embedded(out, embedded[method], method)
    finally:
        fed.stop()
    for p in fed.procs:
        assert p.poll() is not None, f"process {p.pid} ({p.args[0]}) still running"
    assert fed.alive() == []

"""HeteroFL, FedKSeed and ZOWarmUp + FedKSeed deployed: the in-memory deployment (clients that keep
their own models, every message as bytes through the checked codec) ends with the embedded
runner's weights and metrics bit for bit, with the byte counts the accounting promises; and every
malformed message of the kinds these methods add (SUBMODEL, SUBMODEL_UPDATE, STATS_REQUEST, STATS,
KSEED_TASK, KSEED_UPDATE) is rejected with a reason, counted, and changes nothing.

Flower (simulation and deployment engines) for the same methods: tests/test_flower_methods.py."""
from __future__ import annotations

import copy
import re
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from zowarmup import data as zdata
from zowarmup.federated import messages as M
from zowarmup.federated.config import RunConfig, apply_overrides, validate
from zowarmup.federated.deploy import in_memory_deployment
from zowarmup.federated.federation import build_global_model
from zowarmup.federated.loop import Runner, read_metrics
from zowarmup.federated.methods import deployable_methods
from zowarmup.federated.replica import build_replica
from zowarmup.federated.server import Server
from zowarmup.federated.state import states_equal
from zowarmup.federated.validation import Rejected, decode_checked

N = 4
BASE = [f"data.num_clients={N}", "data.hi_fraction=0.5", "model.options.hidden=[16]", "threads=1",
        "measure_memory=false", "progress=false", "baselines=[]", "num_seeds=1",
        "checkpoint_every=0", "pivot=1", "rounds=3"]
#: name -> (method, overrides). HeteroFL's budget share equals the run's, so it keeps its rounds.
CASES = {
    "heterofl": ("heterofl", ["heterofl.budget_hi_fraction=0.5"]),
    "heterofl_bn": ("heterofl", ["heterofl.budget_hi_fraction=0.5", "model.norm=bn",
                                 "zo.clients_per_round=3"]),
    # 2 of 4 clients per round: clients that sat out catch up by seed-log replay (Gaussian noise)
    "fedkseed": ("fedkseed", ["fedkseed.pool_size=16", "fedkseed.local_steps=3",
                              "zo.clients_per_round=2"]),
    # warm-up, then FedKSeed: a weights download after the warm-up, replays after that
    "zowarmup_fedkseed": ("zowarmup_fedkseed", ["rounds=4", "fedkseed.pool_size=16",
                                                "zo.clients_per_round=2", "zo.sync=lazy"]),
}
#: Record fields that must be equal between the embedded runner and a deployment.
SAME = ("round", "phase", "accuracy", "loss", "clients", "kept", "dropped", "dropped_clients")
BYTES = ("bytes_up_per_client", "bytes_down_per_client", "bytes_up_total", "bytes_down_total",
         "bytes_down_sync")


def cfg_of(name: str, *extra) -> RunConfig:
    method, ov = CASES[name]
    return validate(apply_overrides(RunConfig(), BASE + ov + list(extra))).for_run(method, 0)


@pytest.fixture(scope="module")
def digits():
    return zdata.load_dataset("digits")


def _tmp() -> Path:
    return Path(tempfile.mkdtemp(prefix="zw-deploy-methods-"))


def test_the_methods_are_deployable():
    assert {"heterofl", "fedkseed", "zowarmup_fedkseed"} <= set(deployable_methods())
    assert "zowarmup_hilo" not in deployable_methods()


@pytest.mark.parametrize("name", list(CASES))
def test_in_memory_deployment_matches_embedded(digits, name):
    cfg = cfg_of(name)
    assert cfg.rounds == (4 if name == "zowarmup_fedkseed" else 3)
    emb_dir = _tmp() / "emb"
    emb = Runner(cfg, emb_dir, dataset=digits)
    es = emb.run()
    erecs = read_metrics(emb_dir)
    coord, replicas = in_memory_deployment(cfg, digits)
    ds = coord.run()
    # the global model, bit for bit, and every metric
    assert states_equal(coord.model, emb.model)
    assert ds["final_accuracy"] == es["final_accuracy"] and ds["final_loss"] == es["final_loss"]
    assert ds["final_checksum"] == es["final_checksum"]
    assert [{k: r[k] for k in SAME} for r in coord.records] == [{k: r[k] for k in SAME}
                                                                for r in erecs]
    assert all(r["kept"] == r["clients"] for r in coord.records)
    assert ds["rejected_total"] == 0 and ds["desync_total"] == 0 and ds["timed_out_total"] == 0
    # every client ends holding the server's weights (final sync)
    sync = ds["final_sync"]
    assert sync["in_sync"] == list(range(N)) and not sync["mismatch"] and not sync["repaired"]
    for r in replicas.values():
        assert states_equal(r.model, coord.model)
    method = CASES[name][0]
    if method == "heterofl":
        # the same messages cross in both ways of running: the byte counts are equal
        assert [{k: r[k] for k in BYTES} for r in coord.records] == [{k: r[k] for k in BYTES}
                                                                     for r in erecs]
        _check_heterofl_bytes(cfg, digits, coord, name)
    else:
        _check_kseed_bytes(cfg, coord, erecs)


def _check_heterofl_bytes(cfg, ds, coord, name):
    """Bytes per round, from the message layouts: a SubModelTask down (20 + 4 n_rate), a
    SubModelUpdate up (24 + 4 n_rate for 10 classes) per sampled client; with BatchNorm a
    StatsRequest down (16 + 4 * state) and a StatsMessage up (20 + 4 * statistics) per kept one."""
    from zowarmup.federated import heterofl_models as H
    from zowarmup.federated.bn import statistics_size
    hi = coord.fed.hi
    n_of = {r: H.sub_param_count(cfg, ds, r) for r in (1.0, cfg.heterofl.lo_rate)}
    bn = name == "heterofl_bn"
    state = coord.server.layout.size
    stats = statistics_size(coord.model)
    for rec, ids in zip(coord.records, _sampled(coord)):
        rates = [1.0 if hi[c] else cfg.heterofl.lo_rate for c in ids]
        down = sum(20 + 4 * n_of[q] for q in rates) + (len(ids) * (16 + 4 * state) if bn else 0)
        up = sum(24 + 4 * n_of[q] for q in rates) + (len(ids) * (20 + 4 * stats) if bn else 0)
        assert rec["bytes_down_total"] == down and rec["bytes_up_total"] == up, rec["round"]


def _sampled(coord):
    from zowarmup.federated.federation import sample_round
    cfg = coord.cfg
    return [sample_round(cfg, r, cfg.phase(r), coord.fed.hi_ids) for r in range(cfg.rounds)]


def _check_kseed_bytes(cfg, coord, erecs):
    """FedKSeed rounds as ZO rounds: a deployment's messages carry the state checksum (4 bytes
    each: task, reply, catch-up) and its broadcast is not pushed but replayed at the next task,
    so the downlink differs from the embedded runner's by design; the uplink is the embedded
    KSeedUpdate plus the checksum, the downlink the 14-byte task plus the catch-up."""
    for rec, emb in zip(coord.records, erecs):
        if rec["phase"] != "fedkseed":
            assert {k: rec[k] for k in BYTES} == {k: emb[k] for k in BYTES}  # warm-up: same
            continue
        assert rec["bytes_up_total"] == emb["bytes_up_total"] + 4 * rec["kept"]
        assert rec["bytes_down_total"] == 14 * rec["clients"] + rec["bytes_down_sync"]
        assert rec["bytes_up_per_client"] < 100  # scalars only: 20 + 8 per pool index used
    kseed = [r for r in coord.records if r["phase"] == "fedkseed"]
    assert sum(r["catch_up"]["replay"] for r in kseed) > 0  # FedKSeed broadcasts were replayed


def test_heterofl_deployment_with_a_threaded_transport_and_zo_exact_matches(digits):
    """Concurrent clients (threads) and a config with zo.exact on change nothing either."""
    cfg = cfg_of("heterofl_bn", "zo.exact=true")
    emb = Runner(cfg, _tmp() / "emb", dataset=digits)
    emb.run()
    coord, _ = in_memory_deployment(cfg, digits, threads=2)
    try:
        coord.run()
    finally:
        coord.exchange.transport.close()
    assert states_equal(coord.model, emb.model)


# ------------------------------------------------------------------------------------------------
# malformed replies: the server
# ------------------------------------------------------------------------------------------------
R = 1


def _server_state(srv):
    return (copy.deepcopy(srv.model.state_dict()), srv.held.copy(),
            {r: None if m is None else m.to_bytes() for r, m in srv.log.items()},
            srv.registered.copy())


def _unchanged(srv, st):
    sd, held, logd, reg = st
    return (all(torch.equal(a, b) for a, b in zip(sd.values(), srv.model.state_dict().values()))
            and np.array_equal(held, srv.held) and np.array_equal(reg, srv.registered)
            and logd == {r: None if m is None else m.to_bytes() for r, m in srv.log.items()})


@pytest.fixture()
def hserver(digits):
    cfg = cfg_of("heterofl_bn")
    srv = Server(cfg, build_global_model(cfg, digits), N, digits)
    srv.registered[:] = 30
    return srv


@pytest.fixture()
def kserver(digits):
    cfg = cfg_of("fedkseed")
    srv = Server(cfg, build_global_model(cfg, digits), N, digits)
    srv.registered[:] = 30
    return srv


def _htask(srv, rate=0.5):
    return M.SubModelTask(R, rate, np.zeros(srv.limits.submodel_size(rate), np.float32))


def _upd(srv, rate=0.5, **kw):
    n = srv.limits.submodel_size(rate)
    d = dict(round=R, values=np.full(n, 0.5, np.float32),
             labels=np.arange(10) % 2 == 0, num_samples=30)
    d.update(kw)
    return M.SubModelUpdate(**d)


def _with(vals, i, v):
    vals = vals.copy()
    vals[i] = v
    return vals


def _stats(srv, **kw):
    d = dict(round=R, values=np.ones(srv.limits.stats_size, np.float32), num_samples=30)
    d.update(kw)
    return M.StatsMessage(**d)


def _padding_bits(srv):
    b = bytearray(_upd(srv).to_bytes())
    b[8 + 6 + 1] |= 0x80  # label 15 of a 10-class mask
    return bytes(b)


def _huge_count(srv):
    b = bytearray(_upd(srv).to_bytes())
    struct.pack_into("<Q", b, 8 + 6 + 2, 2 ** 40)
    return bytes(b)


BAD_SUBMODEL = {
    # kind: (payload(srv), expected words)
    "wrong count": (lambda s: _upd(s, values=np.ones(3, np.float32)).to_bytes(), "wrong count"),
    "another width's count": (lambda s: _upd(s, rate=1.0).to_bytes(), "wrong count"),
    "nan": (lambda s: _upd(s, values=_with(_upd(s).values, 3, np.nan)).to_bytes(), "non-finite"),
    "inf": (lambda s: _upd(s, values=_with(_upd(s).values, 0, -np.inf)).to_bytes(), "non-finite"),
    "finite but huge": (lambda s: _upd(s, values=_with(_upd(s).values, 1, 3e38)).to_bytes(), "exceeds"),
    "stale round": (lambda s: _upd(s, round=R - 1).to_bytes(), "stale"),
    "future round": (lambda s: _upd(s, round=R + 1).to_bytes(), "future"),
    "labels of another K": (lambda s: _upd(s, labels=np.ones(12, bool)).to_bytes(), "wrong count"),
    "no class held": (lambda s: _upd(s, labels=np.zeros(10, bool)).to_bytes(), "no class"),
    "label bits past K": (lambda s: _padding_bits(s), "past its 10 classes"),
    "lying sample count": (lambda s: _upd(s, num_samples=10 ** 6).to_bytes(), "registered"),
    "truncated": (lambda s: _upd(s).to_bytes()[:-2], "truncated"),
    "huge count field": (lambda s: _huge_count(s), "truncated|oversized"),
    "oversized": (lambda s: _upd(s, values=np.ones(10 ** 5, np.float32)).to_bytes(), "oversized"),
    "wrong type (grads)": (lambda s: M.GradsMessage(R, [1.0] * 4, 30).to_bytes(), "wrong message type"),
    "object of wrong dtype": (lambda s: _obj(_upd(s), values=np.ones(s.limits.submodel_size(0.5))), "dtype"),
    "stats: wrong size": (lambda s: _stats(s, values=np.ones(3, np.float32)).to_bytes(), "wrong count"),
    "stats: nan": (lambda s: _stats(s, values=_with(_stats(s).values, 1, np.nan)).to_bytes(), "non-finite"),
    "stats: stale round": (lambda s: _stats(s, round=R - 1).to_bytes(), "stale"),
    "stats: future round": (lambda s: _stats(s, round=R + 5).to_bytes(), "future"),
    "stats: lying sample count": (lambda s: _stats(s, num_samples=31).to_bytes(), "registered"),
}


def _obj(m, **fields):
    for k, v in fields.items():
        setattr(m, k, v)  # a hand-built object bypassing __post_init__
    return m


@pytest.mark.parametrize("kind", list(BAD_SUBMODEL))
def test_server_rejects_bad_heterofl_replies_without_state_change(hserver, kind, caplog):
    make, words = BAD_SUBMODEL[kind]
    st = _server_state(hserver)
    caplog.set_level("WARNING", logger="zowarmup.federated")
    kinds = ("stats", "status") if kind.startswith("stats") else ("submodel", "status")
    out = hserver.accept(2, make(hserver), R, task=_htask(hserver), kind=kinds)
    assert out is None
    assert hserver.rejected[2] == 1 and hserver.rejected.sum() == 1
    assert re.search(words, hserver.rejections[-1][2]), hserver.rejections[-1][2]
    assert "rejected message from client 2" in caplog.text
    assert _unchanged(hserver, st)


def test_server_accepts_good_heterofl_replies(hserver):
    m = hserver.accept(2, _upd(hserver).to_bytes(), R, task=_htask(hserver), kind="submodel")
    assert isinstance(m, M.SubModelUpdate) and m.labels.tolist() == (np.arange(10) % 2 == 0).tolist()
    full = hserver.accept(1, _upd(hserver, rate=1.0).to_bytes(), R, task=_htask(hserver, 1.0),
                          kind="submodel")
    assert isinstance(full, M.SubModelUpdate)
    assert isinstance(hserver.accept(3, _stats(hserver).to_bytes(), R, kind="stats"), M.StatsMessage)
    # a SUBMODEL_UPDATE from a client given no HeteroFL task
    assert hserver.accept(3, _upd(hserver).to_bytes(), R, kind="submodel") is None
    assert hserver.rejected.sum() == 1


def _kupd(srv, **kw):
    d = dict(round=R, indices=np.array([2, 7], np.uint32), values=np.array([0.5, -1.0], np.float32),
             num_samples=30, checksum=srv.checksum())
    d.update(kw)
    return M.KSeedUpdate(**d)


BAD_KSEED = {
    "missing checksum": (lambda s: _kupd(s, checksum=None).to_bytes(), "checksum"),
    "nan": (lambda s: _kupd(s, values=np.array([np.nan, 1.0], np.float32)).to_bytes(), "non-finite"),
    "stale round": (lambda s: _kupd(s, round=R - 1).to_bytes(), "stale"),
    "future round": (lambda s: _kupd(s, round=R + 1).to_bytes(), "future"),
    "index out of the pool": (lambda s: _kupd(s, indices=np.array([2, 16], np.uint32)).to_bytes(), "out of range"),
    "indices not increasing": (lambda s: _kupd(s, indices=np.array([7, 2], np.uint32)).to_bytes(), "increasing"),
    "more indices than steps": (lambda s: _kupd(s, indices=np.arange(4, dtype=np.uint32), values=np.ones(4, np.float32)).to_bytes(), "oversized|wrong count"),
    "lying sample count": (lambda s: _kupd(s, num_samples=1).to_bytes(), "registered"),
    "wrong type (grads)": (lambda s: M.GradsMessage(R, [1.0] * 4, 30, s.checksum()).to_bytes(), "wrong message type"),
}


@pytest.mark.parametrize("kind", list(BAD_KSEED))
def test_server_rejects_bad_kseed_replies_without_state_change(kserver, kind):
    make, words = BAD_KSEED[kind]
    st = _server_state(kserver)
    task = M.KSeedTask(R, 3, kserver.checksum())
    out = kserver.accept(1, make(kserver), R, task=task, kind=("kseed", "status"),
                         require_checksum=True)
    assert out is None and kserver.rejected[1] == 1 and kserver.rejected.sum() == 1
    assert re.search(words, kserver.rejections[-1][2]), kserver.rejections[-1][2]
    assert _unchanged(kserver, st)


# ------------------------------------------------------------------------------------------------
# malformed tasks: the client
# ------------------------------------------------------------------------------------------------
def _lo_and_hi(cfg):
    hi = zdata.assign_resources(N, cfg.data.hi_fraction, cfg.seed)
    return int(np.flatnonzero(~hi)[0]), int(np.flatnonzero(hi)[0])


@pytest.fixture()
def hreplica(digits):
    cfg = cfg_of("heterofl_bn")
    lo, _ = _lo_and_hi(cfg)
    rep = build_replica(cfg, digits, lo)
    rep.last_round = 1
    assert rep.submodel[0] == 0.5
    return rep


@pytest.fixture()
def kreplica(digits):
    cfg = cfg_of("zowarmup_fedkseed")   # pivot 1: round 0 is a warm-up round
    rep = build_replica(cfg, digits, 1)
    rep.last_round = 1
    return rep


def _replica_state(rep):
    sub = [] if rep.submodel is None else [p.detach().clone() for p in rep.submodel[1].parameters()]
    return ([t.detach().clone() for t in rep.model.state_dict().values()], sub, rep.version,
            rep.last_round)


def _replica_unchanged(rep, st):
    sd, sub, v, lr = st
    now = [] if rep.submodel is None else list(rep.submodel[1].parameters())
    return (all(torch.equal(a, b) for a, b in zip(sd, rep.model.state_dict().values()))
            and all(torch.equal(a, b) for a, b in zip(sub, now))
            and rep.version == v and rep.last_round == lr)


def _sub_task(rep, rate=0.5, **kw):
    d = dict(round=2, rate=rate)
    d.update(kw)
    if "values" not in d:
        d["values"] = np.ones(rep.limits.submodel_size(rate) or 1, np.float32)
    return M.SubModelTask(**d)


def _stats_req(rep, **kw):
    d = dict(round=2, values=rep.layout.flatten(rep.model))
    d.update(kw)
    return M.StatsRequest(**d)


BAD_HETEROFL_TASKS = {
    "another client's width": (lambda rep: [_sub_task(rep, rate=1.0).to_bytes()], "trains width"),
    "a width not in the run": (lambda rep: [_sub_task(rep, rate=0.25, values=np.ones(50, np.float32)).to_bytes()], "not one of the run"),
    "nan rate": (lambda rep: [_sub_task(rep, rate=float("nan")).to_bytes()], "not one of the run"),
    "wrong count": (lambda rep: [_sub_task(rep, values=np.ones(7, np.float32)).to_bytes()], "wrong count"),
    "nan value": (lambda rep: [_sub_task(rep, values=_with(_sub_task(rep).values, 4, np.nan)).to_bytes()], "non-finite"),
    "stale round": (lambda rep: [_sub_task(rep, round=0).to_bytes()], "stale"),
    "future round": (lambda rep: [_sub_task(rep, round=3).to_bytes()], "future"),
    "truncated": (lambda rep: [_sub_task(rep).to_bytes()[:-1]], "truncated"),
    "oversized": (lambda rep: [_sub_task(rep, values=np.ones(10 ** 5, np.float32)).to_bytes()], "oversized"),
    "with a catch-up": (lambda rep: [M.WeightsMessage(2, rep.layout.flatten(rep.model)).to_bytes(),
                                     _sub_task(rep).to_bytes()], "wrong message type|oversized"),
    "stats: wrong size": (lambda rep: [_stats_req(rep, values=np.ones(5, np.float32)).to_bytes()], "wrong count"),
    "stats: inf": (lambda rep: [_stats_req(rep, values=_with(_stats_req(rep).values, 0, np.inf)).to_bytes()], "non-finite"),
    "stats: stale round": (lambda rep: [_stats_req(rep, round=0).to_bytes()], "stale"),
    "stats: future round": (lambda rep: [_stats_req(rep, round=7).to_bytes()], "future"),
    "seeds in a heterofl run": (lambda rep: [M.SeedsMessage(2, np.arange(20, dtype=np.uint64)).to_bytes()], "phase 2 \\(heterofl\\)"),
    "kseed in a heterofl run": (lambda rep: [M.KSeedTask(2, 0).to_bytes()], "wrong step count|phase 2"),
}


@pytest.mark.parametrize("kind", list(BAD_HETEROFL_TASKS))
def test_heterofl_client_rejects_bad_tasks_without_state_change(hreplica, kind, caplog):
    make, words = BAD_HETEROFL_TASKS[kind]
    st = _replica_state(hreplica)
    caplog.set_level("WARNING", logger="zowarmup.federated")
    reply = M.StatusMessage.from_bytes(hreplica.handle(make(hreplica))[0])
    assert reply.code == M.Status.REJECTED and re.search(words, reply.reason), reply.reason
    assert hreplica.rejections and "rejected the server's message" in caplog.text
    assert _replica_unchanged(hreplica, st)


def test_heterofl_client_answers_its_own_width_and_statistics(hreplica):
    out = M.decode(hreplica.handle([_sub_task(hreplica).to_bytes()])[0])
    assert isinstance(out, M.SubModelUpdate) and out.values.size == hreplica.limits.submodel_size(0.5)
    assert out.labels.size == 10 and out.labels.any() and out.num_samples == hreplica.client.num_samples
    assert hreplica.last_round == 2
    st = M.decode(hreplica.handle([_stats_req(hreplica).to_bytes()])[0])
    assert isinstance(st, M.StatsMessage) and st.values.size == hreplica.limits.stats_size
    assert hreplica.version == -1  # the state it was sent is no model version


def _ktask(rep, **kw):
    d = dict(round=2, steps=rep.limits.kseed_steps, checksum=rep.checksum())
    d.update(kw)
    return M.KSeedTask(**d)


BAD_KSEED_TASKS = {
    "wrong steps": (lambda rep: [_ktask(rep, steps=rep.limits.kseed_steps + 1).to_bytes()], "step count"),
    "stale round": (lambda rep: [_ktask(rep, round=0).to_bytes()], "stale"),
    "warm-up round": (lambda rep: [M.KSeedTask(0, 1).to_bytes()], "stale|warm-up"),
    "future round": (lambda rep: [_ktask(rep, round=4).to_bytes()], "future"),
    "truncated": (lambda rep: [_ktask(rep).to_bytes()[:-1]], "must be"),
    "trailing bytes": (lambda rep: [_ktask(rep).to_bytes() + b"\0"], "must be|oversized"),
    "seeds in a fedkseed run": (lambda rep: [M.SeedsMessage(2, np.arange(20, dtype=np.uint64)).to_bytes()], "phase 2 \\(fedkseed\\)"),
    "submodel in a fedkseed run": (lambda rep: [M.SubModelTask(2, 1.0, np.ones(3, np.float32)).to_bytes()], "oversized|trains no"),
    "nan coefficient in the replay": (lambda rep: [M.ReplayMessage(2, [M.BroadcastMessage(1, [3], [np.nan])]).to_bytes(),
                                                   _ktask(rep).to_bytes()], "non-finite"),
}


@pytest.mark.parametrize("kind", list(BAD_KSEED_TASKS))
def test_kseed_client_rejects_bad_tasks_without_state_change(kreplica, kind):
    make, words = BAD_KSEED_TASKS[kind]
    st = _replica_state(kreplica)
    reply = M.StatusMessage.from_bytes(kreplica.handle(make(kreplica))[0])
    assert reply.code == M.Status.REJECTED and re.search(words, reply.reason), reply.reason
    assert _replica_unchanged(kreplica, st)


def test_kseed_client_probes_from_a_snapshot_and_stamps_its_checksum(kreplica):
    ck = kreplica.checksum()
    st = _replica_state(kreplica)
    kreplica.version = 2  # as if it held version 2: the task needs no catch-up
    out = M.decode(kreplica.handle([_ktask(kreplica).to_bytes()])[0])
    assert isinstance(out, M.KSeedUpdate) and out.checksum == ck
    assert 1 <= out.indices.size <= kreplica.limits.kseed_steps
    assert all(torch.equal(a, b) for a, b in zip(st[0], kreplica.model.state_dict().values()))
    assert kreplica.last_round == 2


def test_zo_client_rejects_the_new_task_kinds(digits):
    cfg = validate(apply_overrides(RunConfig(), BASE + ["zo.num_seeds=4"])).for_run("zowarmup", 0)
    rep = build_replica(cfg, digits, 0)
    rep.last_round = 1
    st = _replica_state(rep)
    for task, words in (([M.KSeedTask(2, 0).to_bytes()], "phase 2 \\(zo\\)"),
                        ([M.SubModelTask(2, 1.0, np.ones(3, np.float32)).to_bytes()], "oversized"),
                        ([M.StatsRequest(2, rep.layout.flatten(rep.model)).to_bytes()], "no BatchNorm")):
        reply = M.StatusMessage.from_bytes(rep.handle(task)[0])
        assert reply.code == M.Status.REJECTED and re.search(words, reply.reason), reply.reason
        assert _replica_unchanged(rep, st)


def test_decode_checked_bounds_the_new_types_before_decoding(hserver):
    lim = hserver.limits
    for t in (M.MsgType.SUBMODEL, M.MsgType.SUBMODEL_UPDATE, M.MsgType.STATS_REQUEST,
              M.MsgType.STATS):
        assert lim.max_bytes(t) > M.HEADER_BYTES
    assert lim.submodels and lim.num_classes == 10 and lim.stats_size > 0
    big = M.StatsRequest(R, np.zeros(lim.state_size + 100, np.float32))
    with pytest.raises(Rejected, match="oversized"):
        decode_checked(big.to_bytes(), M.MsgType.STATS_REQUEST, lim)
    # the messages round-trip exactly
    for m in (_htask(hserver), _upd(hserver), _stats(hserver),
              M.StatsRequest(R, np.arange(lim.state_size, dtype=np.float32), 5)):
        b = m.to_bytes()
        assert decode_checked(b, m.TYPE, lim).to_bytes() == b


# ------------------------------------------------------------------------------------------------
# malicious clients inside deployments
# ------------------------------------------------------------------------------------------------
def test_malicious_heterofl_client_is_rejected_counted_and_the_round_goes_on(digits):
    cfg = cfg_of("heterofl_bn", "zo.clients_per_round=4")
    coord, replicas = in_memory_deployment(cfg, digits)
    honest, n = replicas[3].handle, replicas[3].client.num_samples

    def evil(payloads):
        m = M.decode(payloads[-1])
        if m.TYPE == M.MsgType.SUBMODEL and m.round == 0:
            return [M.SubModelUpdate(0, np.full(m.values.size, np.nan, np.float32),
                                     np.ones(10, bool), n).to_bytes()]
        if m.TYPE == M.MsgType.STATS_REQUEST and m.round == 1:
            return [M.StatsMessage(1, np.ones(5, np.float32), n).to_bytes()]
        if m.TYPE == M.MsgType.SUBMODEL and m.round == 2:
            return [M.SubModelUpdate(9, np.ones(m.values.size, np.float32), np.ones(10, bool),
                                     n).to_bytes()]
        return honest(payloads)

    replicas[3].handle = evil
    s = coord.run()
    recs = coord.records
    assert recs[0]["rejected"] == [3] and recs[0]["kept"] == 3 and recs[0]["dropped_clients"] == [3]
    assert recs[1]["rejected"] == [3] and recs[1]["kept"] == 4  # its statistics only
    assert recs[2]["rejected"] == [3] and recs[2]["kept"] == 3
    assert coord.server.rejected[3] == 3 and s["rejected_total"] == 3
    reasons = " ".join(x[2] for x in coord.server.rejections)
    for w in ("non-finite", "wrong count", "future"):
        assert w in reasons, (w, reasons)
    assert s["final_sync"]["in_sync"] == list(range(N))


def test_malicious_kseed_client_is_rejected_counted_and_the_run_matches_without_it(digits):
    cfg = cfg_of("fedkseed", "zo.clients_per_round=4")
    coord, replicas = in_memory_deployment(cfg, digits)
    n = replicas[2].client.num_samples

    honest = replicas[2].handle

    def evil(payloads):
        task = M.decode(payloads[-1])
        if task.TYPE != M.MsgType.KSEED_TASK:
            return honest(payloads)  # the final sync
        return [M.KSeedUpdate(task.round, [0], [np.inf], n, task.checksum).to_bytes()]

    replicas[2].handle = evil
    s = coord.run()
    assert all(r["rejected"] == [2] and r["kept"] == N - 1 for r in coord.records)
    assert s["rejected_total"] == 3 and "non-finite" in coord.server.rejections[-1][2]
    ref, _ = in_memory_deployment(cfg, digits, drop=lambda r, c: c == 2)
    ref.run()
    assert states_equal(coord.model, ref.model)

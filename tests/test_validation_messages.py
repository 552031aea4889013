"""Untrusted input: every kind of bad message -- wrong types, wrong counts, seeds out of range,
NaN/inf, oversized payloads, rounds from the past or future, malformed bytes -- is rejected before
it touches state, with a logged reason, and the sender is counted; the server's and the client's
state stay bit for bit what they were."""
import copy
import struct

import numpy as np
import pytest
import torch

from zowarmup import data as zdata
from zowarmup.federated import messages as M
from zowarmup.federated.config import RunConfig, apply_overrides, validate
from zowarmup.federated.deploy import in_memory_deployment
from zowarmup.federated.replica import build_replica
from zowarmup.federated.server import Server
from zowarmup.federated.state import state_checksum, states_equal
from zowarmup.federated.validation import Rejected, decode_checked

TINY = ["num_seeds=1", "baselines=[]", "data.num_clients=10", "data.hi_fraction=0.3",
        "zo.num_seeds=4", "measure_memory=false", "progress=false", "checkpoint_every=0",
        "threads=1", "model.options.hidden=[16]", "rounds=6", "pivot=2", "zo.clients_per_round=5"]


def cfg_for(*extra):
    return validate(apply_overrides(RunConfig(), TINY + list(extra))).for_run("zowarmup", 0)


@pytest.fixture(scope="module")
def digits():
    return zdata.load_dataset("digits")


@pytest.fixture()
def server(digits):
    from zowarmup.federated.federation import build_global_model
    cfg = cfg_for()
    srv = Server(cfg, build_global_model(cfg, digits), 10)
    srv.registered[:] = 30
    return srv


def _log_bytes(srv):
    # serialized copies: comparing the log's message objects would pass by identity
    return {r: None if m is None else m.to_bytes() for r, m in srv.log.items()}


def _server_state(srv):
    return (copy.deepcopy(srv.model.state_dict()), srv.held.copy(), _log_bytes(srv),
            srv.registered.copy())


def _unchanged(srv, st):
    sd, held, logd, reg = st
    return (all(torch.equal(a, b) for a, b in zip(sd.values(), srv.model.state_dict().values()))
            and np.array_equal(held, srv.held) and logd == _log_bytes(srv)
            and np.array_equal(reg, srv.registered))


R = 3
S = 4


def _task(srv):
    t = srv.zo_seeds(R, 2)
    t.checksum = srv.checksum()
    return t


def _grads(srv, **kw):
    d = dict(round=R, values=np.ones(S, np.float32), num_samples=30, checksum=srv.checksum())
    d.update(kw)
    return M.GradsMessage(**d)


def _nan_vals():
    v = np.ones(S, np.float32)
    v[2] = np.nan
    return v


def _overflow_count():
    # header claims 2**32-1 gradients but carries 4: truncated (and far over the size cap if real)
    b = bytearray(M.GradsMessage(R, np.ones(S, np.float32), 30).to_bytes())
    struct.pack_into("<I", b, 12, 2 ** 32 - 1)
    return bytes(b)


BAD_REPLIES = {
    # kind: (payload factory(srv), expected words in the reason)
    "python type str": (lambda s: "hello", "bytes"),
    "python type dict": (lambda s: {"grads": [1.0]}, "bytes"),
    "python type None": (lambda s: None, "bytes"),
    "wrong message type": (lambda s: M.SeedsMessage(R, [1, 2, 3, 4]).to_bytes(), "wrong message type"),
    "bad magic": (lambda s: b"XX" + _grads(s).to_bytes()[2:], "magic"),
    "bad version": (lambda s: _grads(s).to_bytes()[:2] + b"\x09" + _grads(s).to_bytes()[3:], "version"),
    "unknown type byte": (lambda s: _grads(s).to_bytes()[:3] + b"\x3f" + _grads(s).to_bytes()[4:], "unknown message type"),
    "truncated": (lambda s: _grads(s).to_bytes()[:-3], "truncated"),
    "trailing bytes": (lambda s: _grads(s).to_bytes() + b"\0\0\0\0", "oversized|trailing"),
    "huge count field": (lambda s: _overflow_count(), "truncated"),
    "oversized payload": (lambda s: _grads(s, values=np.ones(10 ** 5, np.float32)).to_bytes(), "oversized"),
    "too few grads": (lambda s: _grads(s, values=np.ones(S - 1, np.float32)).to_bytes(), "wrong count"),
    "too many grads": (lambda s: _grads(s, values=np.ones(S + 1, np.float32)).to_bytes(), "oversized"),
    "too many grads (object)": (lambda s: _grads(s, values=np.ones(S + 1, np.float32)), "wrong count"),
    "nan": (lambda s: _grads(s, values=_nan_vals()).to_bytes(), "non-finite"),
    "inf": (lambda s: _grads(s, values=np.array([1, np.inf, 0, 0], np.float32)).to_bytes(), "non-finite"),
    "finite but huge": (lambda s: _grads(s, values=np.array([1, 3e38, 0, 0], np.float32)).to_bytes(), "exceeds"),
    "stale round": (lambda s: _grads(s, round=R - 1).to_bytes(), "stale"),
    "future round": (lambda s: _grads(s, round=R + 1).to_bytes(), "future"),
    "lying sample count": (lambda s: _grads(s, num_samples=10 ** 6).to_bytes(), "registered"),
    "zero samples": (lambda s: _grads(s, num_samples=0).to_bytes(), "num_samples"),
    "missing checksum": (lambda s: _grads(s, checksum=None).to_bytes(), "checksum"),
    "object of wrong dtype": (lambda s: _obj_float64(s), "dtype"),
}


def _obj_float64(s):
    g = _grads(s)
    g.values = np.ones(S, np.float64)  # bypasses __post_init__: a hand-built object
    return g


@pytest.mark.parametrize("kind", list(BAD_REPLIES))
def test_server_rejects_each_kind_of_bad_reply_without_state_change(server, kind, caplog):
    make, words = BAD_REPLIES[kind]
    st = _server_state(server)
    caplog.set_level("WARNING", logger="zowarmup.federated")
    out = server.accept(2, make(server), R, task=_task(server), require_checksum=True)
    assert out is None
    assert server.rejected[2] == 1 and server.rejected.sum() == 1
    reason = server.rejections[-1][2]
    import re
    assert re.search(words, reason), reason
    assert "rejected message from client 2" in caplog.text
    assert _unchanged(server, st)


def test_server_accepts_the_good_reply_and_rejects_other_kinds(server):
    g = server.accept(2, _grads(server).to_bytes(), R, task=_task(server), require_checksum=True)
    assert isinstance(g, M.GradsMessage) and server.rejected.sum() == 0
    # unknown sender ids
    for cid in (-1, 10, "2", 2.0, True):
        assert server.accept(cid, _grads(server).to_bytes(), R, task=_task(server)) is None
    assert len(server.rejections) == 5 and server.rejected.sum() == 0  # nobody to count
    # a weights reply of the wrong size / with NaN
    w = server.weights_message(R)
    for vals in (w.values[:-1], np.where(np.arange(w.values.size) == 3, np.nan, w.values)):
        assert server.accept(4, M.WeightsMessage(R, vals.astype(np.float32), 30).to_bytes(), R,
                             kind="weights") is None
    assert server.rejected[4] == 2
    good = server.accept(4, M.WeightsMessage(R, w.values, 30).to_bytes(), R, kind="weights")
    assert isinstance(good, M.WeightsMessage)
    # a GRADS reply from a client that was given no task
    assert server.accept(5, _grads(server).to_bytes(), R) is None
    # FedKSeed: pool indices out of range, not increasing
    cfgk = cfg_for("fedkseed.pool_size=16", "fedkseed.local_steps=3")
    cfgk.method = "fedkseed"
    srvk = Server(cfgk, copy.deepcopy(server.model), 10)
    for idx in ([3, 16], [5, 2], [1, 2, 3, 4]):
        u = M.KSeedUpdate(R, np.array(idx, np.uint32), np.ones(len(idx), np.float32), 30)
        assert srvk.accept(1, u.to_bytes(), R, kind="kseed") is None
    assert srvk.rejected[1] == 3
    assert isinstance(srvk.accept(1, M.KSeedUpdate(R, [3, 9], [0.5, 1.0], 30).to_bytes(), R,
                                  kind="kseed"), M.KSeedUpdate)


def test_limits_bound_every_type_before_decoding(server):
    lim = server.limits
    for t in M.MsgType:
        assert lim.max_bytes(t) > M.HEADER_BYTES
    big = M.ReplayMessage(R, [M.BroadcastMessage(0, np.zeros(10 ** 4, np.uint64),
                                                 np.zeros(10 ** 4, np.float32))] * 3)
    with pytest.raises(Rejected, match="oversized"):
        decode_checked(big.to_bytes(), M.MsgType.REPLAY, lim)
    # a REPLAY whose count claims more entries than its bytes can hold
    b = bytearray(M.ReplayMessage(R, []).to_bytes())
    struct.pack_into("<I", b, 8, 2 ** 32 - 1)
    with pytest.raises(Rejected, match="truncated"):
        decode_checked(bytes(b), M.MsgType.REPLAY, lim)


# ------------------------------------------------------------------------------------------------
# client side: what the server sends
# ------------------------------------------------------------------------------------------------
@pytest.fixture()
def replica(digits):
    cfg = cfg_for()
    rep = build_replica(cfg, digits, 6)
    rep.last_round = 2
    return rep


def _replica_state(rep):
    return ([p.detach().clone() for p in rep.model.state_dict().values()], rep.version,
            rep.last_round)


def _replica_unchanged(rep, st):
    sd, v, lr = st
    return (all(torch.equal(a, b) for a, b in zip(sd, rep.model.state_dict().values()))
            and rep.version == v and rep.last_round == lr)


def _seeds(**kw):
    d = dict(round=R, seeds=np.arange(1, S + 1, dtype=np.uint64), steps=1, checksum=None)
    d.update(kw)
    return M.SeedsMessage(**d)


def _bcast(r, coeffs=(0.1, -0.2)):
    return M.BroadcastMessage(r, [11, 12], list(coeffs))


def _replay_nan():
    return M.ReplayMessage(R, [_bcast(0), _bcast(1), _bcast(2, (np.nan, 1.0))])


def _seeds_int64():
    m = _seeds()
    m.seeds = np.array([-1, 2, 3, 4], np.int64)  # a hand-built object with negative seeds
    return m


BAD_TASKS = {
    "not a list": (lambda rep: b"junk", "a task is"),
    "three messages": (lambda rep: [_seeds().to_bytes()] * 3, "a task is"),
    "python type": (lambda rep: [12345], "bytes"),
    "grads sent to a client": (lambda rep: [M.GradsMessage(R, [1.0] * S, 1).to_bytes()], "wrong message type"),
    "wrong seed count": (lambda rep: [_seeds(seeds=np.arange(S - 1, dtype=np.uint64)).to_bytes()], "wrong count"),
    "too many seeds": (lambda rep: [_seeds(seeds=np.arange(S + 1, dtype=np.uint64)).to_bytes()], "oversized"),
    "wrong steps": (lambda rep: [_seeds(seeds=np.arange(2 * S, dtype=np.uint64), steps=2).to_bytes()], "oversized|step"),
    "seeds out of range": (lambda rep: [_seeds_int64()], "dtype"),
    "stale round": (lambda rep: [_seeds(round=1).to_bytes()], "stale"),
    "future round": (lambda rep: [_seeds(round=6).to_bytes()], "future"),
    "warm-up task in phase 2": (lambda rep: [M.WeightsMessage(4, rep.layout.flatten(rep.model)).to_bytes()], "warm-up"),
    "oversized seeds": (lambda rep: [_seeds(seeds=np.arange(10 ** 4, dtype=np.uint64)).to_bytes()], "oversized"),
    "nan coefficient in replay": (lambda rep: [_replay_nan().to_bytes(), _seeds().to_bytes()], "non-finite"),
    "replay with a gap": (lambda rep: [M.ReplayMessage(R, [_bcast(0), _bcast(2)]).to_bytes(), _seeds().to_bytes()], "consecutive"),
    "replay for another round": (lambda rep: [M.ReplayMessage(R - 1, [_bcast(0)]).to_bytes(), _seeds().to_bytes()], "does not match"),
    "replay with too many entries": (lambda rep: [M.ReplayMessage(R, [_bcast(0, [0.1] * 2)] * 7).to_bytes(), _seeds().to_bytes()], "oversized|count|consecutive"),
    "weights of wrong size": (lambda rep: [M.WeightsMessage(R, np.zeros(5, np.float32)).to_bytes(), _seeds().to_bytes()], "wrong count"),
    "weights with inf": (lambda rep: [_weights_inf(rep).to_bytes(), _seeds().to_bytes()], "non-finite"),
    "catch-up after seeds": (lambda rep: [_seeds().to_bytes(), _seeds().to_bytes()], "wrong message type"),
    "truncated": (lambda rep: [_seeds().to_bytes()[:-1]], "truncated"),
}


def _weights_inf(rep):
    v = rep.layout.flatten(rep.model)
    v[0] = np.inf
    return M.WeightsMessage(R, v)


@pytest.mark.parametrize("kind", list(BAD_TASKS))
def test_client_rejects_each_kind_of_bad_task_without_state_change(replica, kind, caplog):
    import re
    make, words = BAD_TASKS[kind]
    st = _replica_state(replica)
    caplog.set_level("WARNING", logger="zowarmup.federated")
    out = replica.handle(make(replica))
    reply = M.StatusMessage.from_bytes(out[0])
    assert reply.code == M.Status.REJECTED and re.search(words, reply.reason), reply.reason
    assert replica.rejections and re.search(words, replica.rejections[-1][1])
    assert "rejected the server's message" in caplog.text
    assert _replica_unchanged(replica, st)


def test_malicious_client_in_a_deployment_is_rejected_counted_and_the_round_goes_on(digits):
    cfg = cfg_for("rounds=5", "pivot=0", "zo.clients_per_round=10")
    coord, replicas = in_memory_deployment(cfg, digits)
    bad = iter([[b"\0" * 9], [M.GradsMessage(1, [np.nan] * S, 30, 0).to_bytes()],
                [M.GradsMessage(2, [1e3] * S, 10 ** 6, 0).to_bytes()],
                [M.GradsMessage(99, [1.0] * S, 30, 0).to_bytes()], "garbage"])
    replicas[4].handle = lambda payloads: next(bad, "garbage")
    s = coord.run()
    rej = [r for r in coord.records if 4 in r["rejected"]]
    assert len(rej) == 5 and coord.server.rejected[4] >= 5 and s["rejected_total"] >= 5
    assert all(r["kept"] == r["clients"] - 1 for r in coord.records)
    reasons = " ".join(x[2] for x in coord.server.rejections)
    for w in ("magic", "non-finite", "registered", "future", "one message"):
        assert w in reasons, (w, reasons)
    assert s["final_sync"]["in_sync"] == [c for c in range(10) if c != 4]
    assert s["final_sync"]["mismatch"] == [4]  # its repair was rejected too
    # the honest clients' run: the same as a run without client 4's replies
    honest, honest_replicas = in_memory_deployment(cfg, digits, drop=lambda r, c: c == 4)
    honest.run()
    assert states_equal(coord.model, honest.model)
    assert all(states_equal(replicas[c].model, coord.model) for c in range(10) if c != 4)


@pytest.mark.parametrize("wrong", ["kseed", "weights"])
def test_a_zo_reply_of_the_wrong_kind_is_rejected_and_counted(digits, wrong):
    cfg = cfg_for("rounds=3", "pivot=0", "zo.clients_per_round=10")
    coord, replicas = in_memory_deployment(cfg, digits)
    n4 = replicas[4].client.num_samples

    def evil(payloads):
        task = M.decode(payloads[-1])
        if wrong == "kseed":
            m = M.KSeedUpdate(task.round, np.zeros(0, np.uint32), np.zeros(0, np.float32), n4,
                              task.checksum)
        else:  # a well-formed weights reply stamped with the right checksum
            m = M.WeightsMessage(task.round, coord.server.layout.flatten(coord.model), n4,
                                 task.checksum)
        return [m.to_bytes()]

    replicas[4].handle = evil
    rec = coord.run_round(0)
    assert rec["rejected"] == [4] and rec["dropped_clients"] == [4] and rec["kept"] == 9
    assert coord.server.rejected[4] == 1 and coord.server.rejected.sum() == 1
    assert not rec["desync"] and not rec["failed"]
    reason = coord.server.rejections[-1][2]
    assert "wrong message type" in reason or "largest legal GRADS/STATUS" in reason, reason


def test_forged_future_round_task_changes_nothing_and_the_genuine_rounds_still_run(digits):
    """A task for a round the client cannot legitimately see yet (still inside the run) must not
    move its last round, version or weights: it then takes part in the genuine next round, and
    the run ends bit for bit as without the forgery."""
    cfg = cfg_for("zo.clients_per_round=10")       # rounds=6, pivot=2: every client every round
    coord, replicas = in_memory_deployment(cfg, digits)
    ref, _ = in_memory_deployment(cfg, digits)
    ref.run()
    for r in range(3):
        coord.run_round(r)
    victim = replicas[6]
    assert victim.version == 2 and victim.last_round == 2
    ck = coord.server.checksum()
    st = _replica_state(victim)
    forged = [
        [_seeds(round=5).to_bytes()],                      # no catch-up: not its version
        [_seeds(round=5, checksum=ck).to_bytes()],
        [_seeds(round=4, checksum=ck).to_bytes()],
        [_seeds(round=2, checksum=ck).to_bytes()],        # its round, another checksum
        [M.WeightsMessage(4, victim.layout.flatten(victim.model)).to_bytes()],  # warm-up in phase 2
        [M.StatusMessage(5, M.Status.OK, 5, "", ck).to_bytes()],  # sync to a future version
    ]
    for f in forged:
        out = M.decode(victim.handle(f)[0])
        assert isinstance(out, M.StatusMessage), out
        assert out.code in (M.Status.DESYNC, M.Status.REJECTED), out
        assert _replica_unchanged(victim, st), f
    recs = [coord.run_round(r) for r in range(3, 6)]
    for rec in recs:
        assert 6 not in rec["dropped_clients"] and 6 not in rec["desync"], rec
        assert rec["kept"] == 10
    assert victim.last_round == 5 and victim.version == 5
    report = coord.sync_all()
    assert report["in_sync"] == list(range(10)) and not report["repaired"]
    assert states_equal(victim.model, coord.model)
    assert states_equal(coord.model, ref.model)
    # a SEEDS task can not claim a warm-up round either (fresh client, nothing seen yet)
    fresh = build_replica(cfg, digits, 3)
    st = _replica_state(fresh)
    out = M.decode(fresh.handle([_seeds(round=1).to_bytes()])[0])
    assert out.code == M.Status.REJECTED and "warm-up" in out.reason
    assert _replica_unchanged(fresh, st)


def test_weights_download_is_verified_before_it_is_loaded(replica):
    ck = replica.checksum()
    good = replica.layout.flatten(replica.model)
    bad = good.copy()
    bad[:100] = 0.0                                     # tampered, still claims the checksum
    st = _replica_state(replica)
    for cu in (M.WeightsMessage(R, bad, 0, ck), M.WeightsMessage(R, bad, 0, None),
               M.WeightsMessage(R, good, 0, (ck + 1) % 2 ** 32)):
        out = M.decode(replica.handle([cu.to_bytes(), _seeds(checksum=ck).to_bytes()])[0])
        assert out.code == M.Status.REJECTED and "checksum" in out.reason, out.reason
        assert _replica_unchanged(replica, st)
    # a download that matches its checksum is loaded and the task runs on it
    other = copy.deepcopy(replica.model)
    replica.layout.load(other, good + np.float32(0.25))
    ck2 = state_checksum(other)
    out = M.decode(replica.handle([M.WeightsMessage(R, good + np.float32(0.25), 0, ck2).to_bytes(),
                                   _seeds(checksum=ck2).to_bytes()])[0])
    assert isinstance(out, M.GradsMessage) and out.checksum == ck2
    assert replica.version == R and replica.last_round == R
    assert states_equal(replica.model, other)

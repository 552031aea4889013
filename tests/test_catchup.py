"""Catch-up and dropouts: a client that missed rounds replays the server's seed log or downloads
the weights, whichever is fewer bytes, and both paths give bit-identical weights; a round with a
client that drops out closes at its deadline with whoever answered, and counts the rest."""
import copy
import time

import pytest
import torch

from zowarmup import data as zdata
from zowarmup.federated import messages as M
from zowarmup.federated.config import RunConfig, apply_overrides, validate
from zowarmup.federated.deploy import in_memory_deployment
from zowarmup.federated.loop import Runner
from zowarmup.federated.replica import build_replica
from zowarmup.federated.server import NO_MODEL, Server
from zowarmup.federated.state import states_equal

TINY = ["num_seeds=1", "baselines=[]", "data.num_clients=10", "data.hi_fraction=0.3",
        "zo.num_seeds=4", "measure_memory=false", "progress=false", "checkpoint_every=0",
        "threads=1", "model.options.hidden=[16]"]


def cfg_for(*extra, method="zowarmup"):
    return validate(apply_overrides(RunConfig(), TINY + list(extra))).for_run(method, 0)


@pytest.fixture(scope="module")
def digits():
    return zdata.load_dataset("digits")


def _server_after_zo_rounds(cfg, ds, rounds):
    """A server that ran ``rounds`` ZO rounds (clients 0..3, snapshot probes), and its log."""
    from zowarmup.federated.federation import build_global_model, client_shards, make_client
    model = build_global_model(cfg, ds)
    srv = Server(cfg, model, cfg.data.num_clients)
    shards = client_shards(cfg, ds)
    clients = [make_client(cfg, ds, shards[c], c, "cpu") for c in range(4)]
    versions = [copy.deepcopy(model)]
    for r in range(rounds):
        tasks = {c.cid: srv.zo_seeds(r, c.cid) for c in clients}
        replies = {c.cid: c.fit_zo(copy.deepcopy(model), tasks[c.cid], snapshot=True)
                   for c in clients}
        srv.aggregate_zo(r, tasks, replies)
        versions.append(copy.deepcopy(model))
    return srv, versions


def test_replay_and_download_give_identical_weights_and_the_cheaper_is_chosen(digits):
    # a 64-4-10 MLP (310 floats, 1260 B of weights) so the crossover falls inside 12 rounds
    cfg = cfg_for("rounds=12", "pivot=0", "model.options.hidden=[4]", method="zo_only")
    srv, versions = _server_after_zo_rounds(cfg, digits, 12)
    R = 12
    weights_len = len(srv.weights_message(R).to_bytes())
    bcast = len(srv.log[0].to_bytes())  # 8 + 4 + 12 * (4 clients * 4 seeds)
    assert bcast == 8 + 4 + 12 * 16
    ck = srv.checksum()
    for h in range(R + 1):
        srv.held[7] = h
        msg = srv.catch_up_message(7, R, checksum=ck)
        replay_len = 8 + 4 + 4 + (R - h) * bcast
        if h == R:
            assert msg is None and srv.catch_up_bytes(7, R) == 0
            continue
        want = "REPLAY" if replay_len <= weights_len + 4 else "WEIGHTS"
        assert msg.TYPE.name == want, (h, replay_len, weights_len)
        assert len(msg.to_bytes()) == min(replay_len, weights_len + 4)
        assert srv.catch_up_bytes(7, R) == min(replay_len, weights_len + 4) - 4  # no checksum
        # both paths, applied by a client holding version h, land on the server's exact bits
        rep = build_replica(cfg, digits, 7, model=copy.deepcopy(versions[h]))
        rep.version = h
        out = rep.handle([srv.catch_up_message(7, R, checksum=ck).to_bytes(),
                          M.StatusMessage(R, M.Status.OK, R, "", ck).to_bytes()])
        st = M.StatusMessage.from_bytes(out[0])
        assert st.code == M.Status.OK and st.checksum == ck
        assert states_equal(rep.model, srv.model)
        rep2 = build_replica(cfg, digits, 7, model=copy.deepcopy(versions[h]))
        rep2.version = h
        rep2.handle([srv.weights_message(R, ck).to_bytes(),
                     M.StatusMessage(R, M.Status.OK, R, "", ck).to_bytes()])
        assert states_equal(rep2.model, rep.model)
    # the crossover exists in this setting: far-behind clients download, recent ones replay
    srv.held[7] = 0
    assert srv.catch_up_message(7, R).TYPE.name == "WEIGHTS"
    srv.held[7] = R - 1
    assert srv.catch_up_message(7, R).TYPE.name == "REPLAY"
    # a dense round in the range (warm-up, FedAdam) forces the download
    srv.log[5] = None
    srv.held[7] = 9
    assert srv.catch_up_message(7, R).TYPE.name == "REPLAY"
    srv.held[7] = 4
    assert srv.catch_up_message(7, R).TYPE.name == "WEIGHTS"
    srv.held[7] = NO_MODEL
    assert srv.catch_up_message(7, R).TYPE.name == "WEIGHTS"


def test_replica_skips_rounds_it_already_has_and_desyncs_when_it_cannot_replay(digits):
    cfg = cfg_for("rounds=6", "pivot=0", method="zo_only")
    srv, versions = _server_after_zo_rounds(cfg, digits, 6)
    ck = srv.checksum()
    replay = srv.catch_up_message(9, 6, held=1, checksum=ck)   # rounds 1..5
    sync = M.StatusMessage(6, M.Status.OK, 6, "", ck).to_bytes()
    ahead = build_replica(cfg, digits, 9, model=copy.deepcopy(versions[3]))
    ahead.version = 3   # the server believed 1 (e.g. its reply timed out), it applied 3 rounds
    st = M.StatusMessage.from_bytes(ahead.handle([replay.to_bytes(), sync])[0])
    assert st.code == M.Status.OK and states_equal(ahead.model, srv.model)
    behind = build_replica(cfg, digits, 9, model=copy.deepcopy(versions[0]))
    before = [p.detach().clone() for p in behind.model.parameters()]
    st = M.StatusMessage.from_bytes(behind.handle([replay.to_bytes(), sync])[0])
    assert st.code == M.Status.DESYNC and "cannot replay" in st.reason
    assert all(torch.equal(a, b) for a, b in zip(before, behind.model.parameters()))


def test_lazy_clients_catch_up_by_replay_in_a_deployment(digits):
    """Few clients per round: sampled clients are usually behind; they replay the log (or
    download when that is smaller) and the run equals the embedded one bit for bit."""
    cfg = cfg_for("rounds=10", "pivot=2", "zo.clients_per_round=2", "model.options.hidden=[64]")
    emb = Runner(cfg, _tmp() / "emb", dataset=digits)
    emb.run()
    coord, replicas = in_memory_deployment(cfg, digits)
    s = coord.run()
    assert states_equal(coord.model, emb.model)
    zo = [r for r in coord.records if r["phase"] == "zo"]
    assert sum(r["catch_up"]["replay"] for r in zo) >= 2
    assert sum(r["catch_up"]["weights"] for r in zo) >= 1   # at least the first ZO contact
    assert s["final_sync"]["in_sync"] == list(range(10))


def test_dropouts_do_not_stall_a_round_and_are_counted(digits):
    """Client 3 drops before its work in round 3; client 5 answers after the deadline in round 4
    (its work completes later, so it is ahead of what the server assumes). Both rounds close at the
    deadline with the others; metrics count them; both catch up afterwards.

    No clock decides the outcome: client 5 is held back by an event that is set only after round 4
    has closed, so the round can only have closed without it; the deadline is generous so that the
    other clients answer in time on a loaded machine."""
    import threading
    cfg = cfg_for("rounds=7", "pivot=2", "zo.clients_per_round=10")
    release = threading.Event()

    def delay(r, c):
        if (r, c) == (4, 5):
            assert release.wait(600), "the test never released client 5"
        return 0.0

    coord, replicas = in_memory_deployment(
        cfg, digits, deadline=10.0, threads=10, drop=lambda r, c: (r, c) == (3, 3), delay=delay)
    recs = [coord.run_round(r) for r in range(4)]
    rec4 = coord.run_round(4)
    assert replicas[5].version == 3  # the round closed without client 5: its work has not run
    release.set()
    assert recs[3]["timed_out"] == [3]
    assert recs[3]["kept"] == 9 and recs[3]["dropped_clients"] == [3]
    assert rec4["timed_out"] == [5] and rec4["kept"] == 9 and rec4["dropped_clients"] == [5]
    # the server assumes the oldest version each could hold: what it held before the round
    t_end = time.monotonic() + 600  # only a hung client fails on time
    while replicas[5].version != 4 and time.monotonic() < t_end:
        time.sleep(0.05)  # client 5's late work, released above, finishes in the background
    assert replicas[5].version == 4 and coord.server.held[5] == 3
    for r in range(5, 7):
        coord.run_round(r)
    rep = coord.sync_all()
    assert rep["in_sync"] == list(range(10)) and not rep["repaired"]
    for r in replicas.values():
        assert states_equal(r.model, coord.model)
    coord.transport.close()


def test_runner_catch_up_accounting_uses_the_server_choice(digits, tmp_path):
    cfg = cfg_for("rounds=9", "pivot=2", "zo.sync=lazy", "zo.clients_per_round=3")
    runner = Runner(cfg, tmp_path / "run", dataset=digits)
    runner.setup()
    sizes = []
    orig = runner.server.catch_up_bytes

    def spy(c, r, held=None):
        n = orig(c, r, held)
        m = runner.server.catch_up_message(c, r, held)
        sizes.append((n, 0 if m is None else len(m.to_bytes())))
        return n

    runner.server.catch_up_bytes = spy
    runner.run()
    assert sizes and all(a == b for a, b in sizes)


def _tmp():
    import tempfile
    from pathlib import Path
    return Path(tempfile.mkdtemp(prefix="zw-catchup-"))


def test_dense_phase2_rounds_make_clients_download_and_still_match_embedded(digits):
    """FedAdam as the phase-2 server optimizer is not replayable from seeds: the seed log has no
    entry, every sampled client downloads the weights, and the result is still the embedded one."""
    cfg = cfg_for("rounds=5", "pivot=2", "zo.server_opt=fedadam", "zo.server_lr=0.01",
                  "zo.clients_per_round=4")
    emb = Runner(cfg, _tmp() / "emb", dataset=digits)
    emb.run()
    coord, replicas = in_memory_deployment(cfg, digits)
    s = coord.run()
    assert states_equal(coord.model, emb.model)
    zo = [r for r in coord.records if r["phase"] == "zo"]
    assert all(r["catch_up"]["replay"] == 0 and r["catch_up"]["weights"] == r["clients"]
               for r in zo)
    assert s["final_sync"]["in_sync"] == list(range(10))

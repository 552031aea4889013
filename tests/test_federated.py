"""Federated protocol logic (server/client, message in -> message out) against independent references,
and the embedded runner end to end: pivot, byte accounting, determinism, dropping, resume."""
import copy
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import zo_kernels
from zowarmup import data as zdata
from zowarmup.federated import messages as M
from zowarmup.federated.client import Client
from zowarmup.federated.checkpoint import load_checkpoint
from zowarmup.federated.config import RunConfig, apply_overrides, validate
from zowarmup.federated.loop import Runner, read_metrics
from zowarmup.federated.server import Server
from zowarmup.federated.state import StateLayout, states_equal

REPO = Path(__file__).resolve().parents[1]

TINY = ["rounds=6", "pivot=3", "num_seeds=1", "baselines=[]", "data.num_clients=10",
        "data.hi_fraction=0.3", "zo.num_seeds=4", "zo.clients_per_round=5", "measure_memory=false",
        "progress=false", "checkpoint_every=2", "threads=1", "model.options.hidden=[16]"]


def tiny(*extra, method="zowarmup", seed=0) -> RunConfig:
    cfg = validate(apply_overrides(RunConfig(), TINY + list(extra)))
    return cfg.for_run(method, seed)


@pytest.fixture(scope="module")
def digits():
    return zdata.load_dataset("digits")


def _model(hidden=16, seed=0):
    torch.manual_seed(seed)
    from zowarmup.models import build_model
    return build_model("mlp", 10, 1, 8, norm="none", hidden=(hidden,))


def _clients(cfg, ds, n=4, per=30):
    out = []
    for i in range(n):
        sl = slice(i * per, (i + 1) * per + i)  # unequal sizes: weighting by n_i matters
        out.append(Client(i, ds.x_train[sl], ds.y_train[sl], cfg.seed, cfg.warmup, cfg.zo,
                          cfg.fedkseed))
    return out


def _noise_like(params, seed, dist="rademacher"):
    """Materialized z(seed) for each parameter, at its global offset (independent of apply_seeds_)."""
    offs = zo_kernels.offsets(params)
    return [zo_kernels.noise(seed, p.numel(), offset=o, dist=dist).reshape(p.shape)
            for p, o in zip(params, offs)]


def _loss(model, x, y):
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y, reduction="sum")) / x.shape[0]


# ------------------------------------------------------------------------------------------------
# server and clients against references
# ------------------------------------------------------------------------------------------------
def test_zo_round_matches_reference_and_clients_stay_bit_identical(digits):
    cfg = tiny("zo.num_seeds=3", "zo.lr=0.05")
    server = Server(cfg, _model(), 4)
    clients = _clients(cfg, digits)
    persistent = [copy.deepcopy(server.model) for _ in clients]   # every client's own model
    bystander = copy.deepcopy(server.model)                        # never sampled, only listens
    for r in range(3):
        before = [p.detach().clone() for p in server.model.parameters()]
        tasks = {c.cid: server.zo_seeds(r, c.cid) for c in clients[:3]}
        replies = {c.cid: c.fit_zo(persistent[c.cid], tasks[c.cid], snapshot=True)
                   for c in clients[:3]}
        # the client's projected gradients against a MeZO-style reference with materialized noise
        for c in clients[:3]:
            ref = copy.deepcopy(server.model)
            ps = list(ref.parameters())
            for k, seed in enumerate(tasks[c.cid].seeds):
                z = _noise_like(ps, int(seed))
                d = cfg.zo.eps * cfg.zo.scale
                with torch.no_grad():
                    for p, b, zz in zip(ps, before, z):
                        p.copy_(b + d * zz)
                lp = _loss(ref, c.x, c.y)
                with torch.no_grad():
                    for p, b, zz in zip(ps, before, z):
                        p.copy_(b - d * zz)
                lm = _loss(ref, c.x, c.y)
                g_ref = (lp - lm) / (2 * cfg.zo.eps)
                assert replies[c.cid].values[k] == pytest.approx(g_ref, rel=2e-2, abs=2e-3)
        res = server.aggregate_zo(r, tasks, replies)
        assert res.kept == [0, 1, 2] and res.dropped == []
        # server update == sum over clients/seeds of -lr*c*g*n_i/sum(n)/S * z, built independently
        n = {c.cid: c.num_samples for c in clients[:3]}
        tot = sum(n.values())
        expect = [b.double().clone() for b in before]
        for cid in (0, 1, 2):
            for seed, g in zip(tasks[cid].seeds, replies[cid].values):
                coef = -cfg.zo.lr * cfg.zo.scale * float(g) * n[cid] / tot / cfg.zo.num_seeds
                for e, zz in zip(expect, _noise_like(before, int(seed))):
                    e += coef * zz.double()
        for p, e in zip(server.model.parameters(), expect):
            torch.testing.assert_close(p.detach().double(), e, atol=1e-6, rtol=0)
        # the broadcast is all anyone needs: every client lands on the server's exact bits
        wire = M.BroadcastMessage.from_bytes(res.broadcast.to_bytes())
        for c in clients:
            c.apply_broadcast(persistent[c.cid], wire)
        clients[0].apply_broadcast(bystander, wire)
        for m in persistent + [bystander]:
            assert states_equal(m, server.model)


def test_in_place_restore_drift_is_within_the_documented_bound(digits):
    """Without snapshot, +eps/-2eps/+eps restore rounds: after applying the broadcast the client is
    within (2S + 2) ulp(max(|w|, |w'|) + 2 eps c) of the server per element (w before, w' after
    the round; client.py documents this bound), and most elements are exact."""
    cfg = tiny("zo.num_seeds=6")
    server = Server(cfg, _model(), 4)
    c = _clients(cfg, digits)[0]
    mine = copy.deepcopy(server.model)
    before = [p.detach().clone() for p in server.model.parameters()]
    task = server.zo_seeds(0, 0)
    reply = c.fit_zo(mine, task, snapshot=False)
    res = server.aggregate_zo(0, {0: task}, {0: reply})
    c.apply_broadcast(mine, res.broadcast)
    S, a = cfg.zo.num_seeds, 2 * cfg.zo.eps * cfg.zo.scale
    exact = total = 0
    for p, q, b in zip(mine.parameters(), server.model.parameters(), before):
        mag = torch.maximum(b.abs(), q.detach().abs()) + a
        ulp = torch.nextafter(mag, torch.full_like(mag, math.inf)) - mag
        diff = (p.detach() - q.detach()).abs()
        assert bool((diff <= (2 * S + 2) * ulp).all()), float((diff / ulp).max())
        exact += int((diff == 0).sum())
        total += diff.numel()
    assert exact > total // 4


def test_fedavg_and_fedadam_warmup_match_references(digits):
    for opt in ("fedavg", "fedadam"):
        cfg = tiny(f"warmup.server_opt={opt}", "warmup.server_lr=" + ("1.0" if opt == "fedavg" else "0.01"),
                   "warmup.local_epochs=1")
        server = Server(cfg, _model(), 4)
        clients = _clients(cfg, digits)
        lay = StateLayout(server.model)
        m = v = None
        for r in range(2):
            x0 = lay.flatten(server.model).astype(np.float64)
            down = server.weights_message(r)
            worker = copy.deepcopy(server.model)
            replies = {c.cid: M.WeightsMessage.from_bytes(c.fit_warmup(worker, down, lay).to_bytes())
                       for c in clients}
            server.aggregate_weights(r, replies)
            n = np.array([c.num_samples for c in clients], dtype=np.float64)
            avg = sum(n[i] / n.sum() * replies[i].values.astype(np.float64) for i in range(4))
            d = avg - x0
            if opt == "fedavg":
                expect = x0 + d
            else:
                w = cfg.warmup
                m = (1 - w.beta1) * d if m is None else w.beta1 * m + (1 - w.beta1) * d
                v = (1 - w.beta2) * d * d if v is None else w.beta2 * v + (1 - w.beta2) * d * d
                expect = x0 + w.server_lr * m / (np.sqrt(v) + w.tau)
            np.testing.assert_allclose(lay.flatten(server.model), expect, atol=2e-6, rtol=1e-5)


def test_nan_replies_are_dropped_and_do_not_touch_the_update(digits):
    cfg = tiny()
    s1, s2 = Server(cfg, _model(), 4), Server(cfg, _model(), 4)
    clients = _clients(cfg, digits)
    tasks = {c.cid: s1.zo_seeds(0, c.cid) for c in clients}
    replies = {c.cid: c.fit_zo(copy.deepcopy(s1.model), tasks[c.cid], snapshot=True) for c in clients}
    bad = dict(replies)
    bad[2] = M.GradsMessage(0, np.array([1.0, np.nan, 0.0, 2.0], np.float32), 31)
    bad[3] = M.GradsMessage(0, np.array([1.0, 2.0], np.float32), 31)  # wrong length
    res = s1.aggregate_zo(0, tasks, bad)
    assert res.dropped == [2, 3] and res.kept == [0, 1]
    res2 = s2.aggregate_zo(0, {c: tasks[c] for c in (0, 1)}, {c: replies[c] for c in (0, 1)})
    assert states_equal(s1.model, s2.model)
    assert np.array_equal(res.broadcast.coeffs, res2.broadcast.coeffs)
    # a warm-up reply with inf is dropped too
    w = s1.weights_message(1)
    vals = w.values.copy()
    vals[3] = np.inf
    res3 = s1.aggregate_weights(1, {0: M.WeightsMessage(1, vals, 5), 1: M.WeightsMessage(1, w.values, 5)})[0]
    assert res3.dropped == [0] and res3.kept == [1]


def test_tied_parameters_get_the_server_optimizer_update():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 4, bias=False)
            self.b = torch.nn.Linear(4, 4, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    torch.manual_seed(0)
    m = Tied()
    lay = StateLayout(m)
    assert [e.is_param for e in lay.entries] == [True, True] and lay.buffer_slices() == []
    server = Server(tiny("warmup.server_lr=0.5"), m, 10)
    x = lay.flatten(m)
    server.aggregate_weights(0, {0: M.WeightsMessage(0, x + np.float32(1.0), 30)})
    want = torch.from_numpy(x[:16] + np.float32(0.5)).reshape(4, 4)  # x + server_lr * delta
    assert torch.allclose(m.a.weight.detach(), want, atol=1e-6)
    assert m.b.weight is m.a.weight


def test_fedkseed_aggregation_matches_reference(digits):
    cfg = tiny("fedkseed.pool_size=16", "fedkseed.local_steps=5", method="fedkseed")
    server = Server(cfg, _model(), 4)
    clients = _clients(cfg, digits)
    for c in clients:
        c.pool = server.pool
    before = [p.detach().clone() for p in server.model.parameters()]
    task = M.KSeedTask.from_bytes(server.kseed_task(0).to_bytes())
    replies = {c.cid: c.fit_kseed(copy.deepcopy(server.model), task, snapshot=True) for c in clients}
    for r in replies.values():
        assert 1 <= r.indices.size <= 5 and list(r.indices) == sorted(set(r.indices.tolist()))
    res = server.aggregate_kseed(0, replies)
    n = np.array([c.num_samples for c in clients], dtype=np.float64)
    acc = np.zeros(16)
    for i, r in replies.items():
        acc[r.indices.astype(int)] += n[i] / n.sum() * r.values
    k = cfg.fedkseed
    expect = [b.double().clone() for b in before]
    for idx in np.flatnonzero(acc):
        coef = -k.lr * k.scale * acc[idx]
        for e, z in zip(expect, _noise_like(before, int(server.pool[idx]), k.dist)):
            e += coef * z.double()
    for p, e in zip(server.model.parameters(), expect):
        torch.testing.assert_close(p.detach().double(), e, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------
# runner end to end
# ------------------------------------------------------------------------------------------------
def _weights_len(n_floats):
    return 8 + 12 + 4 * n_floats


def test_pivot_phases_and_byte_counts_equal_serialized_sizes(digits, tmp_path):
    cfg = tiny()
    runner = Runner(cfg, tmp_path / "run", dataset=digits)
    summary = runner.run()
    recs = read_metrics(tmp_path / "run")
    assert [r["round"] for r in recs] == list(range(6))
    assert [r["phase"] for r in recs] == ["warmup"] * 3 + ["zo"] * 3
    n_state = sum(t.numel() for t in runner.model.state_dict().values())
    W = _weights_len(n_state)
    S, k, N, n_hi = 4, 5, 10, 3
    assert int(runner.hi.sum()) == n_hi
    for r in recs[:3]:  # warm-up: every high-resource client, full weights both ways
        assert r["clients"] == n_hi
        assert r["bytes_up_per_client"] == W and r["bytes_down_per_client"] == W
        assert r["bytes_up_total"] == n_hi * W and r["bytes_down_total"] == n_hi * W
    seeds_len, grads_len, bcast_len = 8 + 6 + 8 * S, 8 + 8 + 4 * S, 8 + 4 + 12 * S * k
    for r in recs[3:]:
        assert r["clients"] == k and r["bytes_up_per_client"] == grads_len
        assert r["bytes_up_total"] == k * grads_len
    # pivot round: all N clients download the warmed-up weights once, then seeds and broadcast
    p = recs[3]
    assert p["bytes_down_sync"] == N * W
    assert p["bytes_down_per_client"] == W + seeds_len + bcast_len
    assert p["bytes_down_total"] == N * W + k * seeds_len + N * bcast_len
    for r in recs[4:]:
        assert r["bytes_down_sync"] == 0
        assert r["bytes_down_per_client"] == seeds_len + bcast_len
        assert r["bytes_down_total"] == k * seeds_len + N * bcast_len
    assert summary["communication"]["zo"]["bytes_up_per_client_median"] == grads_len
    assert all(r["accuracy"] is not None and 0 <= r["accuracy"] <= 1 for r in recs)
    for f in ("config.json", "metrics.jsonl", "summary.json", "accuracy.png", "checkpoint.pt"):
        assert (tmp_path / "run" / f).exists(), f
    assert (tmp_path / "run" / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lazy_sync_counts_the_cheaper_of_replay_and_weights(digits, tmp_path):
    cfg = tiny("zo.sync=lazy", "rounds=9", "pivot=2", "zo.clients_per_round=3",
               "model.options.hidden=[64]")
    runner = Runner(cfg, tmp_path / "run", dataset=digits)
    runner.run()
    recs = read_metrics(tmp_path / "run")
    N, S, k = 10, 4, 3
    W = _weights_len(sum(t.numel() for t in runner.model.state_dict().values()))
    bcast = 8 + 4 + 12 * S * k
    held = {c: None for c in range(N)}  # None: holds no replayable version
    for r in range(2, 9):
        ids = zdata.sample_clients(N, k, r, cfg.seed).tolist()
        sync = 0
        for c in ids:
            h = held[c]
            if h is None:
                sync += W
            elif h < r:
                sync += min(W, 8 + 4 + (r - h) * bcast)   # a REPLAY of the missed broadcasts
        for c in ids:
            held[c] = r + 1
        assert recs[r]["bytes_down_sync"] == sync, r
        assert recs[r]["bytes_down_total"] == sync + k * (8 + 6 + 8 * S) + k * bcast


def test_same_config_and_seed_give_identical_metrics(digits, tmp_path):
    a = Runner(tiny(), tmp_path / "a", dataset=digits)
    a.run()
    b = Runner(tiny(), tmp_path / "b", dataset=digits)
    b.run()
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == (tmp_path / "b" / "metrics.jsonl").read_text()
    assert states_equal(a.model, b.model)
    c = Runner(tiny(seed=1), tmp_path / "c", dataset=digits)
    c.run()
    assert read_metrics(tmp_path / "c") != read_metrics(tmp_path / "a")


def test_nan_client_is_dropped_logged_and_counted(digits, tmp_path):
    runner = Runner(tiny(), tmp_path / "run", dataset=digits)
    runner.setup()
    hi = int(np.flatnonzero(runner.hi)[0])
    lo = int(np.flatnonzero(~runner.hi)[0])
    for c in (hi, lo):
        runner.clients[c].x = torch.full_like(runner.clients[c].x, float("nan"))
    summary = runner.run()
    recs = read_metrics(tmp_path / "run")
    total = 0
    for r in recs:
        expect = [c for c in sorted({hi, lo}) if c in _participants(runner, r["round"], r["phase"])]
        assert r["dropped_clients"] == expect and r["dropped"] == len(expect)
        total += len(expect)
    assert total >= 3 and summary["dropped_total"] == total
    assert math.isfinite(summary["final_accuracy"]) and summary["final_accuracy"] > 0.1
    assert f"dropped client {hi}" in (tmp_path / "run" / "run.log").read_text()


def _participants(runner, r, phase):
    cfg = runner.cfg
    if phase == "warmup":
        return zdata.sample_clients(10, len(runner.hi_ids), r, cfg.seed,
                                    candidates=runner.hi_ids).tolist()
    return zdata.sample_clients(10, cfg.zo.clients_per_round, r, cfg.seed).tolist()


@pytest.mark.parametrize("method, extra", [
    ("zowarmup_hilo", []), ("zowarmup_fedkseed", ["fedkseed.pool_size=64"]),
    ("zowarmup", ["zo.server_opt=fedadam", "zo.server_lr=0.01", "zo.dist=gaussian",
                  "zo.local_steps=2", "zo.seed_sharing=shared"]),
])
def test_variants_run_and_account_their_downlink(digits, tmp_path, method, extra):
    runner = Runner(tiny(*extra, method=method), tmp_path / "run", dataset=digits)
    summary = runner.run()
    recs = read_metrics(tmp_path / "run")
    assert all(math.isfinite(r["loss"]) for r in recs)
    W = _weights_len(sum(t.numel() for t in runner.model.state_dict().values()))
    if method == "zowarmup_hilo" or "zo.server_opt=fedadam" in extra:
        # dense phase-2 updates are not replayable: sampled clients download weights each round
        assert summary["notes"]
        for r in recs[3:]:
            assert r["bytes_down_per_client"] >= W and r["bytes_down_sync"] > 0
    if "zo.local_steps=2" in extra:
        assert recs[-1]["bytes_up_per_client"] == 8 + 8 + 4 * 4 * 2
    if "zo.seed_sharing=shared" in extra:
        assert recs[-1]["bytes_down_per_client"] >= 8 + 6 + 8 * 8


def test_memory_report_shows_zo_at_inference_level(digits, tmp_path):
    # same samples per forward for both (64), a model whose weights matter (64 -> 128 -> 10)
    runner = Runner(tiny("measure_memory=true", "rounds=1", "pivot=0", "zo.micro_batch=64",
                         "warmup.batch_size=64", "model.options.hidden=[128]"), tmp_path / "run",
                    dataset=digits)
    mem = runner.run()["memory"]
    meas = mem["measured"]
    assert meas["inference"]["total_bytes"] > meas["inference"]["weights"] > 0
    assert meas["zo_step"]["total_bytes"] < meas["backprop_step"]["total_bytes"]
    assert meas["zo_step"]["vs_inference"] < 1.25
    f = mem["formula"]
    assert f["forward_methods"]["zo"]["total_bytes"] == f["forward_methods"]["inference"]["total_bytes"]
    assert f["backprop_methods"]["backprop_sgd"]["grads"] == meas["zo_step"]["weights"]


def test_sigkill_mid_round_then_resume_gives_the_uninterrupted_metrics(digits, tmp_path):
    over = ["rounds=14", "pivot=4", "data.num_clients=20", "zo.clients_per_round=20",
            "zo.num_seeds=6", "checkpoint_every=3", "model.options.hidden=[32]"]
    ref = Runner(tiny(*over), tmp_path / "ref", dataset=digits)
    ref.run()
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "zowarmup", "run", "-q", "--out", str(out)] + TINY + over
    env = dict(os.environ)  # the installed package: the copy this process tests
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    killed_at = None
    deadline = time.time() + 900  # only a hung run fails on time
    try:
        while time.time() < deadline and proc.poll() is None:
            runs = list(out.glob("*/zowarmup-seed0"))
            if runs and (runs[0] / "checkpoint.pt").exists():
                lines = (runs[0] / "metrics.jsonl").read_text().count("\n")
                if lines >= 7:
                    os.kill(proc.pid, signal.SIGKILL)
                    killed_at = lines
                    break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and killed_at is None:
            proc.kill()
        proc.wait()
    assert killed_at is not None, "the run finished before it could be killed: " + \
        proc.stderr.read().decode()[-2000:]
    exp = next(out.glob("*"))
    run = exp / "zowarmup-seed0"
    assert not (run / "summary.json").exists()
    res = subprocess.run([sys.executable, "-m", "zowarmup", "run", "-q", "--resume", str(exp)],
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (run / "metrics.jsonl").read_text() == (tmp_path / "ref" / "metrics.jsonl").read_text()
    assert "resumed" in (run / "run.log").read_text()
    final = load_checkpoint(run)["model"]  # framed, weights_only=True
    for k, v in ref.model.state_dict().items():
        assert torch.equal(final[k], v)

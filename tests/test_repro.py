"""Issue 12: the paper's protocol as the default, BatchNorm modes in ZO rounds, the Table 3 data
split, faithful FedKSeed, HeteroFL (against a numpy reference of its per-entry averaging) and the
sweep's validation split."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import zo_kernels
from zowarmup import data as zdata
from zowarmup.federated import bn as zbn
from zowarmup.federated import heterofl_models as H
from zowarmup.federated.client import Client
from zowarmup.federated.config import ConfigError, RunConfig, apply_overrides, validate
from zowarmup.federated.messages import KSeedTask, SeedsMessage
from zowarmup.federated.state import StateLayout
from zowarmup.models import build_model

TINY = ["rounds=4", "pivot=2", "num_seeds=1", "baselines=[]", "data.num_clients=6",
        "data.hi_fraction=0.34", "zo.num_seeds=3", "measure_memory=false", "progress=false",
        "checkpoint_every=0", "threads=1", "model.options.hidden=[12]"]


def tiny(*extra, method="zowarmup", seed=0):
    return validate(apply_overrides(RunConfig(), TINY + list(extra))).for_run(method, seed)


@pytest.fixture(scope="module")
def digits():
    return zdata.load_dataset("digits")


# -- 1. the paper's protocol -------------------------------------------------------------------
def test_defaults_are_the_papers_protocol():
    c = RunConfig()
    assert c.zo.clients_per_round == 0 and c.zo.local_steps == 1 and not c.zo.epoch_split
    assert c.zo.scale == 0.75 and c.zo.dist == "rademacher"
    for bad in (0, 1.5, -0.1):
        with pytest.raises(ConfigError, match=r"zo.scale.*\(0, 1\]"):
            validate(apply_overrides(RunConfig(), [f"zo.scale={bad}"]))
    validate(apply_overrides(RunConfig(), ["zo.scale=1.0"]))


def _bn_mlp():
    torch.manual_seed(0)
    return build_model("mlp", 10, 1, 8, norm="bn", hidden=(6,))


def test_local_statistics_match_numpy(digits):
    m = _bn_mlp()
    x = digits.x_train[:40]
    stats = zbn.local_statistics(m, x, micro_batch=64)
    h = (torch.flatten(x, 1) @ m.net[0].weight.T + m.net[0].bias).detach().numpy().astype(np.float64)
    ref = np.concatenate([h.mean(0), h.var(0, ddof=1)])
    np.testing.assert_allclose(stats, ref, rtol=1e-4, atol=1e-5)
    # buffers untouched, eval mode after
    assert torch.equal(m.net[1].running_mean, torch.zeros(6)) and not m.training


def test_bn_modes_in_fit_zo(digits):
    """frozen: the loss uses running statistics; batch: the batch's; neither changes the buffers."""
    x, y = digits.x_train[:30], digits.y_train[:30]
    out = {}
    for mode in ("frozen", "batch"):
        cfg = tiny(f"zo.bn_stats='{mode}'", "model.norm='bn'", "zo.eps=0.001")
        m = _bn_mlp()
        with torch.no_grad():
            m.net[1].running_mean.fill_(0.3)
        before = {k: v.clone() for k, v in m.state_dict().items()}
        cl = Client(0, x, y, 0, cfg.warmup, cfg.zo)
        g = cl.fit_zo(m, SeedsMessage(0, [11, 12], 1), snapshot=True).values
        assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
        # reference: central difference with the matching BN behaviour
        params = list(m.parameters())
        z = [zo_kernels.noise(11, p.numel(), offset=o).reshape(p.shape)
             for p, o in zip(params, zo_kernels.offsets(params))]

        def loss(sign):
            mm = _bn_mlp()
            mm.load_state_dict(before)
            with torch.no_grad():
                for p, zz in zip(mm.parameters(), z):
                    p.add_(sign * 1e-3 * 0.75 * zz)
            mm.eval()
            if mode == "batch":
                mm.net[1].train()
                mm.net[1].track_running_stats = False
            with torch.no_grad():
                return float(F.cross_entropy(mm(x), y))
        ref = (loss(1) - loss(-1)) / 2e-3
        assert abs(g[0] - ref) < 2e-2 * max(1.0, abs(ref)), (mode, g[0], ref)
        out[mode] = g[0]
    assert out["frozen"] != out["batch"]


def test_recompute_sets_server_statistics(digits):
    """After a ZO round with bn_stats=recompute the server's running statistics are the
    sample-weighted mean of every client's statistics under the round's starting weights."""
    import copy
    from zowarmup.federated.driver import LocalExchange, RoundDriver
    from zowarmup.federated.federation import Federation
    cfg = tiny("model.norm='bn'", "zo.bn_stats='recompute'", "rounds=3", "pivot=2")
    fed = Federation(cfg, dataset=digits)
    d = RoundDriver(fed, LocalExchange(fed))
    d.step(0)
    d.step(1)
    start = copy.deepcopy(fed.model)
    n = np.asarray([c.num_samples for c in fed.clients], dtype=np.float64)
    ref = sum(w * zbn.local_statistics(start, c.x, cfg.zo.micro_batch).astype(np.float64)
              for w, c in zip(n / n.sum(), fed.clients))
    rec = d.step(2)
    assert rec["phase"] == "zo"
    bnl = fed.model.net[1]
    np.testing.assert_allclose(np.concatenate([bnl.running_mean.numpy(), bnl.running_var.numpy()]),
                               ref, rtol=1e-5, atol=1e-6)
    # S grads up (GradsMessage) + 24 statistics (WeightsMessage) per client
    from zowarmup.federated.messages import GradsMessage, WeightsMessage
    up = len(GradsMessage(2, np.zeros(3, np.float32), 1).to_bytes()) + \
        len(WeightsMessage(2, np.zeros(24, np.float32), 1).to_bytes())
    assert rec["bytes_up_per_client"] == up


def test_epoch_split_covers_the_data_once(digits):
    cfg = tiny("zo.local_steps=3", "zo.epoch_split=true", "zo.scale=0.25")
    cl = Client(1, digits.x_train[:31], digits.y_train[:31], 0, cfg.warmup, cfg.zo)
    chunks = cl._step_data(5, 3)
    assert [c[0].shape[0] for c in chunks] == [11, 10, 10]
    allx = torch.cat([c[0] for c in chunks])
    assert sorted(map(tuple, allx.flatten(1).tolist())) == sorted(map(tuple, digits.x_train[:31].flatten(1).tolist()))
    assert cl._step_data(5, 3)[0][1].tolist() == chunks[0][1].tolist()  # deterministic
    assert cl._step_data(6, 3)[0][1].tolist() != chunks[0][1].tolist()  # per round


# -- 3. FedKSeed -------------------------------------------------------------------------------
def test_fedkseed_uses_its_own_gaussian_noise_and_pool(digits):
    cfg = tiny("fedkseed.local_steps=2", "fedkseed.batch_size=0", "fedkseed.lr=0.01",
               "fedkseed.eps=0.002", method="fedkseed")
    assert cfg.fedkseed.dist == "gaussian" and cfg.fedkseed.scale == 1.0
    assert cfg.fedkseed.pool_size == 1024
    from zowarmup.federated.server import Server
    m = build_model("mlp", 10, 1, 8, norm="none", hidden=(8,))
    srv = Server(cfg, m, 6)
    assert srv.pool.size == 1024 and len(np.unique(srv.pool)) == 1024
    x, y = digits.x_train[:20], digits.y_train[:20]
    cl = Client(0, x, y, 0, cfg.warmup, cfg.zo, cfg.fedkseed.for_method("fedkseed"), srv.pool)
    work = build_model("mlp", 10, 1, 8, norm="none", hidden=(8,))
    work.load_state_dict(m.state_dict())
    rep = cl.fit_kseed(work, KSeedTask(0, 2), snapshot=True)
    # reference first step: unscaled Gaussian z of the chosen pool seed, eps 0.002
    from zowarmup.seeds import TAG_KSEED_INDEX, derive_seed
    k0 = derive_seed(0, TAG_KSEED_INDEX, 0, 0, 0) % 1024
    params = list(m.parameters())
    z = [zo_kernels.noise(int(srv.pool[k0]), p.numel(), offset=o, dist="gaussian").reshape(p.shape)
         for p, o in zip(params, zo_kernels.offsets(params))]

    def loss(sign):
        mm = build_model("mlp", 10, 1, 8, norm="none", hidden=(8,))
        mm.load_state_dict(m.state_dict())
        with torch.no_grad():
            for p, zz in zip(mm.parameters(), z):
                p.add_(sign * 0.002 * zz)
            return float(F.cross_entropy(mm(x), y))
    ref = (loss(1) - loss(-1)) / 0.004
    k1 = derive_seed(0, TAG_KSEED_INDEX, 0, 0, 1) % 1024
    if k1 != k0:
        got = dict(zip(rep.indices.tolist(), rep.values.tolist()))[k0]
        assert abs(got - ref) < 1e-2 * max(1.0, abs(ref))
    # zowarmup_fedkseed: one step on the whole local data
    c2 = tiny(method="zowarmup_fedkseed")
    assert c2.fedkseed.for_method("zowarmup_fedkseed").local_steps == 1
    assert c2.fedkseed.for_method("zowarmup_fedkseed").batch_size == 0
    assert c2.fedkseed.for_method("fedkseed").local_steps == c2.fedkseed.local_steps


# -- 2. HeteroFL -------------------------------------------------------------------------------
def test_heterofl_slices_nest_for_every_family():
    for name, opts in (("mlp", {"hidden": (8, 6)}), ("cnn", {"widths": (4, 8)}),
                       ("resnet18", {"width": 4})):
        full = build_model(name, 10, 1, 8, norm="bn", **opts)
        sub = build_model(name, 10, 1, 8, norm="bn", **H.sub_options(name, opts, 0.5))
        idx = H.sub_index(full, sub)
        H.extract(full, sub, idx)
        for n, p in sub.named_parameters():
            assert torch.equal(p, dict(full.named_parameters())[n][idx[n]])
        assert sum(p.numel() for p in sub.parameters()) < sum(p.numel() for p in full.parameters())


def test_heterofl_aggregation_matches_numpy_reference():
    torch.manual_seed(1)
    full = build_model("mlp", 4, 1, 2, norm="none", hidden=(6,))
    half = build_model("mlp", 4, 1, 2, norm="none", hidden=(3,))
    fi, hi = H.sub_index(full, full), H.sub_index(full, half)
    W0 = {n: p.detach().numpy().astype(np.float64).copy() for n, p in full.named_parameters()}
    rng = np.random.default_rng(0)
    clients = []
    for idx, model, mask in ((fi, full, [1, 1, 0, 0]), (hi, half, [0, 1, 1, 0]), (hi, half, [1, 1, 1, 1])):
        params = {n: torch.from_numpy(rng.normal(size=p.shape).astype(np.float32))
                  for n, p in model.named_parameters()}
        clients.append((idx, params, np.asarray(mask, bool)))
    H.aggregate(full, clients, 4)
    # numpy reference: entry-wise mean over holders; classifier rows only from label holders
    for n, W in W0.items():
        acc, cnt = np.zeros_like(W), np.zeros_like(W)
        for idx, params, mask in clients:
            v = params[n].numpy().astype(np.float64)
            sl = tuple(slice(0, s) for s in v.shape)
            m = np.ones_like(v)
            if n.startswith("net.3."):  # classifier: rows are classes
                m *= mask.reshape(-1, *([1] * (v.ndim - 1)))
            acc[sl] += m * v
            cnt[sl] += m
        ref = np.where(cnt > 0, acc / np.maximum(cnt, 1), W)
        np.testing.assert_allclose(dict(full.named_parameters())[n].detach().numpy(), ref,
                                   rtol=1e-6, atol=1e-6)
    # class 3 is held by client 2 only; hidden units 3..5 only by client 0
    assert np.allclose(full.net[3].weight.detach().numpy()[3, :3], clients[2][1]["net.3.weight"][3].numpy())


def test_heterofl_scaler_and_budget():
    m = build_model("mlp", 10, 1, 8, norm="none", hidden=(4,))
    hooks = H.add_scaler(m, 0.5)
    x = torch.randn(3, 1, 8, 8)
    m.eval()
    ev = m(x)
    m.train()
    tr = m(x)
    h = torch.relu((torch.flatten(x, 1) @ m.net[0].weight.T + m.net[0].bias) / 0.5)
    assert torch.allclose(tr, h @ m.net[3].weight.T + m.net[3].bias, atol=1e-5)
    assert not torch.allclose(ev, tr)
    for hk in hooks:
        hk.remove()
    from zowarmup.federated.methods.heterofl import rounds_under_budget
    c1 = tiny(method="heterofl")
    base = validate(apply_overrides(RunConfig(), TINY + ["rounds=100", "data.hi_fraction=0.5"]))
    c2 = base.for_run("heterofl", 0)
    # budget at share 0.1: 100 * (0.1 + 0.9/4) / (0.5 + 0.5/4) = 52
    assert c2.rounds == 52 and rounds_under_budget(base) == 52
    assert c1.rounds <= 4


def test_heterofl_runs_and_counts_bytes(digits, tmp_path):
    from zowarmup.federated.loop import Runner
    cfg = tiny("model.norm='bn'", "rounds=2", method="heterofl")
    s = Runner(cfg, tmp_path / "h", dataset=digits).run()
    recs = [json.loads(line) for line in (tmp_path / "h" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["phase"] == "heterofl" for r in recs) and s["final_accuracy"] is not None
    full = build_model("mlp", 10, 1, 8, norm="bn", hidden=(12,))
    half = build_model("mlp", 10, 1, 8, norm="bn", hidden=(6,))
    pf = sum(p.numel() for p in full.parameters())
    ph = sum(p.numel() for p in half.parameters())
    n_hi = 2
    state = len(StateLayout(full).flatten(full))
    # down: a SubModelTask of the sub-network's parameters (20 bytes of header, rate and count),
    # then, for sBN, a StatsRequest with the new global state (16 bytes of header and count)
    exp_task = (n_hi * (20 + 4 * pf) + (6 - n_hi) * (20 + 4 * ph)) / 6
    assert recs[0]["bytes_down_per_client"] == pytest.approx(exp_task + 16 + 4 * state)
    # up: the trained parameters with the client's class mask (uint16 K + 2 bytes of bits for
    # 10 classes), plus the BatchNorm statistics (2 * 12 floats) for sBN
    assert recs[0]["bytes_up_per_client"] == pytest.approx(exp_task + 4 + 20 + 4 * 24)


# -- 5. sweep ----------------------------------------------------------------------------------
def test_validation_split_is_carved_from_training_data(digits):
    from zowarmup.federated.federation import validation_dataset
    v = validation_dataset(digits, 0.2)
    tr = {tuple(r) for r in v.x_train.flatten(1).tolist()}
    va = {tuple(r) for r in v.x_test.flatten(1).tolist()}
    alltr = {tuple(r) for r in digits.x_train.flatten(1).tolist()}
    te = {tuple(r) for r in digits.x_test.flatten(1).tolist()}
    assert va <= alltr and not (va & tr) and not (va & te - alltr)
    assert len(v.y_train) + len(v.y_test) == len(digits.y_train)


def test_sweep_selects_on_validation_and_writes_a_runnable_config(tmp_path, digits, monkeypatch):
    from zowarmup.federated import sweep as S
    base = validate(apply_overrides(RunConfig(), TINY + ["rounds=2", "pivot=1"]))
    grid = S.parse_grid(["zo.lr=[0.01, 0.2]"])
    d = S.run_sweep(base, grid, sweep_dir=tmp_path / "s", progress=False, echo=None)
    t = json.loads((d / "results.json").read_text())
    means = [r["results"]["zowarmup"]["mean"] for r in t["rows"]]
    assert t["best"]["index"] == int(np.argmax(means))
    cfg_run = json.loads((d / "point-0" / "zowarmup-seed0" / "config.json").read_text())
    assert cfg_run["data"]["validation"] == 0.2
    best = json.loads((d / "best.json").read_text())
    assert best["data"]["validation"] == 0.0 and best["zo"]["lr"] == t["best"]["point"]["zo.lr"]
    from zowarmup.federated.config import load_config
    load_config(d / "best.json")
    # resume: nothing to redo, same table
    S.resume_sweep(d, progress=False, echo=None)
    assert json.loads((d / "results.json").read_text()) == t


def test_parallel_jobs_match_sequential_runs(tmp_path, digits):
    from zowarmup.federated.parallel import run_jobs
    cfgs = [tiny("rounds=2", "pivot=1", seed=s) for s in (0, 1)]
    seq, par = {}, {}
    run_jobs([(c, tmp_path / "a" / str(c.seed)) for c in cfgs], 1,
             done=lambda rd, s: seq.__setitem__(rd[-1], s["final_checksum"]))
    run_jobs([(c, tmp_path / "b" / str(c.seed)) for c in cfgs], 2,
             done=lambda rd, s: par.__setitem__(rd[-1], s["final_checksum"]))
    assert seq == par and len(seq) == 2

"""Exact agreement: the scratch-buffer ZO evaluation (bit-exact perturbed forwards, stored weights
untouched, memory = inference + the largest layer), state checksums in messages, and persistent
clients that stay bit-identical to the server over ZO rounds while only seeds and scalars travel --
with drift and corruption detected by checksum and repaired by a weights download."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import zo_kernels
from zowarmup import data as zdata
from zowarmup import memory as accounting
from zowarmup.federated import messages as M
from zowarmup.federated.config import RunConfig, apply_overrides, validate
from zowarmup.federated.deploy import in_memory_deployment
from zowarmup.optim.exact import ScratchPerturbation, check_exact_supported, exact_estimate
from zowarmup.federated.loop import Runner
from zowarmup.federated.state import state_checksum, states_equal
from zowarmup.models import build_model

TINY = ["rounds=6", "pivot=3", "num_seeds=1", "baselines=[]", "data.num_clients=10",
        "data.hi_fraction=0.3", "zo.num_seeds=4", "zo.clients_per_round=5", "measure_memory=false",
        "progress=false", "checkpoint_every=0", "threads=1", "model.options.hidden=[16]"]


def tiny(*extra, method="zowarmup", seed=0) -> RunConfig:
    return validate(apply_overrides(RunConfig(), TINY + list(extra))).for_run(method, seed)


@pytest.fixture(scope="module")
def digits():
    return zdata.load_dataset("digits")


MODELS = [
    ("mlp", dict(norm="none", hidden=(16,)), (5, 1, 8, 8)),
    ("cnn", dict(norm="bn"), (5, 1, 8, 8)),
    ("resnet18", dict(norm="gn", width=8), (2, 3, 32, 32)),
    ("vit_small", dict(dim=24, depth=2, heads=2), (3, 3, 32, 32)),
]


def _bits(model):
    return [p.detach().clone().view(torch.int32) for p in model.parameters()]


def _perturbed_copy(model, seed, alpha):
    """Reference: a copy whose parameters are fl(w + alpha z) element by element, from the
    materialized noise (independent of apply_seeds_)."""
    ref = copy.deepcopy(model)
    ps = list(ref.parameters())
    a32 = float(torch.tensor(alpha, dtype=torch.float32))
    with torch.no_grad():
        for p, off in zip(ps, zo_kernels.offsets(ps)):
            z = zo_kernels.noise(seed, p.numel(), offset=off).reshape(p.shape)
            p.copy_(p + a32 * z)
    return ref


@pytest.mark.parametrize("name, kw, shape", MODELS, ids=[m[0] for m in MODELS])
def test_scratch_forward_is_bit_exact_and_leaves_weights_untouched(name, kw, shape):
    torch.manual_seed(0)
    model = build_model(name, 10, shape[1], shape[2], **kw).eval()
    x = torch.randn(shape)
    before = _bits(model)
    sp = ScratchPerturbation(model)
    with torch.no_grad():
        for seed, alpha in ((7, 1e-3 * 0.75), (2 ** 64 - 1, -0.3)):
            want = _perturbed_copy(model, seed, alpha).eval()(x)
            with sp.hooks():
                with sp.perturb(seed, alpha):
                    got = model(x)
                    got2 = model(x)  # every forward recomputes from the untouched weights
                plain = model(x)     # outside perturb(): the stored weights
            assert torch.equal(got, want) and torch.equal(got2, want)
            assert torch.equal(plain, model(x))
    assert all(torch.equal(a, b) for a, b in zip(before, _bits(model)))
    assert sp.overflow_bytes == 0
    # the largest transient perturbed copy: a chunk (these layers fit one 4 MiB chunk) or a
    # whole small parameter (fallback), never more than the largest parameter
    largest = max(p.numel() * 4 for p in model.parameters())
    assert 0 < max(sp.chunked.chunk_max_bytes, sp.chunked.fallback_max_bytes) <= largest
    assert check_exact_supported(model, x)


def test_reads_outside_the_owner_are_supported_and_aliases_are_detected():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Linear(4, 4)
            self.out = torch.nn.Linear(4, 3)

        def forward(self, x):  # reads emb.weight outside emb's forward: perturbed too
            return self.out(F.linear(x, self.emb.weight))

    assert check_exact_supported(Tied(), torch.randn(2, 4))
    assert check_exact_supported(_ReadsAnAlias(bypass=False), torch.randn(2, 64))
    assert not check_exact_supported(_ReadsAnAlias(), torch.randn(2, 64))
    alias = torch.nn.Linear(64, 10)
    alias.w = alias.weight.detach()  # shares the parameter's memory, another tensor object
    alias.forward = lambda x: F.linear(x.flatten(1), alias.w, alias.bias)
    assert not check_exact_supported(alias, torch.randn(2, 64))


class _ReadsAnAlias(torch.nn.Module):
    """Reads its weight with torch functions switched off (as some fused-kernel libraries do), or
    through a tensor aliasing the parameter's memory: exact mode would see w, not w + a z."""

    def __init__(self, bypass: bool = True):
        super().__init__()
        self.fc = torch.nn.Linear(64, 10)
        self.bypass = bypass

    def forward(self, x):
        if not self.bypass:
            return self.fc(x.flatten(1))
        with torch._C.DisableTorchFunction():
            return F.linear(x.flatten(1), self.fc.weight, self.fc.bias)


def test_exact_mode_refuses_an_unsupported_model_before_training(digits, monkeypatch, tmp_path):
    from zowarmup.federated import federation
    from zowarmup.federated.replica import build_replica
    cfg = tiny("zo.exact=true")
    with pytest.raises(ValueError, match="zo.exact"):
        build_replica(cfg, digits, 0, model=_ReadsAnAlias())
    assert not build_replica(tiny(), digits, 0, model=_ReadsAnAlias()).exact  # snapshot: fine
    assert build_replica(cfg, digits, 0).exact                  # a supported model: fine
    # the embedded runner refuses at setup, before any round
    monkeypatch.setattr(federation, "build_global_model", lambda cfg, ds: _ReadsAnAlias())
    with pytest.raises(ValueError, match="zo.exact"):
        Runner(cfg, tmp_path / "run", dataset=digits).run()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_exact_estimate_matches_materialized_reference_and_uses_one_layer_of_memory():
    torch.manual_seed(1)
    model = build_model("mlp", 10, 1, 8, norm="none", hidden=(128,)).eval()
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    eps, c = 1e-3, 0.75

    def loss(m):
        with torch.no_grad():
            return float(F.cross_entropy(m(x), y))

    seeds = [3, 99, 2 ** 63 + 5]
    before = _bits(model)
    grads, losses = exact_estimate(model, lambda: loss(model), seeds, eps, c)
    assert all(torch.equal(a, b) for a, b in zip(before, _bits(model)))
    for k, s in enumerate(seeds):
        lp = loss(_perturbed_copy(model, s, eps * c))
        lm = loss(_perturbed_copy(model, s, -eps * c))
        assert losses[2 * k] == lp and losses[2 * k + 1] == lm
        assert grads[k] == (lp - lm) / (2 * eps)
    # transient memory over an inference pass: at most one perturbed copy of the largest layer
    # (64x128, within one chunk) and its bias
    infer = accounting.measure_peak(lambda: loss(model))
    ex = accounting.measure_peak(lambda: exact_estimate(model, lambda: loss(model), seeds, eps, c))
    # both measured (measure_peak raises when it cannot measure, so no sentinel passes here), and
    # the exact estimate adds at most one perturbed chunk of the largest layer and its bias
    assert infer > 0 and ex > 0, (infer, ex)
    assert ex - infer <= (64 * 128 + 128) * 4 + 4096, (infer, ex)
    # a non-finite loss stops the estimate: NaN from there on
    nan_model = copy.deepcopy(model)
    with torch.no_grad():
        next(nan_model.parameters())[0, 0] = float("nan")
    g, _ = exact_estimate(nan_model, lambda: loss(nan_model), seeds, eps, c)
    assert all(math.isnan(v) for v in g)


def test_fit_zo_exact_with_local_steps_folds_the_local_update_into_the_scratch(digits):
    cfg = tiny("zo.local_steps=2", "zo.exact=true")
    from zowarmup.federated.client import Client
    from zowarmup.federated.server import Server
    torch.manual_seed(0)
    model = build_model("mlp", 10, 1, 8, norm="none", hidden=(16,))
    srv = Server(cfg, copy.deepcopy(model), 4)
    c = Client(0, digits.x_train[:40], digits.y_train[:40], 0, cfg.warmup, cfg.zo)
    task = srv.zo_seeds(3, 0)
    before = _bits(model)
    reply = c.fit_zo(model, task)  # exact from zo.exact
    assert all(torch.equal(a, b) for a, b in zip(before, _bits(model)))
    # reference: step 1 in scratch, then its local update applied in place, then step 2 in scratch
    ref = copy.deepcopy(model)
    S, z = 4, cfg.zo
    g1, _ = exact_estimate(ref, lambda: _loss_all(ref, c), [int(s) for s in task.seeds[:S]],
                           z.eps, z.scale)
    assert np.array_equal(reply.values[:S], np.asarray(g1, np.float32))
    zo_kernels.apply_seeds_([p.data for p in ref.parameters()], [int(s) for s in task.seeds[:S]],
                            [-z.lr * z.scale * v / S for v in g1])
    g2, _ = exact_estimate(ref, lambda: _loss_all(ref, c), [int(s) for s in task.seeds[S:]],
                           z.eps, z.scale)
    assert np.array_equal(reply.values[S:], np.asarray(g2, np.float32))


def _loss_all(model, client):
    from zowarmup.federated.client import dataset_loss
    model.eval()
    return dataset_loss(model, client.x, client.y, client.zo.micro_batch)


def test_checksum_rides_in_the_header_flag_and_old_layout_is_unchanged():
    s = np.array([1, 2 ** 64 - 1], dtype=np.uint64)
    plain = M.SeedsMessage(3, s, 1).to_bytes()
    withck = M.SeedsMessage(3, s, 1, checksum=0xDEADBEEF).to_bytes()
    assert len(withck) == len(plain) + 4 and plain[3] == M.MsgType.SEEDS
    assert withck[3] == M.MsgType.SEEDS | M.CHECKSUM_FLAG
    back = M.decode(withck)
    assert back.checksum == 0xDEADBEEF and np.array_equal(back.seeds, s)
    assert M.decode(plain).checksum is None
    g = M.GradsMessage(3, np.ones(2, np.float32), 7, checksum=0)
    g2 = M.GradsMessage.from_bytes(g.to_bytes())
    assert g2.checksum == 0 and g2.num_samples == 7 and np.array_equal(g2.values, g.values)
    st = M.StatusMessage(4, M.Status.DESYNC, 3, "checksum differs", 12345)
    b = M.StatusMessage.from_bytes(st.to_bytes())
    assert (b.code, b.version, b.reason, b.checksum) == (M.Status.DESYNC, 3, "checksum differs", 12345)
    r = M.ReplayMessage(5, [M.BroadcastMessage(4, s, [0.5, -1.0], 77)], 99)
    r2 = M.ReplayMessage.from_bytes(r.to_bytes())
    assert r2.checksum == 99 and r2.entries[0].checksum == 77
    with pytest.raises(ValueError, match="checksum"):
        M.SeedsMessage(3, s, 1, checksum=2 ** 32).to_bytes()
    with pytest.raises(ValueError, match="truncated"):
        M.decode(withck[:10])


def test_state_checksum_sees_one_ulp():
    torch.manual_seed(0)
    m = build_model("mlp", 10, 1, 8, norm="bn", hidden=(16,))
    a = state_checksum(m)
    assert a == state_checksum(copy.deepcopy(m)) and 0 <= a < 2 ** 32
    with torch.no_grad():
        p = next(m.parameters())
        p[0, 0] = torch.nextafter(p[0, 0], torch.tensor(float("inf")))
    assert state_checksum(m) != a


@pytest.mark.parametrize("exact", [True, False], ids=["scratch", "snapshot"])
def test_persistent_clients_stay_bit_identical_over_zo_rounds(digits, exact):
    """R ZO rounds, clients keep their own models, only seeds/scalars (and a one-off weights
    download at the pivot) travel; after every round each participant held the server's exact
    bits (its checksum matched), and the final sync finds every client identical -- and the whole
    run equals the embedded runner bit for bit."""
    cfg = tiny("rounds=7", "pivot=2", f"zo.exact={'true' if exact else 'false'}",
               "zo.clients_per_round=4")
    emb = Runner(cfg, _tmp() / "emb", dataset=digits)
    emb.run()
    coord, replicas = in_memory_deployment(cfg, digits)
    summary = coord.run()
    assert states_equal(coord.model, emb.model)
    assert summary["final_accuracy"] == emb._summary(None, 0, 0, {}, 0)["final_accuracy"]
    assert summary["desync_total"] == 0 and summary["rejected_total"] == 0
    rep = summary["final_sync"]
    assert rep["in_sync"] == list(range(10)) and not rep["repaired"] and not rep["mismatch"]
    for r in replicas.values():
        assert states_equal(r.model, coord.model)
    zo = [r for r in coord.records if r["phase"] == "zo"]
    assert sum(r["catch_up"]["replay"] for r in zo) > 0  # seed-log replays did happen
    # uplink in ZO rounds: S float32 scalars + header + checksum, nothing else
    assert all(r["bytes_up_per_client"] == 8 + 4 + 8 + 4 * 4 for r in zo)


def test_drift_and_corruption_are_detected_by_checksum_and_repaired(digits, caplog):
    cfg = tiny("rounds=8", "pivot=2", "zo.clients_per_round=6")
    emb = Runner(cfg, _tmp() / "emb", dataset=digits)
    emb.run()
    coord, replicas = in_memory_deployment(cfg, digits)
    # client 1 probes in place WITHOUT a snapshot: its weights drift by restore rounding
    drifter = replicas[1]
    orig_fit = drifter.client.fit_zo
    drifter.client.fit_zo = lambda model, msg, snapshot=False, exact=None: orig_fit(
        model, msg, snapshot=False, exact=False)
    # client 2's memory gets a flipped bit after round 4
    corrupt = {"done": False}
    orig_handle = replicas[2].handle

    def handle(payloads):
        if coord.server.log.get(4) is not None and not corrupt["done"] and replicas[2].version >= 2:
            with torch.no_grad():
                p = next(replicas[2].model.parameters())
                p.view(-1)[5] = -p.view(-1)[5] + 1.0
            corrupt["done"] = True
        return orig_handle(payloads)

    replicas[2].handle = handle
    caplog.set_level("WARNING", logger="zowarmup.federated")
    summary = coord.run()
    assert summary["desync_total"] >= 2, [(r["round"], r["desync"]) for r in coord.records]
    desynced = {c for r in coord.records for c in r["desync"]}
    sync = summary["final_sync"]
    assert 1 in desynced  # the drifter, at its next task after a round it probed
    assert 2 in desynced | set(sync["repaired"])  # the flipped bit, at its next contact
    assert summary["repaired_total"] == summary["desync_total"]  # repaired within the round
    assert "out of sync" in caplog.text or "checksum" in caplog.text
    # repaired in the round it was found, so the run is still the embedded one, bit for bit
    assert states_equal(coord.model, emb.model)
    assert sync["mismatch"] == [] and sorted(sync["in_sync"] + sync["repaired"]) == list(range(10))
    for r in replicas.values():
        assert states_equal(r.model, coord.model)


def _tmp():
    import tempfile
    from pathlib import Path
    return Path(tempfile.mkdtemp(prefix="zw-exact-"))


def test_config_hash_of_runs_written_before_zo_exact_existed_is_unchanged():
    from zowarmup.federated.checkpoint import config_hash
    d = RunConfig().to_dict()
    old = {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()}
    del old["zo"]["exact"]
    assert config_hash(old) == config_hash(d)
    d2 = copy.deepcopy(d)
    d2["zo"]["exact"] = True
    assert config_hash(d2) != config_hash(d)

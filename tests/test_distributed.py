"""Data-parallel ZO on torch.distributed: ``ZOOptimizer(..., process_group=...)``.

Two ranks run with the gloo backend on the CPU, started by ``torch.multiprocessing`` (spawn) and
rendezvoused through a FileStore in the test's tmp folder; gloo's sockets are pinned to the
loopback interface. Every scenario runs in one launch (starting a process costs a torch import);
each rank writes its results to a file and the tests below compare them with a single-process
run of this process. Processes are joined with a deadline and killed if still alive.

The model's parameters are float32 (what the kernels update) but its forward computes in float64:
``g = (L+ - L-) / (2 eps)`` divides the loss by eps = 1e-3, so a float32 rounding difference
between the loss of the whole batch and the combination of the shards' losses (about 1e-7
relative) would reappear a thousand times larger in g. In float64 the only difference between
the two runs is the order of a sum, and the weights agree to far below 1e-6.
"""
from __future__ import annotations

import datetime
import os
import re
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from zowarmup.optim import ZOOptimizer

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

WORLD = 2
N_BATCH = 16
STEPS = 4
SHARDS_EQUAL = (8, 8)
SHARDS_UNEQUAL = (11, 5)
SHARDS_EMPTY = (16, 0)
KW_A = dict(lr=0.05, eps=1e-3, num_samples=2, seed=123)
KW_B = dict(lr=0.05, eps=1e-3, num_samples=3, seed=7, weight_decay=0.01)
EST_SEEDS = [11, 2**64 - 5, 2**40 + 3]
LAUNCH_DEADLINE_S = 900.0  # only a hung launch fails on time
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor",
               "all_gather_object", "broadcast_object_list", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "gather", "gather_object", "scatter", "scatter_object_list",
               "send", "recv", "isend", "irecv", "barrier", "all_to_all", "all_to_all_single",
               "batch_isend_irecv", "monitored_barrier")


# ------------------------------------------------------------------------------------------------
# shared by the ranks and the single-process reference
# ------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """float32 parameters; float64 arithmetic unless ``f64=False`` (see the module docstring)."""

    def __init__(self, f64: bool = True):
        super().__init__()
        self.f64 = f64
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x):
        if not self.f64:
            return self.fc2(torch.tanh(self.fc1(x)))
        h = torch.tanh(nn.functional.linear(x.double(), self.fc1.weight.double(),
                                            self.fc1.bias.double()))
        return nn.functional.linear(h, self.fc2.weight.double(), self.fc2.bias.double())


def make_model(f64: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return MLP(f64)


def make_groups(model, two_groups: bool):
    if not two_groups:
        return model.parameters()
    return [{"params": model.fc1.parameters()},
            {"params": model.fc2.parameters(), "lr": 0.02, "eps": 2e-3}]


def global_batch(t: int):
    """The global batch of step t: the same on every process."""
    g = torch.Generator().manual_seed(1000 + t)
    x = torch.randn(N_BATCH, 6, generator=g)
    y = torch.randint(0, 3, (N_BATCH,), generator=g)
    return x, y


def shard(t: int, rank: int, sizes):
    x, y = global_batch(t)
    lo = sum(sizes[:rank])
    return x[lo:lo + sizes[rank]], y[lo:lo + sizes[rank]]


def mean_loss(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def train_single(kw: dict, two_groups: bool = False, steps: int = STEPS):
    """The reference: one process, the whole (concatenated) batch."""
    model = make_model()
    opt = ZOOptimizer(make_groups(model, two_groups), **kw)
    losses = []
    for t in range(steps):
        x, y = global_batch(t)
        losses.append(opt.step(lambda: mean_loss(model, x, y)))
    return flat(model), losses


def train_single_sharded(kw: dict, sizes, steps: int = STEPS):
    """One process on a float32 model whose closure combines the shards' float32 mean losses
    with the arithmetic of the all-reduce: ``sum(n_r * L_r) / sum(n_r)`` in float64."""
    model = make_model(f64=False)
    opt = ZOOptimizer(model.parameters(), **kw)
    for t in range(steps):
        parts = [shard(t, r, sizes) for r in range(WORLD)]

        def closure():
            losses = [float(mean_loss(model, x, y)) for x, y in parts]
            return sum(float(len(x)) * v for (x, _), v in zip(parts, losses)) / float(N_BATCH)
        opt.step(closure)
    return flat(model)


# ------------------------------------------------------------------------------------------------
# the rank processes
# ------------------------------------------------------------------------------------------------
class _Recorder:
    """Wraps torch.distributed's collectives; records (name, numel, dtype) of each call."""

    def __init__(self):
        self.calls: list = []
        self.saved = {}

    def __enter__(self):
        for name in COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self.saved[name] = fn

            def wrapper(*args, _name=name, _fn=fn, **kwargs):
                t = args[0] if args else kwargs.get("tensor")
                numel = t.numel() if isinstance(t, torch.Tensor) else None
                dtype = str(t.dtype) if isinstance(t, torch.Tensor) else None
                self.calls.append((_name, numel, dtype))
                return _fn(*args, **kwargs)
            setattr(dist, name, wrapper)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def _train_rank(rank, sizes, kw, two_groups, form="tuple", steps=STEPS, f64=True):
    """Train on this rank's shards; per step the recorded collectives."""
    model = make_model(f64)
    init = flat(model)
    with _Recorder() as rec:
        opt = ZOOptimizer(make_groups(model, two_groups), process_group=dist.group.WORLD, **kw)
    losses, calls = [], [rec.calls]  # calls[0]: the constructor's (none)
    for t in range(steps):
        x, y = shard(t, rank, sizes)

        def closure():
            loss = mean_loss(model, x, y)
            return (loss, len(x)) if form == "tuple" else loss
        with _Recorder() as rec:
            losses.append(opt.step(closure))
        calls.append(rec.calls)
    return dict(init=init, weights=flat(model), losses=losses, calls=calls,
                step_count=opt.step_count)


def _expect_error(rank, make_opt_and_closure):
    """Run one step expected to raise on every rank; report the error and the weights."""
    model = make_model()
    opt, closure = make_opt_and_closure(model)
    before = flat(model)
    try:
        opt.step(closure)
        err = None
    except Exception as exc:  # noqa: BLE001 - reported to the test
        err = f"{type(exc).__name__}: {exc}"
    return dict(error=err, before=before, after=flat(model), step_count=opt.step_count)


def _scenarios(rank: int) -> dict:
    out = {}
    group = dist.group.WORLD
    # (A) equal shards, plain loss (the mean over ranks), one param group
    out["A"] = _train_rank(rank, SHARDS_EQUAL, KW_A, two_groups=False, form="plain")
    # (B) unequal shards weighted by (loss, n); two param groups, weight decay
    out["B"] = _train_rank(rank, SHARDS_UNEQUAL, KW_B, two_groups=True)
    # (C) an empty shard: n = 0 contributes nothing (its mean loss is NaN)
    out["C"] = _train_rank(rank, SHARDS_EMPTY, KW_A, two_groups=False, steps=2)
    # (B32) as B with a float32 forward, one param group
    out["B32"] = _train_rank(rank, SHARDS_UNEQUAL, KW_B, two_groups=False, f64=False)
    # (D) estimate() with given seeds
    model = make_model()
    opt = ZOOptimizer(model.parameters(), process_group=group, **KW_A)
    x, y = shard(0, rank, SHARDS_UNEQUAL)
    with _Recorder() as rec:
        est = opt.estimate(lambda: (mean_loss(model, x, y), len(x)), seeds=EST_SEEDS)
    out["D"] = dict(est=tuple(est), calls=rec.calls, step_count=opt.step_count)
    # (E) the ranks' optimizers have different base seeds: refused on every rank
    out["E"] = _expect_error(rank, lambda m: (
        ZOOptimizer(m.parameters(), process_group=group, **dict(KW_A, seed=KW_A["seed"] + rank)),
        lambda: (mean_loss(m, *shard(0, rank, SHARDS_EQUAL)), 8)))
    # (F) rank 0 returns a plain loss, rank 1 (loss, n): refused on every rank
    out["F"] = _expect_error(rank, lambda m: (
        ZOOptimizer(m.parameters(), process_group=group, **KW_A),
        (lambda: mean_loss(m, *shard(0, rank, SHARDS_EQUAL))) if rank == 0 else
        (lambda: (mean_loss(m, *shard(0, rank, SHARDS_EQUAL)), 8))))
    # (G) a NaN loss on rank 1 only (its 2nd call): the step is skipped on both ranks, then the
    # next step trains normally
    model = make_model()
    opt = ZOOptimizer(model.parameters(), process_group=group, **KW_A)
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        loss = mean_loss(model, *shard(0, rank, SHARDS_EQUAL))
        return loss * float("nan") if rank == 1 and calls["n"] == 2 else loss
    with pytest.warns(RuntimeWarning, match="skipped"):
        skipped_loss = opt.step(closure)
    after_skip = flat(model)
    next_loss = opt.step(closure)
    out["G"] = dict(skipped_loss=skipped_loss, after_skip=after_skip, weights=flat(model),
                    skipped=opt.skipped_steps, closure_calls=calls["n"], next_loss=next_loss)
    # (H) argument validation with torch.distributed initialized
    errors = []
    try:
        ZOOptimizer(make_model().parameters(), process_group="WORLD")
    except TypeError as exc:
        errors.append(str(exc))
    sub = dist.new_group([0])  # every rank must call new_group; rank 1 is not a member
    if rank == 1:
        try:
            ZOOptimizer(make_model().parameters(), process_group=sub)
        except (TypeError, ValueError) as exc:
            errors.append(str(exc))
    out["H"] = errors
    return out


def _rank_main(rank: int, world: int, store_path: str, out_dir: str) -> None:
    try:
        torch.set_num_threads(1)
        lo = next((n for _, n in socket.if_nameindex() if n.startswith("lo")), "lo")
        os.environ["GLOO_SOCKET_IFNAME"] = lo  # gloo's sockets on the loopback interface only
        dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=30))
        try:
            result = _scenarios(rank)
        finally:
            dist.destroy_process_group()
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Launch WORLD gloo ranks once; the per-rank result dicts."""
    out_dir = tmp_path_factory.mktemp("dist")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(r, WORLD, str(out_dir / "store"), str(out_dir)),
                         daemon=True) for r in range(WORLD)]
    t0 = time.monotonic()
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(max(0.0, LAUNCH_DEADLINE_S - (time.monotonic() - t0)))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    elapsed = time.monotonic() - t0
    errors = {r: (out_dir / f"rank{r}.err").read_text() for r in range(WORLD)
              if (out_dir / f"rank{r}.err").exists()}
    assert not errors, f"rank errors: {errors}"
    assert all(p.exitcode == 0 for p in procs), \
        f"exit codes {[p.exitcode for p in procs]} after {elapsed:.1f} s (deadline " \
        f"{LAUNCH_DEADLINE_S} s)"
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------
def test_process_group_needs_initialized_distributed():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="not initialized.*init_process_group"):
        ZOOptimizer(make_model().parameters(), process_group=object())
    opt = ZOOptimizer(make_model().parameters(), process_group=None)  # the default: one process
    assert opt.process_group is None


@pytest.mark.parametrize("scenario,kw,two_groups", [("A", KW_A, False), ("B", KW_B, True),
                                                    ("C", KW_A, False)])
def test_ranks_bit_identical_and_equal_single_process(ranks, scenario, kw, two_groups):
    """(A) equal shards with a plain loss, (B) unequal shards with (loss, n) and two param groups,
    (C) an empty shard: every rank ends bit-identical, and equal to one process on the whole
    batch within 1e-6 relative; the returned losses are those of the whole batch."""
    r0, r1 = ranks[0][scenario], ranks[1][scenario]
    assert torch.equal(r0["init"], r1["init"])
    assert torch.equal(r0["weights"], r1["weights"])          # bit-identical, no weight sent
    assert r0["losses"] == r1["losses"] and r0["step_count"] == r1["step_count"]
    steps = len(r0["losses"])
    ref_w, ref_losses = train_single(kw, two_groups, steps=steps)
    assert not torch.equal(ref_w, flat(make_model()))         # it trained
    rel = _rel(r0["weights"], ref_w)
    print(f"scenario {scenario}: max |w_2ranks - w_1process| / max |w| = {rel:.3g}")
    assert rel <= 1e-6, rel
    for got, want in zip(r0["losses"], ref_losses):
        assert got == pytest.approx(want, rel=1e-9)


def test_float32_forward_matches_the_same_loss_arithmetic_in_one_process(ranks):
    """With a float32 forward the 2-rank run is bit-identical to one process whose closure
    combines the shards' losses as the all-reduce does; against the whole-batch float32 loss it
    differs by the float32 rounding of the loss amplified by 1/eps (about 1e-5 here), a property
    of the loss arithmetic that any change of batch split shows, not of the distribution."""
    r0, r1 = ranks[0]["B32"], ranks[1]["B32"]
    assert torch.equal(r0["weights"], r1["weights"])
    assert torch.equal(r0["weights"], train_single_sharded(KW_B, SHARDS_UNEQUAL))
    model = make_model(f64=False)
    opt = ZOOptimizer(model.parameters(), **KW_B)
    for t in range(STEPS):
        x, y = global_batch(t)
        opt.step(lambda: mean_loss(model, x, y))
    print(f"float32 forward: max |w_2ranks - w_whole_batch| / max |w| = "
          f"{_rel(r0['weights'], flat(model)):.3g}")


@pytest.mark.parametrize("scenario,num_samples", [("A", KW_A["num_samples"]),
                                                  ("B", KW_B["num_samples"])])
def test_only_loss_scalars_travel(ranks, scenario, num_samples):
    """Per step exactly one collective: an all_reduce of 2S + 4 float64 scalars (the 2S losses,
    the sample count, the return-form flag and the seed fingerprint with its square); none in the
    constructor."""
    for r in range(WORLD):
        assert ranks[r][scenario]["calls"][0] == []
        assert len(ranks[r][scenario]["calls"]) == STEPS + 1
        for calls in ranks[r][scenario]["calls"][1:]:
            assert calls == [("all_reduce", 2 * num_samples + 4, "torch.float64")]
    assert ranks[0]["D"]["calls"] == [("all_reduce", 2 * len(EST_SEEDS) + 4, "torch.float64")]


def test_estimate_all_reduces_losses(ranks):
    est0, est1 = ranks[0]["D"]["est"], ranks[1]["D"]["est"]
    assert est0 == est1 and ranks[0]["D"]["step_count"] == 0
    model = make_model()
    x, y = global_batch(0)
    ref = ZOOptimizer(model.parameters(), **KW_A).estimate(lambda: mean_loss(model, x, y),
                                                          seeds=EST_SEEDS)
    assert est0[0] == ref.seeds
    assert est0[1] == pytest.approx(ref.projected_grads, rel=1e-6)
    assert est0[2] == pytest.approx(ref.loss, rel=1e-9)


@pytest.mark.parametrize("scenario,pattern", [("E", "RuntimeError: .*different noise seeds"),
                                              ("F", "ValueError: .*1 of 2 ranks.*same form")])
def test_mismatched_ranks_raise_on_every_rank(ranks, scenario, pattern):
    """Different seeds or return forms: every rank raises (none waits), weights restored."""
    for r in range(WORLD):
        res = ranks[r][scenario]
        assert res["error"] is not None and re.match(pattern, res["error"]), res["error"]
        assert res["step_count"] == 0
        torch.testing.assert_close(res["after"], res["before"], rtol=1e-6, atol=1e-7)


def test_nonfinite_loss_on_one_rank_skips_on_all(ranks):
    g0, g1 = ranks[0]["G"], ranks[1]["G"]
    for g in (g0, g1):
        assert g["skipped"] == 1
        assert g["closure_calls"] == 2 * 2 * KW_A["num_samples"]  # no early stop on any rank
        assert g["skipped_loss"] != g["skipped_loss"]            # NaN
        assert g["next_loss"] == g["next_loss"]
    torch.testing.assert_close(g0["after_skip"], flat(make_model()), rtol=1e-6, atol=1e-7)
    assert torch.equal(g0["after_skip"], g1["after_skip"])
    assert torch.equal(g0["weights"], g1["weights"])


def test_invalid_process_group_arguments(ranks):
    assert any("ProcessGroup" in e for e in ranks[0]["H"])
    assert len(ranks[1]["H"]) == 2

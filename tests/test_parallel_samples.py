"""Perturbation-parallel ZO: ``ZOOptimizer(process_group=..., parallel="samples")``.

Two gloo ranks on the CPU (spawned once, FileStore rendezvous, loopback sockets). Each scenario is
compared with a single-process optimizer run *inside the rank* (same thread count and kernels), so
"bit-identical to one process" is checked with ``torch.equal``:

- (A) in place, S = 5 over 2 ranks (uneven shares), two param groups with their own lr/eps and
  weight decay: every rank's weights equal the one-process run bit for bit, and per step the only
  collective is one all_gather of 2 + 2*ceil(S/2) float64 scalars.
- (B) exact mode with bfloat16 weights: bit-identical to the one-process exact run; lr = 0 leaves
  the weights bit-identical to the start (no drift).
- (C) samples x data: each rank is its own samples group and the two ranks form the data group
  (a 1 x 2 grid: two ranks is what a shared CI machine affords; the code path is the one of any
  grid): the losses are all-reduced over the data group, then gathered over the samples group;
  equal to one process whose closure combines the two shards' losses.
- (D) mismatched seeds are refused on every rank; bad arguments are one-line errors.
- (E) a 2 x 2 grid on four ranks: two samples groups ({0, 1} and {2, 3}, each evaluating its half of
  the S directions on its data shard) crossed with two data groups ({0, 2} and {1, 3}, the same
  directions on the two shards), in place and in exact mode: every rank ends bit-identical to the
  others and equal to one process whose closure combines the two shards' losses.
"""
from __future__ import annotations

import datetime
import os
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
STEPS = 3
DEADLINE_S = 400.0  # generous: only a hung launch fails (4 spawned ranks import torch on a shared machine)


def make_model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def groups(model):
    return [{"params": model[0].parameters(), "weight_decay": 0.01},
            {"params": model[2].parameters(), "lr": 0.02, "eps": 2e-3}]


def batch(t: int, n: int = 12):
    g = torch.Generator().manual_seed(100 + t)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def loss_fn(model, x, y):
    return nn.functional.cross_entropy(model(x.to(model[0].weight.dtype)).float(), y)


def flat(model):
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])


class Recorder:
    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "barrier",
             "all_gather_object", "reduce", "gather", "scatter", "send", "recv")

    def __init__(self):
        self.calls, self.saved = [], {}

    def __enter__(self):
        for name in self.NAMES:
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self.saved[name] = fn

            def wrap(*a, _n=name, _f=fn, **k):
                t = a[1] if _n == "all_gather" else (a[0] if a else None)
                self.calls.append((_n, t.numel() if isinstance(t, torch.Tensor) else None))
                return _f(*a, **k)
            setattr(dist, name, wrap)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def run(model, opt, steps, closure_of):
    losses = []
    for t in range(steps):
        losses.append(opt.step(closure_of(t)))
    return flat(model), losses


def _scenarios(rank: int) -> dict:
    out = {}
    world = dist.group.WORLD
    kw = dict(lr=0.05, eps=1e-3, num_samples=5, seed=42)

    # (A) in place, uneven shares, two groups
    def plain(model):
        return lambda t: (lambda x=batch(t)[0], y=batch(t)[1]: loss_fn(model, x, y))
    m1 = make_model()
    single = run(m1, ZOOptimizer(groups(m1), **kw), STEPS, plain(m1))
    m2 = make_model()
    opt = ZOOptimizer(groups(m2), process_group=world, parallel="samples", **kw)
    calls = []
    for t in range(STEPS):
        with Recorder() as rec:
            opt.step(plain(m2)(t))
        calls.append(rec.calls)
    out["A"] = dict(single=single[0], par=flat(m2), calls=calls)

    # (B) exact mode, bfloat16 weights; lr = 0 keeps the weights bit-identical
    m1 = make_model(torch.bfloat16)
    single = run(m1, ZOOptimizer(groups(m1), exact=True, **kw), STEPS, plain(m1))
    m2 = make_model(torch.bfloat16)
    par = run(m2, ZOOptimizer(groups(m2), exact=True, process_group=world, parallel="samples",
                              **kw), STEPS, plain(m2))
    m3 = make_model(torch.bfloat16)
    w0 = flat(m3)
    run(m3, ZOOptimizer(m3.parameters(), exact=True, process_group=world, parallel="samples",
                        **dict(kw, lr=0.0)), STEPS, plain(m3))
    out["B"] = dict(single=single, par=par, lr0_before=w0, lr0_after=flat(m3))

    # (C) 1 x 2 grid: every rank its own samples group, both ranks one data group (shard d = rank)
    samples_groups = [dist.new_group([0]), dist.new_group([1])]
    data_groups = [dist.new_group([0, 1])]
    p, d = 0, rank
    kw_c = dict(lr=0.05, eps=1e-2, num_samples=3, seed=9)

    def shards(t):
        x, y = batch(t)
        return [(x[:7], y[:7]), (x[7:], y[7:])]
    m1 = make_model()
    o1 = ZOOptimizer(m1.parameters(), **kw_c)
    for t in range(STEPS):
        parts = shards(t)

        def closure(parts=parts):
            ls = [float(loss_fn(m1, x, y)) for x, y in parts]
            return sum(float(len(x)) * v for (x, _), v in zip(parts, ls)) / 12.0
        o1.step(closure)
    m2 = make_model()
    o2 = ZOOptimizer(m2.parameters(), process_group=samples_groups[rank], parallel="samples",
                     data_group=data_groups[p], **kw_c)
    for t in range(STEPS):
        x, y = shards(t)[d]
        o2.step(lambda x=x, y=y: (loss_fn(m2, x, y), len(x)))
    out["C"] = dict(single=flat(m1), par=flat(m2))

    # (D) different base seeds: refused on every rank; exact mode, so the weights are untouched
    m = make_model()
    o = ZOOptimizer(m.parameters(), process_group=world, parallel="samples", exact=True,
                    **dict(kw, seed=kw["seed"] + (rank == 1)))
    before = flat(m)
    try:
        o.step(plain(m)(0))
        err = None
    except RuntimeError as exc:
        err = str(exc)
    out["D"] = dict(error=err, before=before, after=flat(m))
    return out


def _grid_scenarios(rank: int) -> dict:
    """(E): rank r holds data shard r // 2 and is position r % 2 of its samples group."""
    d, pos = divmod(rank, 2)
    samples_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    data_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    out = {}
    for exact in (False, True):
        kw_e = dict(lr=0.05, eps=1e-2, num_samples=5, seed=21, exact=exact)

        def shards(t):
            x, y = batch(t)
            return [(x[:5], y[:5]), (x[5:], y[5:])]
        m1 = make_model()
        o1 = ZOOptimizer(m1.parameters(), **kw_e)
        for t in range(STEPS):
            parts = shards(t)

            def closure(parts=parts):
                ls = [float(loss_fn(m1, x, y)) for x, y in parts]
                return sum(float(len(x)) * v for (x, _), v in zip(parts, ls)) / 12.0
            o1.step(closure)
        m2 = make_model()
        o2 = ZOOptimizer(m2.parameters(), process_group=samples_groups[d], parallel="samples",
                         data_group=data_groups[pos], **kw_e)
        with Recorder() as rec:
            for t in range(STEPS):
                x, y = shards(t)[d]
                o2.step(lambda x=x, y=y: (loss_fn(m2, x, y), len(x)))
        out["exact" if exact else "in place"] = dict(single=flat(m1), par=flat(m2),
                                                     calls=[c[0] for c in rec.calls])
    return out


def _rank_main(rank, world, store, out_dir):
    try:
        torch.set_num_threads(1)
        lo = next((n for _, n in socket.if_nameindex() if n.startswith("lo")), "lo")
        os.environ["GLOO_SOCKET_IFNAME"] = lo
        dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=60))
        try:
            res = _scenarios(rank) if world == WORLD else _grid_scenarios(rank)
        finally:
            dist.destroy_process_group()
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _launch(world: int, out_dir) -> list[dict]:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(r, world, str(out_dir / "store"), str(out_dir)),
                         daemon=True) for r in range(world)]
    t0 = time.monotonic()
    try:
        for pr in procs:
            pr.start()
        for pr in procs:
            pr.join(max(0.0, DEADLINE_S - (time.monotonic() - t0)))
    finally:
        for pr in procs:
            if pr.is_alive():
                pr.kill()
                pr.join(5)
    errors = {r: (out_dir / f"rank{r}.err").read_text() for r in range(world)
              if (out_dir / f"rank{r}.err").exists()}
    assert not errors, f"rank errors: {errors}"
    assert all(pr.exitcode == 0 for pr in procs), [pr.exitcode for pr in procs]
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return _launch(WORLD, tmp_path_factory.mktemp("samples"))


@pytest.fixture(scope="module")
def grid_ranks(tmp_path_factory):
    return _launch(4, tmp_path_factory.mktemp("grid"))


def test_inplace_sample_parallel_equals_one_process_bit_for_bit(ranks):
    for r in ranks:
        assert torch.equal(r["A"]["par"], r["A"]["single"])
        assert not torch.equal(r["A"]["par"], flat(make_model()))
        for calls in r["A"]["calls"]:  # one all_gather of 2 + 2*ceil(5/2) scalars per step
            assert calls == [("all_gather", 2 + 2 * 3)]


def test_exact_sample_parallel_bf16_bit_identical_and_no_drift(ranks):
    for r in ranks:
        assert torch.equal(r["B"]["par"][0], r["B"]["single"][0])
        assert r["B"]["par"][1] == r["B"]["single"][1]
        assert torch.equal(r["B"]["lr0_after"], r["B"]["lr0_before"])
    assert not torch.equal(ranks[0]["B"]["par"][0], flat(make_model(torch.bfloat16)))


def test_samples_times_data_grid_matches_one_process(ranks):
    for r in ranks:
        torch.testing.assert_close(r["C"]["par"], r["C"]["single"], rtol=0, atol=1e-6)
        assert torch.equal(r["C"]["par"], ranks[0]["C"]["par"])  # identical across the grid
    assert float((ranks[0]["C"]["par"] - flat(make_model())).abs().max()) > 1e-3


@pytest.mark.parametrize("mode", ["in place", "exact"])
def test_two_by_two_grid_matches_one_process_and_is_identical_across_ranks(grid_ranks, mode):
    for r in grid_ranks:
        g = r[mode]
        torch.testing.assert_close(g["par"], g["single"], rtol=0, atol=1e-6)
        assert torch.equal(g["par"], grid_ranks[0][mode]["par"])  # bit-identical on all 4 ranks
        # per step: the data group's all_reduce, then one all_gather over the samples group
        assert g["calls"] == ["all_reduce", "all_gather"] * STEPS, g["calls"]
    assert float((grid_ranks[0][mode]["par"] - flat(make_model())).abs().max()) > 1e-3


def test_mismatched_seeds_refused_on_every_rank(ranks):
    for r in ranks:
        assert r["D"]["error"] is not None and "different noise seeds" in r["D"]["error"]
        assert torch.equal(r["D"]["before"], r["D"]["after"])


def test_bad_parallel_arguments():
    m = make_model()
    with pytest.raises(ValueError, match="parallel"):
        ZOOptimizer(m.parameters(), parallel="tensor")
    with pytest.raises(ValueError, match="needs a process_group"):
        ZOOptimizer(m.parameters(), parallel="samples")

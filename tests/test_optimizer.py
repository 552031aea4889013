"""ZOOptimizer against a plain MeZO-style reference, and its contract (issue 3).

The reference below materializes the noise with ``zo_kernels.noise`` (the stream every backend is
tested against bit for bit), perturbs with separate ``add_`` calls (+eps / -2eps / +eps) and updates
in a separate pass: none of the optimizer's fusion, grouping or bookkeeping code is reused.
"""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import zo_kernels
import zowarmup
from zowarmup import ZOEstimate, ZOOptimizer, derive_seed
from zowarmup.optim import freeze_running_stats, running_stats_once
from zowarmup.seeds import sample_seeds

CPU_BUILT = zo_kernels.backends()["cpu"]["usable"]


# ------------------------------------------------------------------------------------------------
# the independent reference
# ------------------------------------------------------------------------------------------------
class MeZOReference:
    """SPSA exactly as MeZO writes it: materialized noise, in-place +eps*c / -2eps*c / +eps*c, then
    a separate weight-decay multiply and one ``add_`` per sample.

    ``groups``: list of dicts ``{"params", "lr", "eps", "scale", "weight_decay"}``; the noise of all
    groups is one flat vector (tensor k starts at ``zo_kernels.offsets(all params)[k]``).
    """

    def __init__(self, groups, seed=0, num_samples=1, eps_ref=None, dist="rademacher"):
        self.groups = groups
        self.seed = seed
        self.num_samples = num_samples
        self.eps_ref = groups[0]["eps"] if eps_ref is None else eps_ref
        self.dist = dist
        self.params = [p for g in groups for p in g["params"]]
        self.offs = zo_kernels.offsets(self.params)

    def noise(self, seed):
        return [zo_kernels.noise(seed, p.numel(), offset=o, dist=self.dist, dtype=torch.float32)
                .view(p.shape) for p, o in zip(self.params, self.offs)]

    def _perturb(self, zs, factor):
        # the rounding rule of docs/DESIGN.md, "Grouped summation order", spelled out: fp32
        # coefficient, fp32 math, one rounding
        k = 0
        for g in self.groups:
            for p in g["params"]:
                coef = torch.tensor(factor * g["eps"] * g["scale"], dtype=torch.float32)
                p.copy_((p.float() + coef * zs[k]).to(p.dtype))
                k += 1

    @torch.no_grad()
    def estimate(self, closure, seeds):
        losses, grads = [], []
        for sd in seeds:
            zs = self.noise(sd)
            self._perturb(zs, 1.0)
            lp = float(closure())
            self._perturb(zs, -2.0)
            lm = float(closure())
            self._perturb(zs, 1.0)
            losses += [lp, lm]
            grads.append((lp - lm) / (2 * self.eps_ref))
        return losses, grads

    @torch.no_grad()
    def update(self, seeds, grads):
        S = len(seeds)
        for g in self.groups:
            for p in g["params"]:
                p.mul_(1 - g["lr"] * g["weight_decay"])
        for sd, gs in zip(seeds, grads):
            zs = self.noise(sd)
            k = 0
            for g in self.groups:
                for p in g["params"]:
                    coef = -g["lr"] * g["scale"] * gs * (self.eps_ref / g["eps"]) / S
                    p.add_(zs[k].to(p.dtype), alpha=coef)
                    k += 1

    def step(self, closure, t):
        seeds = [derive_seed(self.seed, t, s) for s in range(self.num_samples)]
        losses, grads = self.estimate(closure, seeds)
        self.update(seeds, grads)
        return losses


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------
def make_mlp(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # odd sizes: every tensor is padded to a 128-element block in the flat noise vector
    m = nn.Sequential(nn.Linear(13, 11), nn.Tanh(), nn.Linear(11, 5))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    return m.to(dtype)


def make_data(n=256, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 13, generator=g)
    w = torch.randn(13, 5, generator=g)
    y = (x @ w).argmax(1)
    return x, y


def batch(t, x, y, bs=64):
    i = (t * bs) % x.shape[0]
    return x[i:i + bs], y[i:i + bs]


def closure_for(model, xb, yb, log=None, f64=True):
    """Loss closure on one batch. With ``f64`` the forward runs in float64 from the (float32)
    weights: SPSA divides loss differences by 2*eps, so float32 forward rounding (1 ulp of the loss,
    ~1e-7) would dominate the comparison; in float64 only the optimizer's own arithmetic shows."""
    def closure():
        if f64:
            params = {n: p.double() for n, p in model.named_parameters()}
            out = torch.func.functional_call(model, params, (xb.double(),))
        else:
            out = model(xb.to(next(model.parameters()).dtype))
        loss = nn.functional.cross_entropy(out, yb)
        if log is not None:
            log.append(float(loss))
        return loss
    return closure


def flat(model):
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------------------
# seeds
# ------------------------------------------------------------------------------------------------
def _splitmix_numpy(words):
    """derive_seed re-implemented with numpy uint64 wrap-around arithmetic (independent code)."""
    with np.errstate(over="ignore"):
        h = np.uint64(int.from_bytes(b"zowarmup", "big"))
        for w in words:
            z = (h ^ np.uint64(w)) + np.uint64(0x9E3779B97F4A7C15)
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            h = z ^ (z >> np.uint64(31))
    return int(h)


def test_derive_seed_matches_numpy_splitmix_chain():
    rng = np.random.default_rng(0)
    cases = [(0,), (1, 2, 3), (2**64 - 1, 0), (5, 7, 11, 13)]
    cases += [tuple(int(v) for v in rng.integers(0, 2**64 - 1, size=k, dtype=np.uint64,
                                                 endpoint=True))
              for k in (1, 2, 3, 4) for _ in range(5)]
    for words in cases:
        assert derive_seed(*words) == _splitmix_numpy(words), words
    assert all(0 <= derive_seed(*w) < 2**64 for w in cases)


def test_derive_seed_distinct_and_validated():
    seeds = {derive_seed(3, t, s) for t in range(50) for s in range(20)}
    assert len(seeds) == 1000
    assert sample_seeds(3, 7, 4) == [derive_seed(3, 7, s) for s in range(4)]
    assert derive_seed(np.uint64(2**64 - 1)) == derive_seed(2**64 - 1)
    with pytest.raises(ValueError, match="at least one word"):
        derive_seed()
    with pytest.raises(ValueError, match=r"words\[1\]"):
        derive_seed(0, -1)
    with pytest.raises(ValueError, match="out of range"):
        derive_seed(2**64)
    with pytest.raises(TypeError, match="float"):
        derive_seed(1.0)


# ------------------------------------------------------------------------------------------------
# against the reference
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("S", [1, 4])
def test_matches_mezo_reference_20_steps(S):
    x, y = make_data()
    m_zo, m_ref = make_mlp(), make_mlp()
    kw = dict(lr=0.05, eps=1e-3, scale=0.75, weight_decay=0.01)
    opt = ZOOptimizer(m_zo.parameters(), num_samples=S, seed=123, **kw)
    ref = MeZOReference([dict(params=list(m_ref.parameters()), **kw)], seed=123, num_samples=S)
    w0 = flat(m_zo).clone()
    for t in range(20):
        xb, yb = batch(t, x, y)
        log = []
        mean = opt.step(closure_for(m_zo, xb, yb, log))
        ref_losses = ref.step(closure_for(m_ref, xb, yb), t)
        assert len(log) == len(ref_losses) == 2 * S
        np.testing.assert_allclose(log, ref_losses, rtol=1e-6)
        assert mean == pytest.approx(sum(log) / len(log), rel=1e-12)
    assert opt.step_count == 20
    assert rel_err(flat(m_zo), flat(m_ref)) <= 1e-6
    torch.testing.assert_close(flat(m_zo), flat(m_ref), rtol=1e-5, atol=1e-5)  # per element
    # the run did move the weights (a no-op optimizer would also "match" an identity reference)
    assert rel_err(flat(m_zo), w0) > 1e-3


def test_gaussian_matches_reference():
    x, y = make_data()
    m_zo, m_ref = make_mlp(), make_mlp()
    kw = dict(lr=0.05, eps=1e-3, scale=1.0, weight_decay=0.0)
    opt = ZOOptimizer(m_zo.parameters(), num_samples=2, seed=9, dist="gaussian", **kw)
    ref = MeZOReference([dict(params=list(m_ref.parameters()), **kw)], seed=9, num_samples=2,
                        dist="gaussian")
    for t in range(10):
        xb, yb = batch(t, x, y)
        opt.step(closure_for(m_zo, xb, yb))
        ref.step(closure_for(m_ref, xb, yb), t)
    assert rel_err(flat(m_zo), flat(m_ref)) <= 1e-6


def test_param_groups_match_reference_and_share_one_flat_vector():
    x, y = make_data()
    m_zo, m_ref = make_mlp(), make_mlp()
    p_zo, p_ref = list(m_zo.parameters()), list(m_ref.parameters())
    g0 = dict(lr=0.05, eps=1e-3, scale=0.75, weight_decay=0.0)
    g1 = dict(lr=0.02, eps=4e-3, scale=0.5, weight_decay=0.1)
    opt = ZOOptimizer([dict(params=p_zo[:2]), dict(params=p_zo[2:], **g1)], num_samples=2,
                      seed=5, **g0)
    assert opt.param_groups[1]["eps"] == 4e-3 and opt.param_groups[0]["eps"] == 1e-3
    ref = MeZOReference([dict(params=p_ref[:2], **g0), dict(params=p_ref[2:], **g1)], seed=5,
                        num_samples=2, eps_ref=1e-3)
    for t in range(20):
        xb, yb = batch(t, x, y)
        log = []
        opt.step(closure_for(m_zo, xb, yb, log))
        np.testing.assert_allclose(log, ref.step(closure_for(m_ref, xb, yb), t), rtol=1e-6)
    assert rel_err(flat(m_zo), flat(m_ref)) <= 1e-6

    # Groups with identical settings are bit-identical to one group: the noise is one flat vector.
    m_a, m_b = make_mlp(), make_mlp()
    pa = list(m_a.parameters())
    opt_a = ZOOptimizer([dict(params=pa[:1]), dict(params=pa[1:3]), dict(params=pa[3:])],
                        lr=0.05, num_samples=3, seed=2)
    opt_b = ZOOptimizer(m_b.parameters(), lr=0.05, num_samples=3, seed=2)
    for t in range(5):
        xb, yb = batch(t, x, y)
        opt_a.step(closure_for(m_a, xb, yb))
        opt_b.step(closure_for(m_b, xb, yb))
    assert torch.equal(flat(m_a), flat(m_b))


@pytest.mark.parametrize("kind", ["StepLR", "CosineAnnealingLR", "LambdaLR"])
def test_lr_schedulers(kind):
    x, y = make_data()
    m_zo, m_ref = make_mlp(), make_mlp()
    lr0 = 0.08
    opt = ZOOptimizer(m_zo.parameters(), lr=lr0, num_samples=2, seed=4)
    sched = {"StepLR": lambda: torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5),
             "CosineAnnealingLR": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12),
             "LambdaLR": lambda: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t)),
             }[kind]()
    closed_form = {"StepLR": lambda t: lr0 * 0.5 ** (t // 4),
                   "CosineAnnealingLR": lambda t: lr0 * (1 + math.cos(math.pi * t / 12)) / 2,
                   "LambdaLR": lambda t: lr0 / (1 + t)}[kind]
    group = dict(params=list(m_ref.parameters()), lr=lr0, eps=1e-3, scale=0.75, weight_decay=0.0)
    ref = MeZOReference([group], seed=4, num_samples=2)
    for t in range(12):
        assert opt.param_groups[0]["lr"] == pytest.approx(closed_form(t), rel=1e-9)
        group["lr"] = closed_form(t)
        xb, yb = batch(t, x, y)
        opt.step(closure_for(m_zo, xb, yb))
        ref.step(closure_for(m_ref, xb, yb), t)
        sched.step()
    assert rel_err(flat(m_zo), flat(m_ref)) <= 1e-6


def _usable_on_cpu(name):
    info = zo_kernels.backends()[name]
    return info["usable"] and "cpu" in info["devices"]


@pytest.mark.parametrize("backend", [
    "reference",
    pytest.param("cpu", marks=pytest.mark.skipif(not _usable_on_cpu("cpu"),
                                                 reason="C++ CPU backend not built")),
    pytest.param("triton", marks=pytest.mark.skipif(
        not _usable_on_cpu("triton"),
        reason="Triton not usable on CPU tensors (needs TRITON_INTERPRET=1 and triton)")),
])
def test_backends_give_bit_identical_training(backend):
    """The optimizer forwards ``backend``; every backend yields the same bits as the default."""
    x, y = make_data(n=64)
    m_auto, m_b = make_mlp(), make_mlp()
    o_auto = ZOOptimizer(m_auto.parameters(), lr=0.05, num_samples=2, seed=3, weight_decay=0.01)
    o_b = ZOOptimizer(m_b.parameters(), lr=0.05, num_samples=2, seed=3, weight_decay=0.01,
                      backend=backend)
    for t in range(3):
        xb, yb = batch(t, x, y, bs=32)
        assert o_auto.step(closure_for(m_auto, xb, yb)) == o_b.step(closure_for(m_b, xb, yb))
    assert torch.equal(flat(m_auto), flat(m_b))


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------
def test_state_dict_roundtrip_continues_bit_identically(tmp_path):
    x, y = make_data()
    model = make_mlp()
    opt = ZOOptimizer(model.parameters(), lr=0.05, num_samples=3, seed=2**64 - 5, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
    for t in range(7):
        opt.step(closure_for(model, *batch(t, x, y)))
        sched.step()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()},
               tmp_path / "ckpt.pt")
    sd = opt.state_dict()
    assert sd["zo"]["step"] == 7 and type(sd["zo"]["step"]) is int
    assert sd["zo"]["seed"] == 2**64 - 5 and type(sd["zo"]["seed"]) is int
    for t in range(7, 14):
        opt.step(closure_for(model, *batch(t, x, y)))
        sched.step()

    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model2 = make_mlp(seed=99)                       # different init: everything comes from ck
    model2.load_state_dict(ck["model"])
    opt2 = ZOOptimizer(model2.parameters(), lr=0.05, num_samples=1, seed=0, weight_decay=0.01)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=3, gamma=0.7)
    sched2.load_state_dict(ck["sched"])
    opt2.load_state_dict(ck["opt"])
    assert opt2.step_count == 7 and opt2.seed == 2**64 - 5 and opt2.num_samples == 3
    for t in range(7, 14):
        opt2.step(closure_for(model2, *batch(t, x, y)))
        sched2.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert opt.state_dict()["zo"] == opt2.state_dict()["zo"]


def test_load_state_dict_rejects_foreign_state_without_changes():
    model = make_mlp()
    opt = ZOOptimizer(model.parameters())
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="'zo'"):
        opt.load_state_dict(sgd.state_dict())
    bad = opt.state_dict()
    bad["zo"]["seed"] = -1
    with pytest.raises(ValueError, match="seed"):
        opt.load_state_dict(bad)
    assert opt.seed == 0 and opt.step_count == 0


def test_deepcopy_and_conventions():
    x, y = make_data()
    model = make_mlp()
    opt = ZOOptimizer(model.parameters(), lr=0.05, seed=11, max_skips=3)
    opt.step(closure_for(model, *batch(0, x, y)))
    opt.zero_grad()                                   # harmless
    assert all(p.grad is None for p in model.parameters())
    opt2 = copy.deepcopy(opt)
    assert opt2.zo_state == opt.zo_state and opt2.max_skips == 3 and opt2.zo_state is not opt.zo_state
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.sample_seeds() == [derive_seed(11, 1, 0)]
    # add_param_group: the new tensor joins the end of the flat vector and is trained
    extra = nn.Parameter(torch.zeros(7))
    opt.add_param_group({"params": [extra], "lr": 0.5})
    assert opt.param_groups[1]["eps"] == 1e-3 and opt.param_groups[1]["lr"] == 0.5
    opt.step(lambda: (extra - 1).pow(2).sum() + nn.functional.cross_entropy(model(x), y))
    assert extra.abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# split API
# ------------------------------------------------------------------------------------------------
def test_estimate_then_apply_estimate_equals_step():
    x, y = make_data()
    m1, m2, m3 = make_mlp(), make_mlp(), make_mlp()
    kw = dict(lr=0.05, num_samples=3, seed=8, weight_decay=0.02)
    o1, o2 = ZOOptimizer(m1.parameters(), **kw), ZOOptimizer(m2.parameters(), **kw)
    ref = MeZOReference([dict(params=list(m3.parameters()), lr=0.05, eps=1e-3, scale=0.75,
                              weight_decay=0.02)], seed=8, num_samples=3)
    for t in range(5):
        xb, yb = batch(t, x, y)
        before = flat(m2).clone()
        est = o2.estimate(closure_for(m2, xb, yb))
        assert isinstance(est, ZOEstimate) and o2.step_count == t
        assert est.seeds == [derive_seed(8, t, s) for s in range(3)]
        # estimate leaves the weights where they were, up to restore rounding
        torch.testing.assert_close(flat(m2), before, rtol=1e-6, atol=1e-7)
        ref_losses, ref_grads = ref.estimate(closure_for(m3, xb, yb), est.seeds)
        np.testing.assert_allclose(est.projected_grads, ref_grads, rtol=1e-4, atol=1e-3)
        assert est.loss == pytest.approx(np.mean(ref_losses), rel=1e-6)
        o2.apply_estimate(est)
        ref.update(est.seeds, est.projected_grads)
        o1.step(closure_for(m1, xb, yb))
        assert o2.step_count == t + 1
    assert rel_err(flat(m2), flat(m1)) <= 1e-6
    assert rel_err(flat(m2), flat(m3)) <= 1e-6


def test_estimate_with_given_seeds_and_apply():
    x, y = make_data()
    m, m_ref = make_mlp(), make_mlp()
    opt = ZOOptimizer(m.parameters(), num_samples=1, eps=1e-2)
    ref = MeZOReference([dict(params=list(m_ref.parameters()), lr=0.0, eps=1e-2, scale=0.75,
                              weight_decay=0.0)])
    seeds = [2**64 - 1, 0, 12345]
    est = opt.estimate(closure_for(m, x, y), seeds=seeds)
    assert est.seeds == seeds and len(est.projected_grads) == 3 and opt.step_count == 0
    _, ref_grads = ref.estimate(closure_for(m_ref, x, y), seeds)
    np.testing.assert_allclose(est.projected_grads, ref_grads, rtol=1e-4, atol=1e-4)

    # apply(): w + sum_k c_k z_k over the flat vector of all params, exactly these coefficients
    params = list(m.parameters())
    before = [p.detach().clone() for p in params]
    coeffs = [0.25, -0.125, 0.5]
    opt.apply(seeds, coeffs)
    offs = zo_kernels.offsets(params)
    for p, b, o in zip(params, before, offs):
        expect = b.double() + sum(c * zo_kernels.noise(s, p.numel(), offset=o).double().view(p.shape)
                                  for s, c in zip(seeds, coeffs))
        torch.testing.assert_close(p.detach().double(), expect, rtol=1e-6, atol=1e-6)
    assert opt.step_count == 0
    with pytest.raises(ValueError, match="len"):
        opt.apply(seeds, [1.0])
    with pytest.raises(ValueError, match="at least one"):
        opt.estimate(closure_for(m, x, y), seeds=[])
    with pytest.raises(ValueError, match="out of range"):
        opt.estimate(closure_for(m, x, y), seeds=[2**64])


def test_apply_estimate_lr_override_and_nonfinite():
    m1, m2 = make_mlp(), make_mlp()
    o1 = ZOOptimizer(m1.parameters(), lr=0.3)
    o2 = ZOOptimizer(m2.parameters(), lr=0.9)
    est = ZOEstimate([7, 8], [0.5, -1.5], 1.0)
    o1.apply_estimate(est)
    o2.apply_estimate(est, lr=0.3)
    assert torch.equal(flat(m1), flat(m2))
    before = flat(m1).clone()
    with pytest.warns(RuntimeWarning, match="not finite"):
        o1.apply_estimate(ZOEstimate([7], [math.nan], math.nan))
    assert torch.equal(flat(m1), before)
    assert o1.skipped_steps == 1 and o1.step_count == 2
    with pytest.raises(ValueError, match="same number"):
        o1.apply_estimate(ZOEstimate([7, 8], [0.5], 1.0))


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,name", [
    (dict(lr=-1e-3), "lr"), (dict(eps=0.0), "eps"), (dict(eps=-1e-3), "eps"),
    (dict(eps=math.nan), "eps"), (dict(num_samples=0), "num_samples"),
    (dict(num_samples=1.5), "num_samples"), (dict(scale=0.0), "scale"),
    (dict(scale=-0.75), "scale"), (dict(dist="uniform"), "dist"),
    (dict(weight_decay=-0.1), "weight_decay"), (dict(backend="gpu"), "backend"),
    (dict(seed=-1), "seed"), (dict(seed=2**64), "seed"), (dict(max_skips=0), "max_skips"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ZOOptimizer(make_mlp().parameters(), **kwargs)


def test_bad_groups_dtypes_devices_and_layouts():
    model = make_mlp()
    opt = ZOOptimizer(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['eps'\]"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))], "eps": 0.0})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="one device"):
        ZOOptimizer([nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3, device="meta"))])
    with pytest.raises(ValueError, match="one device"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3, device="meta"))]})
    assert len(opt.param_groups) == 1
    with pytest.raises(TypeError, match="float64"):
        ZOOptimizer([nn.Parameter(torch.zeros(3, dtype=torch.float64))])
    with pytest.raises(ValueError, match="contiguous"):
        ZOOptimizer([nn.Parameter(torch.zeros(4, 3).t())])
    # a scheduler or user setting a bad group value: the step raises before touching weights
    before = flat(model).clone()
    opt.param_groups[0]["lr"] = -0.5
    with pytest.raises(ValueError, match="lr"):
        opt.step(lambda: torch.tensor(1.0))
    assert torch.equal(flat(model), before) and opt.step_count == 0
    opt.param_groups[0]["lr"] = 0.1
    with pytest.raises(TypeError, match="closure"):
        opt.step()


# ------------------------------------------------------------------------------------------------
# closures that misbehave
# ------------------------------------------------------------------------------------------------
def _counting(values, exc_at=None):
    """A closure returning values[i] on call i (raising at call exc_at)."""
    calls = {"n": 0}

    def closure():
        i = calls["n"]
        calls["n"] += 1
        if exc_at is not None and i == exc_at:
            raise KeyError("boom")
        return values[i]
    return closure, calls


@pytest.mark.parametrize("ret,pattern", [
    (None, "NoneType"), (torch.ones(2), r"shape \(2,\)"), ("1.0", "str"), ([1.0], "list"),
    (torch.tensor(True), "bool"), (torch.ones(1, 1), r"shape \(1, 1\)"),
])
def test_closure_bad_return_type_error_restores(ret, pattern):
    model = make_mlp()
    opt = ZOOptimizer(model.parameters(), num_samples=2)
    before = flat(model).clone()
    with pytest.raises(TypeError, match=pattern):
        opt.step(lambda: ret)
    torch.testing.assert_close(flat(model), before, rtol=1e-6, atol=1e-7)
    assert opt.step_count == 0


@pytest.mark.parametrize("exc_at", [0, 1, 2, 3])
def test_closure_exception_propagates_after_restore(exc_at):
    model = make_mlp()
    opt = ZOOptimizer(model.parameters(), num_samples=2, eps=0.1)
    before = flat(model).clone()
    closure, calls = _counting([1.0, 0.5, 2.0, 1.0], exc_at=exc_at)
    with pytest.raises(KeyError, match="boom"):
        opt.step(closure)
    assert calls["n"] == exc_at + 1
    torch.testing.assert_close(flat(model), before, rtol=1e-6, atol=1e-7)
    assert opt.step_count == 0


def test_closure_runs_without_grad_and_accepts_floats():
    model = make_mlp()
    opt = ZOOptimizer(model.parameters())
    seen = []

    def closure():
        seen.append(torch.is_grad_enabled())
        return 1.5                                   # a plain float is a valid loss
    assert opt.step(closure) == 1.5
    assert seen == [False, False]


def test_nonfinite_loss_skips_step_warns_once_and_max_skips():
    model = make_mlp()
    opt = ZOOptimizer(model.parameters(), num_samples=2, eps=0.05, max_skips=3)
    before = flat(model).clone()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for bad in ([1.0, math.nan], [math.inf]):
            closure, calls = _counting(bad)
            assert not math.isfinite(opt.step(closure))
            assert calls["n"] == len(bad)             # evaluation stops at the bad loss
            torch.testing.assert_close(flat(model), before, rtol=1e-6, atol=1e-7)
    assert sum("not finite" in str(w.message) for w in rec) == 1
    assert opt.skipped_steps == 2 and opt.step_count == 2
    assert opt.zo_state["consecutive_skips"] == 2
    # a good step resets the consecutive count but not the total
    closure, _ = _counting([1.0, 0.5, 2.0, 1.0])
    opt.step(closure)
    assert opt.zo_state["consecutive_skips"] == 0 and opt.skipped_steps == 2
    assert not torch.equal(flat(model), before)
    after_good = flat(model).clone()
    # three in a row: the third raises (the weights are restored before it does)
    for i, bad in enumerate(([math.nan], [1.0, 2.0, 0.5, -math.inf], [1.0, math.nan])):
        closure, calls = _counting(bad)
        if i < 2:
            opt.step(closure)
        else:
            with pytest.raises(RuntimeError, match="max_skips=3"):
                opt.step(closure)
        assert calls["n"] == len(bad)
        torch.testing.assert_close(flat(model), after_good, rtol=1e-6, atol=1e-7)
    assert opt.skipped_steps == 5 and opt.step_count == 6
    assert opt.state_dict()["zo"]["skipped_steps"] == 5


def test_estimate_with_nonfinite_loss_restores_and_reports_nan():
    model = make_mlp()
    opt = ZOOptimizer(model.parameters(), num_samples=3, eps=0.05)
    before = flat(model).clone()
    closure, calls = _counting([1.0, 0.5, math.nan])
    est = opt.estimate(closure)
    assert calls["n"] == 3
    assert est.projected_grads[0] == pytest.approx(0.5 / 0.1)
    assert math.isnan(est.projected_grads[1]) and math.isnan(est.projected_grads[2])
    assert math.isnan(est.loss)
    torch.testing.assert_close(flat(model), before, rtol=1e-6, atol=1e-7)
    assert opt.step_count == 0 and opt.skipped_steps == 0    # estimate() counts nothing


def test_requires_grad_mix_warns():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3), requires_grad=False)
    with pytest.warns(UserWarning, match="requires_grad=False"):
        ZOOptimizer([a, b])
    a.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ZOOptimizer([a, b])                             # all frozen for autograd: deliberate


# ------------------------------------------------------------------------------------------------
# low precision
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_perturbations_match_reference(dtype):
    x, y = make_data()
    m, m_ref = make_mlp(dtype=dtype), make_mlp(dtype=dtype)
    kw = dict(lr=0.05, eps=0.02, scale=0.75, weight_decay=0.0)
    opt = ZOOptimizer(m.parameters(), **kw)
    ref = MeZOReference([dict(params=list(m_ref.parameters()), **kw)])
    log = []
    opt.step(closure_for(m, x, y, log))
    ref_losses = ref.step(closure_for(m_ref, x, y), 0)
    assert log == ref_losses                           # one rounding per perturbation: same bits
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(flat(m), flat(m_ref), rtol=2 * ulp, atol=1e-3)
    assert all(p.dtype == dtype for p in m.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d", [7.5e-4, 1e-2, 3e-6])
def test_vanish_threshold_against_rounding(dtype, d):
    """From the threshold up, a step of d away from zero rounds back to the weight (d is below half
    an ulp), and so does a step toward zero except at exact powers of two (where the spacing below
    halves); just below the threshold the step away from zero survives. Checked with torch's own
    fp32 -> dtype rounding."""
    from zowarmup.optim.precision import _vanish_threshold
    thr = _vanish_threshold(d, dtype)
    mags = torch.cat([torch.linspace(thr, 4 * thr, 2001), torch.linspace(thr / 2, thr, 2001)[:-1]])
    w = torch.cat([mags, -mags]).to(dtype)
    wf = w.float()
    away = (wf + torch.sign(wf) * d).to(dtype) == w
    toward = (wf - torch.sign(wf) * d).to(dtype) == w
    pow2 = torch.frexp(wf.abs()).mantissa == 0.5
    above = wf.abs() >= thr
    assert bool(away[above].all())
    assert bool(toward[above & ~pow2].all())
    assert not bool(away[~above].any())


def test_bf16_warns_when_perturbation_rounds_away():
    p = nn.Parameter(torch.full((1000,), 1.0, dtype=torch.bfloat16))
    opt = ZOOptimizer([p], eps=1e-3, scale=0.75)
    with pytest.warns(RuntimeWarning, match="below half an ulp"):
        opt.step(lambda: p.float().sum())
    assert torch.equal(p, torch.ones_like(p))          # the update rounded away too
    # no warning where the perturbation is representable: fp32, or bf16 with a larger eps
    for q, eps in ((nn.Parameter(torch.ones(1000)), 1e-3),
                   (nn.Parameter(torch.ones(1000, dtype=torch.bfloat16)), 2e-2)):
        o = ZOOptimizer([q], eps=eps)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            o.step(lambda: q.float().sum())


# ------------------------------------------------------------------------------------------------
# BatchNorm
# ------------------------------------------------------------------------------------------------
def _bn_model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(13, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5))


def test_batchnorm_running_stats_default_once_and_frozen():
    x, y = make_data()
    S = 3
    m_default, m_once = _bn_model(), _bn_model()
    m_probe = copy.deepcopy(m_once)
    o_def = ZOOptimizer(m_default.parameters(), num_samples=S, seed=1)
    o_once = ZOOptimizer(m_once.parameters(), num_samples=S, seed=1)
    o_def.step(closure_for(m_default, x, y, f64=False))
    assert int(m_default[1].num_batches_tracked) == 2 * S      # every forward updates them
    o_once.step(running_stats_once(m_once, closure_for(m_once, x, y, f64=False)))
    assert int(m_once[1].num_batches_tracked) == 1

    # independent expectation: one train-mode forward at w + eps*c*z_0
    params = list(m_probe.parameters())
    offs = zo_kernels.offsets(params)
    z0 = derive_seed(1, 0, 0)
    with torch.no_grad():
        for p, o in zip(params, offs):
            p.add_(zo_kernels.noise(z0, p.numel(), offset=o).view(p.shape), alpha=1e-3 * 0.75)
        m_probe(x)
    torch.testing.assert_close(m_once[1].running_mean, m_probe[1].running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m_once[1].running_var, m_probe[1].running_var, rtol=1e-5, atol=1e-6)

    bn = m_once[1]
    saved = [bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()]
    with freeze_running_stats(m_once):
        o_once.step(closure_for(m_once, x, y, f64=False))
    assert torch.equal(bn.running_mean, saved[0]) and torch.equal(bn.running_var, saved[1])
    assert torch.equal(bn.num_batches_tracked, saved[2])


# ------------------------------------------------------------------------------------------------
# memory: a step allocates nothing in proportion to the model
# ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not CPU_BUILT, reason="the C++ CPU backend (zo_kernels._C) is not built; the "
                    "reference path uses a bounded chunk of scratch memory (tens of MB)")
def test_step_peak_memory_stays_at_inference_level():
    code = textwrap.dedent("""
        import json, resource, torch
        from zowarmup import ZOOptimizer
        torch.set_num_threads(1)
        def hwm():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        def rss():
            for line in open("/proc/self/status"):
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        lin = torch.nn.Linear(4096, 2048)               # 8.4M params, 33.6 MB
        x = torch.randn(4, 4096)
        opt = ZOOptimizer(lin.parameters(), num_samples=2)
        closure = lambda: lin(x).square().mean()
        with torch.no_grad():
            closure()
        opt.step(closure)                               # warm-up: lazy initialisations
        open("/proc/self/clear_refs", "w").write("5")
        base = rss()
        opt.step(closure)
        print(json.dumps({"base_kb": base, "peak_kb": hwm(), "param_kb": 8390656 * 4 // 1024}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    growth = r["peak_kb"] - r["base_kb"]
    assert growth < 0.05 * r["param_kb"], r          # a noise tensor or weight copy would be 100%


def test_package_import_is_lazy():
    code = "import sys, zowarmup; print('torch' in sys.modules); zowarmup.ZOOptimizer; " \
           "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "True"]
    assert set(zowarmup.__all__) >= {"ZOOptimizer", "ZOEstimate", "derive_seed"}

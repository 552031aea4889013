"""The functional ZO core (``zowarmup.optim.functional``) on plain data, against ZOOptimizer and
against per-tensor ``apply_seeds_`` calls."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import zo_kernels
from zowarmup import ZOOptimizer
from zowarmup.optim import functional as F
from zowarmup.seeds import sample_seeds


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 20), nn.Tanh(), nn.Linear(20, 3))


def _data():
    g = torch.Generator().manual_seed(5)
    return torch.randn(16, 7, generator=g), torch.randint(0, 3, (16,), generator=g)


def _flat(m):
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


GROUP_KW = [dict(lr=0.05, eps=1e-3, scale=0.75, weight_decay=0.01),
            dict(lr=0.02, eps=3e-3, scale=0.5, weight_decay=0.0)]


@pytest.mark.parametrize("num_samples", [1, 3])
def test_zo_step_is_the_optimizer_step(num_samples):
    """``zo_step`` over FlatParams and GroupHypers gives ZOOptimizer.step's bits and losses."""
    x, y = _data()
    m_opt, m_fn = _model(), _model()
    opt = ZOOptimizer([dict(params=list(m_opt[0].parameters()), **GROUP_KW[0]),
                       dict(params=list(m_opt[2].parameters()), **GROUP_KW[1])],
                      eps=1e-3, num_samples=num_samples, seed=11)
    params = F.flat_params([list(m_fn[0].parameters()), list(m_fn[2].parameters())])
    hypers = [F.GroupHypers(**kw) for kw in GROUP_KW]
    for t in range(3):
        loss = opt.step(lambda: nn.functional.cross_entropy(m_opt(x), y))
        res = F.zo_step(params, hypers, lambda: nn.functional.cross_entropy(m_fn(x), y),
                        sample_seeds(11, t, num_samples), 1e-3)
        assert res.ok and len(res.losses) == 2 * num_samples and len(res.grads) == num_samples
        assert sum(res.losses) / len(res.losses) == loss
        assert torch.equal(_flat(m_opt), _flat(m_fn))


def test_apply_groups_equals_one_call_per_tensor():
    """Runs of groups with equal coefficients are merged into one call; the bits are those of one
    apply_seeds_ per tensor at its global offset, with empty groups anywhere."""
    torch.manual_seed(3)
    shapes = [[(5, 3), (130,)], [], [(7,)], [(2, 64)]]
    groups = [[torch.randn(s) for s in g] for g in shapes]
    ref = [[t.clone() for t in g] for g in groups]
    seeds = [3, 2**64 - 1]
    coeffs = [(0.5, -0.25), (0.5, -0.25), (0.5, -0.25), (1e-3, 2.0)]
    decays = [0.9, 0.9, 0.9, 1.0]
    F.apply_groups(F.flat_params(groups), seeds, coeffs, decays)
    flat_ref = [t for g in ref for t in g]
    offs = zo_kernels.offsets(flat_ref)
    k = 0
    for gi, g in enumerate(ref):
        for t in g:
            zo_kernels.apply_seeds_([t], seeds, list(coeffs[gi]), decays[gi], offset=offs[k])
            k += 1
    assert all(torch.equal(a, b) for ga, gb in zip(groups, ref) for a, b in zip(ga, gb))


def test_spsa_grads_stop_at_the_first_nonfinite_loss():
    losses, grads, ok = F.spsa_grads([1.0, 0.5, 2.0, 1.0], 0.25)
    assert ok and losses == [1.0, 0.5, 2.0, 1.0] and grads == [1.0, 2.0]
    losses, grads, ok = F.spsa_grads([1.0, 0.5, math.nan, 3.0], 0.25)
    assert not ok and losses[:2] == [1.0, 0.5] and math.isnan(losses[2]) and len(losses) == 3
    assert grads == [1.0]


def test_apply_update_beyond_float32_restores_and_applies_nothing():
    """The fused final pass with a coefficient beyond float32 range: False, no update, and the
    displacement left by spsa_estimate(keep_last=True) undone."""
    x, y = _data()
    m = _model()
    before = _flat(m).clone()
    params = F.flat_params([list(m.parameters())])
    hypers = [F.GroupHypers(lr=1e300, eps=1e-3, scale=0.75, weight_decay=0.0)]
    closure = lambda: nn.functional.cross_entropy(m(x), y)  # noqa: E731
    res = F.spsa_estimate(params, hypers, closure, [9], 1e-3, keep_last=True)
    assert res.ok and res.grads[0] != 0.0
    assert not torch.equal(_flat(m), before)
    expect = [p.detach().clone() for p in m.parameters()]
    zo_kernels.apply_seeds_(expect, [9], [1e-3 * 0.75], 1.0)  # the undo: + eps*c*z(9)
    expect = torch.cat([t.reshape(-1) for t in expect])
    assert F.apply_update(params, hypers, [9], res.grads, 1e-3, restore_seed=9) is False
    assert torch.equal(_flat(m), expect)
    # the same update with a sane lr is applied and returns True
    hypers = [hypers[0]._replace(lr=0.1)]
    assert F.apply_update(params, hypers, [9], res.grads, 1e-3) is True
    assert not torch.equal(_flat(m), expect)


def test_spsa_estimate_undoes_the_perturbation_when_the_closure_raises():
    m = _model()
    params = F.flat_params([list(m.parameters())])
    hypers = [F.GroupHypers(lr=0.1, eps=1e-2, scale=1.0, weight_decay=0.0)]
    calls = []

    def closure():
        calls.append(_flat(m).clone())
        if len(calls) == 2:
            raise KeyError("boom")
        return 1.0

    before = _flat(m).clone()
    with pytest.raises(KeyError):
        F.spsa_estimate(params, hypers, closure, [4, 5], 1e-2)
    assert len(calls) == 2 and not torch.equal(calls[1], before)
    # the weights were at w + c z - 2 c z; undoing adds c z back: equal to before up to rounding
    torch.testing.assert_close(_flat(m), before, rtol=0, atol=1e-6)
    assert (_flat(m) - calls[1]).abs().max() > 1e-3


def test_final_pass_merges_the_restore_into_the_last_seeds_term():
    """The restore of z(last) and the update's term of z(last) are one term (float64 sum): the
    final pass sums S noise terms; the other seeds keep their order and coefficients."""
    assert F.final_pass(9, 0.5, [3, 7, 9], [0.1, -0.2, 0.25]) == ([9, 3, 7], [0.75, 0.1, -0.2])
    assert F.final_pass(9, 0.5, [9], [-0.125]) == ([9], [0.375])  # S = 1: one term
    # a restore seed that is not among the update's seeds (not what zo_step does) stays separate
    assert F.final_pass(4, 0.5, [3, 7], [0.1, 0.2]) == ([4, 3, 7], [0.5, 0.1, 0.2])
    # seeds and coefficients of different lengths: an error, not a silently dropped term
    with pytest.raises(ValueError, match="2 seeds but 1 coefficients"):
        F.final_pass(9, 0.5, [3, 9], [0.1])


@pytest.mark.parametrize("S", [1, 4])
def test_zo_step_final_pass_has_S_terms_and_equals_restore_then_update(S, monkeypatch):
    """The step's 2S+1 apply_seeds_ calls have K = 1, 1, (2, 1) x (S-1), S; the fused final pass
    lands within float32 rounding of a separate restore followed by the update."""
    x, y = _data()
    m, m_sep = _model(), _model()
    hypers = [F.GroupHypers(**GROUP_KW[0])]
    seeds = [11 + s for s in range(S)]
    ks, calls = [], []
    real = zo_kernels.apply_seeds_

    def spy(tensors, sds, coeffs, *a, **kw):
        ks.append(len(sds))
        calls.append((list(sds), list(coeffs)))
        return real(tensors, sds, coeffs, *a, **kw)

    monkeypatch.setattr(zo_kernels, "apply_seeds_", spy)
    closure = lambda: nn.functional.cross_entropy(m(x), y)  # noqa: E731
    res = F.zo_step(F.flat_params([list(m.parameters())]), hypers, closure, seeds, 1e-3)
    assert res.ok
    assert ks == [1, 1] + [2, 1] * (S - 1) + [S]
    monkeypatch.setattr(zo_kernels, "apply_seeds_", real)
    # the same step with the restore and the update as two separate passes (independent of
    # final_pass): the projected gradients from the fused run, the update from group_update
    p_sep = F.flat_params([list(m_sep.parameters())])
    closure_sep = lambda: nn.functional.cross_entropy(m_sep(x), y)  # noqa: E731
    res_sep = F.spsa_estimate(p_sep, hypers, closure_sep, seeds, 1e-3, keep_last=True)
    assert res_sep.grads == res.grads
    zo_kernels.apply_seeds_(list(p_sep.tensors[0]), [seeds[-1]], [hypers[0].eps_c], 1.0)
    upd, decay = F.group_update(hypers[0], res.grads, 1e-3)
    # the final call: z_{S-1} first with restore (decayed) + its update, then the others in order
    assert calls[-1] == ([seeds[-1]] + seeds[:-1],
                         [hypers[0].eps_c * decay + upd[-1]] + list(upd[:-1]))
    zo_kernels.apply_seeds_(list(p_sep.tensors[0]), seeds, upd, decay)
    torch.testing.assert_close(_flat(m), _flat(m_sep), rtol=0, atol=2e-7)
    assert not torch.equal(_flat(m), _flat(_model()))  # the step moved the weights

"""HeteroFL (Diao, Ding and Tarokh, ICLR 2021) as a Table 2 baseline: every round, every sampled
client trains a width-sliced sub-network of the global model -- the full width for high-resource
clients, ``heterofl.lo_rate`` (half) of every hidden width for low-resource ones, as in the
paper's section 4.1 -- with HeteroFL's scaler, static BatchNorm and masked loss; the server
averages each parameter entry over the clients that hold it (:mod:`..heterofl_models`).

Communication budget (section 4.1: a fixed budget, so fewer rounds as the high-resource share
grows): a sub-network of rate p has about p^2 of the parameters, so a round with high-resource
share h costs ``h + (1 - h) p^2`` full-model exchanges per client. The budget is that of
``heterofl.budget_rounds`` rounds (0: ``rounds``) at share ``heterofl.budget_hi_fraction``; a run
gets ``floor(budget / cost(h))`` rounds, at most ``rounds``.

A round, through the driver's exchange (embedded or deployed alike):

1. each sampled client gets a :class:`~..messages.SubModelTask`: its width rate (1 for
   high-resource clients, ``heterofl.lo_rate`` for low-resource ones) and the leading slices of
   the global parameters;
2. it trains them (:meth:`..client.Client.fit_heterofl`) and returns a
   :class:`~..messages.SubModelUpdate`: the trained slice and the classes it holds;
3. the server averages every entry over the kept clients holding it
   (:func:`..heterofl_models.aggregate`);
4. with BatchNorm (sBN), the kept clients get a :class:`~..messages.StatsRequest` with the new
   global state and return their data's statistics under it
   (:meth:`..client.Client.fit_statistics`); the server sets the sample-weighted mean.

Bytes are those serialized messages, down and up, in every way of running (the embedded runner
passes them as bytes too). Dense, so not replayable: clients hold no model version afterwards.
"""
from __future__ import annotations

import math

import numpy as np

from ..state import NO_MODEL
from .base import Method, Phase


def rounds_under_budget(cfg) -> int:
    """Rounds a HeteroFL run gets under the fixed communication budget (module docstring)."""
    h = cfg.heterofl
    p2 = float(h.lo_rate) ** 2

    def cost(share):
        return share + (1.0 - share) * p2

    base = h.budget_rounds or cfg.rounds
    n = int(math.floor(base * cost(h.budget_hi_fraction) / cost(cfg.data.hi_fraction) + 1e-9))
    return max(1, min(cfg.rounds, n))


def client_rate(cfg, hi: bool) -> float:
    """A client's width rate: 1 (full width) for high-resource clients, ``heterofl.lo_rate``
    otherwise."""
    return 1.0 if hi else float(cfg.heterofl.lo_rate)


class _ServerState:
    """Per-run HeteroFL state of the server: one sub-network per rate (a buffer to slice the
    global parameters into, in the sub-network's layout) and its slices of the global model."""

    def __init__(self, d):
        from .. import heterofl_models as H
        cfg, fed = d.cfg, d.fed
        self.subs, self.index = {}, {}
        for rate in {1.0, float(cfg.heterofl.lo_rate)}:
            self.subs[rate] = H.sub_network(cfg, fed.dataset, rate, fed.device)
            self.index[rate] = H.sub_index(d.model, self.subs[rate])


def run_round(d, r: int, ids: list, nb, rec):
    """One HeteroFL round through the driver ``d``; returns the AggregateResult."""
    from .. import heterofl_models as H
    from ..bn import bn_layers, set_statistics
    from ..messages import StatsRequest, SubModelTask
    from ..server import AggregateResult
    st = getattr(d, "_heterofl", None)
    if st is None:
        st = d._heterofl = _ServerState(d)
    cfg, fed, srv = d.cfg, d.fed, d.server
    rate_of = {c: client_rate(cfg, bool(fed.hi[c])) for c in ids}
    tasks = {}
    for c in ids:
        sub = st.subs[rate_of[c]]
        H.extract(d.model, sub, st.index[rate_of[c]])
        tasks[c] = SubModelTask(r, rate_of[c], H.flat_params(sub))
    replies = d.exchange.heterofl(d, r, ids, tasks, nb, rec)
    res = AggregateResult()
    updates = []
    for c in ids:
        srv.held[c] = NO_MODEL
        if c not in replies:  # timed out or rejected (a deployment)
            continue
        m = replies[c]
        if m.values.shape != tasks[c].values.shape or not np.all(np.isfinite(m.values)):
            res.dropped.append(c)
            continue
        res.kept.append(c)
        sub = st.subs[rate_of[c]]
        updates.append((st.index[rate_of[c]], H.unflatten(sub, m.values, fed.device), m.labels))
    if updates:
        H.aggregate(d.model, updates, fed.dataset.num_classes)
    if updates and bn_layers(d.model):
        # sBN: the global running statistics from the kept clients' data under the new model
        stats = d.exchange.statistics(d, r, list(res.kept),
                                      StatsRequest(r, srv.layout.flatten(d.model)), nb, rec)
        tot, acc = 0.0, None
        for c in sorted(stats):
            m = stats[c]
            v = m.values.astype(np.float64) * m.num_samples
            acc = v if acc is None else acc + v
            tot += m.num_samples
        if acc is not None:
            set_statistics(d.model, (acc / tot).astype(np.float32))
    srv.log[r] = None
    res.kept.sort()
    res.dropped.sort()
    return res


PHASE = Phase("heterofl", run_round, deployable=True, replayable=lambda cfg: False)

HETEROFL = Method(
    "heterofl", "HeteroFL",
    "width-sliced sub-networks (full width hi, half width lo) under a fixed communication budget",
    warmup=False, phase2=PHASE, sections=("warmup", "heterofl"), rounds=rounds_under_budget)

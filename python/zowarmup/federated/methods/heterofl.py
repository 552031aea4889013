"""HeteroFL (Diao, Ding and Tarokh, ICLR 2021) as a Table 2 baseline: every round, every sampled
client trains a width-sliced sub-network of the global model -- the full width for high-resource
clients, ``heterofl.lo_rate`` (half) of every hidden width for low-resource ones, as in the
paper's section 4.1 -- with HeteroFL's scaler, static BatchNorm and masked loss; the server
averages each parameter entry over the clients that hold it (:mod:`..heterofl_models`).

Communication budget (section 4.1: a fixed budget, so fewer rounds as the high-resource share
grows): a sub-network of rate p has about p^2 of the parameters, so a round with high-resource
share h costs ``h + (1 - h) p^2`` full-model exchanges per client. The budget is that of
``heterofl.budget_rounds`` rounds (0: ``rounds``) at share ``heterofl.budget_hi_fraction``; a run
gets ``floor(budget / cost(h))`` rounds, at most ``rounds``. Bytes are counted from the serialized
WeightsMessages of the sub-network parameters (down and up) and, with BatchNorm, the statistics
each client returns for sBN.

Embedded runner only: a deployment would need a task message that names the client's width and
a reply carrying the BatchNorm statistics.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..messages import WeightsMessage
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


def _flat(params: list) -> np.ndarray:
    return np.concatenate([p.detach().reshape(-1).cpu().numpy() for p in params]).astype(np.float32)


def _load(params: list, flat: np.ndarray) -> None:
    off = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(torch.from_numpy(flat[off:off + n]).reshape(p.shape).to(p))
            off += n


class _State:
    """Per-run HeteroFL state on the driver: one sub-network per rate, slices, label masks."""

    def __init__(self, d):
        from .. import heterofl_models as H
        cfg, fed = d.cfg, d.fed
        self.subs, self.index = {}, {}
        for rate in {1.0, float(cfg.heterofl.lo_rate)}:
            sub = H.build_sub_model(cfg, fed.dataset, rate).to(d.model.device if hasattr(
                d.model, "device") else fed.device)
            H.static_bn(sub)
            H.add_scaler(sub, rate)
            self.subs[rate] = sub
            self.index[rate] = H.sub_index(d.model, sub)
        K = fed.dataset.num_classes
        self.masks = {}
        for c, cl in enumerate(d.exchange.clients):
            m = np.zeros(K, dtype=bool)
            m[np.unique(cl.y.cpu().numpy())] = True
            self.masks[c] = m


def run_round(d, r: int, ids: list, nb, rec):
    """One HeteroFL round through the driver ``d`` (embedded); returns the AggregateResult."""
    from .. import heterofl_models as H
    from ..bn import bn_layers, local_statistics, set_statistics
    from ..server import AggregateResult
    from ...seeds import derive_seed, TAG_SGD
    if not hasattr(d.exchange, "clients"):
        raise ValueError("HeteroFL runs embedded only (a deployment would need a width-carrying "
                         "task message and a statistics reply)")
    st = getattr(d, "_heterofl", None)
    if st is None:
        st = d._heterofl = _State(d)
    cfg, fed, srv = d.cfg, d.fed, d.server
    w = cfg.warmup
    lo = float(cfg.heterofl.lo_rate)
    res = AggregateResult()
    updates = []
    for c in ids:
        rate = 1.0 if fed.hi[c] else lo
        sub, index = st.subs[rate], st.index[rate]
        H.extract(d.model, sub, index)
        params = list(sub.parameters())
        down = WeightsMessage(r, _flat(params), 0).to_bytes()
        nb.add_down(c, len(down))
        _load(params, WeightsMessage.from_bytes(down).values)
        cl = d.exchange.clients[c]
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, TAG_SGD, r, c) >> 1)
        H.local_train(sub, cl.x, cl.y, torch.from_numpy(st.masks[c]), w.client_lr, w.momentum,
                      w.weight_decay, w.local_epochs, w.batch_size, gen)
        up = WeightsMessage(r, _flat(params), cl.num_samples).to_bytes()
        nb.add_up(c, len(up))
        vals = WeightsMessage.from_bytes(up).values
        srv.held[c] = NO_MODEL
        if not np.all(np.isfinite(vals)):
            res.dropped.append(c)
            continue
        res.kept.append(c)
        trained = {}
        off = 0
        for n, p in sub.named_parameters():
            trained[n] = torch.from_numpy(vals[off:off + p.numel()].copy()).reshape(p.shape).to(
                fed.device)
            off += p.numel()
        updates.append((index, trained, st.masks[c]))
    if updates:
        H.aggregate(d.model, updates, fed.dataset.num_classes)
    if updates and bn_layers(d.model):
        # sBN: the global running statistics from the kept clients' data under the new model
        tot, acc = 0.0, None
        for c in res.kept:
            cl = d.exchange.clients[c]
            s = WeightsMessage(r, local_statistics(d.model, cl.x, cfg.zo.micro_batch),
                               cl.num_samples).to_bytes()
            nb.add_up(c, len(s))
            v = WeightsMessage.from_bytes(s).values.astype(np.float64) * cl.num_samples
            acc = v if acc is None else acc + v
            tot += cl.num_samples
        set_statistics(d.model, (acc / tot).astype(np.float32))
    srv.log[r] = None
    res.kept.sort()
    res.dropped.sort()
    return res


PHASE = Phase("heterofl", run_round, deployable=False, replayable=lambda cfg: False)

HETEROFL = Method(
    "heterofl", "HeteroFL",
    "width-sliced sub-networks (full width hi, half width lo) under a fixed communication budget",
    warmup=False, phase2=PHASE, sections=("warmup", "heterofl"), rounds=rounds_under_budget)

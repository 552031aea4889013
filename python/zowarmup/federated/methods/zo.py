"""Seed-only ZO rounds (phase 2 of ZOWarmUp), and the methods built on them: ZOWarmUp (warm-up,
then ZO for every client) and ZO only (ZO from a random init).

Per round, each sampled client gets its seeds (``derive_seed(run_seed, TAG_ZO_SEEDS, round,
client, j)``), runs ``zo.local_steps`` SPSA steps on its whole local data
(:meth:`..client.Client.fit_zo`) and returns ``steps * S`` projected gradients; the server turns
them into one (seed, coeff) list (:meth:`..server.Server.aggregate_zo`; coefficients from
:func:`zowarmup.optim.functional.update_coeff`) that it and every client apply with
``apply_seeds_``. With FedAdam as the phase-2 server optimizer the update is dense instead.
"""
from __future__ import annotations

import numpy as np

from .base import Method, Phase


def replayable(cfg) -> bool:
    """The round's update is a (seed, coeff) broadcast unless phase 2 uses FedAdam."""
    return cfg.zo.server_opt != "fedadam"


def run_round(d, r: int, ids: list, nb, rec):
    """One ZO round through the driver ``d``; returns the AggregateResult."""
    srv = d.server
    push = replayable(d.cfg) and d.cfg.zo.sync == "broadcast"
    tasks = {c: srv.zo_seeds(r, c) for c in ids}
    replies = d.exchange.zo(d, r, ids, tasks, nb, rec, everyone=push)
    stats = recompute_statistics(d, r, list(replies), nb)
    res = srv.aggregate_zo(r, {c: tasks[c] for c in replies}, replies)
    if stats is not None:
        stats.apply(res.kept)
    d.exchange.broadcast(d, r, ids, res, nb, everyone=push)
    if stats is not None:
        stats.count_download(res, ids, push)
    return res


class _Statistics:
    """``zo.bn_stats = "recompute"``: the participants' BatchNorm statistics of one round."""

    def __init__(self, d, r, replies, nb):
        self.d, self.r, self.replies, self.nb = d, r, replies, nb

    def apply(self, kept):
        """Set the server's running statistics to the sample-weighted mean over ``kept``."""
        from ..bn import set_statistics
        kept = [c for c in kept if c in self.replies]
        if not kept:
            return
        n = np.asarray([self.replies[c].num_samples for c in kept], dtype=np.float64)
        w = n / n.sum() if n.sum() > 0 else np.full(len(kept), 1.0 / len(kept))
        avg = sum(wi * self.replies[c].values.astype(np.float64) for wi, c in zip(w, kept))
        set_statistics(self.d.model, avg.astype(np.float32))

    def count_download(self, res, ids, push):
        """The new statistics travel with the round's broadcast (same receivers)."""
        if res.broadcast is None or not self.replies:
            return
        size = 4 * len(next(iter(self.replies.values())).values)
        srv = self.d.server
        for c in (range(self.d.cfg.data.num_clients) if push else ids):
            if srv.held[c] == self.r + 1:
                self.nb.add_down(c, size)


def recompute_statistics(d, r: int, ids: list, nb):
    """With ``zo.bn_stats = "recompute"`` and a model with BatchNorm: every client in ``ids``
    computes the statistics of its data under the round's global weights (the exchange's
    ``bn_statistics``; bytes counted up); None otherwise."""
    if d.cfg.zo.bn_stats != "recompute" or not ids:
        return None
    from ..bn import bn_layers
    if not bn_layers(d.model):
        return None
    fetch = getattr(d.exchange, "bn_statistics", None)
    if fetch is None:
        raise ValueError("zo.bn_stats='recompute' runs embedded only (a deployment would need a "
                         "statistics field in the ZO reply); use zo.bn_stats='frozen' or 'batch'")
    return _Statistics(d, r, fetch(d, r, ids, nb), nb)


PHASE = Phase("zo", run_round, deployable=True, replayable=replayable)

ZOWARMUP = Method(
    "zowarmup", "ZOWarmUp",
    "warm-up on high-resource clients, then seed-only ZO rounds for every client",
    warmup=True, phase2=PHASE)
ZO_ONLY = Method(
    "zo_only", "ZO only (no warm-up)",
    "seed-only ZO rounds for every client from a random init (no warm-up)",
    warmup=False, phase2=PHASE, sections=("zo",))

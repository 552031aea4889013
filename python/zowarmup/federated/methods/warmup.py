"""Warm-up rounds (phase 1): FedAvg or FedAdam over the sampled high-resource clients, and the
High Res Only baseline, which warms up for every round.

Client: local SGD from the global weights (:meth:`..client.Client.fit_warmup`). Server: the
weighted average of the returned states as the pseudo-gradient of FedAvg/FedAdam
(:meth:`..server.Server.aggregate_weights`). Dense, so not replayable from seeds.
"""
from __future__ import annotations

from ..state import NO_MODEL
from .base import Method, Phase


def run_round(d, r: int, ids: list, nb, rec):
    """One warm-up round through the driver ``d``; returns the AggregateResult."""
    srv = d.server
    replies = d.exchange.warmup(d, r, ids, srv.weights_message(r), nb, rec)
    for c in ids:
        srv.held[c] = NO_MODEL
    res = srv.aggregate_weights(r, replies)[0]
    srv.log[r] = None
    return res


PHASE = Phase("warmup", run_round, deployable=True, replayable=lambda cfg: False)

HIGH_RES_ONLY = Method(
    "high_res_only", "High Res Only",
    "phase 1 (FedAvg/FedAdam over high-resource clients) for all rounds",
    warmup=True, phase2=None, sections=("warmup",))

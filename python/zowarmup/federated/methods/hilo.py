"""Phase 2 where high-resource clients keep FedAvg and low-resource ones run ZO (the paper's
Table 7 variant): one dense update from both kinds of replies (:meth:`..server.Server.aggregate_hilo`),
so not replayable. Embedded runner only.
"""
from __future__ import annotations

from .base import Method, Phase


def run_round(d, r: int, ids: list, nb, rec):
    """One hi+lo round through the driver ``d``; returns the AggregateResult."""
    srv = d.server
    hi_ids = [c for c in ids if d.fed.hi[c]]
    lo_ids = [c for c in ids if not d.fed.hi[c]]
    wrep = d.exchange.warmup(d, r, hi_ids, srv.weights_message(r), nb, rec)
    tasks = {c: srv.zo_seeds(r, c) for c in lo_ids}
    grep = d.exchange.zo(d, r, lo_ids, tasks, nb, rec, everyone=False)
    return srv.aggregate_hilo(r, wrep, {c: tasks[c] for c in grep}, grep)


PHASE = Phase("hilo", run_round, deployable=False, replayable=lambda cfg: False)

ZOWARMUP_HILO = Method(
    "zowarmup_hilo", "ZOWarmUp (hi keep FedAvg)",
    "warm-up, then high-resource clients keep FedAvg while low-resource ones run ZO",
    warmup=True, phase2=PHASE)

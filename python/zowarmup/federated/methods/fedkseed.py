"""FedKSeed rounds: a finite pool of seeds fixed at setup, several local ZO steps per round, each
along one pool seed; the server sums the clients' per-seed scalars into one broadcast
(:meth:`..client.Client.fit_kseed`, :meth:`..server.Server.aggregate_kseed`). Methods: FedKSeed
from a random init, and ZOWarmUp + FedKSeed (warm-up, then FedKSeed).

What travels: down, a :class:`~..messages.KSeedTask` (the round and the step count: every client
derives the pool from the run seed); up, a :class:`~..messages.KSeedUpdate` (the pool indices the
client used and its accumulated projected gradient per index, float32, and ``n_i``). The round's
(pool seed, coeff) list is replayable, like a ZO broadcast (with FedKSeed's noise,
``fedkseed.dist``). In a deployment the task carries the server's state checksum and a catch-up
(seed-log replay or weights), the client probes from a snapshot (its stored weights do not move)
and stamps its reply with its checksum, exactly like a ZO round (:class:`..driver.TransportExchange`).
"""
from __future__ import annotations

from .base import Method, Phase


def run_round(d, r: int, ids: list, nb, rec):
    """One FedKSeed round through the driver ``d``; returns the AggregateResult."""
    srv = d.server
    push = d.cfg.zo.sync == "broadcast"
    replies = d.exchange.kseed(d, r, ids, srv.kseed_task(r), nb, rec, everyone=push)
    res = srv.aggregate_kseed(r, replies)
    d.exchange.broadcast(d, r, ids, res, nb, everyone=push)
    return res


PHASE = Phase("fedkseed", run_round, deployable=True, replayable=lambda cfg: True)

FEDKSEED = Method(
    "fedkseed", "FedKSeed",
    "FedKSeed from a random init: shared pool of K seeds, several local ZO steps",
    warmup=False, phase2=PHASE, sections=("zo", "fedkseed"), seed_pool=True)
ZOWARMUP_FEDKSEED = Method(
    "zowarmup_fedkseed", "ZOWarmUp + FedKSeed", "warm-up, then FedKSeed as the phase-2 method",
    warmup=True, phase2=PHASE, sections=("warmup", "zo", "fedkseed"), seed_pool=True)

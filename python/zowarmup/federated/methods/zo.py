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
    res = srv.aggregate_zo(r, {c: tasks[c] for c in replies}, replies)
    d.exchange.broadcast(d, r, ids, res, nb, everyone=push)
    return res


PHASE = Phase("zo", run_round, deployable=True, replayable=replayable)

ZOWARMUP = Method(
    "zowarmup", "ZOWarmUp",
    "warm-up on high-resource clients, then seed-only ZO rounds for every client",
    warmup=True, phase2=PHASE)
ZO_ONLY = Method(
    "zo_only", "ZO only (no warm-up)",
    "seed-only ZO rounds for every client from a random init (no warm-up)",
    warmup=False, phase2=PHASE, sections=("zo",))

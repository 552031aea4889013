"""What a federated method is: a declaration (:class:`Method`) over round phases (:class:`Phase`).

A method says which phase every round runs: warm-up rounds (FedAvg/FedAdam over the high-resource
clients) before its pivot, its phase-2 kind from the pivot on. A phase is one function that runs a
round through the round driver (:mod:`..driver`): it builds the tasks with the server, hands them to
the driver's exchange (in-process clients, or a transport to deployed clients), and aggregates the
replies with the server. This module imports nothing of the federation, so the config can read the
registry without import cycles.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

__all__ = ["Method", "Phase"]


@dataclass(frozen=True)
class Phase:
    """One kind of round.

    Attributes:
        name: the phase name written into every round record (``"warmup"``, ``"zo"``, ...).
        run: ``run(driver, r, ids, nb, rec) -> AggregateResult``: round ``r`` with the sampled
            clients ``ids``; ``nb`` counts bytes per client, ``rec`` is the round record (the
            phase may add fields).
        deployable: whether the deployment exchange (Flower, the in-memory transport) runs it.
        replayable: ``replayable(cfg) -> bool``: whether its update is a (seed, coeff) broadcast
            that clients can replay (else clients download weights when next needed).
    """
    name: str
    run: Callable
    deployable: bool
    replayable: Callable


@dataclass(frozen=True)
class Method:
    """A federated method, as the config's ``method`` / ``baselines`` name it.

    Attributes:
        name: the config name.
        label: the name in tables and plots.
        description: one line for ``--help`` and the docs.
        warmup: rounds before the pivot are warm-up rounds (False: phase 2 from round 0).
        phase2: the phase from the pivot on; None: warm-up for every round (no pivot).
        sections: the config sections the method reads (``data``, ``model`` always).
        seed_pool: the server draws FedKSeed's finite seed pool at setup.
        rounds: ``rounds(cfg) -> int``: the rounds a run of this method gets (None: ``rounds``;
            HeteroFL: fewer, under its communication budget).
    """
    name: str
    label: str
    description: str
    warmup: bool
    phase2: Phase | None
    sections: tuple = ("warmup", "zo")
    seed_pool: bool = False
    rounds: Callable | None = None

    @property
    def deployable(self) -> bool:
        """Every phase the method uses runs on a deployment."""
        return self.phase2 is None or self.phase2.deployable

    def pivot(self, rounds: int, pivot: int) -> int:
        """First phase-2 round given the config's ``rounds`` and ``pivot``."""
        if self.phase2 is None:
            return rounds
        if not self.warmup:
            return 0
        return pivot

    def phase_name(self, round_idx: int, rounds: int, pivot: int) -> str:
        """The phase round ``round_idx`` runs."""
        if round_idx < self.pivot(rounds, pivot):
            return "warmup"
        return self.phase2.name

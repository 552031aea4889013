"""A client that keeps its own copy of the global model between rounds (a deployment's client).

The embedded runner reloads one worker model from the server before each client, so it needs no
client-side state. In a deployment (Flower, or :class:`.deploy.InMemoryTransport` in tests) each
client holds a model of its own and must keep it bit-identical to the server's while only seeds
and scalars travel. :class:`ClientReplica` is that client: it wraps the same :class:`.client.Client`
(local data, ``fit_warmup``, ``fit_zo``) and adds

- a model version (the global model after ``version`` rounds; ``-1`` = holds no usable version,
  e.g. after local SGD in the warm-up);
- catch-up: a :class:`~.messages.ReplayMessage` of the seed log (applied round by round with
  ``apply_seeds_``, skipping rounds it already has) or a weights download;
- checksums: every ZO task names the server's state checksum; a weights download is checked
  against it before it is loaded (a mismatch is rejected); after catching up the client compares
  its own and, on a mismatch, answers ``DESYNC`` instead of probing a wrong model (the server
  repairs it with a weights download). Its gradients carry its checksum;
- exact ZO evaluation: ``zo.exact`` (scratch buffer, :mod:`zowarmup.optim.exact`) or a parameter snapshot, so
  probing never moves the stored weights;
- validation of everything the server sends (:mod:`.validation`); a rejected message changes
  nothing and is answered with ``REJECTED`` and the reason. A task that does not fit the version
  the client holds (a round it cannot have reached without a catch-up, e.g. a forged future round)
  is answered with ``DESYNC`` (the server's repair request) and changes nothing either: the last
  round seen advances only when a task has passed every check.

:meth:`ClientReplica.handle` takes the task's serialized messages and returns the reply's; the
Flower ClientApp and the in-memory transport both call it.

Tasks (what the server sends) and replies:

==========================================  ===================================================
``[WeightsMessage]``                        warm-up: local SGD -> ``[WeightsMessage]``
``[catch-up?, SeedsMessage]``               ZO round -> ``[GradsMessage]`` (or ``[StatusMessage]``)
``[catch-up?, KSeedTask]``                  FedKSeed round -> ``[KSeedUpdate]`` (or a status)
``[SubModelTask]``                          HeteroFL round: local SGD of the client's width ->
                                            ``[SubModelUpdate]``
``[StatsRequest]``                          HeteroFL sBN: statistics under the sent state ->
                                            ``[StatsMessage]``
``[catch-up?, StatusMessage]``              sync to ``version`` -> ``[StatusMessage]`` (OK/DESYNC)
==========================================  ===================================================

A phase-2 task must be the kind the run's phase 2 sends (:func:`.validation.check_task_kind`).
A HeteroFL client trains its own width only (1 if high-resource, ``heterofl.lo_rate`` otherwise,
from the run seed's resource assignment); a task naming another width is rejected. Replayed
broadcasts of FedKSeed rounds use FedKSeed's noise (``fedkseed.dist``), as the server applied them.

where ``catch-up`` is a ReplayMessage or a WeightsMessage.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from .client import Client, apply_broadcast
from ..optim.exact import require_exact_supported
from .federation import build_global_model, client_shards, make_client
from .methods import require_deployable
from .messages import MsgType, Status, StatusMessage
from .server import seed_pool
from .state import NO_MODEL, StateLayout, state_checksum
from .validation import (Limits, Rejected, check_checksum, check_kseed_task, check_replay,
                         check_seeds_task, check_stats_request, check_submodel_task,
                         check_task_kind, as_message, check_task_round, check_weights_download)

log = logging.getLogger("zowarmup.federated")



class ClientReplica:
    """One client's persistent model, version and protocol handling.

    Args:
        client: the client's data and settings (:class:`.client.Client`).
        model: the client's own model (updated in place; version 0 = the initial model every
            client builds from the run seed).
        limits: what a legal server message may contain (``Limits.from_config``).
        version: the version ``model`` holds (0 for a fresh initial model).
        exact: evaluate ZO perturbations in a scratch buffer (``True``, ``zo.exact``) instead of
            in place with a parameter snapshot (``False``); either way the stored weights end
            bit-identical. Exact mode checks the model first
            (:func:`zowarmup.optim.exact.require_exact_supported`: ``ValueError`` when unsupported).
        submodel: HeteroFL: ``(rate, sub-network)``, the width this client trains and its
            sub-network (:func:`.heterofl_models.sub_network`); None for other methods.
    """

    def __init__(self, client: Client, model: nn.Module, limits: Limits, version: int = 0,
                 exact: bool | None = None, submodel: tuple | None = None):
        self.client = client
        self.submodel = submodel
        self.model = model
        self.layout = StateLayout(model)
        self.limits = limits
        self.version = int(version)
        self.last_round = 0
        self.exact = client.zo.exact if exact is None else bool(exact)
        if self.exact and client.num_samples:
            require_exact_supported(model, client.x[:2], client.zo.dist, client.zo.backend)
        #: (round, reason) of rejected server messages.
        self.rejections: list[tuple[int, str]] = []

    # -- state (for engines that restart the client process between messages) -----------------
    def state(self) -> dict:
        """``{"version", "last_round", "weights"}`` (weights: float32 flat state)."""
        return {"version": self.version, "last_round": self.last_round,
                "weights": self.layout.flatten(self.model)}

    def load_state(self, st: dict) -> None:
        """Inverse of :meth:`state`."""
        self.layout.load(self.model, np.asarray(st["weights"], dtype=np.float32))
        self.version = int(st["version"])
        self.last_round = int(st["last_round"])

    def checksum(self) -> int:
        """:func:`~.state.state_checksum` of the client's model."""
        return state_checksum(self.model)

    # -- protocol --------------------------------------------------------------------------------
    def handle(self, payloads: list) -> list[bytes]:
        """Validate and execute one task (its serialized messages); return the serialized reply.

        Nothing changes when the task is invalid: the reply is a ``REJECTED`` StatusMessage naming
        the reason (and the rejection is logged).
        """
        rnd = self.last_round
        try:
            msgs = self._decode(payloads)
            rnd = int(msgs[-1].round)
            return [m.to_bytes() for m in self._run(msgs)]
        except Rejected as e:
            log.warning("client %d: rejected the server's message: %s", self.client.cid, e)
            self.rejections.append((rnd, str(e)))
            return [StatusMessage(max(0, min(rnd, 2 ** 32 - 1)), Status.REJECTED, self.version,
                                  str(e), self._ck_or_none()).to_bytes()]

    def _decode(self, payloads) -> list:
        if not isinstance(payloads, (list, tuple)) or not 1 <= len(payloads) <= 2:
            raise Rejected(f"a task is 1 or 2 messages, got "
                           f"{len(payloads) if isinstance(payloads, (list, tuple)) else type(payloads).__name__}")
        lim = self.limits
        after_catch_up = (MsgType.SEEDS, MsgType.KSEED_TASK, MsgType.STATUS)
        if len(payloads) == 1:  # as_message: bytes decoded, objects must be genuine messages
            msgs = [as_message(payloads[0], (MsgType.WEIGHTS, *after_catch_up, MsgType.SUBMODEL,
                                             MsgType.STATS_REQUEST), lim)]
        else:
            cu = as_message(payloads[0], (MsgType.REPLAY, MsgType.WEIGHTS), lim)
            last = as_message(payloads[1], after_catch_up, lim)
            if cu.TYPE not in (MsgType.REPLAY, MsgType.WEIGHTS):
                raise Rejected(f"a task's first message must be a catch-up (REPLAY or WEIGHTS), "
                               f"got {cu.TYPE.name}")
            if last.TYPE not in after_catch_up:
                raise Rejected(f"a catch-up must be followed by SEEDS, KSEED_TASK or STATUS, got "
                               f"{last.TYPE.name}")
            msgs = [cu, last]
        # validate everything before anything is applied
        last = msgs[-1]
        if last.TYPE == MsgType.WEIGHTS:       # warm-up
            check_task_round(last.round, self.last_round, lim, "WEIGHTS", "warmup")
            check_weights_download(last, lim)
        elif last.TYPE == MsgType.SEEDS:
            check_seeds_task(last, self.last_round, lim)
        elif last.TYPE == MsgType.KSEED_TASK:
            check_kseed_task(last, self.last_round, lim)
        elif last.TYPE == MsgType.SUBMODEL:
            if self.submodel is None:
                raise Rejected("SUBMODEL task, but this client trains no HeteroFL sub-network")
            check_submodel_task(last, self.last_round, lim, self.submodel[0])
        elif last.TYPE == MsgType.STATS_REQUEST:
            check_stats_request(last, self.last_round, lim)
        elif last.TYPE == MsgType.STATUS:      # sync request: round may equal R (after the run)
            if not isinstance(last.version, (int, np.integer)) or last.version != last.round:
                raise Rejected(f"STATUS sync request: version {last.version!r} must equal its "
                               f"round {last.round!r}")
            if not isinstance(last.round, (int, np.integer)) or \
                    not self.last_round <= int(last.round) <= lim.rounds:
                raise Rejected(f"STATUS sync request: round {last.round!r} is stale or outside "
                               f"the run (last seen {self.last_round}, {lim.rounds} rounds)")
            check_checksum(last, "STATUS")
        else:
            raise Rejected(f"unexpected task message {last.TYPE.name}")
        check_task_kind(last, lim)
        if len(msgs) == 2:
            cu = msgs[0]
            if int(cu.round) != int(last.round):
                raise Rejected(f"catch-up to round {cu.round} does not match the task's round "
                               f"{last.round}")
            if cu.TYPE == MsgType.WEIGHTS:
                check_weights_download(cu, lim)
                self._check_download_checksum(cu, last)
            else:  # structure only; whether it fits this client's version is _catch_up's call
                check_replay(cu, int(cu.round), lim)
        return msgs

    def _check_download_checksum(self, cu, last) -> None:
        """A weights download must match the checksum it (or its task) names, before loading."""
        mine, task = cu.checksum, last.checksum
        if mine is not None and task is not None and int(mine) != int(task):
            raise Rejected(f"WEIGHTS download: checksum {int(mine):08x} differs from the task's "
                           f"{int(task):08x}")
        want = task if task is not None else mine
        if want is None:
            return
        got = self.layout.checksum(cu.values)
        if got != int(want):
            raise Rejected(f"WEIGHTS download: its values have checksum {got:08x}, not the "
                           f"{int(want):08x} it claims (not loaded)")

    def _catch_up(self, cu, target: int) -> StatusMessage | None:
        """Apply a catch-up; None when the model now holds version ``target``, else a DESYNC
        status (nothing applied)."""
        if cu is not None and cu.TYPE == MsgType.WEIGHTS:
            self.layout.load(self.model, cu.values)
            self.version = target
        elif cu is not None:  # replay: skip the rounds this client already has
            first = target - len(cu.entries)
            if self.version == NO_MODEL or not first <= self.version <= target:
                return StatusMessage(target, Status.DESYNC, self.version,
                                     f"cannot replay rounds {first}..{target - 1} onto version "
                                     f"{self.version}", self._ck_or_none())
            backend = self.client.zo.backend
            for e in cu.entries[self.version - first:]:
                apply_broadcast(self.model, e, self._dist(int(e.round)), backend)
                self.version = int(e.round) + 1
        if self.version != target:
            return StatusMessage(target, Status.DESYNC, self.version,
                                 f"holds version {self.version}, the task needs {target}",
                                 self._ck_or_none())
        return None

    def _dist(self, round_idx: int) -> str:
        """The noise round ``round_idx``'s broadcast was applied with: FedKSeed's own
        (``fedkseed.dist``) in a FedKSeed round, ``zo.dist`` otherwise (as the server)."""
        lim = self.limits
        if lim.phase2 == "fedkseed" and lim.pivot is not None and round_idx >= lim.pivot:
            return self.client.kseed.dist
        return self.client.zo.dist

    def _ck_or_none(self):
        return self.checksum() if self.version != NO_MODEL else None

    def _run(self, msgs: list) -> list:
        last = msgs[-1]
        cu = msgs[0] if len(msgs) == 2 else None
        r = int(last.round)
        if last.TYPE == MsgType.WEIGHTS:  # warm-up: local SGD from the global state
            reply = self.client.fit_warmup(self.model, last, self.layout)
            self.version = NO_MODEL
            self.last_round = r
            return [reply]
        if last.TYPE == MsgType.SUBMODEL:  # HeteroFL: its own sub-network, its model untouched
            self.last_round = r
            return [self._local(r, lambda: self.client.fit_heterofl(self.submodel[1], last))]
        if last.TYPE == MsgType.STATS_REQUEST:  # sBN: the sent state is no model version
            self.version = NO_MODEL
            self.last_round = r
            return [self._local(r, lambda: self.client.fit_statistics(self.model, last,
                                                                      self.layout))]
        # the task must fit this client's version (after its catch-up) and the named checksum;
        # until both hold, its round is not taken as seen (a forged future round changes nothing)
        out = self._catch_up(cu, r)
        if out is not None:
            log.warning("client %d: task for round %d does not fit: %s", self.client.cid, r,
                        out.reason)
            return [out]
        mine = self.checksum()
        want = last.checksum
        if want is not None and mine != want:
            log.warning("client %d: state checksum %08x differs from the server's %08x at "
                        "version %d: asking for a weights download", self.client.cid, mine, want,
                        r)
            if cu is not None:  # the replay moved the weights: they hold no known version now
                self.version = NO_MODEL
            return [StatusMessage(r, Status.DESYNC, self.version,
                                  f"checksum {mine:08x} != server's {want:08x} at version {r}",
                                  mine)]
        self.last_round = r
        if last.TYPE == MsgType.STATUS:  # sync request
            return [StatusMessage(r, Status.OK, self.version, "", mine)]
        if last.TYPE == MsgType.KSEED_TASK:  # FedKSeed's local steps from a snapshot
            def fit():
                return self.client.fit_kseed(self.model, last, snapshot=True)
        elif self.exact:
            def fit():
                return self.client.fit_zo(self.model, last, exact=True)
        else:
            def fit():
                return self.client.fit_zo(self.model, last, snapshot=True, exact=False)
        reply = self._local(r, fit, mine)
        reply.checksum = mine
        return [reply]

    def _local(self, r: int, fit, checksum=None):
        """``fit()``, or a FAILED status naming the exception (a local failure is reported, not
        fatal to the federation)."""
        try:
            return fit()
        except Exception as e:
            log.exception("client %d: local work of round %d failed", self.client.cid, r)
            return StatusMessage(r, Status.FAILED, self.version, f"{type(e).__name__}: {e}",
                                 checksum)


def build_replica(cfg, ds, cid: int, device="cpu", shards=None, model=None,
                  client: Client | None = None, where: str = "deployments") -> ClientReplica:
    """Client ``cid``'s replica for config ``cfg`` and dataset ``ds``: its shard of the Dirichlet
    split (or the given ``client``), the initial model (version 0, built from the run seed without
    moving torch's global RNG), and the run's limits. Every deployment (in memory, Flower) builds
    its clients here."""
    method = require_deployable(cfg.method, where)
    if client is None:
        shards = client_shards(cfg, ds) if shards is None else shards
        client = make_client(cfg, ds, shards[cid], cid, torch.device(device))
    if client.pool is None and method.seed_pool:  # FedKSeed's pool, from the run seed
        client.pool = seed_pool(cfg)
    if model is None:
        rng = torch.get_rng_state()
        model = build_global_model(cfg, ds).to(device)
        torch.set_rng_state(rng)
    lim = Limits.from_config(cfg, StateLayout(model).size, ds, model)
    submodel = None
    if method.phase2 is not None and method.phase2.name == "heterofl":
        from .. import data as zdata
        from .heterofl_models import sub_network
        from .methods.heterofl import client_rate
        hi = zdata.assign_resources(cfg.data.num_clients, cfg.data.hi_fraction, cfg.seed)
        rate = client_rate(cfg, bool(hi[cid]))
        submodel = (rate, sub_network(cfg, ds, rate, model_device(model)))
    return ClientReplica(client, model, lim, 0, submodel=submodel)


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


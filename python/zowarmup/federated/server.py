"""Server-side logic of the federated protocol: tasks out, replies in, global model updated.

:class:`Server` holds the global model, the server optimizer state (FedAdam moments), the seed log
and, for the accounting, which model version every client holds. Its methods take and return
message objects and never loop over rounds: the embedded runner (:mod:`.loop`) and a deployment
wrapper drive them.

Updates, with ``w_i = n_i / sum_{kept j} n_j`` over the clients whose replies were kept:

- Phase 1 (FedAvg): ``x <- x + server_lr * sum_i w_i (x_i - x)`` for parameters; buffers
  (BatchNorm statistics) become ``sum_i w_i b_i``. FedAdam (Reddi et al. 2021, no bias
  correction): ``d = sum_i w_i (x_i - x)``, ``m <- b1 m + (1-b1) d``, ``v <- b2 v + (1-b2) d^2``,
  ``x <- x + server_lr * m / (sqrt(v) + tau)``.
- Phase 2 ZO: client i's local step k, seed s, projected gradient g gives the entry
  ``(seed, -server_lr * lr * c * g * w_i / S)``; with ``seed_sharing = "shared"`` entries of one
  seed are summed over clients (float64, client order). The list is broadcast and applied with
  ``apply_seeds_`` by server and clients alike. With FedAdam as the phase-2 server optimizer the same
  list (without server_lr) is expanded into a dense pseudo-gradient and Adam is applied: not
  replayable from seeds, so clients then download weights.
- FedKSeed: entry per pool index k: ``(pool[k], -server_lr * lr * c * sum_i w_i acc_i[k])``.

Dropping: a reply with any NaN/inf value, or of the wrong length, is dropped from the round and
reported back (the caller logs and counts it). A round where every reply is dropped leaves the
model unchanged.

Untrusted input (deployments): :meth:`Server.accept` validates a client's reply -- as bytes or as a
decoded message -- before anything uses it (:mod:`.validation`: type, size, counts, ranges, NaN/inf,
round, registered sample count). A rejected message is logged with its reason, counted against the
sender (:attr:`Server.rejected`, :attr:`Server.rejections`) and changes nothing else.

Catch-up (:meth:`Server.catch_up_message`): a client holding version h < r gets either the seed log
of rounds h..r-1 (a ReplayMessage) or the weights, whichever serializes smaller; both leave it
bit-identical to the server (Rademacher ``apply_seeds_`` is exact on every backend).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

import zo_kernels

from ..optim.functional import update_coeffs_array
from ..seeds import derive_seed, TAG_ZO_SEEDS, TAG_POOL
from .client import apply_broadcast
from .config import RunConfig
from .messages import (CHECKSUM_BYTES, HEADER_BYTES, BroadcastMessage, GradsMessage, KSeedTask,
                       KSeedUpdate, MsgType, ReplayMessage, SeedsMessage, SubModelTask,
                       WeightsMessage)
from .methods import get as get_method
from .state import NO_MODEL, StateLayout, state_checksum
from .validation import (Limits, Rejected, check_grads_reply, check_kseed_reply, check_status,
                         as_message, check_stats_reply, check_submodel_reply, check_weights_reply)

log = logging.getLogger("zowarmup.federated")

#: Serialized WeightsMessage size without the floats: header (8) + num_samples (4) + n (8).
HEADER_AND_WEIGHTS = 20


@dataclass
class AggregateResult:
    """What a server aggregation did.

    Attributes:
        kept: client ids whose replies were used, ascending.
        dropped: client ids dropped (non-finite or malformed replies), ascending.
        broadcast: the (seed, coeff) list everyone applies, or None when the update is dense.
    """
    kept: list = field(default_factory=list)
    dropped: list = field(default_factory=list)
    broadcast: BroadcastMessage | None = None


class ServerAdam:
    """FedAdam's server state: first and second moments per parameter (float32, on the device)."""

    def __init__(self, params: list[torch.Tensor], beta1: float, beta2: float, tau: float):
        self.beta1, self.beta2, self.tau = float(beta1), float(beta2), float(tau)
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.steps = 0

    @torch.no_grad()
    def step(self, params: list[torch.Tensor], deltas: list[torch.Tensor], lr: float) -> None:
        """``x += lr * m / (sqrt(v) + tau)`` after updating the moments with ``deltas``."""
        for p, d, m, v in zip(params, deltas, self.m, self.v):
            d = d.to(p.dtype)
            m.mul_(self.beta1).add_(d, alpha=1 - self.beta1)
            v.mul_(self.beta2).addcmul_(d, d, value=1 - self.beta2)
            p.add_(lr * m / (v.sqrt() + self.tau))
        self.steps += 1

    def state_dict(self) -> dict:
        """Moments and step count (for checkpoints)."""
        return {"m": [t.cpu() for t in self.m], "v": [t.cpu() for t in self.v], "steps": self.steps}

    def load_state_dict(self, sd: dict) -> None:
        """Inverse of :meth:`state_dict`."""
        for dst, src in zip(self.m + self.v, list(sd["m"]) + list(sd["v"])):
            dst.copy_(src)
        self.steps = int(sd["steps"])


def _finite(a: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(a)))


def seed_pool(cfg: RunConfig) -> np.ndarray | None:
    """FedKSeed's pool of ``fedkseed.pool_size`` seeds, ``pool[k] = derive_seed(seed, TAG_POOL,
    k)`` (uint64), fixed by the run seed, so the server and every client derive it; None for a
    method without a pool."""
    if not get_method(cfg.method).seed_pool:
        return None
    return np.asarray([derive_seed(cfg.seed, TAG_POOL, k) for k in range(cfg.fedkseed.pool_size)],
                      dtype=np.uint64)


class Server:
    """The federated server: global model, server optimizers, seed log, version bookkeeping.

    Args:
        cfg: the run's configuration (method, phases, optimizer settings).
        model: the global model (updated in place).
        num_clients: N.
        dataset: the run's dataset (its shapes size HeteroFL's messages, :class:`Limits`).
    """

    def __init__(self, cfg: RunConfig, model: nn.Module, num_clients: int, dataset=None):
        self.cfg = cfg
        self.model = model
        self.layout = StateLayout(model)
        self.params = [p for p in model.parameters()]
        self.num_clients = int(num_clients)
        w, z = cfg.warmup, cfg.zo
        self.adam_warmup = (ServerAdam(self.params, w.beta1, w.beta2, w.tau)
                            if w.server_opt == "fedadam" else None)
        self.adam_zo = (ServerAdam(self.params, z.beta1, z.beta2, z.tau)
                        if z.server_opt == "fedadam" else None)
        self.pool = seed_pool(cfg)
        #: held[i]: the global model version (= rounds applied) client i holds; version 0, the
        #: initial model, is built by every client from the run seed; NO_MODEL after local training.
        self.held = np.zeros(self.num_clients, dtype=np.int64)
        #: seed log: round -> BroadcastMessage, or None for a round whose update was dense.
        self.log: dict[int, BroadcastMessage | None] = {}
        #: what a legal message of this run may contain (validation).
        self.limits = Limits.from_config(cfg, self.layout.size, dataset, model)
        #: rejected[i]: messages from client i rejected by :meth:`accept`.
        self.rejected = np.zeros(self.num_clients, dtype=np.int64)
        #: (round, client, reason) of the latest rejections (at most MAX_REJECTIONS kept).
        self.rejections: list[tuple[int, int, str]] = []
        #: registered[i]: client i's sample count as registered with the server (-1: unknown);
        #: replies claiming another count are rejected.
        self.registered = np.full(self.num_clients, -1, dtype=np.int64)

    MAX_REJECTIONS = 1000

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def dist(self) -> str:
        """Noise distribution of the ZO phase (``zo.dist``)."""
        return self.cfg.zo.dist

    @property
    def backend(self):
        """``zo_kernels`` backend name (``"auto"``: picked per device by ``zo_kernels``)."""
        return self.cfg.zo.backend

    def weights_message(self, round_idx: int, checksum: int | None = None) -> WeightsMessage:
        """The current global state as a WeightsMessage (server -> client)."""
        return WeightsMessage(round_idx, self.layout.flatten(self.model), 0, checksum)

    def checksum(self) -> int:
        """:func:`~.state.state_checksum` of the global model (uint32)."""
        return state_checksum(self.model)

    # -- untrusted input -------------------------------------------------------------------------
    def reject(self, cid: int, round_idx: int, reason: str) -> None:
        """Log and count a rejected message from client ``cid`` (nothing else changes)."""
        log.warning("round %d: rejected message from client %s: %s", round_idx, cid, reason)
        known = (isinstance(cid, (int, np.integer)) and not isinstance(cid, bool)
                 and 0 <= int(cid) < self.num_clients)
        if known:
            self.rejected[int(cid)] += 1
        self.rejections.append((int(round_idx), int(cid) if known else -1, str(reason)))
        del self.rejections[:-self.MAX_REJECTIONS]

    def accept(self, cid: int, payload, round_idx: int, task: SeedsMessage | None = None,
               kind: str | tuple | None = None, require_checksum: bool = False):
        """Validate client ``cid``'s reply for round ``round_idx`` before it is used.

        Args:
            cid: the sender's client id (must be in ``[0, N)``).
            payload: serialized bytes or a decoded message.
            task: the task the client was given: a SeedsMessage (ZO replies are checked against
                it) or a SubModelTask (HeteroFL replies are).
            kind: ``"weights"``, ``"grads"``, ``"kseed"``, ``"submodel"``, ``"stats"`` or
                ``"status"``, or a tuple of them (the reply may be any of those); None: any kind
                (by the message's type; a GradsMessage or SubModelUpdate needs ``task``). Another
                kind is rejected.
            require_checksum: ZO and FedKSeed replies must carry a state checksum.

        Returns:
            The validated message, or None after logging and counting a rejection. The server's
            state (model, optimizer, seed log, versions) is not touched either way.
        """
        try:
            if isinstance(cid, bool) or not isinstance(cid, (int, np.integer)) \
                    or not 0 <= int(cid) < self.num_clients:
                raise Rejected(f"unknown sender {cid!r} (clients are 0..{self.num_clients - 1})")
            kinds = {"weights": MsgType.WEIGHTS, "grads": MsgType.GRADS,
                     "kseed": MsgType.KSEED_UPDATE, "submodel": MsgType.SUBMODEL_UPDATE,
                     "stats": MsgType.STATS, "status": MsgType.STATUS}
            ks = (kind,) if isinstance(kind, str) else tuple(kind or ())
            if any(k not in kinds for k in ks):
                raise ValueError(f"accept: unknown kind {kind!r}")
            want = tuple(kinds[k] for k in ks) if ks else tuple(kinds.values())
            msg = as_message(payload, want, self.limits)  # bytes or a genuine message object
            n = int(self.registered[int(cid)])
            n = n if n >= 0 else None
            if msg.TYPE == MsgType.WEIGHTS:
                return check_weights_reply(msg, round_idx, self.limits, n)
            if msg.TYPE == MsgType.GRADS:
                if task is None:
                    raise Rejected("GRADS reply but this client was given no ZO task")
                return check_grads_reply(msg, round_idx, task, self.limits, n, require_checksum)
            if msg.TYPE == MsgType.KSEED_UPDATE:
                return check_kseed_reply(msg, round_idx, self.limits, n, require_checksum)
            if msg.TYPE == MsgType.SUBMODEL_UPDATE:
                if not isinstance(task, SubModelTask):
                    raise Rejected("SUBMODEL_UPDATE reply but this client was given no "
                                   "HeteroFL task")
                return check_submodel_reply(msg, round_idx, task, self.limits, n)
            if msg.TYPE == MsgType.STATS:
                return check_stats_reply(msg, round_idx, self.limits, n)
            return check_status(msg, round_idx)
        except Rejected as e:
            self.reject(cid, round_idx, str(e))
            return None

    # -- catch-up --------------------------------------------------------------------------------
    def _catch_up_plan(self, cid: int, round_idx: int, held: int | None, checksum: bool
                       ) -> tuple[str, int]:
        """("none" | "replay" | "weights", serialized size) of what client ``cid`` needs to hold
        version ``round_idx``: the seed-log replay of rounds ``held .. round_idx-1`` when every one
        of them is replayable and it is not larger than the weights (ties: the replay), else the
        weights. Sizes are computed without flattening the model (45 MB for ResNet-18)."""
        h = int(self.held[cid]) if held is None else int(held)
        if h == round_idx:
            return "none", 0
        extra = CHECKSUM_BYTES if checksum else 0
        w_len = HEADER_AND_WEIGHTS + 4 * self.layout.size + extra
        if h != NO_MODEL and 0 <= h < round_idx and self.replayable(h, round_idx):
            replay = (HEADER_BYTES + extra + 4
                      + sum(len(self.log[t].to_bytes()) for t in range(h, round_idx)))
            if replay <= w_len:
                return "replay", replay
        return "weights", w_len

    def catch_up_message(self, cid: int, round_idx: int, held: int | None = None,
                         checksum: int | None = None):
        """What client ``cid`` (holding version ``held``, default ``self.held[cid]``) needs to hold
        version ``round_idx``: None (nothing), a ReplayMessage of the seed log of rounds
        ``held .. round_idx-1``, or a WeightsMessage, whichever serializes to fewer bytes (ties:
        the replay). A client without a usable version, or behind a dense round, gets weights.

        ``checksum`` (the server's state checksum at ``round_idx``) is attached when given.
        """
        kind, _ = self._catch_up_plan(cid, round_idx, held, checksum is not None)
        if kind == "none":
            return None
        if kind == "replay":
            h = int(self.held[cid]) if held is None else int(held)
            return ReplayMessage(round_idx, [self.log[t] for t in range(h, round_idx)], checksum)
        return self.weights_message(round_idx, checksum)

    def catch_up_bytes(self, cid: int, round_idx: int, held: int | None = None) -> int:
        """Serialized size of :meth:`catch_up_message` without a checksum (0 when the client is
        current), without building it."""
        return self._catch_up_plan(cid, round_idx, held, False)[1]

    @staticmethod
    def _weights(replies: dict, kept: list) -> dict:
        total = float(sum(replies[c].num_samples for c in kept))
        if total <= 0:
            return {c: 1.0 / len(kept) for c in kept}
        return {c: replies[c].num_samples / total for c in kept}

    # -- phase 1 ---------------------------------------------------------------------------------
    def aggregate_weights(self, round_idx: int, replies: dict[int, WeightsMessage],
                          apply: bool = True) -> tuple[AggregateResult, list | None, np.ndarray | None]:
        """Validate phase-1 replies; return (result, parameter deltas, averaged buffers).

        The deltas are ``sum_i w_i (x_i - x)`` per parameter (float64 accumulation, client order);
        with ``apply`` the server optimizer applies them and the buffers are replaced.
        """
        res = AggregateResult()
        for c in sorted(replies):
            r = replies[c]
            ok = (r.values.shape == (self.layout.size,) and _finite(r.values)
                  and r.round == round_idx)
            (res.kept if ok else res.dropped).append(c)
        if not res.kept:
            return res, None, None
        w = self._weights(replies, res.kept)
        x = self.layout.flatten(self.model).astype(np.float64)
        avg = np.zeros(self.layout.size, dtype=np.float64)
        for c in res.kept:
            avg += w[c] * replies[c].values.astype(np.float64)
        delta = avg - x
        deltas = [torch.from_numpy(delta[s].astype(np.float32)).reshape(p.shape).to(p.device)
                  for s, p in zip(self.layout.param_slices(), self.params)]
        bufs = avg
        if apply:
            self._apply_dense(deltas, bufs, phase="warmup")
        return res, deltas, bufs

    @torch.no_grad()
    def _apply_dense(self, deltas: list, avg_flat: np.ndarray | None, phase: str) -> None:
        opt = self.cfg.warmup if phase == "warmup" else self.cfg.zo
        adam = self.adam_warmup if phase == "warmup" else self.adam_zo
        if adam is not None:
            adam.step(self.params, deltas, opt.server_lr)
        else:
            for p, d in zip(self.params, deltas):
                p.add_(d.to(p.dtype), alpha=opt.server_lr)
        if avg_flat is not None:
            sd = self.model.state_dict()
            for e in self.layout.entries:
                if e.is_param:
                    continue
                t = sd[e.name]
                src = torch.from_numpy(avg_flat[e.offset:e.offset + e.numel].astype(np.float32))
                src = src.reshape(e.shape)
                if not e.dtype.is_floating_point:
                    src = torch.round(src)
                t.copy_(src.to(t.device, t.dtype))

    # -- phase 2: ZO -----------------------------------------------------------------------------
    def zo_seeds(self, round_idx: int, cid: int) -> SeedsMessage:
        """The seeds client ``cid`` probes in ZO round ``round_idx`` (steps * S of them).

        ``derive_seed(run_seed, TAG, round, client, j)``, with client = N for every client when
        ``zo.seed_sharing == "shared"``.
        """
        z = self.cfg.zo
        who = self.num_clients if z.seed_sharing == "shared" else int(cid)
        n = z.num_seeds * z.local_steps
        return SeedsMessage(round_idx, [derive_seed(self.cfg.seed, TAG_ZO_SEEDS, round_idx, who, j)
                                        for j in range(n)], z.local_steps)

    def zo_entries(self, round_idx: int, tasks: dict[int, SeedsMessage],
                   replies: dict[int, GradsMessage], lr_scale: float
                   ) -> tuple[AggregateResult, np.ndarray, np.ndarray]:
        """Validate ZO replies and build the (seed, coeff) list, coefficients times ``lr_scale``.

        Returns (result, seeds uint64 (K,), coeffs float32 (K,)); the weights ``w_i`` are over
        ``weight_total`` (see :meth:`aggregate_zo`).
        """
        res = AggregateResult()
        for c in sorted(replies):
            r = replies[c]
            ok = (c in tasks and r.values.shape == tasks[c].seeds.shape and _finite(r.values)
                  and r.round == round_idx)
            (res.kept if ok else res.dropped).append(c)
        if not res.kept:
            return res, np.zeros(0, np.uint64), np.zeros(0, np.float32)
        return res, *self._zo_coeffs(tasks, replies, res.kept, self._weights(replies, res.kept),
                                     lr_scale)

    def _zo_coeffs(self, tasks, replies, kept, w, lr_scale):
        z = self.cfg.zo
        S = z.num_seeds
        def coeffs_of(c):
            return update_coeffs_array(replies[c].values, z.lr, z.scale, S, w[c], lr_scale)

        if z.seed_sharing == "shared":
            seeds = tasks[kept[0]].seeds
            acc = np.zeros(seeds.size, dtype=np.float64)
            for c in kept:
                acc += coeffs_of(c)
            return seeds.copy(), acc.astype(np.float32)
        seeds, coeffs = [], []
        for c in kept:
            seeds.append(tasks[c].seeds)
            coeffs.append(coeffs_of(c))
        return np.concatenate(seeds), np.concatenate(coeffs).astype(np.float32)

    def aggregate_zo(self, round_idx: int, tasks: dict[int, SeedsMessage],
                     replies: dict[int, GradsMessage]) -> AggregateResult:
        """Aggregate a ZO round and update the global model.

        FedAvg-style (``zo.server_opt = "fedavg"``): the broadcast list is applied to the server's
        parameters with ``apply_seeds_`` and returned in ``result.broadcast``. FedAdam: dense
        pseudo-gradient from the list, Adam step, ``result.broadcast = None`` (weights downlink).
        """
        z = self.cfg.zo
        if self.adam_zo is None:
            res, seeds, coeffs = self.zo_entries(round_idx, tasks, replies, z.server_lr)
            res.broadcast = BroadcastMessage(round_idx, seeds, coeffs)
            apply_broadcast(self.model, res.broadcast, self.dist, self.backend)
            self.log[round_idx] = res.broadcast
        else:
            res, seeds, coeffs = self.zo_entries(round_idx, tasks, replies, 1.0)
            if res.kept:
                self._apply_dense(self.dense_from_seeds(seeds, coeffs), None, phase="zo")
            self.log[round_idx] = None
        return res

    @torch.no_grad()
    def dense_from_seeds(self, seeds: np.ndarray, coeffs: np.ndarray) -> list[torch.Tensor]:
        """``sum_k coeffs_k z(seeds_k)`` materialized per parameter (fp32, same layout)."""
        out = [torch.zeros_like(p) for p in self.params]
        if seeds.size:
            zo_kernels.apply_seeds_(out, torch.from_numpy(seeds.view(np.int64).copy()),
                                    torch.from_numpy(coeffs.astype(np.float32)), 1.0, self.dist,
                                    self.backend)
        return out

    # -- phase 2: FedKSeed -----------------------------------------------------------------------
    def kseed_task(self, round_idx: int) -> KSeedTask:
        """The FedKSeed task message (local steps; the pool is fixed at setup)."""
        return KSeedTask(round_idx, self.cfg.fedkseed.for_method(self.cfg.method).local_steps)

    def aggregate_kseed(self, round_idx: int, replies: dict[int, KSeedUpdate]) -> AggregateResult:
        """Sum the clients' per-seed scalars (weighted) and apply them as one broadcast."""
        if self.pool is None:
            raise RuntimeError("aggregate_kseed: this server has no seed pool (method is not FedKSeed)")
        k = self.cfg.fedkseed
        K = len(self.pool)
        res = AggregateResult()
        for c in sorted(replies):
            r = replies[c]
            ok = (_finite(r.values) and r.round == round_idx
                  and (r.indices.size == 0 or int(r.indices.max()) < K)
                  and len(np.unique(r.indices)) == r.indices.size)
            (res.kept if ok else res.dropped).append(c)
        acc = np.zeros(K, dtype=np.float64)
        used = np.zeros(K, dtype=bool)
        if res.kept:
            w = self._weights(replies, res.kept)
            for c in res.kept:
                r = replies[c]
                idx = r.indices.astype(np.int64)
                acc[idx] += w[c] * r.values.astype(np.float64)
                used[idx] = True
        idx = np.flatnonzero(used)
        coeffs = update_coeffs_array(acc[idx], k.lr, k.scale, 1,
                                     server_lr=self.cfg.zo.server_lr).astype(np.float32)
        res.broadcast = BroadcastMessage(round_idx, self.pool[idx], coeffs)
        apply_broadcast(self.model, res.broadcast, k.dist, self.backend)  # FedKSeed's own noise
        self.log[round_idx] = res.broadcast
        return res

    # -- phase 2: hi keep FedAvg, lo run ZO ------------------------------------------------------
    def aggregate_hilo(self, round_idx: int, weight_replies: dict[int, WeightsMessage],
                       tasks: dict[int, SeedsMessage], grad_replies: dict[int, GradsMessage]
                       ) -> AggregateResult:
        """High-resource clients' FedAvg deltas and low-resource clients' ZO steps in one update.

        Weights ``w_i = n_i / sum n`` over all kept participants of both kinds; the dense part
        (``sum_hi w_i (x_i - x)``) and the seed part (``sum_lo`` of the ZO entries) are added and
        applied with the phase-2 server optimizer. Dense, so not replayable from seeds.
        """
        wres = AggregateResult()
        for c in sorted(weight_replies):
            r = weight_replies[c]
            ok = r.values.shape == (self.layout.size,) and _finite(r.values) and r.round == round_idx
            (wres.kept if ok else wres.dropped).append(c)
        zres = AggregateResult()
        for c in sorted(grad_replies):
            r = grad_replies[c]
            ok = (c in tasks and r.values.shape == tasks[c].seeds.shape and _finite(r.values)
                  and r.round == round_idx)
            (zres.kept if ok else zres.dropped).append(c)
        allr = {**{c: weight_replies[c] for c in wres.kept}, **{c: grad_replies[c] for c in zres.kept}}
        res = AggregateResult(kept=sorted(allr), dropped=sorted(wres.dropped + zres.dropped))
        self.log[round_idx] = None
        if not allr:
            return res
        w = self._weights(allr, res.kept)
        x = self.layout.flatten(self.model).astype(np.float64)
        deltas = [torch.zeros_like(p) for p in self.params]
        avg_buf = None
        if wres.kept:
            wsum = sum(w[c] for c in wres.kept)
            avg = np.zeros(self.layout.size, dtype=np.float64)
            for c in wres.kept:
                avg += w[c] * weight_replies[c].values.astype(np.float64)
            d = avg - wsum * x
            deltas = [torch.from_numpy(d[s].astype(np.float32)).reshape(p.shape).to(p.device)
                      for s, p in zip(self.layout.param_slices(), self.params)]
            # buffers: hi clients' weighted statistics renormalized among the hi clients
            avg_buf = avg / wsum
        if zres.kept:
            seeds, coeffs = self._zo_coeffs(tasks, grad_replies, zres.kept, w, 1.0)
            for d, dz in zip(deltas, self.dense_from_seeds(seeds, coeffs)):
                d.add_(dz)
        self._apply_dense(deltas, avg_buf, phase="zo")
        return res

    # -- accounting helpers ----------------------------------------------------------------------
    def replayable(self, start: int, stop: int) -> bool:
        """Whether rounds [start, stop) all have (seed, coeff) log entries."""
        return all(self.log.get(t) is not None for t in range(start, stop))

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything but the model weights: optimizer moments, versions held, seed log."""
        return {
            "adam_warmup": self.adam_warmup.state_dict() if self.adam_warmup else None,
            "adam_zo": self.adam_zo.state_dict() if self.adam_zo else None,
            "held": self.held.copy(),
            "log": {int(r): (None if m is None else m.to_bytes()) for r, m in self.log.items()},
            "rejected": self.rejected.copy(),
            "rejections": list(self.rejections),
            "registered": self.registered.copy(),
        }

    def load_state_dict(self, sd: dict) -> None:
        """Inverse of :meth:`state_dict`."""
        if self.adam_warmup is not None:
            self.adam_warmup.load_state_dict(sd["adam_warmup"])
        if self.adam_zo is not None:
            self.adam_zo.load_state_dict(sd["adam_zo"])
        self.held = np.asarray(sd["held"], dtype=np.int64).copy()
        self.log = {int(r): (None if b is None else BroadcastMessage.from_bytes(b))
                    for r, b in sd["log"].items()}
        if "rejected" in sd:  # checkpoints written before validation existed lack these
            self.rejected = np.asarray(sd["rejected"], dtype=np.int64).copy()
            self.rejections = [tuple(x) for x in sd["rejections"]]
            self.registered = np.asarray(sd["registered"], dtype=np.int64).copy()

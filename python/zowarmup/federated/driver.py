"""The one round driver: sampling, seeds, aggregation, evaluation, records, summaries and bytes.

:class:`RoundDriver` runs the rounds of one federated run for every way of running it: the
embedded runner (:mod:`.loop`), the in-memory deployment and Flower (:mod:`.deploy`,
:mod:`zowarmup.flower`). Per round it reseeds and samples the clients (:class:`.federation.Federation`),
runs the round's phase from the method registry (:mod:`.methods`: tasks built by the server,
replies aggregated by the server), counts bytes, decides whether to evaluate, and writes the round
record. What differs between the ways of running is only how tasks reach clients and replies come
back -- the *exchange*:

- :class:`LocalExchange`: the clients live in this process and share one worker model, reloaded
  from the global model before each client; messages cross as bytes (``to_bytes`` /
  ``from_bytes``). A round's broadcast is pushed at once to the clients that hold the round's
  version (every client with ``zo.sync = "broadcast"``, the participants with ``"lazy"``); a
  client that is behind catches up first (a seed-log replay or a weights download, whichever is
  smaller, counted in ``bytes_down_sync``).
- :class:`TransportExchange`: the clients keep their own models (:class:`~.replica.ClientReplica`)
  and answer over a transport (in memory, or Flower's Grid) by a deadline. Every reply is validated
  (:meth:`~.server.Server.accept`); ZO and FedKSeed tasks carry the catch-up the client needs and
  the server's state checksum; a client out of sync is repaired by a weights download within the
  round. The broadcast is not pushed: it is the first entry of the client's next replay.

Both exchanges offer the same round kinds, one method each: ``warmup`` (weights down, local SGD,
weights up), ``zo`` (seeds down, projected gradients up), ``kseed`` (FedKSeed's step count down,
per-seed scalars up), ``heterofl`` (a width-sliced sub-network down and back) and ``statistics``
(a global state down, BatchNorm statistics up); the client's computation behind each is the same
:class:`~.client.Client` method either way, and the phase (:mod:`.methods`) that calls them builds
the tasks and aggregates the replies for both.

Round record (one line of ``metrics.jsonl``): ``round``, ``phase``, ``accuracy``, ``loss`` (test
set; null on rounds without evaluation), ``clients`` (sampled), ``kept``, ``dropped`` and
``dropped_clients`` (sampled clients whose replies were not used), ``bytes_up_per_client`` /
``bytes_down_per_client`` (mean over the sampled clients, catch-up included), ``bytes_up_total`` /
``bytes_down_total`` (all clients, broadcasts to non-participants included), ``bytes_down_sync``
(catch-up downloads). A transport adds ``timed_out``, ``rejected``, ``desync``, ``failed``,
``repaired``, ``catch_up`` and ``round_seconds``.
"""
from __future__ import annotations

import copy
import logging
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable, Protocol

from . import accounting
from .checkpoint import config_hash
from .federation import Federation
from .messages import KSeedTask, StatsRequest, Status, StatusMessage, WeightsMessage
from .methods import PHASES
from .methods import get as get_method
from .state import NO_MODEL, copy_state_
from .validation import Rejected

log = logging.getLogger("zowarmup.federated")

__all__ = ["RoundDriver", "Bytes", "LocalExchange", "TransportExchange", "Transport",
           "InMemoryTransport"]


class Bytes:
    """Bytes sent to (``down``) and from (``up``) each client in one round; ``sync``: catch-up."""

    def __init__(self):
        self.up: dict[int, int] = {}
        self.down: dict[int, int] = {}
        self.sync = 0

    def add_up(self, c: int, n: int):
        self.up[c] = self.up.get(c, 0) + int(n)

    def add_down(self, c: int, n: int):
        self.down[c] = self.down.get(c, 0) + int(n)


class RoundDriver:
    """Runs rounds of one federated run over an exchange.

    Args:
        fed: the run's :class:`~.federation.Federation` (server, global model, data, sampling).
        exchange: :class:`LocalExchange` or :class:`TransportExchange`.
    """

    def __init__(self, fed: Federation, exchange):
        self.fed = fed
        self.cfg = fed.cfg
        self.server = fed.server
        self.model = fed.model
        self.method = get_method(fed.cfg.method)
        self.exchange = exchange
        self.pivot = fed.pivot

    def run_round(self, r: int) -> dict:
        """Round ``r``: sample, exchange, aggregate, count; its record (without evaluation)."""
        cfg = self.cfg
        phase = cfg.phase(r)
        ids = self.fed.sample(r, phase)
        nb = Bytes()
        rec = {"round": r, "phase": phase, "accuracy": None, "loss": None, "clients": len(ids)}
        rec.update(self.exchange.begin_round(r))
        res = PHASES[phase].run(self, r, ids, nb, rec)
        for c in res.dropped:
            log.warning("round %d: dropped client %d (non-finite or malformed reply)", r, c)
        n = max(len(ids), 1)
        rec.update({
            "kept": len(res.kept), "dropped": len(ids) - len(res.kept),
            "dropped_clients": sorted(set(ids) - set(res.kept)),
            "bytes_up_per_client": sum(nb.up.get(c, 0) for c in ids) / n,
            "bytes_down_per_client": sum(nb.down.get(c, 0) for c in ids) / n,
            "bytes_up_total": sum(nb.up.values()), "bytes_down_total": sum(nb.down.values()),
            "bytes_down_sync": nb.sync,
        })
        rec.update(self.exchange.end_round(r))
        return rec

    def evaluates(self, r: int) -> bool:
        """Whether round ``r`` ends with an evaluation: every ``eval_every`` rounds, the last
        round, and the round before the pivot."""
        cfg = self.cfg
        return (r + 1) % cfg.eval_every == 0 or r == cfg.rounds - 1 or r + 1 == self.pivot

    def step(self, r: int) -> dict:
        """:meth:`run_round` and, when due, the evaluation written into the record."""
        rec = self.run_round(r)
        if self.evaluates(r):
            rec["accuracy"], rec["loss"] = self.fed.evaluate()
        return rec

    def summary(self, records: list[dict]) -> dict:
        """The summary fields every way of running writes (accuracy, drops, communication)."""
        cfg, srv = self.cfg, self.server
        evals = [r for r in records if r["accuracy"] is not None]
        final = evals[-1] if evals else None
        notes = []
        if self.pivot < cfg.rounds and cfg.phase(self.pivot) != "warmup" \
                and not self.method.phase2.replayable(cfg):
            notes.append({
                "zo": "phase-2 server optimizer is FedAdam: its update is not replayable from "
                      "seeds, so every sampled client downloads the full weights each round "
                      "(counted in bytes_down)",
                "hilo": "hi+lo: the FedAvg part makes every phase-2 update dense, so clients "
                        "download weights when sampled (counted in bytes_down)",
            }.get(cfg.phase(self.pivot), f"phase {cfg.phase(self.pivot)!r} is not replayable "
                  "from seeds: clients download weights when sampled"))
        return {
            "method": cfg.method, "label": self.method.label, "seed": cfg.seed,
            "rounds": cfg.rounds, "pivot": self.pivot, "config_hash": config_hash(cfg.to_dict()),
            "final_accuracy": final["accuracy"] if final else None,
            "final_loss": final["loss"] if final else None,
            "best_accuracy": max((r["accuracy"] for r in evals), default=None),
            "accuracy_at_pivot": next((r["accuracy"] for r in evals if r["round"] + 1 == self.pivot),
                                      None),
            "dropped_total": int(sum(r["dropped"] for r in records)),
            "communication": accounting.phase_summary(records),
            "bytes_up_total": int(sum(r["bytes_up_total"] for r in records)),
            "bytes_down_total": int(sum(r["bytes_down_total"] for r in records)),
            "final_checksum": srv.checksum(),
            "notes": notes,
        }


# ------------------------------------------------------------------------------------------------
# exchanges
# ------------------------------------------------------------------------------------------------
class LocalExchange:
    """In-process clients sharing one worker model (the embedded runner's exchange)."""

    def __init__(self, fed: Federation):
        if fed.clients is None:
            raise ValueError("LocalExchange needs a Federation built with clients=True")
        self.fed = fed
        self.clients = fed.clients
        self.worker = copy.deepcopy(fed.model)

    def begin_round(self, r: int) -> dict:
        return {}

    def end_round(self, r: int) -> dict:
        return {}

    def _catch_up(self, d: RoundDriver, c: int, r: int, nb: Bytes) -> None:
        """Bring client c to version r (a replay or a weights download, the smaller)."""
        srv = d.server
        if int(srv.held[c]) == r:
            return
        cost = srv.catch_up_bytes(c, r)
        nb.add_down(c, cost)
        nb.sync += cost
        srv.held[c] = r

    def _catch_up_all(self, d: RoundDriver, r: int, ids: list, nb: Bytes, everyone: bool):
        for c in (range(d.cfg.data.num_clients) if everyone else ids):
            self._catch_up(d, c, r, nb)

    def _serve(self, d: RoundDriver, ids: list, nb: Bytes, task_of, fit, reload: bool) -> dict:
        """Each client c in ``ids``: its task ``task_of(c)`` crosses as bytes, ``fit(client,
        decoded task)`` runs on the worker model (reloaded from the global model first when
        ``reload``), the reply crosses back as bytes; returns client id -> decoded reply."""
        replies = {}
        for c in ids:
            task = task_of(c)
            down = task.to_bytes()
            if reload:
                copy_state_(self.worker, d.model)  # the client holds version r (caught up)
            reply = fit(self.clients[c], type(task).from_bytes(down))
            up = reply.to_bytes()
            nb.add_down(c, len(down))
            nb.add_up(c, len(up))
            replies[c] = type(reply).from_bytes(up)
        return replies

    def warmup(self, d: RoundDriver, r: int, ids: list, down_msg: WeightsMessage, nb: Bytes,
               rec: dict) -> dict:
        return self._serve(d, ids, nb, lambda c: down_msg,
                           lambda cl, m: cl.fit_warmup(self.worker, m, d.server.layout), False)

    def zo(self, d: RoundDriver, r: int, ids: list, tasks: dict, nb: Bytes, rec: dict,
           everyone: bool) -> dict:
        self._catch_up_all(d, r, ids, nb, everyone)
        return self._serve(d, ids, nb, tasks.__getitem__,
                           lambda cl, m: cl.fit_zo(self.worker, m), True)

    def kseed(self, d: RoundDriver, r: int, ids: list, task: KSeedTask, nb: Bytes, rec: dict,
              everyone: bool) -> dict:
        self._catch_up_all(d, r, ids, nb, everyone)
        return self._serve(d, ids, nb, lambda c: task,
                           lambda cl, m: cl.fit_kseed(self.worker, m), True)

    def heterofl(self, d: RoundDriver, r: int, ids: list, tasks: dict, nb: Bytes,
                 rec: dict) -> dict:
        """HeteroFL: each client trains the sub-network of its task's width
        (:meth:`~.client.Client.fit_heterofl` on a worker sub-network per width rate)."""
        from .heterofl_models import sub_network
        from .methods.heterofl import client_rate
        subs = getattr(self, "_subs", None)
        if subs is None:
            subs = self._subs = {}
        hi = self.fed.hi

        def fit(cl, m):
            rate = client_rate(d.cfg, bool(hi[cl.cid]))
            if rate not in subs:
                subs[rate] = sub_network(d.cfg, self.fed.dataset, rate, self.fed.device)
            return cl.fit_heterofl(subs[rate], m)
        return self._serve(d, ids, nb, tasks.__getitem__, fit, False)

    def statistics(self, d: RoundDriver, r: int, ids: list, request: StatsRequest, nb: Bytes,
                   rec: dict) -> dict:
        """Each client's BatchNorm statistics under the request's global state
        (:meth:`~.client.Client.fit_statistics` on the worker model)."""
        layout = d.server.layout
        return self._serve(d, ids, nb, lambda c: request,
                           lambda cl, m: cl.fit_statistics(self.worker, m, layout), False)

    def bn_statistics(self, d: RoundDriver, r: int, ids: list, nb: Bytes) -> dict:
        """``zo.bn_stats = "recompute"``: each client's BatchNorm statistics under the global
        model (version r), as a WeightsMessage of statistics (bytes counted up)."""
        from .bn import local_statistics
        out = {}
        for c in ids:
            copy_state_(self.worker, d.model)
            cl = self.clients[c]
            msg = WeightsMessage(r, local_statistics(self.worker, cl.x, d.cfg.zo.micro_batch),
                                 cl.num_samples)
            up = msg.to_bytes()
            nb.add_up(c, len(up))
            out[c] = WeightsMessage.from_bytes(up)
        return out

    def broadcast(self, d: RoundDriver, r: int, ids: list, res, nb: Bytes, everyone: bool):
        """Push the round's broadcast to every client that holds version r."""
        if res.broadcast is None:
            return
        srv = d.server
        b = len(res.broadcast.to_bytes())
        for c in (range(d.cfg.data.num_clients) if everyone else ids):
            if srv.held[c] == r:
                nb.add_down(c, b)
                srv.held[c] = r + 1


class Transport(Protocol):
    """How a deployment reaches its clients."""

    def exchange(self, round_idx: int, tasks: dict[int, list], timeout: float
                 ) -> tuple[dict[int, object], dict[int, int], dict[int, int]]:
        """Send ``tasks`` (client id -> message objects), collect replies until ``timeout``
        seconds have passed or all answered. Returns (replies, bytes_down, bytes_up): replies maps
        client id -> list of payloads (bytes or messages) or a Rejected; byte counts per client."""
        ...


class InMemoryTransport:
    """Replicas in this process; tasks and replies cross as bytes.

    Args:
        replicas: client id -> :class:`~.replica.ClientReplica`.
        drop: optional ``drop(round, cid) -> bool``: the client does not answer this exchange
            (it never receives the task: a dropout before the work).
        delay: optional ``delay(round, cid) -> seconds``: the client answers after this long
            (with ``threads``, a delay past the deadline makes it miss the round while its work
            still completes later: a dropout mid-round).
        threads: run clients concurrently on this many threads (0: one after the other; the
            deadline then only applies to ``delay``).
    """

    def __init__(self, replicas: dict, drop: Callable | None = None,
                 delay: Callable | None = None, threads: int = 0):
        self.replicas = replicas
        self.drop = drop
        self.delay = delay
        self.threads = int(threads)
        self._pool = ThreadPoolExecutor(self.threads) if self.threads else None

    def _one(self, r, c, payload):
        if self.delay:
            d = float(self.delay(r, c) or 0)
            if d > 0:
                time.sleep(d)
        return self.replicas[c].handle(payload)

    def exchange(self, round_idx, tasks, timeout):
        down = {c: sum(len(m.to_bytes()) for m in ms) for c, ms in tasks.items()}
        payloads = {c: [m.to_bytes() for m in ms] for c, ms in tasks.items()
                    if not (self.drop and self.drop(round_idx, c))}
        replies: dict = {}
        if self._pool is None:
            for c, p in payloads.items():
                if self.delay and float(self.delay(round_idx, c) or 0) > timeout:
                    continue  # would arrive after the deadline
                replies[c] = self.replicas[c].handle(p)
        else:
            futs = {self._pool.submit(self._one, round_idx, c, p): c for c, p in payloads.items()}
            done, _ = wait(list(futs), timeout=timeout)
            for f in done:
                replies[futs[f]] = f.result()
        up = {c: sum(len(b) for b in rep) for c, rep in replies.items()}
        return replies, down, up

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True)


class TransportExchange:
    """Deployed clients over a :class:`Transport`, with deadlines, validation and repair.

    Args:
        transport: see :class:`Transport`.
        deadline: seconds a round waits for replies before closing with whoever answered.
    """

    def __init__(self, transport, deadline: float = 60.0):
        self.transport = transport
        self.deadline = float(deadline)
        self._t0 = 0.0
        self._rec: dict | None = None

    def begin_round(self, r: int) -> dict:
        self._t0 = time.perf_counter()
        self._rec = {"timed_out": [], "rejected": [], "desync": [], "failed": [], "repaired": [],
                     "catch_up": {"replay": 0, "weights": 0}}
        return self._rec

    def end_round(self, r: int) -> dict:
        return {"round_seconds": time.perf_counter() - self._t0}

    def _send(self, r: int, tasks: dict, nb: Bytes):
        left = max(0.0, self._t0 + self.deadline - time.perf_counter())
        replies, down, up = self.transport.exchange(r, tasks, left)
        for c, n in down.items():
            nb.add_down(c, n)
        for c, n in up.items():
            nb.add_up(c, n)
        return replies

    @staticmethod
    def one_reply(srv, c, rep, r, task=None, kind=None, require_checksum=None):
        """The single validated message of client c's reply, or None (rejected, logged). A
        state checksum is required when a ``task`` is given, unless ``require_checksum`` says."""
        if require_checksum is None:
            require_checksum = task is not None
        if isinstance(rep, Rejected):
            srv.reject(c, r, str(rep))
            return None
        if not isinstance(rep, (list, tuple)) or len(rep) != 1:
            srv.reject(c, r, f"a reply is one message, got "
                             f"{len(rep) if isinstance(rep, (list, tuple)) else type(rep).__name__}")
            return None
        return srv.accept(c, rep[0], r, task=task, kind=kind, require_checksum=require_checksum)

    def warmup(self, d: RoundDriver, r: int, ids: list, down_msg: WeightsMessage, nb: Bytes,
               rec: dict) -> dict:
        srv = d.server
        replies = self._send(r, {c: [down_msg] for c in ids}, nb)
        kept = {}
        for c in ids:
            srv.held[c] = NO_MODEL
            if c not in replies:
                rec["timed_out"].append(c)
                continue
            m = self.one_reply(srv, c, replies[c], r, kind="weights")
            if m is None:
                rec["rejected"].append(c)
                continue
            kept[c] = m
        return kept

    def _simple(self, d: RoundDriver, r: int, ids: list, tasks: dict, nb: Bytes, rec: dict,
                kind: str) -> dict:
        """One task per client, no catch-up, no checksum (HeteroFL's rounds): replies validated
        (``kind``, or a status), the rest counted as timed out, rejected or failed."""
        srv = d.server
        replies = self._send(r, {c: [tasks[c]] for c in ids}, nb)
        kept = {}
        for c in ids:
            if c not in replies:
                rec["timed_out"].append(c)
                continue
            m = self.one_reply(srv, c, replies[c], r, task=tasks[c], kind=(kind, "status"),
                               require_checksum=False)
            if m is None:
                rec["rejected"].append(c)
                continue
            if isinstance(m, StatusMessage):
                log.warning("round %d: client %d answered %s: %s", r, c, Status(m.code).name,
                            m.reason)
                rec["failed"].append(c)
                continue
            kept[c] = m
        return kept

    def heterofl(self, d: RoundDriver, r: int, ids: list, tasks: dict, nb: Bytes,
                 rec: dict) -> dict:
        """HeteroFL: each client's sub-network task, its trained sub-network back (validated
        against the task). Clients hold no model version afterwards."""
        for c in ids:
            d.server.held[c] = NO_MODEL
        return self._simple(d, r, ids, tasks, nb, rec, "submodel")

    def statistics(self, d: RoundDriver, r: int, ids: list, request: StatsRequest, nb: Bytes,
                   rec: dict) -> dict:
        """HeteroFL's sBN: the global state to each client in ``ids``, its BatchNorm statistics
        under it back (validated)."""
        return self._simple(d, r, ids, {c: request for c in ids}, nb, rec, "stats")

    def zo(self, d: RoundDriver, r: int, ids: list, tasks: dict, nb: Bytes, rec: dict,
           everyone: bool) -> dict:
        """Catch-up and seeds (stamped with the server's checksum), replies validated against the
        task, out-of-sync clients repaired once by a weights download within the deadline."""
        return self._probe(d, r, ids, tasks, nb, rec, "grads")

    def kseed(self, d: RoundDriver, r: int, ids: list, task: KSeedTask, nb: Bytes, rec: dict,
              everyone: bool) -> dict:
        """FedKSeed: as :meth:`zo`, with the FedKSeed task (stamped with the server's checksum)
        and the clients' per-seed scalars (:class:`~.messages.KSeedUpdate`) back."""
        return self._probe(d, r, ids, {c: task for c in ids}, nb, rec, "kseed")

    def _probe(self, d: RoundDriver, r: int, ids: list, tasks: dict, nb: Bytes, rec: dict,
               kind: str) -> dict:
        """A round whose clients probe the global model (ZO, FedKSeed): catch-up and task
        stamped with the server's checksum, ``kind`` replies carrying the probed state's
        checksum, mismatches repaired once by a weights download within the deadline."""
        srv = d.server
        ck = srv.checksum()
        before = {c: int(srv.held[c]) for c in ids}
        out = {}
        for c in ids:
            tasks[c].checksum = ck
            cu = srv.catch_up_message(c, r, checksum=ck)
            if cu is not None:
                rec["catch_up"]["replay" if cu.TYPE.name == "REPLAY" else "weights"] += 1
                nb.sync += len(cu.to_bytes())
            out[c] = [m for m in (cu, tasks[c]) if m is not None]
        kept: dict = {}
        pending, attempt = list(ids), 0
        while out:
            replies = self._send(r, out, nb)
            repair = []
            for c in sorted(pending):
                if c not in replies:
                    if attempt == 0:
                        rec["timed_out"].append(c)
                    srv.held[c] = before[c] if attempt == 0 else NO_MODEL
                    continue
                m = self.one_reply(srv, c, replies[c], r, task=tasks[c], kind=(kind, "status"))
                if m is None:
                    rec["rejected"].append(c)
                    srv.held[c] = before[c]
                    continue
                if isinstance(m, StatusMessage):
                    if m.code == Status.DESYNC and attempt == 0:
                        log.warning("round %d: client %d is out of sync (%s): repairing with a "
                                    "weights download", r, c, m.reason)
                        rec["desync"].append(c)
                        repair.append(c)
                    else:
                        log.warning("round %d: client %d answered %s: %s", r, c,
                                    Status(m.code).name, m.reason)
                        rec["failed"].append(c)
                    srv.held[c] = NO_MODEL
                    continue
                if m.checksum != ck:
                    log.warning("round %d: client %d probed a model with checksum %08x, the "
                                "server's is %08x: reply dropped, repairing", r, c, m.checksum, ck)
                    rec["desync"].append(c)
                    srv.held[c] = NO_MODEL
                    if attempt == 0:
                        repair.append(c)
                    continue
                kept[c] = m
                srv.held[c] = r
                if attempt > 0:
                    rec["repaired"].append(c)
            attempt += 1
            if not repair or time.perf_counter() >= self._t0 + self.deadline:
                break
            w = srv.weights_message(r, ck)
            nb.sync += len(w.to_bytes()) * len(repair)
            pending = sorted(repair)
            out = {c: [w, tasks[c]] for c in pending}
        rec["repaired"].sort()
        return kept

    def broadcast(self, d, r, ids, res, nb, everyone):
        """Not pushed: the broadcast is the first entry of a client's next replay."""
        return None

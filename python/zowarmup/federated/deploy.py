"""The server side of a deployment: rounds with persistent clients, deadlines, catch-up, repair.

:class:`Coordinator` drives the same :class:`~.server.Server` as the embedded runner (sampling,
seeds, aggregation, seed log: one implementation of the method) through rounds whose clients keep
their own models (:class:`~.replica.ClientReplica`) and answer over a transport:

- :class:`InMemoryTransport`: replicas in this process, messages as bytes (tests, benchmarks);
- ``zowarmup.flower.FlowerTransport``: Flower's Grid (simulation or deployment engine).

A transport's ``exchange(round, tasks, timeout)`` sends each sampled client its task (a list of
message objects) and returns, by the deadline, whatever came back: client id -> list of payloads
(bytes or decoded messages), or a :class:`~.validation.Rejected` for a reply that could not be
read. Clients that did not answer by the deadline are simply absent: the round closes with whoever
answered, and the metrics count the rest (``timed_out``).

Per round (``r``, version ``r`` = the global model after r rounds):

- warm-up: the global weights go to the sampled high-resource clients; their local states come
  back, are validated (:meth:`Server.accept`) and averaged. They hold no usable version afterwards.
- ZO: each sampled client gets a catch-up -- nothing, the seed log since the version it holds, or
  the weights, whichever is smallest (:meth:`Server.catch_up_message`) -- and its seeds, stamped
  with the server's state checksum. It replies with its projected gradients stamped with its own
  checksum, or ``DESYNC`` when its state does not match after catching up (a reply of any other
  kind is rejected and counted against the sender). A mismatch (either way)
  is logged and repaired at once, within the round's deadline, by a weights download and a retry.
  The kept replies are aggregated by :meth:`Server.aggregate_zo` exactly as in the embedded runner;
  the broadcast is not pushed: it is the first entry of the client's next replay.
- a client that timed out or sent a rejected reply is assumed to hold the version it held before
  the round (the oldest it can hold); a replay from there covers it either way, since replicas skip
  the rounds they already applied.
- at the end (``final_sync``), every client is brought to version R and reports its checksum;
  mismatches are repaired by a weights download and checked again. After it, every reachable
  client's weights are bit-identical to the server's.

Byte counts are the transport's: the serialized messages (in-memory) or Flower's serialized records
(Flower), per client and round, up and down.

Given the same config and seed, and no failures, a Coordinator run ends with the same weights, bit
for bit, as :class:`~.loop.Runner`: the same clients are sampled, the same seeds sent, every client
probes a model bit-identical to the server's with the same evaluation mode (``zo.exact``, or the
in-place step from a snapshot), and the replies are aggregated in the same order.
"""
from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from ..seeds import derive_seed
from .checkpoint import atomic_write_text, config_hash
from .config import RunConfig, validate
from .messages import Status, StatusMessage
from .replica import DEPLOYABLE_METHODS
from .server import NO_MODEL, Server
from .validation import Rejected

log = logging.getLogger("zowarmup.federated")


class Transport(Protocol):
    """How a Coordinator reaches its clients."""

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
        down = {c: sum(len(b) for b in bl) for c, bl in
                ((c, [m.to_bytes() for m in ms]) for c, ms in tasks.items())}
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


class Coordinator:
    """Runs one federated training with persistent clients over a transport.

    Args:
        cfg: one run's config (``cfg.for_run(method, seed)``); method in
            :data:`~.replica.DEPLOYABLE_METHODS`.
        transport: see :class:`Transport`.
        dataset: the server's copy of the data (only the test split is used, for evaluation, and
            the number of training samples, to check N); loaded from ``cfg.data`` when None.
        deadline: seconds a round waits for replies before closing with whoever answered.
        out: optional folder for ``metrics.jsonl``, ``summary.json`` and ``final_state.pt``.
        num_samples: client id -> registered sample count (replies claiming another are rejected).
        final_sync: bring every client to the final version at the end and verify checksums.
    """

    def __init__(self, cfg: RunConfig, transport: Transport, dataset=None, deadline: float = 60.0,
                 out: str | Path | None = None, num_samples: dict | None = None,
                 final_sync: bool = True):
        from .. import data as zdata
        from .loop import build_global_model, resolve_device
        self.cfg = validate(cfg)
        if cfg.baselines or cfg.num_seeds != 1:
            raise ValueError("Coordinator runs one method and one seed (cfg.for_run(method, seed))")
        if cfg.method not in DEPLOYABLE_METHODS:
            raise ValueError(f"method {cfg.method!r} runs embedded only; deployments support "
                             f"{', '.join(DEPLOYABLE_METHODS)}")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.transport = transport
        self.deadline = float(deadline)
        self.out = Path(out) if out else None
        self.final_sync = final_sync
        self.device = resolve_device(cfg.device)
        ds = dataset if dataset is not None else zdata.load_dataset(cfg.data.name, cfg.data.root)
        self.dataset = ds
        N = cfg.data.num_clients
        self.hi_ids = np.flatnonzero(zdata.assign_resources(N, cfg.data.hi_fraction, cfg.seed))
        self.model = build_global_model(cfg, ds).to(self.device)
        self.server = Server(cfg, self.model, N)
        for c, n in (num_samples or {}).items():
            self.server.registered[int(c)] = int(n)
        self.x_test, self.y_test = ds.x_test.to(self.device), ds.y_test.to(self.device)
        self.pivot = cfg.effective_pivot()
        self.records: list[dict] = []
        self.sync_report: dict | None = None
        self._round: dict | None = None

    # -- one exchange with repair ----------------------------------------------------------------
    def _exchange(self, r, tasks, nb, t_end):
        left = max(0.0, t_end - time.perf_counter())
        replies, down, up = self.transport.exchange(r, tasks, left)
        for c, n in down.items():
            nb["down"][c] = nb["down"].get(c, 0) + int(n)
        for c, n in up.items():
            nb["up"][c] = nb["up"].get(c, 0) + int(n)
        return replies

    def _one_reply(self, c, rep, r, task=None, kind=None):
        """The single validated message of client c's reply, or None (rejected, logged)."""
        srv = self.server
        if isinstance(rep, Rejected):
            srv.reject(c, r, str(rep))
            return None
        if not isinstance(rep, (list, tuple)) or len(rep) != 1:
            srv.reject(c, r, f"a reply is one message, got "
                             f"{len(rep) if isinstance(rep, (list, tuple)) else type(rep).__name__}")
            return None
        return srv.accept(c, rep[0], r, task=task, kind=kind, require_checksum=task is not None)

    # -- one round, in three steps (so an engine's strategy can drive them) ---------------------
    def begin_round(self, r: int) -> dict[int, list]:
        """Start round ``r``: sample its clients and build their tasks (client id -> messages).

        Warm-up: the global weights. ZO: a catch-up (if the client is behind) and the seeds, both
        stamped with the server's checksum.
        """
        from .loop import TAG_ROUND, sample_round
        cfg, srv = self.cfg, self.server
        phase = cfg.phase(r)
        if phase not in ("warmup", "zo"):  # pragma: no cover - DEPLOYABLE_METHODS excludes them
            raise ValueError(f"phase {phase!r} is not supported by deployments")
        torch.manual_seed(derive_seed(cfg.seed, TAG_ROUND, r) >> 1)
        ids = sample_round(cfg, r, phase, self.hi_ids)
        st = self._round = {
            "r": r, "phase": phase, "ids": ids, "attempt": 0, "t0": time.perf_counter(),
            "nb": {"up": {}, "down": {}, "sync": 0}, "kept": {}, "seeds": {}, "repairing": [],
            "before": {c: int(srv.held[c]) for c in ids},
            "rec": {"round": r, "phase": phase, "accuracy": None, "loss": None,
                    "clients": len(ids), "timed_out": [], "rejected": [], "desync": [],
                    "failed": [], "repaired": [], "catch_up": {"replay": 0, "weights": 0}},
        }
        if phase == "warmup":
            down = srv.weights_message(r)
            return {c: [down] for c in ids}
        ck = st["ck"] = srv.checksum()
        tasks = {}
        for c in ids:
            s = srv.zo_seeds(r, c)
            s.checksum = ck
            st["seeds"][c] = s
            cu = srv.catch_up_message(c, r, checksum=ck)
            if cu is not None:
                st["rec"]["catch_up"]["replay" if cu.TYPE.name == "REPLAY" else "weights"] += 1
                st["nb"]["sync"] += len(cu.to_bytes())
            tasks[c] = [m for m in (cu, s) if m is not None]
        return tasks

    def receive(self, replies: dict, down: dict | None = None, up: dict | None = None
                ) -> dict[int, list]:
        """Take the replies of the current exchange (client id -> payloads or Rejected; clients
        that did not answer are absent) and their byte counts; validate them before use.

        Returns the repair tasks to send next (ZO clients found out of sync on the first
        exchange get the weights and their seeds again); empty when the round can close.
        """
        st, srv = self._round, self.server
        r, rec, nb = st["r"], st["rec"], st["nb"]
        for c, n in (down or {}).items():
            nb["down"][c] = nb["down"].get(c, 0) + int(n)
        for c, n in (up or {}).items():
            nb["up"][c] = nb["up"].get(c, 0) + int(n)
        attempt = st["attempt"]
        st["attempt"] += 1
        if st["phase"] == "warmup":
            for c in st["ids"]:
                srv.held[c] = NO_MODEL
                if c not in replies:
                    rec["timed_out"].append(c)
                    continue
                m = self._one_reply(c, replies[c], r, kind="weights")
                if m is None:
                    rec["rejected"].append(c)
                    continue
                st["kept"][c] = m
            return {}
        ck, seeds, before = st["ck"], st["seeds"], st["before"]
        pending = st["ids"] if attempt == 0 else st["repairing"]
        repair = []
        for c in sorted(pending):
            if c not in replies:
                if attempt == 0:
                    rec["timed_out"].append(c)
                srv.held[c] = before[c] if attempt == 0 else NO_MODEL
                continue
            m = self._one_reply(c, replies[c], r, task=seeds[c], kind=("grads", "status"))
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
            st["kept"][c] = m
            srv.held[c] = r
        if not repair or time.perf_counter() >= st["t0"] + self.deadline:
            return {}
        w = srv.weights_message(r, ck)
        nb["sync"] += len(w.to_bytes()) * len(repair)
        st["repairing"] = sorted(repair)
        return {c: [w, seeds[c]] for c in repair}

    def end_round(self) -> dict:
        """Aggregate the kept replies exactly as the embedded runner does; return the record."""
        st, srv = self._round, self.server
        r, rec, nb, ids = st["r"], st["rec"], st["nb"], st["ids"]
        if st["phase"] == "warmup":
            res = srv.aggregate_weights(r, st["kept"])[0]
            srv.log[r] = None
        else:
            rec["repaired"] = sorted(c for c in st["repairing"] if c in st["kept"])
            res = srv.aggregate_zo(r, {c: st["seeds"][c] for c in st["kept"]}, st["kept"])
        n = max(len(ids), 1)
        rec.update({
            "kept": len(res.kept), "dropped": len(ids) - len(res.kept),
            "dropped_clients": sorted(set(ids) - set(res.kept)),
            "bytes_up_per_client": sum(nb["up"].get(c, 0) for c in ids) / n,
            "bytes_down_per_client": sum(nb["down"].get(c, 0) for c in ids) / n,
            "bytes_up_total": sum(nb["up"].values()), "bytes_down_total": sum(nb["down"].values()),
            "bytes_down_sync": nb["sync"], "round_seconds": time.perf_counter() - st["t0"],
        })
        self._round = None
        return rec

    def run_round(self, r: int) -> dict:
        """Round ``r``: sample, exchange (deadline), validate, repair, aggregate; its record."""
        tasks = self.begin_round(r)
        t_end = self._round["t0"] + self.deadline
        while tasks:
            left = max(0.0, t_end - time.perf_counter())
            replies, down, up = self.transport.exchange(r, tasks, left)
            tasks = self.receive(replies, down, up)
        return self.end_round()

    # -- final sync ------------------------------------------------------------------------------
    def sync_all(self, version: int | None = None) -> dict:
        """Bring every client to ``version`` (default: R) and verify its checksum; repair
        mismatches with a weights download and verify again. Returns the report."""
        srv = self.server
        R = self.cfg.rounds if version is None else int(version)
        ck = srv.checksum()
        N = self.cfg.data.num_clients
        nb = {"up": {}, "down": {}, "sync": 0}
        t_end = time.perf_counter() + self.deadline
        req = StatusMessage(R, Status.OK, R, "", ck)
        tasks = {}
        before = {c: int(srv.held[c]) for c in range(N)}
        for c in range(N):
            cu = srv.catch_up_message(c, R, checksum=ck)
            tasks[c] = [m for m in (cu, req) if m is not None]
        report = {"version": R, "checksum": ck, "in_sync": [], "repaired": [], "unreachable": [],
                  "mismatch": []}
        pending = tasks
        for attempt in range(2):
            replies = self._exchange(R, pending, nb, t_end)
            repair = []
            for c in sorted(pending):
                if c not in replies:
                    report["unreachable"].append(c)
                    srv.held[c] = before[c]
                    continue
                m = self._one_reply(c, replies[c], R, kind="status")
                if m is not None and m.code == Status.OK and m.checksum == ck and m.version == R:
                    report["repaired" if attempt else "in_sync"].append(c)
                    srv.held[c] = R
                    continue
                srv.held[c] = NO_MODEL
                if attempt == 0:
                    log.warning("final sync: client %d %s: repairing with a weights download", c,
                                "rejected" if m is None else
                                f"answered {Status(m.code).name} ({m.reason or 'checksum'})")
                    repair.append(c)
                else:
                    report["mismatch"].append(c)
            if not repair:
                break
            w = srv.weights_message(R, ck)
            pending = {c: [w, req] for c in repair}
        report["bytes_down_total"] = sum(nb["down"].values())
        report["bytes_up_total"] = sum(nb["up"].values())
        return report

    # -- main loop -------------------------------------------------------------------------------
    def run(self) -> dict:
        """All rounds (evaluating like the embedded runner), then the final sync; returns the
        summary (also written to ``out`` when given)."""
        from .loop import evaluate
        cfg = self.cfg
        t0 = time.perf_counter()
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "metrics.jsonl").write_text("")
        for r in range(cfg.rounds):
            rec = self.run_round(r)
            if (r + 1) % cfg.eval_every == 0 or r == cfg.rounds - 1 or r + 1 == self.pivot:
                rec["accuracy"], rec["loss"] = evaluate(self.model, self.x_test, self.y_test,
                                                        cfg.eval_batch_size)
            self.records.append(rec)
            log.info("round %d (%s): %d clients, %d kept, accuracy %s", r, rec["phase"],
                     rec["clients"], rec["kept"], rec["accuracy"])
            if self.out:
                with open(self.out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
        if self.final_sync:
            self.sync_report = self.sync_all()
        return self._finish(time.perf_counter() - t0)

    def _finish(self, wall: float) -> dict:
        evals = [r for r in self.records if r["accuracy"] is not None]
        srv = self.server
        summary = {
            "method": self.cfg.method, "seed": self.cfg.seed, "rounds": self.cfg.rounds,
            "pivot": self.pivot, "config_hash": config_hash(self.cfg.to_dict()),
            "final_accuracy": evals[-1]["accuracy"] if evals else None,
            "final_loss": evals[-1]["loss"] if evals else None,
            "final_checksum": srv.checksum(),
            "timed_out_total": sum(len(r["timed_out"]) for r in self.records),
            "rejected_total": int(srv.rejected.sum()),
            "rejections": [list(x) for x in srv.rejections[-50:]],
            "desync_total": sum(len(r["desync"]) for r in self.records),
            "repaired_total": sum(len(r["repaired"]) for r in self.records),
            "bytes_up_total": int(sum(r["bytes_up_total"] for r in self.records)),
            "bytes_down_total": int(sum(r["bytes_down_total"] for r in self.records)),
            "final_sync": self.sync_report,
            "wall_time_s": wall,
        }
        if self.out:
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
            torch.save({k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                       self.out / "final_state.pt")
        return summary


def in_memory_deployment(cfg: RunConfig, dataset=None, **kw) -> tuple[Coordinator, dict]:
    """A Coordinator with one :class:`~.replica.ClientReplica` per client in this process.

    Keyword arguments go to :class:`InMemoryTransport` (``drop``, ``delay``, ``threads``) and
    :class:`Coordinator` (``deadline``, ``out``, ``final_sync``). Returns (coordinator, replicas).
    """
    from .. import data as zdata
    from .loop import client_shards
    from .replica import build_replica
    ds = dataset if dataset is not None else zdata.load_dataset(cfg.data.name, cfg.data.root)
    shards = client_shards(cfg, ds)
    replicas = {c: build_replica(cfg, ds, c, cfg.device if cfg.device != "auto" else "cpu", shards)
                for c in range(cfg.data.num_clients)}
    tkw = {k: kw.pop(k) for k in ("drop", "delay", "threads") if k in kw}
    transport = InMemoryTransport(replicas, **tkw)
    coord = Coordinator(cfg, transport, ds,
                        num_samples={c: r.client.num_samples for c, r in replicas.items()}, **kw)
    return coord, replicas

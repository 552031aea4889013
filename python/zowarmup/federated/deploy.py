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
- FedKSeed: as ZO, with a KSeedTask (the step count) and the clients' per-seed scalars
  (:meth:`Server.aggregate_kseed`).
- HeteroFL: each sampled client gets the slice of the global model for its width and returns it
  trained (with its class mask); with BatchNorm the kept clients then get the new global state
  and return their statistics. They hold no usable version afterwards.
- a client that timed out or sent a rejected reply is assumed to hold the version it held before
  the round (the oldest it can hold); a replay from there covers it either way, since replicas skip
  the rounds they already applied.
- at the end (``final_sync``), every client is brought to version R and reports its checksum;
  mismatches are repaired by a weights download and checked again. After it, every reachable
  client's weights are bit-identical to the server's.

Byte counts are the transport's: the serialized messages (in-memory) or Flower's serialized records
(Flower), per client and round, up and down.

The rounds themselves are run by the one round driver (:class:`~.driver.RoundDriver` with a
:class:`~.driver.TransportExchange`), the same driver and the same setup
(:class:`~.federation.Federation`) as the embedded runner's. So, given the same config and seed,
and no failures, a Coordinator run ends with the same weights, bit for bit, as :class:`~.loop.Runner`:
the same clients are sampled, the same seeds sent, every client probes a model bit-identical to the
server's with the same evaluation mode (``zo.exact``, or the in-place step from a snapshot), and the
replies are aggregated in the same order.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from .. import data as zdata
from .checkpoint import atomic_write_text
from .config import RunConfig, validate
from .driver import Bytes, InMemoryTransport, RoundDriver, Transport, TransportExchange
from .federation import Federation, client_shards
from .messages import Status, StatusMessage
from .methods import require_deployable
from .replica import build_replica
from .state import NO_MODEL

log = logging.getLogger("zowarmup.federated")

__all__ = ["Coordinator", "InMemoryTransport", "Transport", "in_memory_deployment"]


class Coordinator:
    """Runs one federated training with persistent clients over a transport.

    Args:
        cfg: one run's config (``cfg.for_run(method, seed)``); a deployable method
            (:func:`~.methods.deployable_methods`).
        transport: see :class:`~.driver.Transport`.
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
        self.cfg = validate(cfg)
        if cfg.baselines or cfg.num_seeds != 1:
            raise ValueError("Coordinator runs one method and one seed (cfg.for_run(method, seed))")
        require_deployable(cfg.method)
        self.transport = transport
        self.deadline = float(deadline)
        self.out = Path(out) if out else None
        self.final_sync = final_sync
        self.fed = Federation(self.cfg, dataset, clients=False)
        self.device, self.dataset, self.model = self.fed.device, self.fed.dataset, self.fed.model
        self.server, self.hi_ids, self.pivot = self.fed.server, self.fed.hi_ids, self.fed.pivot
        for c, n in (num_samples or {}).items():
            self.server.registered[int(c)] = int(n)
        self.exchange = TransportExchange(transport, self.deadline)
        self.driver = RoundDriver(self.fed, self.exchange)
        self.records: list[dict] = []
        self.sync_report: dict | None = None

    def run_round(self, r: int) -> dict:
        """Round ``r``: sample, exchange (deadline), validate, repair, aggregate; its record."""
        return self.driver.run_round(r)

    # -- final sync ------------------------------------------------------------------------------
    def sync_all(self, version: int | None = None) -> dict:
        """Bring every client to ``version`` (default: R) and verify its checksum; repair
        mismatches with a weights download and verify again. Returns the report."""
        srv = self.server
        R = self.cfg.rounds if version is None else int(version)
        ck = srv.checksum()
        N = self.cfg.data.num_clients
        nb = Bytes()
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
            replies, down, up = self.transport.exchange(R, pending,
                                                        max(0.0, t_end - time.perf_counter()))
            for c, n in down.items():
                nb.add_down(c, n)
            for c, n in up.items():
                nb.add_up(c, n)
            repair = []
            for c in sorted(pending):
                if c not in replies:
                    report["unreachable"].append(c)
                    srv.held[c] = before[c]
                    continue
                m = TransportExchange.one_reply(srv, c, replies[c], R, kind="status")
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
        report["bytes_down_total"] = sum(nb.down.values())
        report["bytes_up_total"] = sum(nb.up.values())
        return report

    # -- main loop -------------------------------------------------------------------------------
    def run(self) -> dict:
        """All rounds (evaluated by the driver, like the embedded runner), then the final sync;
        returns the summary (also written to ``out`` when given)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "metrics.jsonl").write_text("")
        for r in range(cfg.rounds):
            rec = self.driver.step(r)
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
        srv = self.server
        summary = self.driver.summary(self.records)
        summary.update({
            "timed_out_total": sum(len(r["timed_out"]) for r in self.records),
            "rejected_total": int(srv.rejected.sum()),
            "rejections": [list(x) for x in srv.rejections[-50:]],
            "desync_total": sum(len(r["desync"]) for r in self.records),
            "repaired_total": sum(len(r["repaired"]) for r in self.records),
            "final_sync": self.sync_report,
            "wall_time_s": wall,
        })
        if self.out:
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
            torch.save({k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                       self.out / "final_state.pt")
        return summary


def in_memory_deployment(cfg: RunConfig, dataset=None, **kw) -> tuple[Coordinator, dict]:
    """A Coordinator with one :class:`~.replica.ClientReplica` per client in this process.

    Keyword arguments go to :class:`~.driver.InMemoryTransport` (``drop``, ``delay``, ``threads``)
    and :class:`Coordinator` (``deadline``, ``out``, ``final_sync``). Returns (coordinator, replicas).
    """
    ds = dataset if dataset is not None else zdata.load_dataset(cfg.data.name, cfg.data.root)
    shards = client_shards(cfg, ds)
    replicas = {c: build_replica(cfg, ds, c, cfg.device if cfg.device != "auto" else "cpu", shards)
                for c in range(cfg.data.num_clients)}
    tkw = {k: kw.pop(k) for k in ("drop", "delay", "threads") if k in kw}
    transport = InMemoryTransport(replicas, **tkw)
    coord = Coordinator(cfg, transport, ds,
                        num_samples={c: r.client.num_samples for c, r in replicas.items()}, **kw)
    return coord, replicas

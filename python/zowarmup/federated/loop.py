"""The embedded runner: one process simulates the server and all clients, round by round.

:class:`Runner` drives :class:`~.server.Server` and :class:`~.client.Client` through the rounds of
one training run. Every message crosses as bytes (``to_bytes`` on one side, ``from_bytes`` on the
other), and the bytes each client sends and receives are counted from those serialized messages.

Run folder (``runs/<name>-<timestamp>/<method>-seed<k>/`` by default):

- ``config.json``: the resolved config (loadable again with ``--config``);
- ``metrics.jsonl``: one JSON object per round: ``round``, ``phase``, ``accuracy``, ``loss`` (test
  set; null on rounds without evaluation), ``clients`` (participants), ``dropped`` (replies
  dropped as NaN/inf/malformed) and ``dropped_clients``, ``bytes_up_per_client`` /
  ``bytes_down_per_client`` (mean over participants, including any catch-up download),
  ``bytes_up_total`` / ``bytes_down_total`` (all N clients, including broadcasts to
  non-participants) and ``bytes_down_sync`` (catch-up downloads: weights or seed-log replays);
- ``summary.json``: final/best accuracy, per-phase communication, memory, timing, notes;
- ``accuracy.png``: accuracy against rounds with the pivot marked; ``run.log``: events;
- ``checkpoint.pt``: written atomically every ``checkpoint_every`` rounds and at the end.

Determinism: every random choice derives from the run seed and the round (``derive_seed``, the
data module's seeded generators, and ``torch.manual_seed`` re-set at the start of every round), and
the worker model is reloaded from the server before each client, so the same config and seed give
identical metrics, and a run resumed from a checkpoint continues exactly as if never stopped.

Model versions and catch-up (for the accounting): version v is the global model after v rounds.
Every client can build version 0 from the run seed. After a replayable round (a (seed, coeff)
broadcast) a client holding version r moves to r + 1 by applying the broadcast; after a dense round
(warm-up, FedAdam in phase 2, hi+lo) it cannot, and must download weights when next needed. A
client that is behind when sampled catches up by a seed-log replay or a weights download,
whichever is smaller. With ``zo.sync = "broadcast"`` every client receives every broadcast (and all
catch up once at the first replayable phase-2 round); with ``"lazy"`` only participants do.
"""
from __future__ import annotations

import copy
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import data as zdata
from .. import memory
from .. import models as zmodels
from ..seeds import derive_seed, TAG_INIT, TAG_ROUND
from . import accounting
from .._safeio import holds_run_lock
from .checkpoint import (atomic_write_text, config_hash, load_checkpoint, read_metrics_file,
                         read_summary, rng_state, save_checkpoint, set_rng_state)
from .client import Client, has_batchnorm
from .config import METHOD_LABELS, ConfigError, RunConfig, load_file, validate
from .messages import (GradsMessage, KSeedUpdate, SeedsMessage, WeightsMessage,
                       KSeedTask)
from .server import NO_MODEL, Server
from .state import copy_state_

log = logging.getLogger("zowarmup.federated")


METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.json"
PLOT = "accuracy.png"
RUNLOG = "run.log"


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU raises ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device; use device='cpu' or 'auto'")
    return torch.device(name)


def build_global_model(cfg: RunConfig, ds) -> torch.nn.Module:
    """The initial global model: ``build_model`` under ``torch.manual_seed(derive_seed(seed, TAG))``,
    so every client can rebuild version 0 from the run seed."""
    torch.manual_seed(derive_seed(cfg.seed, TAG_INIT) >> 1)
    norm = cfg.model.norm
    if cfg.model.name.startswith("vit"):
        norm = None if norm in ("none", "ln") else norm
    try:
        return zmodels.build_model(cfg.model.name, ds.num_classes, ds.in_channels, ds.image_size,
                                   norm=norm, **cfg.model.options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot build model.name={cfg.model.name!r} with model.norm="
                          f"{cfg.model.norm!r}, model.options={cfg.model.options!r} for "
                          f"{ds.name} ({ds.in_channels}x{ds.image_size}x{ds.image_size}): {e}") from None


def client_shards(cfg: RunConfig, ds) -> list:
    """The Dirichlet label split of ``ds``'s training set into ``data.num_clients`` shards (index
    arrays), deterministic in ``cfg.seed``; shard i is client i's data in every runner."""
    return zdata.dirichlet_partition(ds.y_train, cfg.data.num_clients, cfg.data.alpha, cfg.seed,
                                     num_classes=ds.num_classes)


def make_client(cfg: RunConfig, ds, shard, cid: int, device, pool=None) -> Client:
    """Client ``cid`` holding ``ds``'s training samples ``shard`` on ``device``."""
    return Client(cid, ds.x_train[torch.as_tensor(shard)].to(device),
                  ds.y_train[torch.as_tensor(shard)].to(device), cfg.seed, cfg.warmup, cfg.zo,
                  cfg.fedkseed, pool)


def sample_round(cfg: RunConfig, r: int, phase: str, hi_ids) -> list[int]:
    """The clients taking part in round ``r`` (``phase`` = ``cfg.phase(r)``): a draw from the
    high-resource clients ``hi_ids`` during warm-up, from all N afterwards."""
    N = cfg.data.num_clients
    if phase == "warmup":
        k = cfg.warmup.clients_per_round or len(hi_ids)
        ids = zdata.sample_clients(N, min(k, len(hi_ids)), r, cfg.seed, candidates=hi_ids)
    else:
        k = min(cfg.zo.clients_per_round or N, N)
        ids = zdata.sample_clients(N, k, r, cfg.seed)
    return [int(c) for c in ids]


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> tuple[float, float]:
    """(accuracy in [0, 1], mean cross-entropy) of ``model`` in eval mode on (x, y)."""
    model.eval()
    correct, loss, n = 0, 0.0, x.shape[0]
    for i in range(0, n, batch):
        out = model(x[i:i + batch]).float()
        loss += float(F.cross_entropy(out, y[i:i + batch], reduction="sum"))
        correct += int((out.argmax(1) == y[i:i + batch]).sum())
    return correct / max(n, 1), loss / max(n, 1)


class _Bytes:
    """Bytes sent to/from each client in one round."""

    def __init__(self):
        self.up: dict[int, int] = {}
        self.down: dict[int, int] = {}
        self.sync = 0

    def add_up(self, c: int, n: int):
        self.up[c] = self.up.get(c, 0) + int(n)

    def add_down(self, c: int, n: int):
        self.down[c] = self.down.get(c, 0) + int(n)


class Runner:
    """One training run (one method, one seed) in one process.

    Args:
        cfg: the run's config (``cfg.for_run(method, seed)``: ``baselines`` empty); validated here.
        run_dir: folder for the run's files (created).
        dataset: an already loaded ``zowarmup.data.Dataset`` (tests, or to share one load between
            runs); loaded from ``cfg.data`` when None.
        progress: override ``cfg.progress`` (tqdm bar during rounds).
    """

    def __init__(self, cfg: RunConfig, run_dir: str | Path, dataset=None, progress: bool | None = None):
        self.cfg = validate(cfg)
        if cfg.baselines or cfg.num_seeds != 1:
            raise ValueError("Runner runs one method and one seed; use run_experiment for "
                             "baselines / several seeds (or cfg.for_run(method, seed))")
        self.run_dir = Path(run_dir)
        self.progress = cfg.progress if progress is None else progress
        self._dataset = dataset
        self._ready = False

    # -- setup -----------------------------------------------------------------------------------
    def setup(self) -> None:
        """Load data, split it, build the model, the server and the clients."""
        if self._ready:
            return
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        ds = self._dataset if self._dataset is not None else zdata.load_dataset(cfg.data.name,
                                                                                 cfg.data.root)
        self.dataset = ds
        N = cfg.data.num_clients
        if N > ds.x_train.shape[0]:
            raise ValueError(f"data.num_clients={N} exceeds the {ds.x_train.shape[0]} training "
                             f"samples of {ds.name}")
        shards = client_shards(cfg, ds)
        self.shards = shards
        self.hi = zdata.assign_resources(N, cfg.data.hi_fraction, cfg.seed)
        self.hi_ids = np.flatnonzero(self.hi)
        model = build_global_model(cfg, ds).to(self.device)
        self.model = model
        self.worker = copy.deepcopy(model)
        self.server = Server(cfg, model, N)
        dev = self.device
        self.clients = [make_client(cfg, ds, s, i, dev, self.server.pool)
                        for i, s in enumerate(shards)]
        if cfg.zo.exact:  # an unsupported model fails here, before any round
            from ..optim.exact import require_exact_supported
            require_exact_supported(self.worker, self.clients[0].x[:2], cfg.zo.dist, cfg.zo.backend)
        self.x_test, self.y_test = ds.x_test.to(dev), ds.y_test.to(dev)
        self.pivot = cfg.effective_pivot()
        self._ready = True

    # -- one round -------------------------------------------------------------------------------
    def _sample(self, r: int, phase: str) -> list[int]:
        return sample_round(self.cfg, r, phase, self.hi_ids)

    def _catch_up(self, c: int, r: int, nb: _Bytes) -> None:
        """Bring client c to version r (counting a replay or a weights download, the smaller)."""
        srv = self.server
        if int(srv.held[c]) == r:
            return
        cost = srv.catch_up_bytes(c, r)
        nb.add_down(c, cost)
        nb.sync += cost
        srv.held[c] = r

    def _run_warmup_clients(self, r: int, ids: list[int], nb: _Bytes) -> dict:
        srv = self.server
        down = srv.weights_message(r).to_bytes()
        replies = {}
        for c in ids:
            reply = self.clients[c].fit_warmup(self.worker, WeightsMessage.from_bytes(down),
                                               srv.layout)
            up = reply.to_bytes()
            nb.add_down(c, len(down))
            nb.add_up(c, len(up))
            replies[c] = WeightsMessage.from_bytes(up)
            srv.held[c] = NO_MODEL
        return replies

    def _run_zo_clients(self, r: int, ids: list[int], nb: _Bytes) -> tuple[dict, dict]:
        srv = self.server
        tasks, replies = {}, {}
        for c in ids:
            task = srv.zo_seeds(r, c)
            down = task.to_bytes()
            copy_state_(self.worker, self.model)  # the client holds version r (caught up above)
            reply = self.clients[c].fit_zo(self.worker, SeedsMessage.from_bytes(down))
            up = reply.to_bytes()
            nb.add_down(c, len(down))
            nb.add_up(c, len(up))
            tasks[c] = task
            replies[c] = GradsMessage.from_bytes(up)
        return tasks, replies

    def _run_kseed_clients(self, r: int, ids: list[int], nb: _Bytes) -> dict:
        srv = self.server
        down = srv.kseed_task(r).to_bytes()
        replies = {}
        for c in ids:
            copy_state_(self.worker, self.model)
            reply = self.clients[c].fit_kseed(self.worker, KSeedTask.from_bytes(down))
            up = reply.to_bytes()
            nb.add_down(c, len(down))
            nb.add_up(c, len(up))
            replies[c] = KSeedUpdate.from_bytes(up)
        return replies

    def run_round(self, r: int) -> dict:
        """Run round ``r`` (sampling, client work, aggregation, accounting); return its record
        without the evaluation fields."""
        cfg, srv = self.cfg, self.server
        N = cfg.data.num_clients
        phase = cfg.phase(r)
        torch.manual_seed(derive_seed(cfg.seed, TAG_ROUND, r) >> 1)
        ids = self._sample(r, phase)
        nb = _Bytes()
        replayable_phase = (phase == "fedkseed") or (phase == "zo" and srv.adam_zo is None)
        if phase == "warmup":
            replies = self._run_warmup_clients(r, ids, nb)
            res = srv.aggregate_weights(r, replies)[0]
            srv.log[r] = None
        elif phase in ("zo", "fedkseed"):
            everyone = replayable_phase and cfg.zo.sync == "broadcast"
            for c in (range(N) if everyone else ids):
                self._catch_up(c, r, nb)
            if phase == "zo":
                tasks, replies = self._run_zo_clients(r, ids, nb)
                res = srv.aggregate_zo(r, tasks, replies)
            else:
                replies = self._run_kseed_clients(r, ids, nb)
                res = srv.aggregate_kseed(r, replies)
            if res.broadcast is not None:
                b = len(res.broadcast.to_bytes())
                for c in (range(N) if everyone else ids):
                    if srv.held[c] == r:
                        nb.add_down(c, b)
                        srv.held[c] = r + 1
        elif phase == "hilo":
            hi_ids = [c for c in ids if self.hi[c]]
            lo_ids = [c for c in ids if not self.hi[c]]
            wrep = self._run_warmup_clients(r, hi_ids, nb)
            for c in lo_ids:
                self._catch_up(c, r, nb)
            tasks, grep = self._run_zo_clients(r, lo_ids, nb)
            res = srv.aggregate_hilo(r, wrep, tasks, grep)
        else:  # pragma: no cover - config validation prevents it
            raise ValueError(f"unknown phase {phase!r}")
        for c in res.dropped:
            log.warning("round %d: dropped client %d (non-finite or malformed reply)", r, c)
        n = max(len(ids), 1)
        return {
            "round": r, "phase": phase, "accuracy": None, "loss": None,
            "clients": len(ids), "dropped": len(res.dropped), "dropped_clients": res.dropped,
            "bytes_up_per_client": sum(nb.up.get(c, 0) for c in ids) / n,
            "bytes_down_per_client": sum(nb.down.get(c, 0) for c in ids) / n,
            "bytes_up_total": sum(nb.up.values()), "bytes_down_total": sum(nb.down.values()),
            "bytes_down_sync": nb.sync,
        }

    # -- memory ----------------------------------------------------------------------------------
    def memory_report(self) -> dict:
        """Formula table (``zowarmup.memory.model_memory_table``) and measured peaks for this model.

        Measured: ``inference`` (one forward of a ZO micro-batch), ``zo_step`` (a client's whole
        ZO step with S seeds on its local data), ``backprop_step`` (one client SGD step of
        ``warmup.batch_size``); each is weights + the peak of tensors alive during the call.
        """
        cfg = self.cfg
        ds = self.dataset
        n_max = max(c.num_samples for c in self.clients)
        b_zo = min(cfg.zo.micro_batch, n_max)
        b_bp = min(cfg.warmup.batch_size, n_max)
        model = copy.deepcopy(self.model)
        formula = {
            "zo_batch": b_zo, "backprop_batch": b_bp,
            "forward_methods": memory.model_memory_table(model, b_zo, ds.input_shape,
                                                          methods=("inference", "zo", "mezo")),
            "backprop_methods": memory.model_memory_table(
                model, b_bp, ds.input_shape,
                methods=("backprop_sgd", "backprop_sgdm", "backprop_adam")),
        }
        weights = memory.tensor_bytes(model)
        c0 = max(self.clients, key=lambda c: c.num_samples)
        x = c0.x[:b_zo]

        def infer():
            model.eval()
            with torch.no_grad():
                model(x)

        seeds = self.server.zo_seeds(0, c0.cid)
        seeds = SeedsMessage(0, seeds.seeds[:cfg.zo.num_seeds], 1)

        def zo_step():
            c0.fit_zo(model, seeds)

        def bp_step():
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=1e-9, momentum=cfg.warmup.momentum)
            xb, yb = c0.x[:b_bp], c0.y[:b_bp]
            if has_batchnorm(model) and xb.shape[0] < 2:
                return
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        measured = {}
        for name, fn in (("inference", infer), ("zo_step", zo_step), ("backprop_step", bp_step)):
            peak = memory.measure_peak(fn, self.device)
            measured[name] = {"weights": weights, "peak_transient": peak,
                              "total_bytes": weights + peak if peak >= 0 else None}
        inf = measured["inference"]["total_bytes"]
        for v in measured.values():
            v["vs_inference"] = (v["total_bytes"] / inf) if inf and v["total_bytes"] else None
        return {"formula": formula, "measured": measured,
                "measured_how": ("torch.cuda.max_memory_allocated" if self.device.type == "cuda"
                                 else "TorchDispatchMode live-storage tracker (CPU)")}

    # -- files -----------------------------------------------------------------------------------
    def _metrics_path(self) -> Path:
        return self.run_dir / METRICS

    def _truncate_metrics(self, n: int) -> None:
        p = self._metrics_path()
        lines = (p.read_text(errors="surrogateescape").splitlines(keepends=True)  # bytes kept as is
                 if p.exists() else [])
        complete = [ln for ln in lines if ln.endswith("\n")]
        if len(complete) < n:
            raise RuntimeError(f"{p} has {len(complete)} complete lines but the checkpoint "
                               f"expects {n}; the run folder is inconsistent")
        atomic_write_text(p, "".join(complete[:n]))

    def _attach_log(self) -> logging.Handler:
        h = logging.FileHandler(self.run_dir / RUNLOG)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(h)
        if log.level == logging.NOTSET or log.level > logging.INFO:
            log.setLevel(logging.INFO)
        return h

    # -- main loop -------------------------------------------------------------------------------
    @holds_run_lock  # one process per run folder (a second --resume is refused)
    def run(self) -> dict:
        """Train (or continue from the folder's checkpoint) to the last round; return the summary."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        cfg_dict = cfg.to_dict()
        h = config_hash(cfg_dict)
        cfg_path = self.run_dir / CONFIG
        if cfg_path.exists():
            old = json.loads(cfg_path.read_text())
            if config_hash(old) != h:
                raise ValueError(f"{self.run_dir} holds a run with a different config; use a new "
                                 "output folder (or --resume with no config changes)")
        else:
            atomic_write_text(cfg_path, json.dumps(cfg_dict, indent=2) + "\n")
        handler = self._attach_log()
        try:
            return self._run(h)
        finally:
            log.removeHandler(handler)
            handler.close()

    def _run(self, h: str) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        self.setup()
        R = cfg.rounds
        ck = load_checkpoint(self.run_dir)
        elapsed_before = 0.0
        memory = None
        if ck is not None:
            if ck["config_hash"] != h:
                raise ValueError(f"{self.run_dir}/checkpoint.pt was written with a different config")
            self.model.load_state_dict(ck["model"])
            self.server.load_state_dict(ck["server"])
            set_rng_state(ck["rng"])
            start = int(ck["next_round"])
            elapsed_before = float(ck.get("elapsed", 0.0))
            memory = ck.get("memory")
            self._truncate_metrics(start)
            log.info("resumed %s at round %d", self.run_dir, start)
        else:
            start = 0
            self._truncate_metrics(0)
            log.info("started %s: method=%s seed=%d rounds=%d pivot=%d device=%s", self.run_dir,
                     cfg.method, cfg.seed, R, self.pivot, self.device)
        done = read_summary(self.run_dir / SUMMARY) if start >= R else None  # None: rebuild it
        if done is not None:
            return done
        if memory is None and cfg.measure_memory:
            memory = self.memory_report()

        bar = None
        if self.progress:
            from tqdm.auto import tqdm
            # Redirected to a file or a CI log, redraw at most every 10 s instead of every round.
            tty = getattr(sys.stderr, "isatty", lambda: False)()
            bar = tqdm(total=R, initial=start, desc=f"{METHOD_LABELS[cfg.method]} seed {cfg.seed}",
                       unit="round", leave=True, dynamic_ncols=True,
                       mininterval=0.1 if tty else 10.0)
        t_train = time.perf_counter()
        phase_time: dict[str, float] = {}
        with open(self._metrics_path(), "a") as mf:
            for r in range(start, R):
                tr = time.perf_counter()
                rec = self.run_round(r)
                last = r == R - 1
                if (r + 1) % cfg.eval_every == 0 or last or r + 1 == self.pivot:
                    acc, loss = evaluate(self.model, self.x_test, self.y_test, cfg.eval_batch_size)
                    rec["accuracy"], rec["loss"] = acc, loss
                mf.write(json.dumps(rec) + "\n")
                mf.flush()
                phase_time[rec["phase"]] = phase_time.get(rec["phase"], 0.0) + time.perf_counter() - tr
                if bar is not None:
                    bar.update(1)
                    if rec["accuracy"] is not None:
                        bar.set_postfix(phase=rec["phase"], acc=f"{100 * rec['accuracy']:.1f}%")
                if (cfg.checkpoint_every and (r + 1) % cfg.checkpoint_every == 0) or last:
                    self._save(r + 1, h, elapsed_before + time.perf_counter() - t0, memory)
        if bar is not None:
            bar.close()
        wall = time.perf_counter() - t0
        summary = self._summary(memory, wall, elapsed_before, phase_time,
                                time.perf_counter() - t_train)
        atomic_write_text(self.run_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")
        try:
            from .plotting import plot_run
            plot_run(read_metrics(self.run_dir), self.run_dir / PLOT, self.pivot,
                     f"{METHOD_LABELS[cfg.method]} - {cfg.data.name}, seed {cfg.seed}")
        except Exception as e:  # a plot must never lose a finished run
            log.warning("could not write the plot: %s", e)
        return summary

    def _save(self, next_round: int, h: str, elapsed: float, memory) -> None:
        save_checkpoint(self.run_dir, {
            "next_round": next_round,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "server": self.server.state_dict(),
            "rng": rng_state(),
            "config_hash": h,
            "elapsed": elapsed,
            "memory": memory,
        })

    def _summary(self, memory, wall, elapsed_before, phase_time, train_time) -> dict:
        cfg = self.cfg
        recs = read_metrics(self.run_dir)
        evals = [r for r in recs if r["accuracy"] is not None]
        final = evals[-1] if evals else None
        notes = []
        if self.pivot < cfg.rounds and cfg.phase(self.pivot) == "zo" and cfg.zo.server_opt == "fedadam":
            notes.append("phase-2 server optimizer is FedAdam: its update is not replayable from "
                         "seeds, so every sampled client downloads the full weights each round "
                         "(counted in bytes_down)")
        if self.pivot < cfg.rounds and cfg.phase(self.pivot) == "hilo":
            notes.append("hi+lo: the FedAvg part makes every phase-2 update dense, so clients "
                         "download weights when sampled (counted in bytes_down)")
        comm = accounting.phase_summary(recs)
        return {
            "method": cfg.method, "label": METHOD_LABELS[cfg.method], "seed": cfg.seed,
            "rounds": cfg.rounds, "pivot": self.pivot,
            "final_accuracy": final["accuracy"] if final else None,
            "final_loss": final["loss"] if final else None,
            "best_accuracy": max((r["accuracy"] for r in evals), default=None),
            "accuracy_at_pivot": next((r["accuracy"] for r in evals if r["round"] + 1 == self.pivot),
                                      None),
            "dropped_total": int(sum(r["dropped"] for r in recs)),
            "communication": comm,
            "bytes_up_total": int(sum(r["bytes_up_total"] for r in recs)),
            "bytes_down_total": int(sum(r["bytes_down_total"] for r in recs)),
            "model": {"name": cfg.model.name, "parameters": int(sum(p.numel() for p in
                                                                   self.model.parameters())),
                      "state_floats": self.server.layout.size},
            "clients": {"num": cfg.data.num_clients, "high_resource": int(self.hi.sum()),
                        "samples_per_client": [int(c.num_samples) for c in self.clients]},
            "memory": memory,
            "notes": notes,
            "device": str(self.device),
            "wall_time_s": wall + elapsed_before,
            "wall_time_this_process_s": wall,
            "train_time_this_process_s": train_time,
            "phase_time_this_process_s": phase_time,
        }


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``metrics.jsonl`` (complete, usable lines; others skipped with a warning)."""
    return read_metrics_file(Path(run_dir) / METRICS)


def resume_run(run_dir: str | Path, progress: bool | None = None, dataset=None) -> dict:
    """Continue the run in ``run_dir`` from its checkpoint (or from scratch if it has none) with
    the config saved there; returns the summary."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / CONFIG
    if not cfg_path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no {CONFIG})")
    cfg = load_file(cfg_path)
    return Runner(cfg, run_dir, dataset=dataset, progress=progress).run()

"""The embedded runner: one process simulates the server and all clients, round by round.

:class:`Runner` runs the one round driver (:class:`~.driver.RoundDriver`) over in-process clients
(:class:`~.driver.LocalExchange`) and adds what a run needs around it: the run folder, metrics,
checkpoints and resume, the memory report, the progress bar and the plot. Every message crosses as
bytes (``to_bytes`` on one side, ``from_bytes`` on the other), and the bytes each client sends and
receives are counted from those serialized messages.

Run folder (``runs/<name>-<timestamp>/<method>-seed<k>/`` by default):

- ``config.json``: the resolved config (loadable again with ``--config``);
- ``metrics.jsonl``: one round record per line (fields in :mod:`.driver`);
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

import torch
import torch.nn.functional as F

from .. import memory
from .._safeio import holds_run_lock
from ..optim.exact import require_exact_supported
from .checkpoint import (atomic_write_text, config_hash, load_checkpoint, read_metrics_file,
                         read_summary, rng_state, save_checkpoint, set_rng_state)
from .client import has_batchnorm
from .config import METHOD_LABELS, RunConfig, load_file, validate
from .driver import LocalExchange, RoundDriver
from .federation import Federation
from .messages import SeedsMessage

log = logging.getLogger("zowarmup.federated")


METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.json"
PLOT = "accuracy.png"
RUNLOG = "run.log"


class Runner:
    """One training run (one method, one seed) in one process: the round driver over in-process
    clients (:class:`~.driver.LocalExchange`), plus the run folder, checkpoints and progress.

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
        """Load data, split it, build the model, the server, the clients and the round driver."""
        if self._ready:
            return
        cfg = self.cfg
        fed = Federation(cfg, self._dataset, clients=True)
        self.fed = fed
        self.device, self.dataset, self.model, self.server = fed.device, fed.dataset, fed.model, fed.server
        self.hi, self.hi_ids, self.shards, self.clients = fed.hi, fed.hi_ids, fed.shards, fed.clients
        self.x_test, self.y_test, self.pivot = fed.x_test, fed.y_test, fed.pivot
        self.exchange = LocalExchange(fed)
        self.worker = self.exchange.worker
        if cfg.zo.exact:  # an unsupported model fails here, before any round
            require_exact_supported(self.worker, self.clients[0].x[:2], cfg.zo.dist, cfg.zo.backend)
        self.driver = RoundDriver(fed, self.exchange)
        self._ready = True

    def run_round(self, r: int) -> dict:
        """Run round ``r`` (sampling, client work, aggregation, accounting); return its record
        without the evaluation fields."""
        return self.driver.run_round(r)

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
                rec = self.driver.step(r)
                last = r == R - 1
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
        summary = self.driver.summary(read_metrics(self.run_dir))
        summary.update({
            "model": {"name": self.cfg.model.name,
                      "parameters": int(sum(p.numel() for p in self.model.parameters())),
                      "state_floats": self.server.layout.size},
            "clients": {"num": self.cfg.data.num_clients, "high_resource": int(self.hi.sum()),
                        "samples_per_client": [int(c.num_samples) for c in self.clients]},
            "memory": memory,
            "device": str(self.device),
            "wall_time_s": wall + elapsed_before,
            "wall_time_this_process_s": wall,
            "train_time_this_process_s": train_time,
            "phase_time_this_process_s": phase_time,
        })
        return summary


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

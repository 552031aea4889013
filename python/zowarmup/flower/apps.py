"""ZOWarmUp on Flower: a ServerApp with a ZOWarmUp strategy and a ClientApp.

Both wrap the protocol code of :mod:`zowarmup.federated` -- there is no second implementation:

- the ServerApp runs a :class:`~zowarmup.federated.deploy.Coordinator` (the same
  :class:`~zowarmup.federated.server.Server` as the embedded runner: sampling, seeds, aggregation,
  seed log, catch-up, checksums, validation, deadlines) over :class:`FlowerTransport`, which turns
  each round's messages into Flower records (:mod:`.records`) and sends them with the Grid;
- the ClientApp runs a :class:`~zowarmup.federated.replica.ClientReplica` (the same
  :class:`~zowarmup.federated.client.Client` as the embedded runner) whose model, version and last
  round live in the node's ``context.state`` between messages (a SuperNode starts a fresh ClientApp
  process per message).

Configuration. The module-level ``server_app`` / ``client_app`` read the Flower run config
(``[tool.flwr.app.config]`` of the app's pyproject.toml, overridable with ``flwr run
--run-config``):

==================  =======================================================================
``config``          path to a zowarmup TOML/JSON config ("" = the built-in defaults)
``overrides``       space-separated ``key=value`` overrides, e.g. ``"rounds=4 pivot=2"``
``deadline``        seconds a round waits for replies before closing with whoever answered
``discovery-timeout`` seconds to wait for all N SuperNodes to connect
``out``             folder for metrics.jsonl, summary.json, final_state.pt ("" = none)
==================  =======================================================================

Each SuperNode is one client: ``--node-config "partition-id=i num-partitions=N"`` with N equal to
``data.num_clients`` (the simulation engine sets both itself). Every client loads the data, makes
the same Dirichlet split from the run seed and keeps shard i; every client builds the initial model
from the run seed, so version 0 never travels.

:func:`make_server_app` / :func:`make_client_app` build the same apps around a given
:class:`~zowarmup.federated.config.RunConfig` (for ``flwr.simulation.run_simulation``, which passes
no run config).
"""
from __future__ import annotations

import json
import logging
import shlex
import time
from pathlib import Path

import numpy as np

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.result import Result

from ..federated.checkpoint import config_hash
from ..federated.client import Client
from ..federated.config import RunConfig, load_config
from ..federated.deploy import Coordinator
from ..federated.federation import client_shards, make_client
from ..federated.messages import Status, StatusMessage, decode
from ..federated.methods import require_deployable
from ..federated.replica import build_replica
from ..federated.validation import Limits, Rejected
from .records import reply_from_records, task_from_records, to_records, wire_bytes

log = logging.getLogger("zowarmup.flower")

#: Message types: warm-up and ZO tasks are "train", the hello and the final sync are "query".
TRAIN, QUERY = "train", "query"


# ------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------
def config_from_run_config(run_config) -> RunConfig:
    """The RunConfig of one Flower run: ``config`` file (or defaults), then ``overrides``; one
    method, one seed (``baselines`` are ignored: a Flower run trains one method)."""
    rc = dict(run_config or {})
    path = str(rc.get("config", "") or "") or None
    overrides = shlex.split(str(rc.get("overrides", "") or ""))
    cfg = load_config(path, overrides + ["baselines=[]", "num_seeds=1", "progress=false"])
    return cfg.for_run(cfg.method, cfg.seed)


def _float(rc, key, default):
    try:
        return float(dict(rc or {}).get(key, default))
    except (TypeError, ValueError):
        return float(default)


# ------------------------------------------------------------------------------------------------
# server side
# ------------------------------------------------------------------------------------------------
class FlowerTransport:
    """The Coordinator's transport over a Flower Grid.

    On creation it waits until ``data.num_clients`` SuperNodes are connected and asks each for
    its client id, sample count and config hash (a ``query`` message); a SuperNode with another
    config, a duplicate or missing id is an error. Then :meth:`exchange` sends each round's tasks
    as records and collects the replies until the deadline.

    Attributes:
        node_of: client id -> Flower node id.
        num_samples: client id -> registered sample count.
    """

    def __init__(self, grid: Grid, cfg: RunConfig, discovery_timeout: float = 120.0,
                 limits: Limits | None = None):
        self.grid = grid
        self.cfg = cfg
        self.limits = limits
        N = cfg.data.num_clients
        t0 = time.time()
        nodes: list[int] = []
        while time.time() - t0 < discovery_timeout:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= N:
                break
            time.sleep(0.5)
        if len(nodes) < N:
            raise RuntimeError(f"only {len(nodes)} of {N} SuperNodes connected within "
                               f"{discovery_timeout:.0f} s (data.num_clients={N})")
        h = config_hash(cfg.to_dict())
        hello = [Message(content=RecordDict({"hello": ConfigRecord({"config_hash": h})}),
                         message_type=QUERY, dst_node_id=n) for n in nodes]
        replies = self.send_and_receive(hello, discovery_timeout)
        self.node_of: dict[int, int] = {}
        self.num_samples: dict[int, int] = {}
        for rep in replies:
            if rep.has_error():
                raise RuntimeError(f"node {rep.metadata.src_node_id} failed the hello: "
                                   f"{rep.error.reason}")
            d = dict(rep.content["hello"])
            if d.get("config_hash") != h:
                raise RuntimeError(f"node {rep.metadata.src_node_id} runs another config "
                                   f"(hash {d.get('config_hash')}, the server's {h})")
            cid = int(d["cid"])
            if cid in self.node_of:
                raise RuntimeError(f"two SuperNodes claim partition-id {cid}")
            self.node_of[cid] = int(rep.metadata.src_node_id)
            self.num_samples[cid] = int(d["num_samples"])
        missing = sorted(set(range(N)) - set(self.node_of))
        if missing:
            raise RuntimeError(f"no SuperNode answered for client ids {missing[:10]} (start one "
                               "per partition-id 0..N-1 with num-partitions=N)")
        self.cid_of = {n: c for c, n in self.node_of.items()}
        log.info("Flower federation: %d clients on nodes %s", N, self.node_of)

    def messages(self, tasks: dict[int, list]) -> tuple[list, dict]:
        """Flower Messages for ``tasks`` and their serialized sizes per client."""
        out, down = [], {}
        for c, ms in tasks.items():
            mtype = QUERY if ms[-1].TYPE.name == "STATUS" else TRAIN
            m = Message(content=to_records(ms), message_type=mtype, dst_node_id=self.node_of[c])
            down[c] = wire_bytes(m)
            out.append(m)
        return out, down

    def replies(self, msgs) -> tuple[dict, dict]:
        """Decode reply Messages: client id -> payloads (or Rejected); sizes per client."""
        out, up = {}, {}
        for rep in msgs:
            c = self.cid_of.get(int(rep.metadata.src_node_id))
            if c is None:
                log.warning("reply from unknown node %s ignored", rep.metadata.src_node_id)
                continue
            if rep.has_error():
                out[c] = Rejected(f"client error: {rep.error.reason}")
                continue
            up[c] = wire_bytes(rep)
            try:
                out[c] = reply_from_records(rep.content, self.limits)
            except Rejected as e:
                out[c] = e
        return out, up

    #: Seconds between pulls for replies (Flower's own send_and_receive waits 3 s between pulls,
    #: which adds 1.5 s to every exchange on average).
    PULL_INTERVAL = 0.25

    def send_and_receive(self, msgs, timeout: float) -> list:
        """Push ``msgs``, pull replies every :attr:`PULL_INTERVAL` s until all arrived or
        ``timeout`` s passed (Grid.send_and_receive with a shorter pull interval)."""
        ids = set(self.grid.push_messages(msgs))
        end = time.time() + max(0.5, float(timeout))
        out: list = []
        while ids:
            got = list(self.grid.pull_messages(ids))
            out.extend(got)
            ids.difference_update(m.metadata.reply_to_message_id for m in got)
            if not ids or time.time() >= end:
                break
            time.sleep(self.PULL_INTERVAL)
        return out

    def exchange(self, round_idx, tasks, timeout):
        msgs, down = self.messages(tasks)
        replies, up = self.replies(self.send_and_receive(msgs, timeout))
        return replies, down, up


class ZOWarmUpStrategy(Strategy):
    """Flower strategy for ZOWarmUp: warm-up rounds exchange weights (ArrayRecord), ZO rounds
    only seeds and scalars (ConfigRecord / MetricRecord), with catch-up, checksums, deadlines and
    validation from :class:`~zowarmup.federated.deploy.Coordinator`.

    Args:
        cfg: one run's config (``cfg.for_run(method, seed)``).
        deadline: seconds a round waits for replies.
        out: optional output folder (metrics.jsonl, summary.json, final_state.pt).
        discovery_timeout: seconds to wait for the SuperNodes.
        dataset: the server's dataset (test split for evaluation); loaded when None.
    """

    def __init__(self, cfg: RunConfig, deadline: float = 120.0, out: str | None = None,
                 discovery_timeout: float = 120.0, dataset=None):
        self.cfg = cfg
        self.deadline = float(deadline)
        self.out = out or None
        self.discovery_timeout = float(discovery_timeout)
        self.dataset = dataset
        self.coordinator = None
        self.transport = None

    # Flower's Strategy interface asks for per-round hooks; this strategy does not use them:
    # start() runs every round itself through the Coordinator (the one round driver), because a
    # ZOWarmUp round may need a second exchange within its deadline (repairs) and catch-up tasks
    # that Flower's one-message-per-node round cannot express.
    def configure_train(self, server_round, arrays, config, grid):
        """Not used: :meth:`start` drives the rounds (raises if Flower ever calls it)."""
        raise NotImplementedError("ZOWarmUpStrategy runs its rounds in start(); "
                                  "configure_train is not part of its loop")

    def aggregate_train(self, server_round, replies):
        """Not used: :meth:`start` drives the rounds (raises if Flower ever calls it)."""
        raise NotImplementedError("ZOWarmUpStrategy runs its rounds in start(); "
                                  "aggregate_train is not part of its loop")

    def configure_evaluate(self, server_round, arrays, config, grid):
        """No client-side evaluation: the server evaluates the global model on the test set."""
        return []

    def aggregate_evaluate(self, server_round, replies):
        return None

    def summary(self) -> None:
        c = self.cfg
        log.info("ZOWarmUp: method=%s rounds=%d pivot=%d clients=%d S=%d deadline=%.0fs exact=%s",
                 c.method, c.rounds, c.effective_pivot(), c.data.num_clients, c.zo.num_seeds,
                 self.deadline, c.zo.exact)

    def start(self, grid: Grid, initial_arrays=None, num_rounds=None, timeout=None,
              train_config=None, evaluate_config=None, evaluate_fn=None) -> Result:
        """Discover the clients, run every round (deadline, repair), sync all clients at the end.

        ``initial_arrays`` is ignored: every client builds version 0 from the run seed.
        """
        self.summary()
        cfg = self.cfg
        self.transport = FlowerTransport(grid, cfg, self.discovery_timeout)
        self.coordinator = Coordinator(cfg, self.transport, self.dataset, deadline=self.deadline,
                                       out=self.out, num_samples=self.transport.num_samples)
        self.transport.limits = self.coordinator.server.limits
        summary = self.coordinator.run()
        result = Result()
        for rec in self.coordinator.records:
            result.train_metrics_clientapp[rec["round"] + 1] = _round_metrics(rec)
            if rec["accuracy"] is not None:
                result.evaluate_metrics_serverapp[rec["round"] + 1] = MetricRecord(
                    {"accuracy": float(rec["accuracy"]), "loss": float(rec["loss"])})
        result.arrays = ArrayRecord({"state": Array(self.coordinator.server.layout.flatten(
            self.coordinator.model))})
        log.info("ZOWarmUp finished: final accuracy %.4f, final sync %s", summary["final_accuracy"],
                 {k: len(v) for k, v in (summary["final_sync"] or {}).items()
                  if isinstance(v, list)})
        self.result_summary = summary
        return result


def _round_metrics(rec: dict) -> MetricRecord:
    return MetricRecord({k: float(rec[k]) if not isinstance(rec[k], list) else len(rec[k])
                         for k in ("clients", "kept", "timed_out", "rejected", "desync",
                                   "repaired", "bytes_up_per_client", "bytes_down_per_client")})


def _server_main(cfg: RunConfig, grid: Grid, deadline: float, out, discovery_timeout: float):
    if cfg.threads:
        import torch
        torch.set_num_threads(cfg.threads)
    strategy = ZOWarmUpStrategy(cfg, deadline, out, discovery_timeout)
    strategy.start(grid)
    s = strategy.result_summary
    print(json.dumps({"zowarmup": "finished", "final_accuracy": s["final_accuracy"],
                      "final_checksum": s["final_checksum"],
                      "final_sync": {k: v for k, v in (s["final_sync"] or {}).items()
                                     if k in ("in_sync", "repaired", "unreachable", "mismatch")}}),
          flush=True)


def make_server_app(cfg: RunConfig, deadline: float = 120.0, out: str | None = None,
                    discovery_timeout: float = 120.0) -> ServerApp:
    """A ServerApp running ZOWarmUp for ``cfg`` (ignores the Flower run config)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        _server_main(cfg, grid, deadline, out, discovery_timeout)

    return app


server_app = ServerApp()


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    _server_main(config_from_run_config(rc), grid, _float(rc, "deadline", 120.0),
                 str(dict(rc).get("out", "") or "") or None,
                 _float(rc, "discovery-timeout", 120.0))


# ------------------------------------------------------------------------------------------------
# client side
# ------------------------------------------------------------------------------------------------
_CACHE: dict = {}
_STATE_W, _STATE_META = "zowarmup.weights", "zowarmup.meta"


def _dataset(cfg: RunConfig):
    from .. import data as zdata
    key = ("ds", cfg.data.name, cfg.data.root)
    if key not in _CACHE:
        _CACHE[key] = zdata.load_dataset(cfg.data.name, cfg.data.root)
    return _CACHE[key]


#: Client data shards up to this size are kept in the node's context.state (local to the
#: SuperNode, never sent), so later messages skip loading and splitting the dataset (about a
#: second of the ~5 s a ClientApp process takes on the 2-core test machine).
STATE_DATA_MAX_BYTES = 64 << 20
_STATE_X, _STATE_DS = "zowarmup.data", "zowarmup.dataset"


def _replica(cfg: RunConfig, context: Context):
    """This node's ClientReplica, its state restored from ``context.state``."""
    import types

    import torch

    nc = dict(context.node_config)
    if "partition-id" not in nc:
        raise ValueError("this SuperNode has no partition-id: start it with --node-config "
                         "\"partition-id=i num-partitions=N\"")
    cid, n = int(nc["partition-id"]), int(nc.get("num-partitions", cfg.data.num_clients))
    if n != cfg.data.num_clients or not 0 <= cid < n:
        raise ValueError(f"node-config partition-id={cid} num-partitions={n} does not fit "
                         f"data.num_clients={cfg.data.num_clients}")
    require_deployable(cfg.method, "Flower runs")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    st = context.state
    key = ("replica", config_hash(cfg.to_dict()), cid)
    rep = _CACHE.get(key)
    if rep is None:
        if _STATE_X in st:  # this node's shard, kept locally by an earlier message
            arr, meta = st[_STATE_X], dict(st[_STATE_DS])
            client = Client(cid, torch.from_numpy(arr["x"].numpy()),
                            torch.from_numpy(arr["y"].numpy()), cfg.seed, cfg.warmup, cfg.zo,
                            cfg.fedkseed.for_method(cfg.method))
            ds = types.SimpleNamespace(**meta)
        else:
            ds = _dataset(cfg)
            client = make_client(cfg, ds, client_shards(cfg, ds)[cid], cid, torch.device("cpu"))
            if client.x.numel() * 4 <= STATE_DATA_MAX_BYTES:
                st[_STATE_X] = ArrayRecord({"x": Array(client.x.numpy()),
                                            "y": Array(client.y.numpy())})
                st[_STATE_DS] = ConfigRecord({"name": ds.name, "num_classes": ds.num_classes,
                                              "in_channels": ds.in_channels,
                                              "image_size": ds.image_size})
        rep = build_replica(cfg, ds, cid, "cpu", client=client, where="Flower runs")
        rep._initial = rep.layout.flatten(rep.model)
        _CACHE[key] = rep
    if _STATE_W in st:
        meta = dict(st[_STATE_META])
        rep.load_state({"weights": st[_STATE_W]["state"].numpy(), "version": meta["version"],
                        "last_round": meta["last_round"]})
    else:  # a fresh node (or a new run): the initial model, version 0
        rep.load_state({"weights": rep._initial, "version": 0, "last_round": 0})
    return rep


def _save(rep, context: Context) -> None:
    st = rep.state()
    context.state[_STATE_W] = ArrayRecord({"state": Array(np.ascontiguousarray(st["weights"]))})
    context.state[_STATE_META] = ConfigRecord({"version": int(st["version"]),
                                               "last_round": int(st["last_round"])})


def _client_handle(cfg: RunConfig, msg: Message, context: Context) -> Message:
    rep = _replica(cfg, context)
    rd = msg.content
    if "hello" in rd.keys():
        h = config_hash(cfg.to_dict())
        return Message(RecordDict({"hello": ConfigRecord({
            "cid": rep.client.cid, "num_samples": rep.client.num_samples, "config_hash": h,
            "version": rep.version})}), reply_to=msg)
    try:
        task = task_from_records(rd, rep.limits)
    except Rejected as e:  # malformed records: same answer as for a malformed binary message
        out = [_rejected_status(rep, str(e))]
    else:
        out = rep.handle(task)
    _save(rep, context)
    return Message(to_records([decode(b) for b in out]), reply_to=msg)


def _rejected_status(rep, reason: str) -> bytes:
    log.warning("client %d: rejected the server's records: %s", rep.client.cid, reason)
    rep.rejections.append((rep.last_round, reason))
    ck = rep.checksum() if rep.version != -1 else None
    return StatusMessage(rep.last_round, Status.REJECTED, rep.version, reason, ck).to_bytes()


def make_client_app(cfg: RunConfig) -> ClientApp:
    """A ClientApp running ZOWarmUp clients for ``cfg`` (ignores the Flower run config)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return _client_handle(cfg, msg, context)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return _client_handle(cfg, msg, context)

    return app


client_app = ClientApp()


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    return _client_handle(config_from_run_config(context.run_config), msg, context)


@client_app.query()
def _query(msg: Message, context: Context) -> Message:
    return _client_handle(config_from_run_config(context.run_config), msg, context)


def write_app(folder: str | Path, run_config: dict | None = None, name: str = "zowarmupflower"
              ) -> Path:
    """Write a Flower App folder (``pyproject.toml`` only) whose components are this module's
    ``server_app`` and ``client_app``; ``flwr run FOLDER CONNECTION`` then runs ZOWarmUp.

    Args:
        folder: where to write (created). Flower requires its name to be a valid project name.
        run_config: defaults for ``[tool.flwr.app.config]`` (``config``, ``overrides``,
            ``deadline``, ``discovery-timeout``, ``out``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rc = {"config": "", "overrides": "", "deadline": 120.0, "discovery-timeout": 120.0, "out": ""}
    rc.update(run_config or {})

    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        return json.dumps(str(v))

    cfg_lines = "\n".join(f"{k} = {val(v)}" for k, v in rc.items())
    (folder / "pyproject.toml").write_text(f'''[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
description = "ZOWarmUp federated training (zowarmup) on Flower"
license = "Apache-2.0"
dependencies = ["flwr>=1.41", "zowarmup"]

[tool.flwr.app]
publisher = "zowarmup"

[tool.flwr.app.components]
serverapp = "zowarmup.flower.apps:server_app"
clientapp = "zowarmup.flower.apps:client_app"

[tool.flwr.app.config]
{cfg_lines}
''')
    return folder

"""Flower deployment with faults, against the in-memory deployment under the same drop rules; and a
smoke test of the documented ``python -m zowarmup.flower app DIR`` + ``flwr run DIR`` on the same
running federation (``simulate --out`` is the command line ``tests/test_flower.py`` runs its
simulation-engine test through).

The deployment: a SuperLink and 4 SuperNodes (separate processes, 127.0.0.1), 6 rounds (one
warm-up, five ZO rounds) with ``zo.clients_per_round = 2 < N``, so clients that sat out rounds
catch up by seed-log replay during the rounds. Faults, injected by a ClientApp wrapper that ships in
the app folder (``zwfaults.py``; the ServerApp and ClientApp are otherwise the package's):

- client 1 answers round 2 with a malformed reply (an extra, unknown record): rejected, counted;
- client 2 stalls in round 4 past the round's deadline: it waits for a file the ServerApp writes
  once round 4 has closed (no clock decides that it is late; the round closes at its deadline with
  the other client), then does its work and answers into the void.

The in-memory deployment (:func:`zowarmup.federated.deploy.in_memory_deployment`) runs the same
config with the same rules: client 1's round-2 reply replaced by garbage bytes, client 2 dropped in
round 4. Both must agree on every round's participants, kept/rejected/timed-out clients, catch-up
choices, accuracy and loss, the final weights bit for bit, and the final sync (every client in
sync). Bytes differ by design (Flower records against the binary messages) and are not compared.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

flwr = pytest.importorskip("flwr", reason="Flower is an extra: pip install '.[flower]'")

from zowarmup import data as zdata  # noqa: E402
from zowarmup.federated.config import RunConfig, apply_overrides, validate  # noqa: E402
from zowarmup.federated.deploy import in_memory_deployment  # noqa: E402

N = 4
FAULT_RUN = [f"data.num_clients={N}", "data.hi_fraction=0.25", "rounds=6", "pivot=1",
             "zo.num_seeds=4", "zo.clients_per_round=2", "model.options.hidden=[16]",
             "threads=1", "measure_memory=false", "progress=false", "baselines=[]",
             "num_seeds=1", "checkpoint_every=0"]
MALFORMED = (2, 1)   # (round, client)
STALL = (4, 2)
#: Seconds a round (and the final sync) waits. Only the stalled round waits it out; the others
#: close when every sampled client has answered. Generous: on the loaded 2-core machine a round took
#: 15-22 s (a ClientApp process per message), and 45 s was too short for the final sync of 4 nodes.
DEADLINE = 90.0

COMPARED = ("round", "phase", "clients", "kept", "dropped_clients", "timed_out", "rejected",
            "desync", "failed", "repaired", "catch_up", "accuracy", "loss")

FAULTS_PY = '''"""Fault injection for tests/test_flower_faults.py (a ClientApp wrapper; ServerApp marker)."""
import time
from pathlib import Path

from flwr.app import ConfigRecord, Message
from flwr.clientapp import ClientApp

from zowarmup.flower import apps as A


def _faults(rc):
    """run config "faults" = "STALL_ROUND STALL_CLIENT BAD_ROUND BAD_CLIENT SIGNAL_DIR" (plain
    words: flwr's --run-config parser refuses JSON inside a string)."""
    w = str(dict(rc).get("faults", "") or "").split()
    if len(w) != 5:
        return {}
    return {"stall": [int(w[0]), int(w[1])], "malformed": [int(w[2]), int(w[3])], "dir": w[4]}


_orig_exchange = A.FlowerTransport.exchange


def _exchange(self, round_idx, tasks, timeout):
    out = _orig_exchange(self, round_idx, tasks, timeout)
    d = getattr(self, "signal_dir", None)
    if d:  # the round's exchange is over: a stalled client may now answer (too late)
        (Path(d) / f"closed-{round_idx}").touch()
    return out


A.FlowerTransport.exchange = _exchange
_orig_init = A.FlowerTransport.__init__


def _init(self, grid, cfg, *a, **kw):
    _orig_init(self, grid, cfg, *a, **kw)
    self.signal_dir = _SIGNAL_DIR


A.FlowerTransport.__init__ = _init
_SIGNAL_DIR = None

from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.app import Context  # noqa: E402

server_app = ServerApp()


@server_app.main()
def _server(grid: Grid, context: Context) -> None:
    global _SIGNAL_DIR
    _SIGNAL_DIR = _faults(context.run_config).get("dir")
    A._main(grid, context)


client_app = ClientApp()


def _handle(msg, context):
    rc = context.run_config
    f = _faults(rc)
    cid = int(dict(context.node_config)["partition-id"])
    rd = msg.content
    r = int(rd["seeds"]["round"]) if "seeds" in rd.keys() else None
    if r is not None and [r, cid] == f.get("stall"):
        flag = Path(f["dir"]) / f"closed-{r}"
        t_end = time.time() + 900  # only a hung server fails on time
        while not flag.exists() and time.time() < t_end:
            time.sleep(0.1)
    reply = A._client_handle(A.config_from_run_config(rc), msg, context)
    if r is not None and [r, cid] == f.get("malformed"):
        content = reply.content
        content["evil"] = ConfigRecord({"x": 1})
        return Message(content, reply_to=msg)
    return reply


@client_app.train()
def _train(msg, context):
    return _handle(msg, context)


@client_app.query()
def _query(msg, context):
    return _handle(msg, context)
'''


def flwr_run(fed, app: Path, run_config: dict | None) -> str:
    """``flwr run APP <connection> [--run-config ...]``, then ``flwr list`` until the run has
    finished; its status. The CLI calls get hung-test timeouts only (a loaded machine can take
    over a minute to answer one ``flwr list``)."""
    import time
    args = ["run", str(app), fed.connection, "--format", "json"]
    if run_config:
        args[3:3] = ["--run-config", " ".join(
            f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in run_config.items())]
    out = fed.flwr(*args, timeout=900)
    try:
        run_id = str(json.loads(out.stdout)["run-id"])
    except (ValueError, KeyError):
        raise AssertionError(f"flwr run failed: {out.stdout[-2000:]} {out.stderr[-2000:]}") from None
    t_end = time.time() + 1200  # only a hung run fails on time
    status = ""
    while time.time() < t_end:
        try:
            ls = fed.flwr("list", fed.connection, "--run-id", run_id, "--format", "json",
                          timeout=600)
            runs = json.loads(ls.stdout).get("runs", [])
        except (subprocess.TimeoutExpired, ValueError):
            runs = []
        status = next((str(r.get("status")) for r in runs if str(r.get("run-id")) == run_id),
                      status)
        if status.startswith("finished"):
            break
        time.sleep(1.0)
    return status


def run_cfg(overrides) -> RunConfig:
    cfg = validate(apply_overrides(RunConfig(), list(overrides)))
    return cfg.for_run(cfg.method, cfg.seed)


def write_fault_app(folder: Path) -> Path:
    from zowarmup.flower.apps import write_app
    write_app(folder, {"faults": ""})
    py = folder / "pyproject.toml"
    text = py.read_text()
    text = text.replace('serverapp = "zowarmup.flower.apps:server_app"', 'serverapp = "zwfaults:server_app"')
    text = text.replace('clientapp = "zowarmup.flower.apps:client_app"', 'clientapp = "zwfaults:client_app"')
    assert "zwfaults:server_app" in text and "zwfaults:client_app" in text
    py.write_text(text)
    (folder / "zwfaults.py").write_text(FAULTS_PY)
    return folder


def in_memory_reference(cfg, ds):
    """The in-memory deployment with the same rules: garbage for the malformed reply, the stalled
    client dropped."""
    coord, replicas = in_memory_deployment(cfg, ds, deadline=600.0,
                                           drop=lambda r, c: (r, c) == STALL)
    t = coord.exchange.transport
    orig = t.exchange

    def exchange(r, tasks, timeout):
        replies, down, up = orig(r, tasks, timeout)
        if (r, MALFORMED[1]) == MALFORMED and MALFORMED[1] in replies:
            replies[MALFORMED[1]] = [b"\x07not a message"]
        return replies, down, up

    t.exchange = exchange
    summary = coord.run()
    return coord, summary


def test_deployment_with_stall_and_malformed_reply_matches_in_memory(tmp_path):
    from zowarmup.flower.local import LocalFederation
    cfg = run_cfg(FAULT_RUN)
    ds = zdata.load_dataset("digits")
    ids = {r: zdata.sample_clients(N, 2, r, cfg.seed).tolist() for r in range(1, 6)}
    assert MALFORMED[1] in ids[MALFORMED[0]] and STALL[1] in ids[STALL[0]]
    assert STALL[1] not in ids[STALL[0] + 1]  # its late work never overlaps its next task
    coord, mem = in_memory_reference(cfg, ds)
    sig = tmp_path / "signals"
    sig.mkdir()
    app = write_fault_app(tmp_path / "zowarmupflower")
    faults = f"{STALL[0]} {STALL[1]} {MALFORMED[0]} {MALFORMED[1]} {sig}"
    fed = LocalFederation(N, tmp_path / "fed")
    smoke = None
    try:
        fed.start(timeout=600)
        out = tmp_path / "out"
        status = flwr_run(fed, app, {"overrides": " ".join(FAULT_RUN), "deadline": DEADLINE,
                                     "out": str(out), "discovery-timeout": 600.0,
                                     "faults": faults})
        assert status == "finished:completed", \
            (status, (fed.workdir / "superlink.log").read_text()[-3000:])
        smoke = _smoke_app_cli_and_flwr_run(fed, tmp_path)
    finally:
        fed.stop()
    assert fed.alive() == []
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 6 and [r["phase"] for r in recs] == ["warmup"] + ["zo"] * 5
    for a, b in zip(recs, coord.records):
        assert {k: a[k] for k in COMPARED} == {k: b[k] for k in COMPARED}, a["round"]
    assert recs[MALFORMED[0]]["rejected"] == [MALFORMED[1]]
    assert recs[STALL[0]]["timed_out"] == [STALL[1]]
    assert recs[STALL[0]]["kept"] == 1 and recs[MALFORMED[0]]["kept"] == 1
    assert sum(r["catch_up"]["replay"] for r in recs[2:]) >= 2   # replays during the rounds
    assert (sig / f"closed-{STALL[0]}").exists()
    s = json.loads((out / "summary.json").read_text())
    assert s["final_accuracy"] == mem["final_accuracy"]
    assert s["rejected_total"] == mem["rejected_total"] >= 1
    assert s["timed_out_total"] == mem["timed_out_total"] == 1
    sync = s["final_sync"]
    assert sync["in_sync"] == mem["final_sync"]["in_sync"] == list(range(N)), sync
    assert not sync["mismatch"] and not sync["unreachable"]
    final = torch.load(out / "final_state.pt", weights_only=True)
    for k, v in coord.model.state_dict().items():
        assert torch.equal(final[k].view(-1).view(torch.uint8), v.view(-1).view(torch.uint8)), k
    # the smoke run (app folder written by the CLI, plain `flwr run`) completed and synced
    assert smoke["status"] == "finished:completed", smoke
    assert smoke["summary"]["final_sync"]["in_sync"] == list(range(N))


def _smoke_app_cli_and_flwr_run(fed, tmp_path) -> dict:
    """``python -m zowarmup.flower app DIR --overrides ... --out ...`` writes the app folder; ``flwr
    run DIR <connection>`` on the running federation (no --run-config overrides: the folder's)."""
    app = tmp_path / "cliapp"
    out = tmp_path / "smoke-out"
    over = (f"data.num_clients={N} data.hi_fraction=0.25 rounds=1 pivot=1 "
            f"model.options.hidden=[8] threads=1 measure_memory=false")
    res = subprocess.run([sys.executable, "-m", "zowarmup.flower", "app", str(app), "--overrides",
                          over, "--out", str(out), "--deadline", "600"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "flwr run" in res.stdout and (app / "pyproject.toml").exists()
    status = flwr_run(fed, app, None)
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    return {"status": status, "summary": summary}

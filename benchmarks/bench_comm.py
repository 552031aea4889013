"""Communication per client and round: FedAvg warm-up, seed-only ZO rounds, catch-up.

Every figure is the length of a real serialized message, built with the protocol code itself:

- embedded: ``len(msg.to_bytes())`` of the binary messages the embedded runner passes
  (``zowarmup.federated.messages``); the runner's byte accounting counts exactly these;
- Flower: the serialized size of the Flower ``Message`` carrying the same content as records
  (``zowarmup.flower.records``): ``deflate()`` of the message and every object it holds, which is
  what a SuperLink stores and forwards (metadata included).

Rows (per model):

- ``warmup``: one FedAvg round for a participating high-resource client: the global weights down,
  its local weights up.
- ``zo``: one ZO round for a participating client, steady state. Embedded (``zo.sync =
  "broadcast"``, the default): seeds down, S float32 projected gradients up, and the round's
  broadcast of ``S x clients_per_round`` (seed, coeff) pairs down (every client receives it;
  non-participants only it). With checksums (the exact-agreement messages): 4 bytes more per
  message. Flower: the task (the previous round's (seed, coeff) list as a one-round replay, the
  seeds, checksums) and the reply (a MetricRecord of S values), for a client that took part in
  the previous round too.
- ``catch_up``: a client that missed m rounds: the seed-log replay of m broadcasts against the
  weights download; the server sends the smaller (``Server.catch_up_message``); the crossover m*.

Models: ``resnet18`` (CIFAR-10, BatchNorm; configs/cifar10_resnet18_fedavg_bn.toml: 50 clients,
S = 20, 10 clients per ZO round) and ``digits_mlp`` (the CPU-scale default config: 64-128-10 MLP,
50 clients, S = 20, 20 clients per ZO round). No training: sizes do not depend on values (the
Flower ints and floats are protobuf-encoded: seeds are real derived seeds, coefficients random).

Writes ``benchmarks/results/communication.json`` (``--no-write`` to skip)::

    python benchmarks/bench_comm.py            # ~20 s (ResNet-18's 45 MB ArrayRecord twice)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_rows  # noqa: E402

RESULTS_NAME = "communication"
MISSED = (1, 2, 5, 10, 20, 50, 100, 200, 300)

SETTINGS = {
    "resnet18": dict(config="configs/cifar10_resnet18_fedavg_bn.toml",
                     dataset=dict(num_classes=10, in_channels=3, image_size=32, name="cifar10")),
    "digits_mlp": dict(config=None,
                       dataset=dict(num_classes=10, in_channels=1, image_size=8, name="digits")),
}


def _flower():
    """(Message, to_records, wire_bytes) or None when flwr is not installed."""
    try:
        from flwr.app import Message
        from flwr.supercore.task_identity import TaskIdentity
    except ImportError:
        return None
    from zowarmup.flower.records import to_records, wire_bytes
    try:  # outside a running Flower app, messages need an identity to be built
        TaskIdentity.run_id
    except RuntimeError:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    return Message, to_records, wire_bytes


def measure(model_key: str, rng: np.random.Generator) -> list[dict]:
    import types

    import torch

    from zowarmup.federated import messages as M
    from zowarmup.federated.config import load_config
    from zowarmup.federated.federation import build_global_model
    from zowarmup.federated.server import Server
    repo = Path(__file__).resolve().parents[1]
    st = SETTINGS[model_key]
    cfg = load_config(repo / st["config"] if st["config"] else None,
                      ["data.root=/unused"] if st["config"] else [])
    cfg = cfg.for_run(cfg.method, cfg.seed)
    ds = types.SimpleNamespace(**st["dataset"])
    model = build_global_model(cfg, ds)
    srv = Server(cfg, model, cfg.data.num_clients)
    n_state = srv.layout.size
    S, k = cfg.zo.num_seeds, cfg.zo.clients_per_round
    K = S * k if cfg.zo.seed_sharing == "per_client" else S
    common = {"model": model_key, "parameters": int(sum(p.numel() for p in model.parameters())),
              "state_floats": int(n_state), "num_clients": cfg.data.num_clients,
              "num_seeds": S, "zo_clients_per_round": k, "broadcast_entries": K,
              "seed_sharing": cfg.zo.seed_sharing}
    ck = srv.checksum()
    rows = []
    fl = _flower()

    # -- warm-up ----------------------------------------------------------------------------------
    w_down = srv.weights_message(3)
    w_up = M.WeightsMessage(3, srv.layout.flatten(model), 30)
    row = {"kind": "warmup", "transport": "embedded",
           "bytes_down": len(w_down.to_bytes()), "bytes_up": len(w_up.to_bytes())}
    rows.append(row)
    if fl:
        Message, to_records, wire = fl
        task = Message(content=to_records([w_down]), message_type="train", dst_node_id=2)
        rep = Message(content=to_records([w_up]), message_type="train", dst_node_id=2)
        rows.append({"kind": "warmup", "transport": "flower",
                     "bytes_down": wire(task), "bytes_up": wire(rep)})

    # -- ZO round ---------------------------------------------------------------------------------
    seeds = srv.zo_seeds(7, 3)
    grads = M.GradsMessage(7, rng.standard_normal(S).astype(np.float32), 30)
    bseeds = np.concatenate([srv.zo_seeds(6, c).seeds for c in range(k)]) if \
        cfg.zo.seed_sharing == "per_client" else srv.zo_seeds(6, 0).seeds
    bcast = M.BroadcastMessage(6, bseeds, (rng.standard_normal(K) * 1e-4).astype(np.float32))
    d_seeds, d_b, u_g = len(seeds.to_bytes()), len(bcast.to_bytes()), len(grads.to_bytes())
    rows.append({"kind": "zo", "transport": "embedded", "bytes_down": d_seeds + d_b,
                 "bytes_up": u_g, "parts": {"seeds": d_seeds, "broadcast": d_b, "grads": u_g},
                 "note": "participant: seeds + the round's broadcast; a non-participant "
                         f"receives the broadcast only ({d_b} B)"})
    seeds_ck = M.SeedsMessage(7, seeds.seeds, 1, ck)
    grads_ck = M.GradsMessage(7, grads.values, 30, ck)
    bcast_ck = M.BroadcastMessage(6, bcast.seeds, bcast.coeffs, ck)
    rows.append({"kind": "zo", "transport": "embedded+checksums",
                 "bytes_down": len(seeds_ck.to_bytes()) + len(bcast_ck.to_bytes()),
                 "bytes_up": len(grads_ck.to_bytes())})
    replay1 = M.ReplayMessage(7, [bcast], ck)
    rows.append({"kind": "zo", "transport": "deployment-binary",
                 "bytes_down": len(replay1.to_bytes()) + len(seeds_ck.to_bytes()),
                 "bytes_up": len(grads_ck.to_bytes()),
                 "note": "Coordinator/in-memory transport: previous broadcast as a 1-round "
                         "replay + seeds, checksums"})
    if fl:
        Message, to_records, wire = fl
        task = Message(content=to_records([replay1, seeds_ck]), message_type="train",
                       dst_node_id=2)
        rep = Message(content=to_records([grads_ck]), message_type="train", dst_node_id=2)
        t_only = Message(content=to_records([seeds_ck]), message_type="train", dst_node_id=2)
        rows.append({"kind": "zo", "transport": "flower", "bytes_down": wire(task),
                     "bytes_up": wire(rep),
                     "parts": {"seeds_only_task": wire(t_only)},
                     "note": "ConfigRecord (1-round replay + seeds + checksums) down, "
                             "MetricRecord (S values, num_samples, checksum) up; no arrays"})

    # -- catch-up ---------------------------------------------------------------------------------
    weights_ck = srv.weights_message(7, ck)
    W = len(weights_ck.to_bytes())
    Wf = None
    if fl:
        Message, to_records, wire = fl
        Wf = wire(Message(content=to_records([weights_ck]), message_type="train",
                          dst_node_id=2))
    entry = len(bcast.to_bytes())
    for m in MISSED:
        replay = 12 + 4 + m * entry
        row = {"kind": "catch_up", "transport": "embedded", "missed_rounds": m,
               "replay_bytes": replay, "download_bytes": W,
               "chosen": "replay" if replay <= W else "download",
               "bytes_down": min(replay, W), "bytes_up": 0}
        rows.append(row)
        if fl and m <= 50:
            rp = M.ReplayMessage(7, [bcast] * m, ck)
            rf = wire(Message(content=to_records([rp]), message_type="train", dst_node_id=2))
            rows.append({"kind": "catch_up", "transport": "flower", "missed_rounds": m,
                         "replay_bytes": rf, "download_bytes": Wf,
                         "chosen": "replay" if rf <= Wf else "download",
                         "bytes_down": min(rf, Wf), "bytes_up": 0})
    crossover = (W - 16) // entry
    rows.append({"kind": "catch_up_crossover", "transport": "embedded",
                 "max_missed_rounds_for_replay": int(crossover), "per_round_entry_bytes": entry,
                 "download_bytes": W})
    for r in rows:
        r.update(common)
    del torch
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet18,digits_mlp")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    out = []
    for mk in args.models.split(","):
        rows = measure(mk, rng)
        out += rows
        print(f"\n{mk}: {rows[0]['state_floats']:,} state floats, S={rows[0]['num_seeds']}, "
              f"{rows[0]['zo_clients_per_round']} clients per ZO round "
              f"({rows[0]['broadcast_entries']} broadcast entries)")
        print(f"  {'kind':10s} {'transport':20s} {'down B':>12s} {'up B':>12s}")
        for r in rows:
            if r["kind"] in ("warmup", "zo"):
                print(f"  {r['kind']:10s} {r['transport']:20s} {r['bytes_down']:12,d} "
                      f"{r['bytes_up']:12,d}")
        for r in rows:
            if r["kind"] == "catch_up":
                print(f"  catch-up {r['transport']:9s} m={r['missed_rounds']:4d}: replay "
                      f"{r['replay_bytes']:12,d} B, download {r['download_bytes']:12,d} B -> "
                      f"{r['chosen']}")
            if r["kind"] == "catch_up_crossover":
                print(f"  replay is cheaper up to {r['max_missed_rounds_for_replay']} missed rounds")
    rows = [{"config": {k: r[k] for k in ("model", "kind", "transport", "parameters",
                                          "state_floats", "num_clients", "num_seeds",
                                          "zo_clients_per_round", "broadcast_entries",
                                          "seed_sharing", "missed_rounds") if k in r},
             "figures": {k: v for k, v in r.items() if k in (
                 "bytes_down", "bytes_up", "parts", "replay_bytes", "download_bytes", "chosen",
                 "max_missed_rounds_for_replay", "per_round_entry_bytes", "note")},
             "command": "python benchmarks/bench_comm.py"} for r in out]
    if not args.no_write:
        print("wrote", write_rows(RESULTS_NAME, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

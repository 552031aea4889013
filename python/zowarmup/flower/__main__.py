"""``python -m zowarmup.flower``: write the Flower App folder, or run ZOWarmUp on Flower locally.

::

    python -m zowarmup.flower app DIR [--overrides "..."] [--config FILE] [--deadline S] [--out DIR]
        write a Flower App folder (pyproject.toml) for `flwr run DIR <connection>`
    python -m zowarmup.flower simulate --supernodes N [--overrides "..."] [--out DIR]
        Flower's simulation engine (Ray backend) in this process
    python -m zowarmup.flower local --supernodes N [--overrides "..."]
        a SuperLink + N SuperNodes on 127.0.0.1 (insecure), `flwr run`, stop them all

``data.num_clients`` is set to N by ``simulate`` and ``local``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys


#: What to tell a user whose environment lacks Flower.
INSTALL_HINT = ('the Flower integration needs the [flower] extra: pip install -e ".[flower]" in a '
                'checkout (or pip install "zowarmup[flower]")')


def flwr_missing() -> str | None:
    """None when ``flwr`` imports; else one line saying which extra to install."""
    try:
        import flwr  # noqa: F401
    except ImportError as e:
        return f"{INSTALL_HINT} ({e})"
    return None


def main(argv=None) -> int:
    missing = flwr_missing()
    if missing:
        print(f"python -m zowarmup.flower: error: {missing}", file=sys.stderr)
        return 2
    ap = argparse.ArgumentParser(prog="python -m zowarmup.flower", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("app", help="write a Flower App folder")
    a.add_argument("dir")
    for p in (a, sub.add_parser("simulate", help="run in Flower's simulation engine")):
        p.add_argument("--overrides", default="", help='zowarmup overrides, e.g. "rounds=10"')
        p.add_argument("--config", default="", help="zowarmup TOML/JSON config file")
        p.add_argument("--deadline", type=float, default=120.0,
                       help="seconds a round waits for replies (default 120)")
        p.add_argument("--discovery-timeout", type=float, default=120.0,
                       help="seconds to wait for every SuperNode to connect and answer the "
                            "hello (default 120)")
        p.add_argument("--out", default="")
    s = sub.choices["simulate"]
    s.add_argument("--supernodes", type=int, default=10)
    sub.add_parser("local", help="local deployment engine (see zowarmup.flower.local --help)",
                   add_help=False)
    args, rest = ap.parse_known_args(argv)
    if args.cmd == "local":
        from .local import main as local_main
        return local_main(rest)
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.cmd == "app":
        from .apps import write_app
        d = write_app(args.dir, {"config": args.config, "overrides": args.overrides,
                                 "deadline": args.deadline,
                                 "discovery-timeout": args.discovery_timeout, "out": args.out})
        print(f"wrote {d / 'pyproject.toml'}; run it with: flwr run {d} <connection>")
        return 0
    # simulate
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    from flwr.simulation import run_simulation

    from .apps import config_from_run_config, make_client_app, make_server_app
    cfg = config_from_run_config({"config": args.config, "overrides": " ".join(
        shlex.split(args.overrides) + [f"data.num_clients={args.supernodes}"])})
    run_simulation(make_server_app(cfg, deadline=args.deadline, out=args.out or None,
                                   discovery_timeout=args.discovery_timeout),
                   make_client_app(cfg), num_supernodes=args.supernodes,
                   backend_config={"client_resources": {"num_cpus": 1}})
    if args.out:
        print(json.dumps(json.load(open(os.path.join(args.out, "summary.json")))["final_sync"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command line: ``zowarmup run``, ``zowarmup compare``, ``zowarmup config``.

::

    zowarmup run [--config FILE] [key=value ...] [--out DIR] [--no-progress] [--quiet]
    zowarmup run --resume DIR          # an experiment folder or a single run folder
    zowarmup compare RUN_DIRS...       # mean(std) table over seeds (run or experiment folders)
    zowarmup config [--config FILE] [key=value ...]   # print the resolved, validated config
    zowarmup sweep [--config FILE] key=[v1,v2] ... [--set key=value] [--validation 0.2]
    zowarmup sweep --resume DIR        # grid search on a validation split (federated/sweep.py)

``zowarmup`` with no sub-command means ``run``; ``python -m zowarmup`` is the same program. With no
arguments it trains the offline default (scikit-learn digits, 50 clients, Dirichlet alpha 0.1,
10/90 high/low-resource, warm-up then seed-only ZO) beside High Res Only, then prints and saves the
comparison. Exit status: 0 on success, 2 on a bad config or command line, 1 on other errors.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

_COMMANDS = ("run", "compare", "config", "sweep")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zowarmup",
        description="ZOWarmUp federated training: warm-up on high-resource clients, then "
                    "seed-only zeroth-order rounds for every client.")
    sub = p.add_subparsers(dest="command", metavar="{run,compare,config,sweep}")

    r = sub.add_parser("run", help="train a method beside its baselines and compare (default)",
                       description="Train cfg.method and cfg.baselines over cfg.num_seeds seeds, "
                                   "write one folder per run, print the comparison table. "
                                   "Overrides are key=value with dotted section keys, e.g. "
                                   "rounds=60 zo.num_seeds=10 data.alpha=0.5 baselines=[].")
    r.add_argument("--config", "-c", metavar="FILE", help="TOML or JSON config (see configs/)")
    r.add_argument("--out", "-o", metavar="DIR", default="runs",
                   help="parent folder for the experiment folder (default: runs)")
    r.add_argument("--resume", metavar="DIR",
                   help="continue an interrupted experiment or run folder (no config changes)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--quiet", "-q", action="store_true", help="no progress bar, no table")
    r.add_argument("overrides", nargs="*", metavar="key=value")

    c = sub.add_parser("compare", help="mean(std) table over seeds from run folders",
                       description="Read run folders and/or experiment folders and print final "
                                   "test accuracy as mean(std) over seeds per method and setting.")
    c.add_argument("dirs", nargs="+", metavar="RUN_DIR")
    c.add_argument("--json", action="store_true", help="print the table as JSON")

    s = sub.add_parser("sweep", help="grid search, selected on a validation split of the training data",
                       description="Run every combination of the key=[v1,v2,...] axes on top of "
                                   "the config, each over cfg.num_seeds seeds, evaluated on a "
                                   "stratified split of the training data (never the test set); "
                                   "write the mean(std) table and best.json for zowarmup run -c.")
    s.add_argument("--config", "-c", metavar="FILE")
    s.add_argument("--set", action="append", default=[], metavar="key=value",
                   help="a fixed override (repeatable)")
    s.add_argument("--validation", type=float, default=0.2,
                   help="fraction of each class of the training data held out (default 0.2)")
    s.add_argument("--out", "-o", metavar="DIR", default="sweeps")
    s.add_argument("--resume", metavar="DIR", help="continue an interrupted sweep folder")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--jobs", "-j", type=int, default=1, help="runs trained at once (processes)")
    s.add_argument("grid", nargs="*", metavar="key=[v1,v2,...]")

    g = sub.add_parser("config", help="print the resolved, validated config as JSON")
    g.add_argument("--config", "-c", metavar="FILE")
    g.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def _error(msg: str, code: int) -> int:
    print(f"zowarmup: error: {msg}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``zowarmup`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in _COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["run"] + argv
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for h in logging.getLogger().handlers:  # INFO events go to each run's run.log only
        h.setLevel(logging.WARNING)

    from ._safeio import FolderBusyError, UnsafeFileError
    from .federated.config import ConfigError, load_config

    try:
        if args.command == "config":
            cfg = load_config(args.config, args.overrides)
            print(json.dumps(cfg.to_dict(), indent=2))
            return 0
        if args.command == "sweep":
            from .federated import sweep as zsweep
            if args.resume:
                zsweep.resume_sweep(args.resume, progress=not args.no_progress, jobs=args.jobs)
                return 0
            cfg = load_config(args.config, args.set)
            zsweep.run_sweep(cfg, zsweep.parse_grid(args.grid), out=args.out,
                             validation=args.validation, progress=not args.no_progress,
                             jobs=args.jobs)
            return 0
        if args.command == "compare":
            from .federated.experiment import compare, format_table
            table = compare(args.dirs)
            print(json.dumps(table, indent=2) if args.json else format_table(table), end="")
            return 0
        # run
        progress = False if (args.no_progress or args.quiet) else None
        echo = None if args.quiet else print
        if args.resume:
            if args.config or args.overrides:
                return _error("--resume continues a folder with its saved config; do not pass "
                              "--config or key=value with it", 2)
            d = Path(args.resume)
            if not d.is_dir():
                return _error(f"--resume {d}: no such folder", 2)
            from ._safeio import run_lock
            from .federated.experiment import EXPERIMENT, resume_experiment
            if (d / EXPERIMENT).exists():
                with run_lock(d):  # one process per experiment folder (runs lock their own)
                    resume_experiment(d, progress=progress, echo=echo)
            else:
                from .federated.loop import resume_run
                s = resume_run(d, progress=progress)
                if echo:
                    acc = s.get("final_accuracy") if isinstance(s, dict) else None
                    shown = f"{100 * acc:.1f}%" if isinstance(acc, (int, float)) else "n/a"
                    echo(f"{s.get('label', '?')} seed {s.get('seed', '?')}: final accuracy "
                         f"{shown} -> {d}")
            return 0
        cfg = load_config(args.config, args.overrides)
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            return _error(f"--out {out} is a file; give a folder (created if missing)", 2)
        from .federated.experiment import run_experiment
        run_experiment(cfg, out=out, progress=progress, echo=echo)
        return 0
    except ConfigError as e:
        return _error(str(e), 2)
    except FileNotFoundError as e:
        return _error(str(e), 2)
    except (UnsafeFileError, FolderBusyError) as e:  # damaged run folder, folder in use
        return _error(str(e), 1)
    except UnicodeDecodeError as e:
        return _error(f"a file is not UTF-8 text ({e})", 1)
    except (ValueError, RuntimeError) as e:  # e.g. a malformed data file, a folder holding another run
        return _error(_one_line(e), 1)
    except OSError as e:  # permissions, a full disk, a path that is a file
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        return _error(f"cannot access{where}: {e.strerror or e}", 1)
    except MemoryError:
        return _error("out of memory (a data file or setting asks for more than this machine "
                      "has)", 1)
    except KeyboardInterrupt:
        return _error("interrupted; continue with: zowarmup run --resume <folder>", 130)
    except Exception as e:  # a bug or an input no check foresaw: still one line, unless debugging
        if os.environ.get("ZOWARMUP_DEBUG"):
            raise
        return _error(f"unexpected {type(e).__name__}: {_one_line(e)} (set ZOWARMUP_DEBUG=1 for "
                      "the traceback)", 1)


def _one_line(e: BaseException) -> str:
    """The first line of an exception's message (a message never spans a traceback's worth)."""
    msg = str(e).strip()
    return (msg.splitlines()[0] if msg else type(e).__name__)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

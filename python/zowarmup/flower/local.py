"""A local Flower deployment: one SuperLink and N SuperNodes on 127.0.0.1, as separate processes.

For the integration test and for trying the deployment engine on one machine. Insecure mode (no
TLS, no authentication): never expose these ports. Every process gets a private ``FLWR_HOME`` and
the environment Flower 1.41 needs offline (telemetry, update checks and runtime dependency
installation off; the Python environment's ``bin`` on ``PATH``, because the SuperLink and
SuperNodes start ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` by name).

Each process is started in its own session (process group) and :meth:`LocalFederation.stop` ends
exactly those groups -- by the PIDs this object started -- with SIGTERM, then SIGKILL after a grace
period, so the helpers they spawned (superexec, app processes) go too. Nothing else is touched. A
SIGTERM to the calling process (main thread) is turned into that same stop, and then ends the
process as SIGTERM would have.

Command line (starts everything, runs, stops everything, then ends like ``zowarmup run``: the run
folder ``<--out, default runs>/flower-<name>-<timestamp>/`` with ``metrics.jsonl``, ``summary.json``,
``final_state.pt`` and ``accuracy.png``, and a last line with the final accuracy and that folder)::

    python -m zowarmup.flower local --supernodes 3 --overrides "data.hi_fraction=0.34 rounds=4 pivot=2"
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


class _Terminated(SystemExit):
    """Raised in the main thread by a running :class:`LocalFederation`'s SIGTERM handler, so that
    the code unwinds to its ``stop()`` (which then ends the process by SIGTERM's default action)."""


FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # the SuperExec polls for ClientApp/ServerApp tasks every second by default
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.1)
    return False


class LocalFederation:
    """SuperLink + ``num_supernodes`` SuperNodes (``partition-id=i num-partitions=N``).

    Args:
        num_supernodes: N (must equal the run's ``data.num_clients``).
        workdir: folder for FLWR_HOME, the app folder and the process logs (a temp dir if None).
        pythonpath: extra entries put first on every process's PYTHONPATH (e.g. a checkout's
            ``python`` and ``src`` folders).
        connection: the connection name written to FLWR_HOME/config.toml.

    Use as a context manager (or ``start()`` with ``stop()`` in a ``finally``); the processes are
    stopped whatever happened, a SIGTERM to this process included: from the first process started
    to the end of ``stop()``, SIGTERM in the main thread unwinds to ``stop()`` and ends the process
    after it (unless the caller installed its own SIGTERM handler, which is left alone).
    """

    def __init__(self, num_supernodes: int, workdir: str | Path | None = None,
                 pythonpath: list | None = None, connection: str = "zwlocal"):
        self.n = int(num_supernodes)
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="zowarmup-flower-"))
        self.home = self.workdir / "flwr-home"
        self.connection = connection
        self.procs: list[subprocess.Popen] = []
        self.logs: dict[str, Path] = {}
        bindir = str(Path(sys.executable).parent)
        env = dict(os.environ)
        env.update(FLOWER_ENV)
        env["FLWR_HOME"] = str(self.home)
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
        if pythonpath:
            env["PYTHONPATH"] = os.pathsep.join([str(p) for p in pythonpath]
                                                + [env.get("PYTHONPATH", "")])
        self.env = env
        self.bindir = bindir
        self.port = None
        self._sigterm_armed = False   # our SIGTERM handler is installed (see _arm_sigterm)
        self._sigterm_seen = False    # a SIGTERM arrived while it was
        self._stopping = False

    # -- SIGTERM ---------------------------------------------------------------------------------
    # The processes run in their own sessions, so SIGTERM's default action on this process (a job
    # scheduler, `kill`, a test runner stopped from outside) would end it and leave them running.
    # From the first spawn to the end of stop(), SIGTERM instead raises _Terminated in the main
    # thread (with or without `with`: the caller's `finally`/`__exit__` reaches stop()); stop()
    # ignores further SIGTERMs while it works, then restores the default action and re-sends the
    # signal, so the process still ends as SIGTERM would have ended it. Main thread only, and never
    # over a handler the caller installed.
    def _arm_sigterm(self) -> None:
        if self._sigterm_armed or threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
            return
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self._sigterm_armed = True

    def _on_sigterm(self, signum, frame):
        self._sigterm_seen = True
        if not self._stopping:
            raise _Terminated(128 + signum)

    def _disarm_sigterm(self) -> None:
        if not self._sigterm_armed:
            return
        self._sigterm_armed = False
        if signal.getsignal(signal.SIGTERM) == self._on_sigterm:  # not if the caller replaced it
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if self._sigterm_seen:
            self._sigterm_seen = False
            os.kill(os.getpid(), signal.SIGTERM)  # the processes are stopped: now the default action

    # -- processes -------------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        self._arm_sigterm()
        log = self.workdir / f"{name}.log"
        self.logs[name] = log
        f = open(log, "wb")
        p = subprocess.Popen(args, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        f.close()
        self.procs.append(p)
        return p

    def _exe(self, name: str) -> str:
        p = Path(self.bindir) / name
        return str(p) if p.exists() else name

    def start(self, timeout: float = 600.0) -> "LocalFederation":
        """Start the SuperLink and the SuperNodes; return once the SuperLink accepts connections."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{self.connection}"\n\n[superlink.{self.connection}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        self._spawn("superlink", [self._exe("flower-superlink"), "--insecure", "--host",
                                  "127.0.0.1", "--port", str(self.port)])
        if not _wait_port(self.port, timeout):
            raise RuntimeError(f"the SuperLink did not open port {self.port} within {timeout} s; "
                               f"log: {self.logs['superlink'].read_text()[-2000:]}")
        for i in range(self.n):
            self._spawn(f"supernode{i}", [
                self._exe("flower-supernode"), "--insecure", "--superlink",
                f"127.0.0.1:{self.port}", "--host", "127.0.0.1", "--port", str(free_port()),
                "--node-config", f"partition-id={i} num-partitions={self.n}"])
        return self

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM each started process group, SIGKILL what is left after ``grace`` seconds. A
        SIGTERM to this process while the federation ran (or while it stops) ends the process once
        the groups are gone."""
        self._stopping = True
        try:
            self._stop_groups(grace)
        finally:
            self._stopping = False
            self._disarm_sigterm()

    def _stop_groups(self, grace: float) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        t0 = time.time()
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, grace - (time.time() - t0)))
            except subprocess.TimeoutExpired:
                pass
        left = self._group_members()
        for p in self.procs:
            # a group may outlive its leader (helpers it spawned): SIGKILL the groups that still
            # have members, as seen in /proc just now (so a recycled id is never signalled)
            if p.poll() is None or p.pid in left:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                p.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass

    def _group_members(self) -> set[int]:
        """Process-group ids (of those started here) that still have a live member."""
        groups = {p.pid for p in self.procs}
        return {pg for pg in (self._pgrp_of(pid) for pid in self.alive()) if pg in groups}

    @staticmethod
    def _pgrp_of(pid: int) -> int:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            return int(stat[stat.rindex(")") + 2:].split()[2])
        except (OSError, ValueError, IndexError):
            return -1

    def alive(self) -> list[int]:
        """PIDs still running (not zombies) in the process groups this object started (Linux
        ``/proc``; elsewhere: the started processes themselves)."""
        groups = {p.pid for p in self.procs}
        proc = Path("/proc")
        if not proc.is_dir():
            return [p.pid for p in self.procs if p.poll() is None]
        out = []
        for d in proc.iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            state, pgrp = fields[0], int(fields[2])
            if pgrp in groups and state not in ("Z", "X"):
                out.append(int(d.name))
        return sorted(out)

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()
        return False

    # -- runs ------------------------------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI with this federation's environment."""
        return subprocess.run([self._exe("flwr"), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def run(self, run_config: dict, timeout: float = 300.0, app_dir: str | Path | None = None
            ) -> dict:
        """``flwr run`` the ZOWarmUp app with ``run_config``, wait until it finishes.

        Returns ``{"run_id", "status", "run": <flwr list entry>, "log": <flwr log text>}``.
        ``flwr run`` exits 0 even when the ServerApp crashed, so the status comes from
        ``flwr list --run-id ID --format json`` (``finished:completed`` on success).
        """
        from .apps import write_app  # imports flwr: only when a run is started
        app = Path(app_dir) if app_dir else write_app(self.workdir / "zowarmupflower")
        rc = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}"
                      for k, v in run_config.items())
        wait = max(120.0, min(float(timeout), 600.0))  # `flwr run` itself is slow under load
        try:
            out = self.flwr("run", str(app), self.connection, "--run-config", rc, "--format",
                            "json", timeout=wait)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"`flwr run` did not answer within {wait:.0f} s (is the machine "
                               "overloaded?)") from None
        try:
            info = json.loads(out.stdout)
            run_id = str(info["run-id"])
        except (ValueError, KeyError):
            raise RuntimeError(f"flwr run failed (rc={out.returncode}):\n{out.stdout[-2000:]}\n"
                               f"{out.stderr[-2000:]}") from None
        t0 = time.time()
        entry: dict = {}
        while time.time() - t0 < timeout:
            try:
                ls = self.flwr("list", self.connection, "--run-id", run_id, "--format", "json",
                               timeout=60)
            except subprocess.TimeoutExpired:  # a slow answer: ask again until `timeout`
                continue
            try:
                runs = json.loads(ls.stdout).get("runs", [])
                entry = next((r for r in runs if str(r.get("run-id")) == run_id), {})
            except ValueError:
                entry = {}
            if str(entry.get("status", "")).startswith("finished"):
                break
            time.sleep(1.0)
        return {"run_id": run_id, "status": str(entry.get("status", "unknown")), "run": entry}


def main(argv=None) -> int:
    """``python -m zowarmup.flower local``: start, run, stop; then finish like ``zowarmup run``:
    the run folder ``<out>/flower-<name>-<timestamp>/`` holds ``metrics.jsonl``, ``summary.json``,
    ``final_state.pt`` and ``accuracy.png``, and the last line printed is the final accuracy and
    that folder."""
    import argparse

    from .__main__ import flwr_missing
    missing = flwr_missing()
    if missing:
        print(f"python -m zowarmup.flower local: error: {missing}", file=sys.stderr)
        return 2
    ap = argparse.ArgumentParser(prog="python -m zowarmup.flower.local",
                                 description="Run ZOWarmUp on a local Flower deployment "
                                             "(SuperLink + SuperNodes on 127.0.0.1, insecure).")
    ap.add_argument("--supernodes", type=int, default=3)
    ap.add_argument("--overrides", default="", help='e.g. "data.hi_fraction=0.34 rounds=4 pivot=2" '
                                                    '(data.num_clients is set to --supernodes)')
    ap.add_argument("--config", default="")
    ap.add_argument("--deadline", type=float, default=120.0)
    ap.add_argument("--out", default="runs", help="parent folder of the run folder (default: runs)")
    ap.add_argument("--timeout", type=float, default=1800.0)
    a = ap.parse_args(argv)
    if a.supernodes < 1:
        print(f"error: --supernodes must be >= 1, got {a.supernodes}", file=sys.stderr)
        return 2
    overrides = f"{a.overrides} data.num_clients={a.supernodes}".strip()
    # Check the config here first: a bad one would otherwise only fail inside the ServerApp.
    from ..federated.config import ConfigError
    from .apps import config_from_run_config
    try:
        cfg = config_from_run_config({"config": a.config, "overrides": overrides})
    except (ConfigError, OSError, ValueError) as e:
        print(f"error: bad zowarmup config: {e}", file=sys.stderr)
        return 2
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        print(f"error: --out {out} is a file; give a folder (created if missing)", file=sys.stderr)
        return 2
    run_dir = new_run_dir(out, f"flower-{cfg.name}")
    try:
        with LocalFederation(a.supernodes) as fed:
            res = fed.run({"config": a.config, "overrides": overrides, "deadline": a.deadline,
                           "out": str(run_dir.resolve())}, timeout=a.timeout)
            print(json.dumps({"run_id": res["run_id"], "status": res["status"],
                              "workdir": str(fed.workdir)}))
            if res["status"] != "finished:completed":
                log = fed.flwr("log", res["run_id"], fed.connection, "--show", timeout=60)
                print(f"the run did not complete; its ServerApp log (`flwr log`):\n"
                      f"{(log.stdout + log.stderr)[-4000:]}", file=sys.stderr)
                return 1
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: the local Flower deployment failed: {msg}", file=sys.stderr)
        return 1
    return finish_run_folder(run_dir, cfg, a.supernodes)


def new_run_dir(out: Path, name: str) -> Path:
    """A new ``<out>/<name>-<timestamp>[-k]/`` folder (created)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    d = Path(out) / f"{name}-{stamp}"
    k = 1
    while d.exists():
        d = Path(out) / f"{name}-{stamp}-{k}"
        k += 1
    d.mkdir(parents=True)
    return d


def finish_run_folder(run_dir: Path, cfg, supernodes: int, echo=print) -> int:
    """After a completed Flower run wrote ``run_dir``: plot ``accuracy.png`` and print the final
    accuracy line naming the folder, like ``zowarmup run``. Returns the exit status."""
    from .._safeio import UnsafeFileError, read_json_object
    from ..federated.checkpoint import read_metrics_file
    from ..federated.config import METHOD_LABELS
    try:
        summary = read_json_object(run_dir / "summary.json", ("final_accuracy",), "run summary")
    except UnsafeFileError as e:
        print(f"error: the run completed but left no usable summary: {e}", file=sys.stderr)
        return 1
    label = METHOD_LABELS.get(cfg.method, cfg.method)
    try:
        from ..federated.plotting import plot_run
        plot_run(read_metrics_file(run_dir / "metrics.jsonl"), run_dir / "accuracy.png",
                 cfg.effective_pivot(), f"{label} on Flower - {cfg.data.name}, seed {cfg.seed}")
    except Exception as e:  # a plot must never lose a finished run
        print(f"(could not write the plot: {e})", file=sys.stderr)
    acc = summary["final_accuracy"]
    shown = f"{100 * acc:.1f}%" if isinstance(acc, (int, float)) and not isinstance(acc, bool) \
        else "n/a"
    echo(f"{label} on Flower ({supernodes} SuperNodes) seed {cfg.seed}: final accuracy {shown} "
         f"-> {run_dir}")
    return 0

if __name__ == "__main__":
    sys.exit(main())

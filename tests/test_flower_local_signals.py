"""``LocalFederation`` stops its processes when its own process gets SIGTERM.

Its SuperLink and SuperNodes run in their own sessions, so the default SIGTERM action (die at once)
left them running: a test runner stopped from outside left ten Flower processes polling for half an
hour. Here a child Python process runs a ``LocalFederation`` whose ``start`` spawns two ``sleep``
processes the same way (``_spawn``: own session), as a context manager and as ``start()`` with
``stop()`` in a ``finally`` (the form the Flower tests use), prints their PIDs and waits; the test
sends it SIGTERM and checks that it still ends by SIGTERM and that both sleepers are gone. No Flower
needed.
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import sys, time
from zowarmup.flower.local import LocalFederation

class Sleepers(LocalFederation):
    def start(self, timeout=600.0):
        self._spawn("a", ["sleep", "300"])
        self._spawn("b", ["sleep", "300"])
        return self

if sys.argv[2] == "with":
    with Sleepers(2, workdir=sys.argv[1]) as fed:
        print(" ".join(str(p.pid) for p in fed.procs), flush=True)
        time.sleep(120)
else:
    fed = Sleepers(2, workdir=sys.argv[1])
    try:
        fed.start()
        print(" ".join(str(p.pid) for p in fed.procs), flush=True)
        time.sleep(120)
    finally:
        fed.stop()
print("not reached", flush=True)
"""

HANDLER_KEPT = r"""
import signal, sys
from zowarmup.flower.local import LocalFederation

def mine(signum, frame):
    pass

class One(LocalFederation):
    def start(self, timeout=600.0):
        self._spawn("a", ["sleep", "300"])
        return self

signal.signal(signal.SIGTERM, mine)
with One(1, workdir=sys.argv[1]):
    assert signal.getsignal(signal.SIGTERM) is mine   # the caller's handler is left in place
assert signal.getsignal(signal.SIGTERM) is mine
signal.signal(signal.SIGTERM, signal.SIG_DFL)
with One(1, workdir=sys.argv[1]):
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # installed while it runs
assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL       # and the default restored after
print("ok")
"""


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python"), str(ROOT / "src"),
                                         env.get("PYTHONPATH", "")])
    return env


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] not in ("Z", "X")


def _readline(stream, timeout: float) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    return stream.readline() if ready else ""


@pytest.mark.skipif(not Path("/proc").is_dir() or sys.platform != "linux",
                    reason="checks the processes through Linux /proc")
@pytest.mark.parametrize("form", ["with", "finally"])
def test_sigterm_to_the_parent_stops_the_federation_processes(tmp_path, form):
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), form], env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        line = _readline(p.stdout, 60)
        pids = [int(x) for x in line.split()]
        assert len(pids) == 2, (line, p.stderr.read() if p.poll() is not None else "no output")
        assert all(_running(pid) for pid in pids)  # guard: the sleepers were up
        p.send_signal(signal.SIGTERM)
        # the child still ends by SIGTERM (after stopping its processes), not by a normal exit
        assert p.wait(timeout=30) == -signal.SIGTERM, p.stderr.read()[-2000:]
        assert "not reached" not in p.stdout.read()
        deadline = time.time() + 10
        while time.time() < deadline and any(_running(pid) for pid in pids):
            time.sleep(0.1)
        assert not any(_running(pid) for pid in pids), "the federation's processes outlived it"
    finally:
        if p.poll() is None:
            p.kill()
        for pid in pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def test_sigterm_handler_is_installed_only_while_running_and_never_over_the_callers(tmp_path):
    res = subprocess.run([sys.executable, "-c", HANDLER_KEPT, str(tmp_path)], env=_env(),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "ok"

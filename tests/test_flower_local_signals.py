"""``LocalFederation`` stops its processes when its own process gets SIGTERM.

Its SuperLink and SuperNodes run in their own sessions, so the default SIGTERM action (die at once)
left them running: a test runner stopped from outside left ten Flower processes polling for half an
hour. Here a child Python process opens a ``LocalFederation`` whose ``start`` spawns two ``sleep``
processes the same way (``_spawn``: own session), prints their PIDs, and waits; the test sends it
SIGTERM and checks that it exits with status 143 and that both sleepers are gone. No Flower needed.
"""
from __future__ import annotations

import os
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

with Sleepers(2, workdir=sys.argv[1]) as fed:
    print(" ".join(str(p.pid) for p in fed.procs), flush=True)
    time.sleep(120)
"""

HANDLER_KEPT = r"""
import signal, sys
from zowarmup.flower.local import LocalFederation

def mine(signum, frame):
    pass

class Nothing(LocalFederation):
    def start(self, timeout=600.0):
        return self

signal.signal(signal.SIGTERM, mine)
with Nothing(1, workdir=sys.argv[1]):
    assert signal.getsignal(signal.SIGTERM) is mine   # the caller's handler is left in place
assert signal.getsignal(signal.SIGTERM) is mine
signal.signal(signal.SIGTERM, signal.SIG_DFL)
with Nothing(1, workdir=sys.argv[1]):
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # installed while it runs
assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL       # and restored after
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


@pytest.mark.skipif(not Path("/proc").is_dir() or sys.platform != "linux",
                    reason="checks the processes through Linux /proc")
def test_sigterm_to_the_parent_stops_the_federation_processes(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        pids = [int(x) for x in line.split()]
        assert len(pids) == 2, (line, p.stderr.read() if p.poll() is not None else "")
        assert all(_running(pid) for pid in pids)  # guard: the sleepers were up
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 143
        deadline = time.time() + 10
        while time.time() < deadline and any(_running(pid) for pid in pids):
            time.sleep(0.1)
        assert not any(_running(pid) for pid in pids), "the federation's processes outlived it"
    finally:
        if p.poll() is None:
            p.kill()
        for pid in locals().get("pids", []):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def test_sigterm_handler_is_installed_only_while_running_and_never_over_the_callers(tmp_path):
    res = subprocess.run([sys.executable, "-c", HANDLER_KEPT, str(tmp_path)], env=_env(),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "ok"

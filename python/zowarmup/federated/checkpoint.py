"""Atomic checkpoints and the run-folder files they pair with.

A checkpoint (``checkpoint.pt`` in the run folder) holds everything a run needs to continue
exactly: the next round, the global model state, the server state (FedAdam moments, the versions
clients hold, the seed log), the RNG states (torch CPU/CUDA, numpy, Python ``random``), the number
of metrics lines already written, and a hash of the resolved config (resuming with a different
config is refused).

Writes are atomic: the data goes to ``checkpoint.pt.tmp`` in the same folder, is flushed and
fsync'ed, the old ``checkpoint.pt`` is renamed to ``checkpoint.prev.pt`` and the new one renamed
into place, so a SIGKILL at any moment leaves a complete checkpoint (the new one, or the previous
one as ``checkpoint.prev.pt``), never a torn one.

The file is untrusted input when read back (a run folder can be copied, edited or damaged): it is
framed (:func:`zowarmup._safeio.frame`: magic, payload length, SHA-256 of the payload) and the
payload is a ``torch.save`` of tensors and plain Python only (numpy arrays stored as bytes), read
with ``torch.load(weights_only=True)``, so loading never runs code from the file. A file that is
empty, truncated, corrupted or malformed is refused with one line naming it, and
:func:`load_checkpoint` falls back to ``checkpoint.prev.pt`` when that one is good.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from pathlib import Path

import numpy as np
import torch

from .._safeio import (UnsafeFileError, frame, from_plain, is_framed, read_json_object,
                       read_jsonl, to_plain, torch_load_safe, torch_save_bytes, unframe)

log = logging.getLogger("zowarmup.federated")

CHECKPOINT = "checkpoint.pt"
#: The checkpoint that ``checkpoint.pt`` replaced (the fallback when ``checkpoint.pt`` is unusable).
PREVIOUS = "checkpoint.prev.pt"
#: The metrics file a checkpoint's ``next_round`` counts lines of (``loop.METRICS``).
METRICS_FILE = "metrics.jsonl"
FORMAT_VERSION = 2


#: Keys added after the first release, with the value that reproduces the old behaviour: at that
#: value they are left out of the hash, so run folders written before they existed still resume.
_ADDED_KEYS = {("zo", "exact"): False}


def config_hash(cfg_dict: dict) -> str:
    """SHA-256 of the canonical JSON of a resolved config (ignores the ``progress`` flag, and
    keys added later while they hold their old-behaviour value)."""
    d = {k: v for k, v in cfg_dict.items() if k not in ("progress",)}
    for (sec, key), legacy in _ADDED_KEYS.items():
        if isinstance(d.get(sec), dict) and key in d[sec] and d[sec][key] == legacy:
            d[sec] = {k: v for k, v in d[sec].items() if k != key}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def rng_state() -> dict:
    """The global RNG states (torch CPU and CUDA, numpy, Python random)."""
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
          "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _write_tmp(path: Path, data: bytes) -> Path:
    """``data`` written and fsynced to ``<path>.tmp`` (same folder, so a rename is atomic)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, os.replace)."""
    path = Path(path)
    os.replace(_write_tmp(path, data), path)
    _fsync_dir(path.parent)  # make the rename itself durable


def atomic_write_text(path: Path, text: str) -> None:
    """UTF-8 text version of :func:`atomic_write_bytes` (undecodable bytes read with
    ``errors="surrogateescape"`` are written back unchanged)."""
    atomic_write_bytes(path, text.encode("utf-8", "surrogateescape"))


def save_checkpoint(run_dir: Path, state: dict) -> None:
    """Serialize ``state`` (tensors, numpy arrays, plain Python) atomically, framed with its length
    and SHA-256 (see the module doc); the checkpoint it replaces is kept as ``checkpoint.prev.pt``."""
    payload = torch_save_bytes(to_plain({"format": FORMAT_VERSION, **state}))
    run_dir = Path(run_dir)
    p = run_dir / CHECKPOINT
    tmp = _write_tmp(p, frame(payload))
    if p.exists():  # keep the last good one: a later corruption of checkpoint.pt falls back to it
        os.replace(p, run_dir / PREVIOUS)
    os.replace(tmp, p)
    _fsync_dir(run_dir)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


class CheckpointError(UnsafeFileError):
    """A checkpoint file is unusable; ``str(e)`` is one line naming the file."""


def read_checkpoint_file(path: Path) -> dict:
    """One checkpoint file, verified and loaded without running code from it.

    Current files (format 2) are framed: the length and SHA-256 are checked before anything is
    parsed, then the payload is read with ``torch.load(weights_only=True)``. Files of format 1
    (unframed, before integrity checks existed) are read with ``weights_only=True`` plus the numpy
    globals that rebuild plain numeric arrays. Raises :class:`CheckpointError` naming the file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({e.strerror or e})") from None
    try:
        if is_framed(data):
            st = from_plain(torch_load_safe(unframe(data, path), path))
            want = FORMAT_VERSION
        elif data[:2] == b"PK":  # a bare torch.save zip: the format-1 layout
            st = torch_load_safe(data, path, legacy_numpy=True)
            want = 1
        elif not data:
            raise CheckpointError(f"{path}: the checkpoint is empty (0 bytes)")
        else:
            raise CheckpointError(f"{path}: not a zowarmup checkpoint (unknown header "
                                  f"{data[:8]!r}, {len(data)} bytes)")
    except CheckpointError:
        raise
    except (UnsafeFileError, ValueError) as e:
        raise CheckpointError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from None
    if not isinstance(st, dict) or st.get("format") != want:
        fmt = st.get("format") if isinstance(st, dict) else type(st).__name__
        raise CheckpointError(f"{path}: checkpoint format {fmt!r}, this build reads "
                              f"{FORMAT_VERSION} (and 1)")
    problem = _check_state(st)
    if problem:
        raise CheckpointError(f"{path}: invalid checkpoint: {problem}")
    return st


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_state(st: dict) -> str | None:
    """The first structural problem of a loaded checkpoint dict, or None."""
    need = {"next_round": "an integer >= 0", "model": "a dict of tensors",
            "server": "a dict", "rng": "a dict", "config_hash": "a hex string"}
    for k, what in need.items():
        if k not in st:
            return f"missing '{k}' ({what})"
    if not _is_int(st["next_round"]) or st["next_round"] < 0:
        return f"'next_round' must be an integer >= 0, got {st['next_round']!r}"
    m = st["model"]
    if not isinstance(m, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                          for k, v in m.items()):
        return "'model' must map parameter names to tensors"
    if not isinstance(st["server"], dict):
        return "'server' must be a dict"
    if not isinstance(st["config_hash"], str):
        return "'config_hash' must be a string"
    problem = _check_rng(st["rng"]) or _check_server(st["server"])
    if problem:
        return problem
    el = st.get("elapsed", 0.0)
    if isinstance(el, bool) or not isinstance(el, (int, float)):
        return f"'elapsed' must be a number, got {type(el).__name__}"
    return None


def _check_rng(rng) -> str | None:
    bad = "'rng' must hold the torch, numpy and python generator states"
    if not isinstance(rng, dict):
        return bad
    t, n, p = rng.get("torch"), rng.get("numpy"), rng.get("python")
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1 \
            or t.numel() != torch.get_rng_state().numel():
        return bad + " (torch: a uint8 tensor of the generator's size)"
    if not (isinstance(n, tuple) and len(n) == 5 and n[0] == "MT19937"
            and isinstance(n[1], np.ndarray) and n[1].dtype == np.uint32 and n[1].shape == (624,)
            and all(_is_int(v) for v in n[2:4]) and 0 <= n[2] <= 624
            and isinstance(n[4], float)):
        return bad + " (numpy: an MT19937 state)"
    if not (isinstance(p, tuple) and len(p) == 3 and _is_int(p[0]) and isinstance(p[1], tuple)
            and len(p[1]) == 625 and all(_is_int(v) and 0 <= v < 2 ** 32 for v in p[1])
            and (p[2] is None or isinstance(p[2], float))):
        return bad + " (python: a random.getstate() tuple)"
    if "cuda" in rng and not (isinstance(rng["cuda"], list)
                              and all(isinstance(x, torch.Tensor) for x in rng["cuda"])):
        return bad + " (cuda: a list of tensors)"
    return None


def _check_server(sv: dict) -> str | None:
    for k in ("held", "rejected", "registered"):
        if k in sv and not (isinstance(sv[k], np.ndarray) and sv[k].dtype.kind in "iu"
                            and sv[k].ndim == 1):
            return f"'server.{k}' must be a 1-D integer array"
    if "held" not in sv or "log" not in sv:
        return "'server' lacks 'held' or 'log'"
    if not isinstance(sv["log"], dict) or not all(
            _is_int(r) and (b is None or isinstance(b, bytes)) for r, b in sv["log"].items()):
        return "'server.log' must map rounds to serialized broadcasts or None"
    for k in ("adam_warmup", "adam_zo"):
        a = sv.get(k)
        if a is None:
            continue
        if not (isinstance(a, dict) and _is_int(a.get("steps"))
                and all(isinstance(a.get(m), list)
                        and all(isinstance(t, torch.Tensor) for t in a[m]) for m in ("m", "v"))):
            return f"'server.{k}' must hold lists of tensors 'm', 'v' and an integer 'steps'"
    if "rejections" in sv and not isinstance(sv["rejections"], list):
        return "'server.rejections' must be a list"
    return None


def _complete_lines(path: Path) -> int:
    try:
        return sum(1 for ln in path.read_bytes().splitlines(keepends=True) if ln.endswith(b"\n"))
    except OSError:
        return 0


def read_summary(path: Path) -> dict | None:
    """A finished run's ``summary.json``, or None (with a warning naming it) when it is missing or
    unreadable, so that the caller rebuilds it from the run folder instead of failing."""
    if not Path(path).exists():
        return None
    try:
        return read_json_object(path, ("final_accuracy",), "run summary")
    except UnsafeFileError as e:
        log.warning("%s; rebuilding it", e)
        return None


def load_checkpoint(run_dir: Path) -> dict | None:
    """The newest usable checkpoint in ``run_dir``, or None when there is none.

    ``checkpoint.pt`` is tried first; when it is missing, truncated, corrupted (integrity check) or
    malformed, or ``metrics.jsonl`` lacks lines it counts on, and ``checkpoint.prev.pt`` (the one it
    replaced) is usable, that one is returned and a warning names the bad file. When neither is usable, :class:`CheckpointError` names
    ``checkpoint.pt`` and the problem. No code from either file runs.
    """
    run_dir = Path(run_dir)
    p, prev = run_dir / CHECKPOINT, run_dir / PREVIOUS
    if not p.exists() and not prev.exists():
        return None
    first = None
    if p.exists():
        try:
            st = read_checkpoint_file(p)
        except CheckpointError as e:
            first = e
        else:
            lines = _complete_lines(run_dir / METRICS_FILE)
            if lines >= st["next_round"] or not prev.exists():
                return st
            # metrics.jsonl lost lines the newest checkpoint counts on: the previous one may fit
            try:
                older = read_checkpoint_file(prev)
            except CheckpointError:
                return st
            if lines >= older["next_round"]:
                log.warning("%s has %d complete lines, %s needs %d; resuming from the previous "
                            "checkpoint %s (round %d)", run_dir / METRICS_FILE, lines, p,
                            st["next_round"], prev, older["next_round"])
                return older
            return st
    if prev.exists():
        try:
            st = read_checkpoint_file(prev)
        except CheckpointError as e:
            if first is None:
                raise
            raise CheckpointError(f"{first} (and the previous checkpoint is unusable too: "
                                  f"{e})") from None
        why = first if first is not None else f"{p} is missing"
        log.warning("%s; resuming from the previous checkpoint %s (round %d)", why, prev,
                    st["next_round"])
        return st
    raise first


# ------------------------------------------------------------------------------------------------
# metrics.jsonl
# ------------------------------------------------------------------------------------------------
def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def metrics_record_problem(rec: dict) -> str | None:
    """Why a ``metrics.jsonl`` record cannot be used by the summary, or None when it can."""
    if not _is_int(rec.get("round")) or rec["round"] < 0:
        return f"'round' must be an integer >= 0, got {rec.get('round')!r}"
    if not isinstance(rec.get("phase"), str):
        return f"'phase' must be a string, got {rec.get('phase')!r}"
    for k in ("accuracy", "loss"):
        if rec.get(k) is not None and not _num(rec[k]):
            return f"'{k}' must be a number or null, got {rec[k]!r}"
    for k in ("dropped", "bytes_up_per_client", "bytes_down_per_client", "bytes_up_total",
              "bytes_down_total"):
        if k in rec and not _num(rec[k]):
            return f"'{k}' must be a number, got {rec[k]!r}"
    return None


def read_metrics_file(path: Path) -> list[dict]:
    """The usable records of a ``metrics.jsonl`` (complete lines only). A line that is not valid
    JSON or not a usable record is skipped with a warning naming the file and the line, so one
    damaged line never makes a run unfinishable."""
    recs, bad = read_jsonl(path, metrics_record_problem)
    for b in bad:
        log.warning("skipping an unusable metrics line: %s", b)
    return recs

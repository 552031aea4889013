"""Atomic checkpoints and the run-folder files they pair with.

A checkpoint (``checkpoint.pt`` in the run folder) holds everything a run needs to continue
exactly: the next round, the global model state, the server state (FedAdam moments, the versions
clients hold, the seed log), the RNG states (torch CPU/CUDA, numpy, Python ``random``), the number
of metrics lines already written, and a hash of the resolved config (resuming with a different
config is refused).

Writes are atomic: the data goes to ``checkpoint.pt.tmp`` in the same folder, is flushed and
fsync'ed, then ``os.replace`` renames it over the old file, so a SIGKILL at any moment leaves either
the previous or the new checkpoint, never a torn one.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
from pathlib import Path

import numpy as np
import torch

CHECKPOINT = "checkpoint.pt"
FORMAT_VERSION = 1


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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, os.replace)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write_text(path: Path, text: str) -> None:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode())


def save_checkpoint(run_dir: Path, state: dict) -> None:
    """Serialize ``state`` (tensors, numpy arrays, plain Python) with ``torch.save``, atomically."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT_VERSION, **state}, buf)
    atomic_write_bytes(Path(run_dir) / CHECKPOINT, buf.getvalue())


def load_checkpoint(run_dir: Path) -> dict | None:
    """The checkpoint in ``run_dir``, or None when there is none. ValueError on a foreign format."""
    p = Path(run_dir) / CHECKPOINT
    if not p.exists():
        return None
    st = torch.load(p, map_location="cpu", weights_only=False)
    if st.get("format") != FORMAT_VERSION:
        raise ValueError(f"{p}: checkpoint format {st.get('format')!r}, this build reads "
                         f"{FORMAT_VERSION}")
    return st

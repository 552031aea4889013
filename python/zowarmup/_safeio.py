"""Reading files the project did not just write itself: no code from them, integrity, clear errors.

Everything here treats its input as untrusted (see docs/DESIGN.md, "Trust boundaries"):

- :func:`frame` / :func:`unframe`: a payload behind a small header (magic, length, SHA-256). A
  truncated, padded or bit-flipped file is refused by :func:`unframe` with an error naming the
  file, before any byte of the payload is parsed.
- :func:`to_plain` / :func:`from_plain`: numpy arrays as tagged ``(bytes, dtype, shape)`` dicts, so
  that a state holding them pickles into something ``torch.load(weights_only=True)`` reads (only
  tensors, containers, numbers, strings and bytes; no globals, so no code can run).
- :func:`torch_load_safe`: ``torch.load(weights_only=True)`` from bytes, every failure one
  :class:`UnsafeFileError` line naming the file.
- :func:`run_lock`: an exclusive, non-blocking ``flock`` on ``<folder>/.zowarmup.lock``, so two
  processes never write one run folder at once (released when the process dies, even by SIGKILL).
- :func:`read_jsonl`: the valid records of a JSON-lines file, plus the numbers and reasons of the
  lines that were not.
- :func:`read_json_object`: a JSON object file with required keys, or a one-line error naming the
  file and the key.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import struct
from pathlib import Path

import numpy as np

#: Header of a framed file: 8-byte magic, uint64 payload length, 32-byte SHA-256 of the payload.
FRAME_MAGIC = b"ZWFRAME1"
_FRAME = struct.Struct("<8sQ32s")
FRAME_HEADER_BYTES = _FRAME.size  # 48
LOCK_NAME = ".zowarmup.lock"
_ND = "__ndarray__"


class UnsafeFileError(ValueError):
    """A file is missing, truncated, corrupted or not in the expected format. ``str(e)`` is one
    line naming the file and the problem."""


class FolderBusyError(RuntimeError):
    """Another process holds a run folder's lock."""


# ------------------------------------------------------------------------------------------------
# integrity frame
# ------------------------------------------------------------------------------------------------
def frame(payload: bytes) -> bytes:
    """``payload`` behind a header holding its length and SHA-256."""
    payload = bytes(payload)
    return _FRAME.pack(FRAME_MAGIC, len(payload), hashlib.sha256(payload).digest()) + payload


def is_framed(data: bytes) -> bool:
    """Whether ``data`` starts with the frame magic (it may still be truncated or corrupted)."""
    return bytes(data[:len(FRAME_MAGIC)]) == FRAME_MAGIC


def unframe(data: bytes, path) -> bytes:
    """The payload of a framed file's bytes ``data``; :class:`UnsafeFileError` naming ``path`` when
    the header is missing, the length differs (truncated or padded) or the SHA-256 does not match."""
    if len(data) == 0:
        raise UnsafeFileError(f"{path}: the file is empty")
    if len(data) < FRAME_HEADER_BYTES or not is_framed(data):
        raise UnsafeFileError(f"{path}: not a zowarmup file (bad or truncated header, "
                              f"{len(data)} bytes)")
    _, n, digest = _FRAME.unpack_from(data, 0)
    have = len(data) - FRAME_HEADER_BYTES
    if have != n:
        raise UnsafeFileError(f"{path}: {'truncated' if have < n else 'trailing bytes'}: the header "
                              f"says {n} payload bytes, the file holds {have}")
    payload = bytes(data[FRAME_HEADER_BYTES:])
    if hashlib.sha256(payload).digest() != digest:
        raise UnsafeFileError(f"{path}: integrity check failed (the SHA-256 of the payload differs "
                              "from the one stored): the file is corrupted")
    return payload


# ------------------------------------------------------------------------------------------------
# code-free pickling
# ------------------------------------------------------------------------------------------------
def to_plain(obj):
    """``obj`` with every numpy array (and numpy scalar) replaced by plain data that
    ``torch.load(weights_only=True)`` accepts; inverse: :func:`from_plain`."""
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError("to_plain: object arrays cannot be stored without code")
        a = np.ascontiguousarray(obj)
        return {_ND: a.tobytes(), "dtype": a.dtype.str, "shape": list(a.shape)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(to_plain(v) for v in obj)
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
    return obj


def from_plain(obj):
    """Inverse of :func:`to_plain`. ValueError for a malformed array entry."""
    if isinstance(obj, dict):
        if _ND in obj:
            raw, dt, shape = obj.get(_ND), obj.get("dtype"), obj.get("shape")
            if not isinstance(raw, bytes) or not isinstance(dt, str) or not isinstance(shape, list) \
                    or not all(isinstance(s, int) and s >= 0 for s in shape):
                raise ValueError("malformed array entry")
            try:
                dtype = np.dtype(dt)
            except TypeError:
                raise ValueError(f"unknown array dtype {dt!r}") from None
            if dtype.hasobject or dtype.itemsize == 0:
                raise ValueError(f"array dtype {dt!r} is not allowed")
            if int(np.prod(shape, dtype=object)) * dtype.itemsize != len(raw):
                raise ValueError(f"array of shape {shape} and dtype {dt} does not match its "
                                 f"{len(raw)} bytes")
            return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
        return {k: from_plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(from_plain(v) for v in obj)
    if isinstance(obj, list):
        return [from_plain(v) for v in obj]
    return obj


def torch_save_bytes(obj) -> bytes:
    """``torch.save(obj)`` into bytes."""
    import torch
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def torch_load_safe(data: bytes, path, legacy_numpy: bool = False):
    """``torch.load(weights_only=True)`` of ``data`` (CPU); every failure is one
    :class:`UnsafeFileError` line naming ``path``. ``legacy_numpy`` also admits the three numpy
    globals that rebuild plain numeric arrays (files written before :func:`to_plain` existed);
    object arrays stay refused, and no other global is allowed."""
    import pickle

    import torch
    ctx = contextlib.nullcontext()
    if legacy_numpy:
        try:
            from numpy._core.multiarray import _reconstruct
        except ImportError:  # numpy < 2
            from numpy.core.multiarray import _reconstruct
        ctx = torch.serialization.safe_globals(
            [_reconstruct, np.ndarray, np.dtype] + [type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFD"])
    import warnings
    try:
        with ctx, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": we refuse anyway
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        code = [ln for ln in lines if "GLOBAL" in ln or "global" in ln.lower().split("weights")[0]]
        if code:
            raise UnsafeFileError(f"{path}: refused: the file holds objects beyond tensors and "
                                  f"plain data (loading it could run code): {code[0][:200]}") from None
        detail = [ln for ln in lines if not ln.startswith(("Weights only load failed", "Please file",
                                                           "Check the documentation"))]
        why = (detail[0] if detail else lines[0] if lines else "unpickling failed")
        raise UnsafeFileError(f"{path}: not a readable checkpoint ({why[:200]})") from None
    except Exception as e:  # zip/pickle/EOF/runtime errors from a damaged file
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UnsafeFileError(f"{path}: not a readable checkpoint ({type(e).__name__}: "
                              f"{msg[:200]})") from None


# ------------------------------------------------------------------------------------------------
# folder lock
# ------------------------------------------------------------------------------------------------
class _Lock:
    def __init__(self, fd, path: Path):
        self.fd, self.path = fd, path

    def release(self) -> None:
        if self.fd is not None:
            try:
                import fcntl
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            except (ImportError, OSError):
                pass
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False


def run_lock(folder) -> _Lock:
    """Take the exclusive lock of ``folder`` (created if missing) or raise :class:`FolderBusyError`
    naming it and the holder's pid. Use as a context manager or call ``release()``. Without
    ``fcntl`` (Windows) it is a no-op."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / LOCK_NAME
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return _Lock(None, p)
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            # a file system without locks (ENOLCK, EOPNOTSUPP): run unlocked, as before locks existed
            os.close(fd)
            return _Lock(None, p)
        try:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
        except OSError:
            holder = "?"
        os.close(fd)
        raise FolderBusyError(f"{folder} is in use by another zowarmup process (pid {holder}); "
                              "wait for it to finish or stop it first") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass
    return _Lock(fd, p)


def holds_run_lock(method):
    """Decorator for a method of an object with ``run_dir``: the call holds :func:`run_lock` on it."""
    import functools

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with run_lock(self.run_dir):
            return method(self, *args, **kwargs)
    return wrapper


# ------------------------------------------------------------------------------------------------
# JSON files
# ------------------------------------------------------------------------------------------------
def read_jsonl(path, check=None) -> tuple[list[dict], list[str]]:
    """The records of a JSON-lines file and the problems found.

    Only complete lines (ending in a newline) count. A line that is not valid UTF-8 / JSON, not a
    JSON object, or that ``check(record)`` refuses (it returns a reason string, or None when fine)
    is skipped and reported as ``"<path>:<line>: <reason>"``. A missing file gives ``([], [])``.
    """
    p = Path(path)
    if not p.exists():
        return [], []
    recs, bad = [], []
    raw = p.read_bytes()
    for i, ln in enumerate(raw.splitlines(keepends=True), 1):
        if not ln.endswith(b"\n"):
            continue
        try:
            rec = json.loads(ln.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            bad.append(f"{p}:{i}: not valid JSON ({e})")
            continue
        if not isinstance(rec, dict):
            bad.append(f"{p}:{i}: not a JSON object")
            continue
        why = check(rec) if check else None
        if why:
            bad.append(f"{p}:{i}: {why}")
            continue
        recs.append(rec)
    return recs, bad


def read_json_object(path, required=(), what: str = "file") -> dict:
    """A JSON object from ``path`` with every key in ``required`` (dotted for nested keys, e.g.
    ``"data.name"``); :class:`UnsafeFileError` naming the file and the problem otherwise."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise UnsafeFileError(f"{p}: {what} not found") from None
    except OSError as e:
        raise UnsafeFileError(f"{p}: cannot read the {what} ({e.strerror or e})") from None
    try:
        d = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UnsafeFileError(f"{p}: the {what} is not UTF-8 text (byte {e.start})") from None
    except ValueError as e:
        raise UnsafeFileError(f"{p}: the {what} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise UnsafeFileError(f"{p}: the {what} must be a JSON object, got {type(d).__name__}")
    for key in required:
        cur = d
        for part in key.split("."):
            if not isinstance(cur, dict) or part not in cur:
                raise UnsafeFileError(f"{p}: the {what} lacks '{key}'")
            cur = cur[part]
    return d

"""The messages of the federated protocol and their compact binary serialization.

Every message is what actually crosses the network; the embedded runner passes the serialized bytes
between server and clients (and decodes them on the other side), and the accounting counts
``len(msg.to_bytes())``. Layout, all little-endian:

===============  ===========================================================================
header (8 B)     ``b"ZW"`` magic, uint8 version (1), uint8 type, uint32 round
WeightsMessage   header, uint32 num_samples, uint64 n, float32[n] (model state, state_dict order)
SeedsMessage     header, uint16 steps, uint32 count, uint64[count] (``count = steps * S``)
GradsMessage     header, uint32 num_samples, uint32 count, float32[count] (projected gradients)
BroadcastMessage header, uint32 count, uint64[count] seeds, float32[count] coefficients
ReplayMessage    header, uint32 count, then ``count`` BroadcastMessages back to back
KSeedTask        header, uint16 steps (FedKSeed; the seed pool is fixed when the federation starts)
KSeedUpdate      header, uint32 num_samples, uint32 count, uint32[count] pool indices, float32[count]
===============  ===========================================================================

So a ZO round with S seeds costs a client ``8 + 6 + 8 S`` bytes down for the seeds and
``8 + 8 + 4 S`` bytes up (S = 20: 174 B down, 96 B up), plus the round's broadcast
``8 + 4 + 12 K`` bytes for K (seed, coeff) entries. ``num_samples`` (the client's n_i, used for
the sample-count weighting) rides in the upload header, 4 bytes, as in FedAvg.

Decoding validates magic, version, type and length and raises ``ValueError`` naming the problem.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

MAGIC = b"ZW"
VERSION = 1
_HEADER = struct.Struct("<2sBBI")
HEADER_BYTES = _HEADER.size  # 8


class MsgType(IntEnum):
    """Message type codes (the header's type byte)."""
    WEIGHTS = 1
    SEEDS = 2
    GRADS = 3
    BROADCAST = 4
    REPLAY = 5
    KSEED_TASK = 6
    KSEED_UPDATE = 7


def _header(t: MsgType, round_idx: int) -> bytes:
    if not 0 <= int(round_idx) < 2 ** 32:
        raise ValueError(f"round {round_idx} does not fit the uint32 header field")
    return _HEADER.pack(MAGIC, VERSION, int(t), int(round_idx))


def _read_header(buf: bytes, want: MsgType | None = None) -> tuple[MsgType, int]:
    if len(buf) < HEADER_BYTES:
        raise ValueError(f"message too short: {len(buf)} bytes, a header alone is {HEADER_BYTES}")
    magic, ver, t, rnd = _HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise ValueError(f"bad magic {magic!r}; expected {MAGIC!r} (not a zowarmup message)")
    if ver != VERSION:
        raise ValueError(f"unsupported message version {ver}; this build reads version {VERSION}")
    try:
        t = MsgType(t)
    except ValueError:
        raise ValueError(f"unknown message type {t}; known: "
                         f"{', '.join(f'{m.value}={m.name}' for m in MsgType)}") from None
    if want is not None and t != want:
        raise ValueError(f"expected a {want.name} message, got {t.name}")
    return t, rnd


def _array(buf: bytes, off: int, dtype: str, n: int, what: str) -> tuple[np.ndarray, int]:
    size = np.dtype(dtype).itemsize * n
    if off + size > len(buf):
        raise ValueError(f"truncated message: {what} needs {size} bytes at offset {off}, "
                         f"only {len(buf) - off} left")
    return np.frombuffer(buf, dtype=dtype, count=n, offset=off).copy(), off + size


def _check_end(buf: bytes, off: int, name: str) -> None:
    if off != len(buf):
        raise ValueError(f"{name}: {len(buf) - off} trailing bytes after the message")


def _u64(seeds) -> np.ndarray:
    a = np.asarray([int(s) for s in seeds] if not isinstance(seeds, np.ndarray) else seeds,
                   dtype=np.uint64).reshape(-1)
    return a


def _f32(values) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(values, dtype=np.float32).reshape(-1))


@dataclass
class WeightsMessage:
    """Model state (float32, flattened in ``state_dict`` order), server -> client or client -> server.

    Attributes:
        round: round index.
        values: float32 array, shape (n,): every state tensor flattened and concatenated.
        num_samples: the sender's local sample count n_i (0 from the server).
    """
    round: int
    values: np.ndarray
    num_samples: int = 0
    TYPE = MsgType.WEIGHTS

    def to_bytes(self) -> bytes:
        """Serialized form (header + uint32 num_samples + uint64 n + float32[n])."""
        v = _f32(self.values)
        return (_header(self.TYPE, self.round) + struct.pack("<IQ", self.num_samples, v.size)
                + v.astype("<f4", copy=False).tobytes())

    @classmethod
    def from_bytes(cls, buf: bytes) -> "WeightsMessage":
        """Inverse of :meth:`to_bytes`; ValueError on a malformed buffer."""
        _, rnd = _read_header(buf, cls.TYPE)
        if len(buf) < HEADER_BYTES + 12:
            raise ValueError("truncated WEIGHTS message")
        ns, n = struct.unpack_from("<IQ", buf, HEADER_BYTES)
        vals, off = _array(buf, HEADER_BYTES + 12, "<f4", n, "weights")
        _check_end(buf, off, "WEIGHTS")
        return cls(rnd, vals.astype(np.float32), ns)


@dataclass
class SeedsMessage:
    """Server -> sampled client in a ZO round: the seeds to probe.

    Attributes:
        round: round index.
        seeds: uint64 array, shape (steps * S,); local step k uses ``seeds[k*S:(k+1)*S]``.
        steps: local ZO steps (1 in the paper's method).
    """
    round: int
    seeds: np.ndarray
    steps: int = 1
    TYPE = MsgType.SEEDS

    def __post_init__(self):
        self.seeds = _u64(self.seeds)

    @property
    def per_step(self) -> int:
        """S, seeds per local step."""
        return self.seeds.size // max(self.steps, 1)

    def to_bytes(self) -> bytes:
        """Serialized form (header + uint16 steps + uint32 count + uint64[count])."""
        if self.steps < 1 or self.seeds.size % self.steps:
            raise ValueError(f"SeedsMessage: {self.seeds.size} seeds do not split into "
                             f"{self.steps} equal steps")
        return (_header(self.TYPE, self.round) + struct.pack("<HI", self.steps, self.seeds.size)
                + self.seeds.astype("<u8", copy=False).tobytes())

    @classmethod
    def from_bytes(cls, buf: bytes) -> "SeedsMessage":
        """Inverse of :meth:`to_bytes`; ValueError on a malformed buffer."""
        _, rnd = _read_header(buf, cls.TYPE)
        if len(buf) < HEADER_BYTES + 6:
            raise ValueError("truncated SEEDS message")
        steps, n = struct.unpack_from("<HI", buf, HEADER_BYTES)
        seeds, off = _array(buf, HEADER_BYTES + 6, "<u8", n, "seeds")
        _check_end(buf, off, "SEEDS")
        return cls(rnd, seeds.astype(np.uint64), steps)


@dataclass
class GradsMessage:
    """Client -> server in a ZO round: one float32 projected gradient per seed received.

    Attributes:
        round: round index.
        values: float32 array, shape (steps * S,), ``g = (L+ - L-) / (2 eps)`` in seed order.
        num_samples: the client's n_i (for the sample-count weighting).
    """
    round: int
    values: np.ndarray
    num_samples: int = 0
    TYPE = MsgType.GRADS

    def __post_init__(self):
        self.values = _f32(self.values)

    def to_bytes(self) -> bytes:
        """Serialized form (header + uint32 num_samples + uint32 count + float32[count])."""
        return (_header(self.TYPE, self.round) + struct.pack("<II", self.num_samples, self.values.size)
                + self.values.astype("<f4", copy=False).tobytes())

    @classmethod
    def from_bytes(cls, buf: bytes) -> "GradsMessage":
        """Inverse of :meth:`to_bytes`; ValueError on a malformed buffer."""
        _, rnd = _read_header(buf, cls.TYPE)
        if len(buf) < HEADER_BYTES + 8:
            raise ValueError("truncated GRADS message")
        ns, n = struct.unpack_from("<II", buf, HEADER_BYTES)
        vals, off = _array(buf, HEADER_BYTES + 8, "<f4", n, "projected gradients")
        _check_end(buf, off, "GRADS")
        return cls(rnd, vals.astype(np.float32), ns)


@dataclass
class BroadcastMessage:
    """Server -> all clients after a ZO round: the (seed, coeff) list everyone applies with
    ``zo_kernels.apply_seeds_(params, seeds, coeffs)`` (params in ``model.parameters()`` order).

    Attributes:
        round: round index.
        seeds: uint64 array, shape (K,).
        coeffs: float32 array, shape (K,); already include learning rates, scale and weights.
    """
    round: int
    seeds: np.ndarray
    coeffs: np.ndarray
    TYPE = MsgType.BROADCAST

    def __post_init__(self):
        self.seeds = _u64(self.seeds)
        self.coeffs = _f32(self.coeffs)
        if self.seeds.size != self.coeffs.size:
            raise ValueError(f"BroadcastMessage: {self.seeds.size} seeds but "
                             f"{self.coeffs.size} coefficients")

    def to_bytes(self) -> bytes:
        """Serialized form (header + uint32 count + uint64[count] + float32[count])."""
        return (_header(self.TYPE, self.round) + struct.pack("<I", self.seeds.size)
                + self.seeds.astype("<u8", copy=False).tobytes()
                + self.coeffs.astype("<f4", copy=False).tobytes())

    @classmethod
    def _decode_at(cls, buf: bytes, start: int) -> tuple["BroadcastMessage", int]:
        _, rnd = _read_header(buf[start:start + HEADER_BYTES], cls.TYPE)
        if len(buf) < start + HEADER_BYTES + 4:
            raise ValueError("truncated BROADCAST message")
        (n,) = struct.unpack_from("<I", buf, start + HEADER_BYTES)
        seeds, off = _array(buf, start + HEADER_BYTES + 4, "<u8", n, "seeds")
        coeffs, off = _array(buf, off, "<f4", n, "coefficients")
        return cls(rnd, seeds.astype(np.uint64), coeffs.astype(np.float32)), off

    @classmethod
    def from_bytes(cls, buf: bytes) -> "BroadcastMessage":
        """Inverse of :meth:`to_bytes`; ValueError on a malformed buffer."""
        msg, off = cls._decode_at(buf, 0)
        _check_end(buf, off, "BROADCAST")
        return msg


@dataclass
class ReplayMessage:
    """Server -> a client that missed rounds: the seed log of those rounds, to apply in order.

    Attributes:
        round: the round the client is catching up to.
        entries: BroadcastMessages of the missed rounds, oldest first.
    """
    round: int
    entries: list = field(default_factory=list)
    TYPE = MsgType.REPLAY

    def to_bytes(self) -> bytes:
        """Serialized form (header + uint32 count + the broadcasts back to back)."""
        return (_header(self.TYPE, self.round) + struct.pack("<I", len(self.entries))
                + b"".join(e.to_bytes() for e in self.entries))

    @classmethod
    def from_bytes(cls, buf: bytes) -> "ReplayMessage":
        """Inverse of :meth:`to_bytes`; ValueError on a malformed buffer."""
        _, rnd = _read_header(buf, cls.TYPE)
        if len(buf) < HEADER_BYTES + 4:
            raise ValueError("truncated REPLAY message")
        (n,) = struct.unpack_from("<I", buf, HEADER_BYTES)
        off, entries = HEADER_BYTES + 4, []
        for _ in range(n):
            e, off = BroadcastMessage._decode_at(buf, off)
            entries.append(e)
        _check_end(buf, off, "REPLAY")
        return cls(rnd, entries)


@dataclass
class KSeedTask:
    """Server -> sampled client in a FedKSeed round: run ``steps`` local ZO steps.

    The pool of K seeds is fixed when the federation starts (derived from the run seed), so the
    per-round downlink carries no seeds.
    """
    round: int
    steps: int
    TYPE = MsgType.KSEED_TASK

    def to_bytes(self) -> bytes:
        """Serialized form (header + uint16 steps)."""
        return _header(self.TYPE, self.round) + struct.pack("<H", self.steps)

    @classmethod
    def from_bytes(cls, buf: bytes) -> "KSeedTask":
        """Inverse of :meth:`to_bytes`; ValueError on a malformed buffer."""
        _, rnd = _read_header(buf, cls.TYPE)
        if len(buf) != HEADER_BYTES + 2:
            raise ValueError(f"KSEED_TASK message must be {HEADER_BYTES + 2} bytes, got {len(buf)}")
        (steps,) = struct.unpack_from("<H", buf, HEADER_BYTES)
        return cls(rnd, steps)


@dataclass
class KSeedUpdate:
    """Client -> server in a FedKSeed round: accumulated projected gradient per pool seed used.

    Attributes:
        round: round index.
        indices: uint32 array, shape (m,), distinct pool indices in increasing order.
        values: float32 array, shape (m,), the sum of the client's g for that seed.
        num_samples: the client's n_i.
    """
    round: int
    indices: np.ndarray
    values: np.ndarray
    num_samples: int = 0
    TYPE = MsgType.KSEED_UPDATE

    def __post_init__(self):
        self.indices = np.asarray(self.indices, dtype=np.uint32).reshape(-1)
        self.values = _f32(self.values)
        if self.indices.size != self.values.size:
            raise ValueError(f"KSeedUpdate: {self.indices.size} indices but {self.values.size} values")

    def to_bytes(self) -> bytes:
        """Serialized form (header + uint32 num_samples + uint32 m + uint32[m] + float32[m])."""
        return (_header(self.TYPE, self.round) + struct.pack("<II", self.num_samples, self.indices.size)
                + self.indices.astype("<u4", copy=False).tobytes()
                + self.values.astype("<f4", copy=False).tobytes())

    @classmethod
    def from_bytes(cls, buf: bytes) -> "KSeedUpdate":
        """Inverse of :meth:`to_bytes`; ValueError on a malformed buffer."""
        _, rnd = _read_header(buf, cls.TYPE)
        if len(buf) < HEADER_BYTES + 8:
            raise ValueError("truncated KSEED_UPDATE message")
        ns, n = struct.unpack_from("<II", buf, HEADER_BYTES)
        idx, off = _array(buf, HEADER_BYTES + 8, "<u4", n, "indices")
        vals, off = _array(buf, off, "<f4", n, "values")
        _check_end(buf, off, "KSEED_UPDATE")
        return cls(rnd, idx.astype(np.uint32), vals.astype(np.float32), ns)


_CLASSES = {c.TYPE: c for c in (WeightsMessage, SeedsMessage, GradsMessage, BroadcastMessage,
                                 ReplayMessage, KSeedTask, KSeedUpdate)}


def decode(buf: bytes):
    """Decode any message by its header's type byte; ValueError on a malformed buffer."""
    t, _ = _read_header(bytes(buf[:HEADER_BYTES]))
    return _CLASSES[t].from_bytes(bytes(buf))


def encode(msg) -> bytes:
    """``msg.to_bytes()`` (for symmetry with :func:`decode`)."""
    return msg.to_bytes()

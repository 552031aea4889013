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
StatusMessage    header, uint8 code, int64 version, uint16 len, utf-8 reason[len] (client -> server)
SubModelTask     header, float32 rate, uint64 n, float32[n] (HeteroFL: the width-``rate`` slice)
SubModelUpdate   header, uint32 num_samples, uint16 K, uint8[ceil(K/8)] label bits, uint64 n,
                 float32[n] (HeteroFL: the trained slice and the classes the client holds)
StatsRequest     header, uint64 n, float32[n] (the global state to compute BatchNorm statistics under)
StatsMessage     header, uint32 num_samples, uint64 n, float32[n] (BatchNorm statistics)
===============  ===========================================================================

Checksums (exact agreement, docs/DESIGN.md, "Catch-up and exactness rules"): any message may carry a uint32 checksum of the
sender's model state (:func:`.state.state_checksum`, CRC-32 of the raw state bytes). It is flagged
by the high bit of the type byte (``type | 0x80``) and sits right after the 8-byte header, so a
message with a checksum is 4 bytes longer and a message without one is byte-for-byte the version-1
layout above. What it certifies depends on the message: a SeedsMessage carries the server's state
at the round's start (the version the client must hold before probing), a GradsMessage the state
the client probed, a WeightsMessage the state it holds, a BroadcastMessage the server's state after
applying it, a StatusMessage the client's current state.

So a ZO round with S seeds costs a client ``8 + 6 + 8 S`` bytes down for the seeds and
``8 + 8 + 4 S`` bytes up (S = 20: 174 B down, 96 B up), plus the round's broadcast
``8 + 4 + 12 K`` bytes for K (seed, coeff) entries. ``num_samples`` (the client's n_i, used for
the sample-count weighting) rides in the upload header, 4 bytes, as in FedAvg.

Decoding validates magic, version, type and length and raises ``ValueError`` naming the problem;
:mod:`.validation` checks the decoded content (counts, ranges, rounds, finiteness) before anything
touches state.
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
#: Type-byte flag: a uint32 checksum of the sender's state follows the header.
CHECKSUM_FLAG = 0x80
CHECKSUM_BYTES = 4
_CK = struct.Struct("<I")


class MsgType(IntEnum):
    """Message type codes (the header's type byte)."""
    WEIGHTS = 1
    SEEDS = 2
    GRADS = 3
    BROADCAST = 4
    REPLAY = 5
    KSEED_TASK = 6
    KSEED_UPDATE = 7
    STATUS = 8
    SUBMODEL = 9
    SUBMODEL_UPDATE = 10
    STATS_REQUEST = 11
    STATS = 12


def _header(t: MsgType, round_idx: int, checksum: int | None = None) -> bytes:
    if not 0 <= int(round_idx) < 2 ** 32:
        raise ValueError(f"round {round_idx} does not fit the uint32 header field")
    if checksum is None:
        return _HEADER.pack(MAGIC, VERSION, int(t), int(round_idx))
    if not 0 <= int(checksum) < 2 ** 32:
        raise ValueError(f"checksum {checksum} does not fit uint32")
    return _HEADER.pack(MAGIC, VERSION, int(t) | CHECKSUM_FLAG, int(round_idx)) + _CK.pack(int(checksum))


def _read_header(buf: bytes, want: MsgType | None = None, start: int = 0
                 ) -> tuple[MsgType, int, int | None, int]:
    """(type, round, checksum or None, offset of the body) of the message starting at ``start``."""
    if len(buf) < start + HEADER_BYTES:
        raise ValueError(f"message too short: {len(buf) - start} bytes, a header alone is "
                         f"{HEADER_BYTES}")
    magic, ver, t, rnd = _HEADER.unpack_from(buf, start)
    if magic != MAGIC:
        raise ValueError(f"bad magic {magic!r}; expected {MAGIC!r} (not a zowarmup message)")
    if ver != VERSION:
        raise ValueError(f"unsupported message version {ver}; this build reads version {VERSION}")
    has_ck = bool(t & CHECKSUM_FLAG)
    t &= ~CHECKSUM_FLAG & 0xFF
    try:
        t = MsgType(t)
    except ValueError:
        raise ValueError(f"unknown message type {t}; known: "
                         f"{', '.join(f'{m.value}={m.name}' for m in MsgType)}") from None
    if want is not None and t != want:
        raise ValueError(f"expected a {want.name} message, got {t.name}")
    off = start + HEADER_BYTES
    ck = None
    if has_ck:
        if len(buf) < off + CHECKSUM_BYTES:
            raise ValueError(f"truncated {t.name} message: the checksum flag is set but "
                             f"{len(buf) - off} bytes follow the header")
        (ck,) = _CK.unpack_from(buf, off)
        off += CHECKSUM_BYTES
    return t, rnd, ck, off


def _array(buf: bytes, off: int, dtype: str, n: int, what: str) -> tuple[np.ndarray, int]:
    size = np.dtype(dtype).itemsize * n
    if off + size > len(buf):
        raise ValueError(f"truncated message: {what} needs {size} bytes at offset {off}, "
                         f"only {len(buf) - off} left")
    return np.frombuffer(buf, dtype=dtype, count=n, offset=off).copy(), off + size


def _check_end(buf: bytes, off: int, name: str) -> None:
    if off != len(buf):
        raise ValueError(f"{name}: {len(buf) - off} trailing bytes after the message")


def _f32_block(values: np.ndarray) -> bytes:
    """uint64 n + float32[n] (little-endian)."""
    return struct.pack("<Q", values.size) + values.astype("<f4", copy=False).tobytes()


def _read_f32_block(buf: bytes, off: int, what: str, name: str) -> tuple[np.ndarray, int]:
    """Inverse of :func:`_f32_block` at ``off``: (float32 values, offset after them)."""
    if len(buf) < off + 8:
        raise ValueError(f"truncated {name} message")
    (n,) = struct.unpack_from("<Q", buf, off)
    vals, off = _array(buf, off + 8, "<f4", n, what)
    return vals.astype(np.float32), off


def _u64(seeds) -> np.ndarray:
    a = np.asarray([int(s) for s in seeds] if not isinstance(seeds, np.ndarray) else seeds,
                   dtype=np.uint64).reshape(-1)
    return a


def _f32(values) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(values, dtype=np.float32).reshape(-1))


class _WeightedValuesCodec:
    """The codec of a message holding (round, float32 values, num_samples, checksum): header +
    ``_COUNTS`` (num_samples, count) + float32[count]. WEIGHTS, GRADS and STATS differ only in the
    count's width (``_COUNTS``) and the name an error gives the array (``_WHAT``)."""

    def to_bytes(self) -> bytes:
        """Serialized form (header + num_samples + count, as ``_COUNTS``, + float32[count])."""
        v = _f32(self.values)
        return (_header(self.TYPE, self.round, self.checksum)
                + struct.pack(self._COUNTS, self.num_samples, v.size)
                + v.astype("<f4", copy=False).tobytes())

    @classmethod
    def from_bytes(cls, buf: bytes):
        """Inverse of :meth:`to_bytes`; ValueError on a malformed buffer."""
        _, rnd, ck, off = _read_header(buf, cls.TYPE)
        size = struct.calcsize(cls._COUNTS)
        if len(buf) < off + size:
            raise ValueError(f"truncated {cls.TYPE.name} message")
        ns, n = struct.unpack_from(cls._COUNTS, buf, off)
        vals, off = _array(buf, off + size, "<f4", n, cls._WHAT)
        _check_end(buf, off, cls.TYPE.name)
        return cls(rnd, vals.astype(np.float32), ns, ck)


class _WeightedValues(_WeightedValuesCodec):
    """The same codec for messages whose values are made float32 when the message is built."""

    def __post_init__(self):
        self.values = _f32(self.values)


@dataclass
class WeightsMessage(_WeightedValuesCodec):
    """Model state (float32, flattened in ``state_dict`` order), server -> client or client -> server.

    Attributes:
        round: round index.
        values: float32 array, shape (n,): every state tensor flattened and concatenated.
        num_samples: the sender's local sample count n_i (0 from the server).
        checksum: optional uint32 :func:`~.state.state_checksum` of the state (see module doc).
    """
    round: int
    values: np.ndarray
    num_samples: int = 0
    checksum: int | None = None
    TYPE = MsgType.WEIGHTS
    _COUNTS = "<IQ"  # uint32 num_samples + uint64 n
    _WHAT = "weights"


@dataclass
class SeedsMessage:
    """Server -> sampled client in a ZO round: the seeds to probe.

    Attributes:
        round: round index.
        seeds: uint64 array, shape (steps * S,); local step k uses ``seeds[k*S:(k+1)*S]``.
        steps: local ZO steps (1 in the paper's method).
        checksum: optional checksum of the server's state at the round's start (the version the
            client must probe).
    """
    round: int
    seeds: np.ndarray
    steps: int = 1
    checksum: int | None = None
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
        return (_header(self.TYPE, self.round, self.checksum)
                + struct.pack("<HI", self.steps, self.seeds.size)
                + self.seeds.astype("<u8", copy=False).tobytes())

    @classmethod
    def from_bytes(cls, buf: bytes) -> "SeedsMessage":
        """Inverse of :meth:`to_bytes`; ValueError on a malformed buffer."""
        _, rnd, ck, off = _read_header(buf, cls.TYPE)
        if len(buf) < off + 6:
            raise ValueError("truncated SEEDS message")
        steps, n = struct.unpack_from("<HI", buf, off)
        seeds, off = _array(buf, off + 6, "<u8", n, "seeds")
        _check_end(buf, off, "SEEDS")
        return cls(rnd, seeds.astype(np.uint64), steps, ck)


@dataclass
class GradsMessage(_WeightedValues):
    """Client -> server in a ZO round: one float32 projected gradient per seed received.

    Attributes:
        round: round index.
        values: float32 array, shape (steps * S,), ``g = (L+ - L-) / (2 eps)`` in seed order.
        num_samples: the client's n_i (for the sample-count weighting).
        checksum: optional checksum of the state the client probed.
    """
    round: int
    values: np.ndarray
    num_samples: int = 0
    checksum: int | None = None
    TYPE = MsgType.GRADS
    _COUNTS = "<II"  # uint32 num_samples + uint32 count
    _WHAT = "projected gradients"


@dataclass
class BroadcastMessage:
    """Server -> all clients after a ZO round: the (seed, coeff) list everyone applies with
    ``zo_kernels.apply_seeds_(params, seeds, coeffs)`` (params in ``model.parameters()`` order).

    Attributes:
        round: round index.
        seeds: uint64 array, shape (K,).
        coeffs: float32 array, shape (K,); already include learning rates, scale and weights.
        checksum: optional checksum of the server's state after applying this list.
    """
    round: int
    seeds: np.ndarray
    coeffs: np.ndarray
    checksum: int | None = None
    TYPE = MsgType.BROADCAST

    def __post_init__(self):
        self.seeds = _u64(self.seeds)
        self.coeffs = _f32(self.coeffs)
        if self.seeds.size != self.coeffs.size:
            raise ValueError(f"BroadcastMessage: {self.seeds.size} seeds but "
                             f"{self.coeffs.size} coefficients")

    def to_bytes(self) -> bytes:
        """Serialized form (header + uint32 count + uint64[count] + float32[count])."""
        return (_header(self.TYPE, self.round, self.checksum) + struct.pack("<I", self.seeds.size)
                + self.seeds.astype("<u8", copy=False).tobytes()
                + self.coeffs.astype("<f4", copy=False).tobytes())

    @classmethod
    def _decode_at(cls, buf: bytes, start: int) -> tuple["BroadcastMessage", int]:
        _, rnd, ck, off = _read_header(buf, cls.TYPE, start)
        if len(buf) < off + 4:
            raise ValueError("truncated BROADCAST message")
        (n,) = struct.unpack_from("<I", buf, off)
        seeds, off = _array(buf, off + 4, "<u8", n, "seeds")
        coeffs, off = _array(buf, off, "<f4", n, "coefficients")
        return cls(rnd, seeds.astype(np.uint64), coeffs.astype(np.float32), ck), off

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
        round: the round the client is catching up to (it then holds version ``round``).
        entries: BroadcastMessages of the missed rounds, oldest first, consecutive rounds.
        checksum: optional checksum of the server's state at version ``round``.
    """
    round: int
    entries: list = field(default_factory=list)
    checksum: int | None = None
    TYPE = MsgType.REPLAY

    def to_bytes(self) -> bytes:
        """Serialized form (header + uint32 count + the broadcasts back to back)."""
        return (_header(self.TYPE, self.round, self.checksum) + struct.pack("<I", len(self.entries))
                + b"".join(e.to_bytes() for e in self.entries))

    @classmethod
    def from_bytes(cls, buf: bytes) -> "ReplayMessage":
        """Inverse of :meth:`to_bytes`; ValueError on a malformed buffer."""
        _, rnd, ck, off = _read_header(buf, cls.TYPE)
        if len(buf) < off + 4:
            raise ValueError("truncated REPLAY message")
        (n,) = struct.unpack_from("<I", buf, off)
        off += 4
        # every entry needs at least a header and a count: bound n before looping
        if n > (len(buf) - off) // (HEADER_BYTES + 4):
            raise ValueError(f"truncated REPLAY message: {n} entries cannot fit in "
                             f"{len(buf) - off} bytes")
        entries = []
        for _ in range(n):
            e, off = BroadcastMessage._decode_at(buf, off)
            entries.append(e)
        _check_end(buf, off, "REPLAY")
        return cls(rnd, entries, ck)


@dataclass
class KSeedTask:
    """Server -> sampled client in a FedKSeed round: run ``steps`` local ZO steps.

    The pool of K seeds is fixed when the federation starts (derived from the run seed), so the
    per-round downlink carries no seeds.
    """
    round: int
    steps: int
    checksum: int | None = None
    TYPE = MsgType.KSEED_TASK

    def to_bytes(self) -> bytes:
        """Serialized form (header + uint16 steps)."""
        return _header(self.TYPE, self.round, self.checksum) + struct.pack("<H", self.steps)

    @classmethod
    def from_bytes(cls, buf: bytes) -> "KSeedTask":
        """Inverse of :meth:`to_bytes`; ValueError on a malformed buffer."""
        _, rnd, ck, off = _read_header(buf, cls.TYPE)
        if len(buf) != off + 2:
            raise ValueError(f"KSEED_TASK message must be {off + 2} bytes, got {len(buf)}")
        (steps,) = struct.unpack_from("<H", buf, off)
        return cls(rnd, steps, ck)


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
    checksum: int | None = None
    TYPE = MsgType.KSEED_UPDATE

    def __post_init__(self):
        self.indices = np.asarray(self.indices, dtype=np.uint32).reshape(-1)
        self.values = _f32(self.values)
        if self.indices.size != self.values.size:
            raise ValueError(f"KSeedUpdate: {self.indices.size} indices but {self.values.size} values")

    def to_bytes(self) -> bytes:
        """Serialized form (header + uint32 num_samples + uint32 m + uint32[m] + float32[m])."""
        return (_header(self.TYPE, self.round, self.checksum)
                + struct.pack("<II", self.num_samples, self.indices.size)
                + self.indices.astype("<u4", copy=False).tobytes()
                + self.values.astype("<f4", copy=False).tobytes())

    @classmethod
    def from_bytes(cls, buf: bytes) -> "KSeedUpdate":
        """Inverse of :meth:`to_bytes`; ValueError on a malformed buffer."""
        _, rnd, ck, off = _read_header(buf, cls.TYPE)
        if len(buf) < off + 8:
            raise ValueError("truncated KSEED_UPDATE message")
        ns, n = struct.unpack_from("<II", buf, off)
        idx, off = _array(buf, off + 8, "<u4", n, "indices")
        vals, off = _array(buf, off, "<f4", n, "values")
        _check_end(buf, off, "KSEED_UPDATE")
        return cls(rnd, idx.astype(np.uint32), vals.astype(np.float32), ns, ck)


class Status(IntEnum):
    """StatusMessage codes (client -> server)."""
    #: The client holds the version the server named (reply to a sync / hello).
    OK = 0
    #: After catch-up the client's state checksum differs from the server's: it needs weights.
    DESYNC = 1
    #: The client rejected the server's message as invalid (reason attached); state unchanged.
    REJECTED = 2
    #: The client's local work failed (reason attached).
    FAILED = 3


MAX_REASON_BYTES = 512


@dataclass
class StatusMessage:
    """Client -> server: the client's state, when it has no gradients or weights to send.

    Attributes:
        round: the round the status answers.
        code: a :class:`Status`.
        version: the model version the client holds (-1: none usable).
        reason: short human-readable explanation (utf-8, at most 512 bytes on the wire).
        checksum: the client's current state checksum (None: it holds no model).
    """
    round: int
    code: int
    version: int = -1
    reason: str = ""
    checksum: int | None = None
    TYPE = MsgType.STATUS

    def to_bytes(self) -> bytes:
        """Serialized form (header + uint8 code + int64 version + uint16 len + utf-8 reason)."""
        r = self.reason.encode("utf-8", "replace")[:MAX_REASON_BYTES]
        return (_header(self.TYPE, self.round, self.checksum)
                + struct.pack("<BqH", int(self.code), int(self.version), len(r)) + r)

    @classmethod
    def from_bytes(cls, buf: bytes) -> "StatusMessage":
        """Inverse of :meth:`to_bytes`; ValueError on a malformed buffer."""
        _, rnd, ck, off = _read_header(buf, cls.TYPE)
        if len(buf) < off + 11:
            raise ValueError("truncated STATUS message")
        code, version, n = struct.unpack_from("<BqH", buf, off)
        off += 11
        if n > MAX_REASON_BYTES or off + n != len(buf):
            raise ValueError(f"STATUS message: reason length {n} does not match the "
                             f"{len(buf) - off} bytes left (at most {MAX_REASON_BYTES})")
        try:
            Status(code)
        except ValueError:
            raise ValueError(f"STATUS message: unknown code {code}") from None
        return cls(rnd, code, version, bytes(buf[off:]).decode("utf-8", "replace"), ck)


@dataclass
class SubModelTask:
    """Server -> sampled client in a HeteroFL round: the width-``rate`` sub-network to train.

    Attributes:
        round: round index.
        rate: the sub-network's width rate (1.0: the full model; float32 on the wire).
        values: float32 array, shape (n,): the sub-network's parameters, ``named_parameters``
            order, each the leading slice of the global parameter (:mod:`.heterofl_models`).
        checksum: optional uint32 checksum (HeteroFL sends none).
    """
    round: int
    rate: float
    values: np.ndarray
    checksum: int | None = None
    TYPE = MsgType.SUBMODEL

    def __post_init__(self):
        self.values = _f32(self.values)

    def to_bytes(self) -> bytes:
        """Serialized form (header + float32 rate + uint64 n + float32[n])."""
        return (_header(self.TYPE, self.round, self.checksum) + struct.pack("<f", float(self.rate))
                + _f32_block(self.values))

    @classmethod
    def from_bytes(cls, buf: bytes) -> "SubModelTask":
        """Inverse of :meth:`to_bytes`; ValueError on a malformed buffer."""
        _, rnd, ck, off = _read_header(buf, cls.TYPE)
        if len(buf) < off + 4:
            raise ValueError("truncated SUBMODEL message")
        (rate,) = struct.unpack_from("<f", buf, off)
        vals, off = _read_f32_block(buf, off + 4, "sub-network parameters", "SUBMODEL")
        _check_end(buf, off, "SUBMODEL")
        return cls(rnd, float(rate), vals, ck)


@dataclass
class SubModelUpdate:
    """Client -> server in a HeteroFL round: the trained sub-network and the client's classes.

    Attributes:
        round: round index.
        values: float32 array, shape (n,): the trained parameters (the task's layout).
        labels: bool array, shape (K,): the classes the client holds samples of (HeteroFL's
            masked loss; only these rows of the classifier are averaged from this client).
        num_samples: the client's n_i.
        checksum: optional uint32 checksum.
    """
    round: int
    values: np.ndarray
    labels: np.ndarray
    num_samples: int = 0
    checksum: int | None = None
    TYPE = MsgType.SUBMODEL_UPDATE

    def __post_init__(self):
        self.values = _f32(self.values)
        self.labels = np.asarray(self.labels, dtype=bool).reshape(-1)

    def to_bytes(self) -> bytes:
        """Serialized form (header + uint32 num_samples + uint16 K + label bits + uint64 n +
        float32[n]); label k is bit ``k % 8`` of byte ``k // 8``."""
        k = self.labels.size
        return (_header(self.TYPE, self.round, self.checksum)
                + struct.pack("<IH", self.num_samples, k)
                + np.packbits(self.labels, bitorder="little").tobytes()
                + _f32_block(self.values))

    @classmethod
    def from_bytes(cls, buf: bytes) -> "SubModelUpdate":
        """Inverse of :meth:`to_bytes`; ValueError on a malformed buffer (bits set past K too)."""
        _, rnd, ck, off = _read_header(buf, cls.TYPE)
        if len(buf) < off + 6:
            raise ValueError("truncated SUBMODEL_UPDATE message")
        ns, k = struct.unpack_from("<IH", buf, off)
        bits, off = _array(buf, off + 6, "u1", (k + 7) // 8, "label bits")
        labels = np.unpackbits(bits, bitorder="little").astype(bool)
        if labels[k:].any():
            raise ValueError(f"SUBMODEL_UPDATE: label bits set past its {k} classes")
        vals, off = _read_f32_block(buf, off, "sub-network parameters", "SUBMODEL_UPDATE")
        _check_end(buf, off, "SUBMODEL_UPDATE")
        return cls(rnd, vals, labels[:k], ns, ck)


@dataclass
class StatsRequest:
    """Server -> client: compute the BatchNorm statistics of your data under this global state
    (HeteroFL's sBN, after the round's aggregation).

    Attributes:
        round: round index.
        values: float32 array, shape (n,): the global state (``state_dict`` order, like WEIGHTS).
        checksum: optional uint32 checksum of that state.
    """
    round: int
    values: np.ndarray
    checksum: int | None = None
    TYPE = MsgType.STATS_REQUEST

    def __post_init__(self):
        self.values = _f32(self.values)

    def to_bytes(self) -> bytes:
        """Serialized form (header + uint64 n + float32[n])."""
        return _header(self.TYPE, self.round, self.checksum) + _f32_block(self.values)

    @classmethod
    def from_bytes(cls, buf: bytes) -> "StatsRequest":
        """Inverse of :meth:`to_bytes`; ValueError on a malformed buffer."""
        _, rnd, ck, off = _read_header(buf, cls.TYPE)
        vals, off = _read_f32_block(buf, off, "state", "STATS_REQUEST")
        _check_end(buf, off, "STATS_REQUEST")
        return cls(rnd, vals, ck)


@dataclass
class StatsMessage(_WeightedValues):
    """Client -> server: BatchNorm statistics of the client's data
    (:func:`.bn.local_statistics`: ``[mean_0, var_0, mean_1, ...]``), the layout of a WEIGHTS
    message.

    Attributes:
        round: round index.
        values: float32 array, shape (n,), n = :func:`.bn.statistics_size` of the model.
        num_samples: the client's n_i (the server's average is sample-weighted).
        checksum: optional uint32 checksum.
    """
    round: int
    values: np.ndarray
    num_samples: int = 0
    checksum: int | None = None
    TYPE = MsgType.STATS
    _COUNTS = "<IQ"  # uint32 num_samples + uint64 n
    _WHAT = "statistics"


_CLASSES = {c.TYPE: c for c in (WeightsMessage, SeedsMessage, GradsMessage, BroadcastMessage,
                                 ReplayMessage, KSeedTask, KSeedUpdate, StatusMessage,
                                 SubModelTask, SubModelUpdate, StatsRequest, StatsMessage)}


def decode(buf: bytes):
    """Decode any message by its header's type byte; ValueError on a malformed buffer."""
    t, _, _, _ = _read_header(bytes(buf[:HEADER_BYTES + CHECKSUM_BYTES]))
    return _CLASSES[t].from_bytes(bytes(buf))


def encode(msg) -> bytes:
    """``msg.to_bytes()`` (for symmetry with :func:`decode`)."""
    return msg.to_bytes()

"""Protocol messages <-> Flower records, with validation of everything that arrives.

ZO and FedKSeed rounds travel as seeds and scalars only: ``ConfigRecord`` (server -> client:
seeds or the FedKSeed step count, replayed (seed, coeff) lists, checksums) and ``MetricRecord``
(client -> server: projected gradients or per-seed scalars, sample count, checksum). Model weights
travel in an ``ArrayRecord`` only where the method needs them: the warm-up rounds, HeteroFL's
sub-networks (and, with BatchNorm, the state its statistics are computed under, and those
statistics), and a catch-up or repair download when that is cheaper than (or the only
alternative to) a replay.

=========================  ===============  =====================================================
message                    record (key)     fields
=========================  ===============  =====================================================
SeedsMessage               ConfigRecord     round, steps, seeds: list[int] (uint64), [checksum]
                           ``seeds``
ReplayMessage              ConfigRecord     round, rounds: list[int], counts: list[int],
                           ``replay``       seeds: list[int], coeffs: list[float], [checksum]
WeightsMessage             ArrayRecord      ``state``: float32 array (n,)
                           ``weights`` +    round, num_samples, [checksum]
                           ConfigRecord
                           ``weights.meta``
StatusMessage              ConfigRecord     round, code, version, reason, [checksum]
                           ``status``
GradsMessage               MetricRecord     round, num_samples, values: list[float], [checksum]
                           ``grads``
KSeedTask                  ConfigRecord     round, steps, [checksum]
                           ``kseed``
KSeedUpdate                MetricRecord     round, num_samples, indices: list[int],
                           ``kseed``        values: list[float], [checksum]
SubModelTask               ArrayRecord      ``values``: float32 array (n,)
                           ``submodel`` +   round, rate: float, [checksum]
                           ConfigRecord
                           ``submodel.meta``
SubModelUpdate             ArrayRecord      ``values``: float32 array (n,)
                           ``submodel`` +   round, num_samples, labels: list[bool] (K),
                           ConfigRecord     [checksum]
                           ``submodel.meta``
StatsRequest               ArrayRecord      ``state``: float32 array (n,)
                           ``stats_request``
                           + ConfigRecord   round, [checksum]
                           ``stats_request.meta``
StatsMessage               ArrayRecord      ``values``: float32 array (n,)
                           ``stats`` +      round, num_samples, [checksum]
                           ConfigRecord
                           ``stats.meta``
=========================  ===============  =====================================================

Python ints up to 2**64 - 1 ride in ConfigRecord lists as they are (every seed is non-negative,
so a list never mixes negative values with values >= 2**63, which Flower 1.41 refuses); float32
values ride as Python floats (exactly). A task is one RecordDict holding its catch-up (if any) and
its main message; a reply holds one message.

Decoding (:func:`task_from_records`, :func:`reply_from_records`) has one codec: the binary one of
:mod:`~zowarmup.federated.messages`. The records layer checks only what belongs to Flower's
containers -- keys, record kinds, Python types, and sizes against
:class:`~zowarmup.federated.validation.Limits` before anything is converted (list lengths, the
array's dtype, shape and byte size) -- builds the message, and passes its serialized form through
:func:`~zowarmup.federated.validation.decode_checked`, exactly as a binary message from the
in-memory transport; field ranges (uint fields, seeds, the reason's length) are the message
definitions'. Anything malformed raises :class:`~zowarmup.federated.validation.Rejected`; the
result then goes through the same protocol checks as every other message.
"""
from __future__ import annotations

import numbers
import struct
from typing import Mapping

import numpy as np

from ..federated.messages import (MAX_REASON_BYTES, BroadcastMessage, GradsMessage, KSeedTask,
                                  KSeedUpdate, MsgType, ReplayMessage, SeedsMessage, StatsMessage,
                                  StatsRequest, StatusMessage, SubModelTask, SubModelUpdate,
                                  WeightsMessage)
from ..federated.validation import Limits, Rejected, decode_checked

#: Records that travel in pairs: an ArrayRecord and its ConfigRecord of fields.
_ARRAYS = {"weights": "state", "submodel": "values", "stats_request": "state", "stats": "values"}
_TASK_KEYS = {"seeds", "replay", "weights", "weights.meta", "status", "kseed", "submodel",
              "submodel.meta", "stats_request", "stats_request.meta"}
_REPLY_KEYS = {"grads", "weights", "weights.meta", "status", "kseed", "submodel", "submodel.meta",
               "stats", "stats.meta"}


def _flwr():
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
    return Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict


# ------------------------------------------------------------------------------------------------
# message -> records
# ------------------------------------------------------------------------------------------------
def _ck(d: dict, msg) -> dict:
    if msg.checksum is not None:
        d["checksum"] = int(msg.checksum)
    return d


def _add(rd: dict, msg) -> None:
    Array, ArrayRecord, ConfigRecord, MetricRecord, _ = _flwr()
    t = msg.TYPE
    if t == MsgType.SEEDS:
        rd["seeds"] = ConfigRecord(_ck({"round": int(msg.round), "steps": int(msg.steps),
                                        "seeds": [int(s) for s in msg.seeds]}, msg))
    elif t == MsgType.REPLAY:
        rd["replay"] = ConfigRecord(_ck({
            "round": int(msg.round),
            "rounds": [int(e.round) for e in msg.entries],
            "counts": [int(e.seeds.size) for e in msg.entries],
            "seeds": [int(s) for e in msg.entries for s in e.seeds],
            "coeffs": [float(c) for e in msg.entries for c in e.coeffs]}, msg))
    elif t == MsgType.WEIGHTS:
        rd["weights"] = ArrayRecord({"state": Array(np.ascontiguousarray(msg.values,
                                                                         dtype=np.float32))})
        rd["weights.meta"] = ConfigRecord(_ck({"round": int(msg.round),
                                               "num_samples": int(msg.num_samples)}, msg))
    elif t == MsgType.STATUS:
        rd["status"] = ConfigRecord(_ck({"round": int(msg.round), "code": int(msg.code),
                                         "version": int(msg.version), "reason": str(msg.reason)},
                                        msg))
    elif t == MsgType.GRADS:
        rd["grads"] = MetricRecord(_ck({"round": int(msg.round),
                                        "num_samples": int(msg.num_samples),
                                        "values": [float(v) for v in msg.values]}, msg))
    elif t == MsgType.KSEED_TASK:
        rd["kseed"] = ConfigRecord(_ck({"round": int(msg.round), "steps": int(msg.steps)}, msg))
    elif t == MsgType.KSEED_UPDATE:
        rd["kseed"] = MetricRecord(_ck({"round": int(msg.round),
                                        "num_samples": int(msg.num_samples),
                                        "indices": [int(i) for i in msg.indices],
                                        "values": [float(v) for v in msg.values]}, msg))
    elif t in (MsgType.SUBMODEL, MsgType.SUBMODEL_UPDATE, MsgType.STATS_REQUEST, MsgType.STATS):
        key = {MsgType.SUBMODEL: "submodel", MsgType.SUBMODEL_UPDATE: "submodel",
               MsgType.STATS_REQUEST: "stats_request", MsgType.STATS: "stats"}[t]
        meta = {"round": int(msg.round)}
        if t == MsgType.SUBMODEL:
            meta["rate"] = float(msg.rate)
        if t == MsgType.SUBMODEL_UPDATE:
            meta["labels"] = [bool(b) for b in msg.labels]
        if hasattr(msg, "num_samples"):
            meta["num_samples"] = int(msg.num_samples)
        rd[key] = ArrayRecord({_ARRAYS[key]: Array(np.ascontiguousarray(msg.values,
                                                                        dtype=np.float32))})
        rd[key + ".meta"] = ConfigRecord(_ck(meta, msg))
    else:
        raise ValueError(f"{t.name} messages have no Flower record form")


def to_records(msgs: list):
    """A task's or reply's messages as one ``RecordDict``."""
    _, _, _, _, RecordDict = _flwr()
    rd: dict = {}
    for m in msgs:
        _add(rd, m)
    return RecordDict(rd)


# ------------------------------------------------------------------------------------------------
# records -> message (validated)
# ------------------------------------------------------------------------------------------------
def _int(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise Rejected(f"{what}: expected an integer, got {type(v).__name__}")
    return int(v)


def _list(v, what: str, max_len: int, kind, bools: bool = False) -> list:
    if not isinstance(v, list):
        raise Rejected(f"{what}: expected a list, got {type(v).__name__}")
    if len(v) > max_len:
        raise Rejected(f"{what}: oversized: {len(v)} entries, at most {max_len}")
    for i, x in enumerate(v):
        if (isinstance(x, bool) and not bools) or not isinstance(x, kind):
            raise Rejected(f"{what}[{i}]: wrong type {type(x).__name__}")
    return v


def _ints(v, what: str, max_len: int) -> list[int]:
    return [int(x) for x in _list(v, what, max_len, numbers.Integral)]


def _floats(v, what: str, max_len: int) -> np.ndarray:
    v = _list(v, what, max_len, numbers.Real)
    with np.errstate(over="ignore"):
        return np.asarray([float(x) for x in v], dtype=np.float32)


def _record(rd, key: str, kind: str):
    r = rd[key]
    name = type(r).__name__
    if name != kind:
        raise Rejected(f"record {key!r}: expected a {kind}, got {name}")
    return r


def _fields(rec, key: str, required: set, optional: set = frozenset()) -> dict:
    d = dict(rec)
    missing = required - set(d)
    extra = set(d) - required - set(optional)
    if missing:
        raise Rejected(f"record {key!r}: missing {', '.join(sorted(missing))}")
    if extra:
        raise Rejected(f"record {key!r}: unexpected {', '.join(sorted(extra))}")
    for k in sorted(d):
        if k in ("checksum", "round", "num_samples", "steps", "code", "version"):
            _int(d[k], f"{key}.{k}")
    return d


def _checksum(d: dict):
    return int(d["checksum"]) if "checksum" in d else None


def _through_codec(key: str, build, limits: Limits):
    """Build the message from record fields, serialize it and decode it back with the binary codec
    (:func:`~zowarmup.federated.validation.decode_checked`): one set of field checks for both."""
    try:
        msg = build()
        buf = msg.to_bytes()
    except (ValueError, OverflowError, struct.error) as e:
        raise Rejected(f"record {key!r}: a field is out of range for its message: {e}") from None
    return decode_checked(buf, msg.TYPE, limits)


def _array(rd, key: str, sizes) -> np.ndarray:
    """The float32 array of the ArrayRecord ``key`` (one array, named ``_ARRAYS[key]``), its
    shape one of ``(n,)`` for n in ``sizes``, checked before its bytes are read."""
    name = _ARRAYS[key]
    if not sizes or not max(sizes):
        raise Rejected(f"record {key!r}: this run sends no {key} messages")
    ar = _record(rd, key, "ArrayRecord")
    if list(ar.keys()) != [name]:
        raise Rejected(f"record {key!r}: expected one array {name!r}, got {list(ar.keys())}")
    a = ar[name]
    shape = tuple(getattr(a, "shape", ()))
    if getattr(a, "dtype", None) != "float32" or len(shape) != 1 or shape[0] not in sizes:
        raise Rejected(f"record {key!r}: wrong dtype/shape {getattr(a, 'dtype', None)} {shape}, "
                       f"expected float32 ({' or '.join(str(n) for n in sorted(sizes))},)")
    if len(a.data) > 4 * shape[0] + 1024:
        raise Rejected(f"record {key!r}: oversized payload, {len(a.data)} bytes")
    try:
        vals = a.numpy()
    except Exception as e:  # malformed .npy bytes
        raise Rejected(f"record {key!r}: cannot read the array: {e}") from None
    if vals.dtype != np.float32 or vals.shape != shape:
        raise Rejected(f"record {key!r}: array data is {vals.dtype} {vals.shape}")
    return np.ascontiguousarray(vals)


def _weights(rd, limits: Limits) -> WeightsMessage:
    meta = _fields(_record(rd, "weights.meta", "ConfigRecord"), "weights.meta",
                   {"round", "num_samples"}, {"checksum"})
    vals = _array(rd, "weights", {limits.state_size})
    return _through_codec("weights", lambda: WeightsMessage(
        meta["round"], vals, meta["num_samples"], _checksum(meta)), limits)


def _submodel_sizes(limits: Limits) -> set:
    return {n for _, n in limits.submodels}


def _submodel_task(rd, limits: Limits) -> SubModelTask:
    meta = _fields(_record(rd, "submodel.meta", "ConfigRecord"), "submodel.meta",
                   {"round", "rate"}, {"checksum"})
    rate = meta["rate"]
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real):
        raise Rejected(f"submodel.meta.rate: expected a number, got {type(rate).__name__}")
    vals = _array(rd, "submodel", _submodel_sizes(limits))
    return _through_codec("submodel", lambda: SubModelTask(meta["round"], float(rate), vals,
                                                           _checksum(meta)), limits)


def _submodel_update(rd, limits: Limits) -> SubModelUpdate:
    meta = _fields(_record(rd, "submodel.meta", "ConfigRecord"), "submodel.meta",
                   {"round", "num_samples", "labels"}, {"checksum"})
    labels = _list(meta["labels"], "submodel.meta.labels", limits.num_classes, (bool, np.bool_),
                   bools=True)
    vals = _array(rd, "submodel", _submodel_sizes(limits))
    return _through_codec("submodel", lambda: SubModelUpdate(
        meta["round"], vals, np.asarray(labels, dtype=bool), meta["num_samples"],
        _checksum(meta)), limits)


def _stats_request(rd, limits: Limits) -> StatsRequest:
    meta = _fields(_record(rd, "stats_request.meta", "ConfigRecord"), "stats_request.meta",
                   {"round"}, {"checksum"})
    vals = _array(rd, "stats_request", {limits.state_size})
    return _through_codec("stats_request", lambda: StatsRequest(meta["round"], vals,
                                                                _checksum(meta)), limits)


def _stats(rd, limits: Limits) -> StatsMessage:
    meta = _fields(_record(rd, "stats.meta", "ConfigRecord"), "stats.meta",
                   {"round", "num_samples"}, {"checksum"})
    vals = _array(rd, "stats", {limits.stats_size})
    return _through_codec("stats", lambda: StatsMessage(meta["round"], vals, meta["num_samples"],
                                                        _checksum(meta)), limits)


def _kseed_task(rd, limits: Limits) -> KSeedTask:
    d = _fields(_record(rd, "kseed", "ConfigRecord"), "kseed", {"round", "steps"}, {"checksum"})
    return _through_codec("kseed", lambda: KSeedTask(d["round"], d["steps"], _checksum(d)), limits)


def _kseed_update(rd, limits: Limits) -> KSeedUpdate:
    d = _fields(_record(rd, "kseed", "MetricRecord"), "kseed",
                {"round", "num_samples", "indices", "values"}, {"checksum"})
    n = min(limits.pool_size, limits.kseed_steps)
    idx = _ints(d["indices"], "kseed.indices", n)
    values = _floats(d["values"], "kseed.values", n)
    if len(idx) != values.size:
        raise Rejected(f"kseed: wrong count: {len(idx)} indices but {values.size} values")
    if any(not 0 <= i < 2 ** 32 for i in idx):
        raise Rejected("kseed.indices: an index is out of range for uint32")
    return _through_codec("kseed", lambda: KSeedUpdate(d["round"], np.asarray(idx, np.uint32),
                                                       values, d["num_samples"], _checksum(d)),
                          limits)


def _seeds_msg(rd, limits: Limits) -> SeedsMessage:
    d = _fields(_record(rd, "seeds", "ConfigRecord"), "seeds", {"round", "steps", "seeds"},
                {"checksum"})
    seeds = _ints(d["seeds"], "seeds.seeds", limits.seeds_per_task)
    return _through_codec("seeds", lambda: SeedsMessage(d["round"], seeds, d["steps"],
                                                        _checksum(d)), limits)


def _replay(rd, limits: Limits) -> ReplayMessage:
    d = _fields(_record(rd, "replay", "ConfigRecord"), "replay",
                {"round", "rounds", "counts", "seeds", "coeffs"}, {"checksum"})
    rounds = _ints(d["rounds"], "replay.rounds", limits.rounds)
    counts = _ints(d["counts"], "replay.counts", limits.rounds)
    if len(counts) != len(rounds):
        raise Rejected(f"replay: wrong count: {len(rounds)} rounds but {len(counts)} counts")
    cap = limits.rounds * limits.max_broadcast
    seeds = _ints(d["seeds"], "replay.seeds", cap)
    coeffs = _floats(d["coeffs"], "replay.coeffs", cap)
    if any(c < 0 for c in counts) or sum(counts) != len(seeds) or len(seeds) != coeffs.size:
        raise Rejected(f"replay: wrong count: counts {counts[:8]} for {len(seeds)} seeds and "
                       f"{coeffs.size} coefficients")

    def build():
        entries, off = [], 0
        for r, n in zip(rounds, counts):
            entries.append(BroadcastMessage(r, seeds[off:off + n], coeffs[off:off + n]))
            off += n
        return ReplayMessage(d["round"], entries, _checksum(d))
    return _through_codec("replay", build, limits)


def _status(rd, limits: Limits) -> StatusMessage:
    d = _fields(_record(rd, "status", "ConfigRecord"), "status",
                {"round", "code", "version", "reason"}, {"checksum"})
    if not isinstance(d["reason"], str) or len(d["reason"].encode("utf-8", "replace")) > MAX_REASON_BYTES:
        raise Rejected(f"status.reason: expected a string of at most {MAX_REASON_BYTES} bytes")
    return _through_codec("status", lambda: StatusMessage(d["round"], d["code"], d["version"],
                                                          d["reason"], _checksum(d)), limits)


def _grads(rd, limits: Limits) -> GradsMessage:
    d = _fields(_record(rd, "grads", "MetricRecord"), "grads", {"round", "num_samples", "values"},
                {"checksum"})
    values = _floats(d["values"], "grads.values", limits.seeds_per_task)
    return _through_codec("grads", lambda: GradsMessage(d["round"], values, d["num_samples"],
                                                        _checksum(d)), limits)


def _keys(rd, allowed: set) -> set:
    if not isinstance(rd, Mapping):
        raise Rejected(f"expected a RecordDict, got {type(rd).__name__}")
    keys = set(rd.keys())
    extra = keys - allowed
    if extra:
        raise Rejected(f"unexpected records {sorted(extra)}")
    for k in _ARRAYS:
        if (k in keys) != (k + ".meta" in keys):
            raise Rejected(f"records {k!r} and '{k}.meta' come together")
    return keys


def _pair(key: str) -> set:
    return {key, key + ".meta"}


def task_from_records(rd, limits: Limits) -> list:
    """A task's messages (catch-up first) from its RecordDict; Rejected when malformed."""
    keys = _keys(rd, _TASK_KEYS)
    main = [k for k in ("seeds", "status", "kseed") if k in keys]
    if len(main) > 1:
        raise Rejected(f"a task has one main message, got {main}")
    if not main:  # one message alone: warm-up weights, a HeteroFL sub-network or sBN request
        for key, read in (("weights", _weights), ("submodel", _submodel_task),
                          ("stats_request", _stats_request)):
            if keys == _pair(key):
                return [read(rd, limits)]
        raise Rejected(f"a task needs seeds, kseed, status, weights, submodel or stats_request, "
                       f"got {sorted(keys)}")
    if keys & (_pair("submodel") | _pair("stats_request")):
        raise Rejected(f"a {main[0]} task carries no submodel or stats_request, got "
                       f"{sorted(keys)}")
    last = {"seeds": _seeds_msg, "status": _status, "kseed": _kseed_task}[main[0]](rd, limits)
    cu = [k for k in ("replay", "weights") if k in keys]
    if len(cu) > 1:
        raise Rejected("a task has at most one catch-up (replay or weights)")
    if not cu:
        return [last]
    return [_replay(rd, limits) if cu[0] == "replay" else _weights(rd, limits), last]


def reply_from_records(rd, limits: Limits) -> list:
    """A reply's message from its RecordDict; Rejected when malformed."""
    keys = _keys(rd, _REPLY_KEYS)
    if keys == {"grads"}:
        return [_grads(rd, limits)]
    if keys == {"status"}:
        return [_status(rd, limits)]
    if keys == {"kseed"}:
        return [_kseed_update(rd, limits)]
    if keys == _pair("weights"):
        return [_weights(rd, limits)]
    if keys == _pair("submodel"):
        return [_submodel_update(rd, limits)]
    if keys == _pair("stats"):
        return [_stats(rd, limits)]
    raise Rejected(f"a reply is one of grads, kseed, status, weights, submodel or stats, got "
                   f"{sorted(keys)}")


# ------------------------------------------------------------------------------------------------
# sizes
# ------------------------------------------------------------------------------------------------
def wire_bytes(obj) -> int:
    """Serialized size of a Flower object (a Message or a RecordDict) and everything it holds:
    the sum of ``deflate()`` over the object tree, i.e. what Flower pushes to the SuperLink."""
    total = len(obj.deflate())
    for child in (obj.children or {}).values():
        total += wire_bytes(child)
    return total

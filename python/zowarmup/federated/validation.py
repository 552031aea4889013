"""Validation of untrusted protocol messages, before anything touches state.

In a deployment every message crosses a trust boundary: a client (or something pretending to be
one) can send garbage, replay an old reply, or claim a million samples; a compromised link can
hand a client a truncated seed list. Each check here raises :class:`Rejected` with a reason naming
the problem; callers (:meth:`.server.Server.accept`, :class:`.replica.ClientReplica`) log it,
count the sender, and leave their state unchanged.

What is checked, by message:

- any, as bytes: the Python type (``bytes``/``bytearray``/``memoryview``); the size, against the
  largest legal message of the expected type *before* decoding (so an oversized payload costs no
  parsing); magic, version, type and exact length (``messages.from_bytes``).
- any, decoded: the message class and the dtypes/shapes of its arrays; the round number (a reply
  must answer the current round: older is stale, newer is forged); the checksum's range.
- client -> server, WeightsMessage: ``n`` equals the model's state size; every value finite and at
  most :data:`MAX_ABS_VALUE`; ``num_samples`` equal to the client's registered count (when known).
- client -> server, GradsMessage: one value per seed of the client's task; finite and at most
  :data:`MAX_ABS_VALUE` (a finite 1e38 would overflow the float32 coefficients); ``num_samples``.
- client -> server, KSeedUpdate: indices inside the pool, strictly increasing, at most one per
  local step; values finite; the state checksum in deployments (like GRADS).
- client -> server, SubModelUpdate (HeteroFL): one finite value per parameter of the task's
  sub-network; a label mask of the run's class count holding at least one class; ``num_samples``.
- client -> server, StatsMessage: one finite value per BatchNorm statistic of the model;
  ``num_samples``.
- server -> client, SeedsMessage: ``steps`` and the seed count equal the run's ``local_steps`` and
  ``S * local_steps``; the round not older than the client's last, inside the run and in phase 2
  (a warm-up task's round in phase 1). A round the client cannot see yet (the task does not fit
  the version it holds) is the replica's check (:class:`.replica.ClientReplica`), which changes
  nothing, its last round included, until every check has passed.
- server -> client, KSeedTask: the run's FedKSeed step count, a phase-2 round (as SEEDS).
- server -> client, SubModelTask: a width rate of the run (the client's own, checked by the
  replica) and exactly that sub-network's parameter count, finite; a phase-2 round.
- server -> client, StatsRequest: finite values of the state's size; a phase-2 round.
- server -> client, WeightsMessage (a download): finite values of the state's size; when the task
  names a checksum, the values' checksum (:meth:`.state.StateLayout.checksum`) must equal it
  before anything is loaded.
- server -> client, BroadcastMessage / ReplayMessage: entry counts bounded, coefficients finite,
  replay entries for consecutive rounds ending right before the task's round.

Seeds carried as bytes are uint64 by construction; seeds carried in Flower records (Python ints)
are range-checked in :mod:`zowarmup.flower.records`, which converts records to these messages and
then runs the same checks.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from .methods import get as get_method
from .messages import (CHECKSUM_BYTES, HEADER_BYTES, MAX_REASON_BYTES, BroadcastMessage,
                       GradsMessage, KSeedTask, KSeedUpdate, MsgType, ReplayMessage, SeedsMessage,
                       StatsMessage, StatsRequest, Status, StatusMessage, SubModelTask,
                       SubModelUpdate, WeightsMessage, _CLASSES, _read_header)

#: Largest magnitude accepted for a weight or a projected gradient. Larger finite values are as
#: useless as inf and would overflow the float32 coefficients of the broadcast.
MAX_ABS_VALUE = 1e30


class Rejected(ValueError):
    """A message failed validation. ``str(e)`` is the reason (logged, and counted per sender)."""


@dataclass(frozen=True)
class Limits:
    """What a legal message of this run may contain.

    Attributes:
        state_size: floats in a WeightsMessage (``StateLayout.size``).
        seeds_per_task: ``zo.num_seeds * zo.local_steps`` (a SeedsMessage / GradsMessage count).
        local_steps: ``zo.local_steps``.
        num_clients: N.
        rounds: R; rounds are ``0 .. R-1``.
        max_broadcast: most (seed, coeff) entries one round's broadcast can hold.
        pool_size: FedKSeed pool size K (0 when unused).
        kseed_steps: FedKSeed local steps (most entries of a KSeedUpdate).
        pivot: first phase-2 round (warm-up tasks come before it, ZO tasks from it on); None:
            unknown (no phase check).
        phase2: the method's phase-2 kind (``"zo"``, ``"fedkseed"``, ``"heterofl"``, ...; ``""``:
            none or unknown): which task a phase-2 round may carry, and whose noise a replayed
            broadcast uses.
        submodels: HeteroFL's width rates and their sub-networks' parameter counts,
            ``((rate, count), ...)`` (rates as float32 values); empty for other methods.
        num_classes: K, the label mask's length in a SubModelUpdate (0: unused).
        stats_size: floats of a BatchNorm statistics vector (:func:`.bn.statistics_size`).
    """
    state_size: int
    seeds_per_task: int
    local_steps: int
    num_clients: int
    rounds: int
    max_broadcast: int
    pool_size: int = 0
    kseed_steps: int = 0
    pivot: int | None = None
    phase2: str = ""
    submodels: tuple = ()
    num_classes: int = 0
    stats_size: int = 0

    @classmethod
    def from_config(cls, cfg, state_size: int, dataset=None, model=None) -> "Limits":
        """Limits for a :class:`~.config.RunConfig` and a model of ``state_size`` floats.

        ``dataset`` (its ``num_classes``, ``in_channels``, ``image_size``) sizes HeteroFL's
        sub-networks and label masks; ``model`` (the global model) its BatchNorm statistics.
        Without them those messages have no legal size (HeteroFL replies are then refused)."""
        z, k = cfg.zo, cfg.fedkseed
        per = z.num_seeds * z.local_steps
        n = cfg.data.num_clients
        method = get_method(cfg.method)
        kseed = method.seed_pool
        mb = per if z.seed_sharing == "shared" else per * n
        if kseed:
            mb = max(mb, k.pool_size)
        phase2 = method.phase2.name if method.phase2 is not None else ""
        subs, ncls, nstats = (), 0, 0
        if phase2 == "heterofl" and dataset is not None:
            from .heterofl_models import sub_param_count
            rates = sorted({1.0, float(cfg.heterofl.lo_rate)})
            subs = tuple((float(np.float32(r)), sub_param_count(cfg, dataset, r)) for r in rates)
            ncls = int(dataset.num_classes)
        if model is not None:
            from .bn import statistics_size
            nstats = statistics_size(model)
        return cls(state_size=int(state_size), seeds_per_task=per, local_steps=z.local_steps,
                   num_clients=n, rounds=cfg.rounds, max_broadcast=mb,
                   pool_size=k.pool_size if kseed else 0,
                   kseed_steps=k.for_method(cfg.method).local_steps if kseed else 0,
                   pivot=cfg.effective_pivot(), phase2=phase2, submodels=subs,
                   num_classes=ncls, stats_size=nstats)

    def submodel_size(self, rate) -> int | None:
        """Parameters of the width-``rate`` sub-network (compared as float32), None when
        ``rate`` is not one of the run's."""
        try:
            r = float(np.float32(rate))
        except (TypeError, ValueError, OverflowError):
            return None
        return next((n for q, n in self.submodels if q == r), None)

    def max_bytes(self, t: MsgType) -> int:
        """Size of the largest legal serialized message of type ``t`` (checksum included)."""
        h = HEADER_BYTES + CHECKSUM_BYTES
        bcast = h + 4 + 12 * self.max_broadcast
        sub = max((n for _, n in self.submodels), default=0)
        return {
            MsgType.WEIGHTS: h + 12 + 4 * self.state_size,
            MsgType.SEEDS: h + 6 + 8 * self.seeds_per_task,
            MsgType.GRADS: h + 8 + 4 * self.seeds_per_task,
            MsgType.BROADCAST: bcast,
            MsgType.REPLAY: h + 4 + self.rounds * bcast,
            MsgType.KSEED_TASK: h + 2,
            MsgType.KSEED_UPDATE: h + 8 + 8 * min(self.pool_size, self.kseed_steps),
            MsgType.STATUS: h + 11 + MAX_REASON_BYTES,
            MsgType.SUBMODEL: h + 12 + 4 * sub,
            MsgType.SUBMODEL_UPDATE: h + 14 + (self.num_classes + 7) // 8 + 4 * sub,
            MsgType.STATS_REQUEST: h + 8 + 4 * self.state_size,
            MsgType.STATS: h + 12 + 4 * self.stats_size,
        }[MsgType(t)]


# ------------------------------------------------------------------------------------------------
# bytes -> message
# ------------------------------------------------------------------------------------------------
def decode_checked(buf, want: MsgType | tuple, limits: Limits):
    """Decode ``buf`` as one of the ``want`` types, refusing oversized or malformed input.

    Raises :class:`Rejected` naming the problem (wrong Python type, too large, bad header, wrong
    message type, truncated or trailing bytes).
    """
    wants = tuple(want) if isinstance(want, (tuple, list, set, frozenset)) else (want,)
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise Rejected(f"expected a serialized message (bytes), got {type(buf).__name__}")
    buf = bytes(buf)
    cap = max(limits.max_bytes(w) for w in wants)
    if len(buf) > cap:
        raise Rejected(f"oversized payload: {len(buf)} bytes, the largest legal "
                       f"{'/'.join(MsgType(w).name for w in wants)} message is {cap} bytes")
    try:
        t, _, _, _ = _read_header(buf[:HEADER_BYTES + CHECKSUM_BYTES])
    except ValueError as e:
        raise Rejected(str(e)) from None
    if t not in wants:
        raise Rejected(f"wrong message type {t.name}; expected "
                       f"{' or '.join(MsgType(w).name for w in wants)}")
    if len(buf) > limits.max_bytes(t):
        raise Rejected(f"oversized payload: {len(buf)} bytes, the largest legal {t.name} "
                       f"message is {limits.max_bytes(t)} bytes")
    try:
        return _CLASSES[t].from_bytes(buf)
    except (ValueError, struct.error) as e:
        raise Rejected(f"malformed {t.name} message: {e}") from None


def as_message(payload, want: tuple, limits: Limits):
    """``payload`` as a message of one of the ``want`` types: bytes are decoded with
    :func:`decode_checked`; an object must be an instance of the message class of a wanted type
    (its ``TYPE`` alone proves nothing: a hand-built object can carry any). :class:`Rejected`
    otherwise, never another exception."""
    if not hasattr(payload, "TYPE"):
        return decode_checked(payload, want, limits)
    t = getattr(payload, "TYPE", None)
    names = " or ".join(MsgType(w).name for w in want)
    try:
        t = MsgType(t) if not isinstance(t, bool) else None
    except (ValueError, TypeError):
        t = None
    if t is None:
        raise Rejected(f"a {type(payload).__name__} object with TYPE {getattr(payload, 'TYPE', None)!r}"
                       f" is not a message; expected {names}")
    if t not in want:
        raise Rejected(f"wrong message type {t.name}; expected {names}")
    if not isinstance(payload, _CLASSES[t]):
        raise Rejected(f"a {type(payload).__name__} object claims TYPE {t.name} but is not a "
                       f"{_CLASSES[t].__name__}")
    return payload


# ------------------------------------------------------------------------------------------------
# decoded-message checks
# ------------------------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _check_round(msg, round_idx: int, what: str) -> None:
    r = getattr(msg, "round", None)
    if not _is_int(r):
        raise Rejected(f"{what}: round must be an integer, got {type(r).__name__}")
    if int(r) < round_idx:
        raise Rejected(f"{what}: stale round {int(r)} (the current round is {round_idx})")
    if int(r) > round_idx:
        raise Rejected(f"{what}: round {int(r)} is from the future (the current round is "
                       f"{round_idx})")


def check_checksum(msg, what: str, required: bool = False) -> None:
    """Reject ``msg`` unless its ``checksum`` is absent (allowed unless ``required``) or a uint32."""
    ck = getattr(msg, "checksum", None)
    if ck is None:
        if required:
            raise Rejected(f"{what}: missing state checksum")
        return
    if not _is_int(ck) or not 0 <= int(ck) < 2 ** 32:
        raise Rejected(f"{what}: checksum {ck!r} is not a uint32")


def _check_array(a, dtype, what: str, count: int | None = None) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise Rejected(f"{what}: expected a numpy array, got {type(a).__name__}")
    if a.dtype != np.dtype(dtype):
        raise Rejected(f"{what}: wrong dtype {a.dtype}, expected {np.dtype(dtype)}")
    if a.ndim != 1:
        raise Rejected(f"{what}: expected a 1-D array, got shape {a.shape}")
    if count is not None and a.size != count:
        raise Rejected(f"{what}: wrong count {a.size}, expected {count}")
    return a


def _check_values(a: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(a)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise Rejected(f"{what}: non-finite value {a[i]} at index {i} "
                       f"({int(bad.sum())} of {a.size})")
    # Compare in the array's own precision: float32(1e30) is 1.0000000150e30 as a Python float,
    # and the bound itself must be accepted.
    limit = np.asarray(MAX_ABS_VALUE, dtype=a.dtype) if a.dtype.kind == "f" else MAX_ABS_VALUE
    if a.size and np.max(np.abs(a)) > limit:
        i = int(np.argmax(np.abs(a)))
        raise Rejected(f"{what}: value {a[i]:.3g} at index {i} exceeds {MAX_ABS_VALUE:g} in "
                       "magnitude")


def _check_samples(msg, expected: int | None, what: str) -> None:
    ns = getattr(msg, "num_samples", None)
    if not _is_int(ns) or not 0 < int(ns) < 2 ** 32:
        raise Rejected(f"{what}: num_samples {ns!r} is not a positive uint32")
    if expected is not None and expected >= 0 and int(ns) != expected:
        raise Rejected(f"{what}: num_samples {int(ns)} differs from the client's registered "
                       f"{expected}")


def _check_reply(msg, cls: type, round_idx: int, what: str, require_checksum: bool = False) -> None:
    """What every client reply is checked for first: its class, its round, its checksum."""
    if not isinstance(msg, cls):
        raise Rejected(f"expected a {cls.__name__}, got {type(msg).__name__}")
    _check_round(msg, round_idx, what)
    check_checksum(msg, what, require_checksum)


def check_weights_reply(msg, round_idx: int, limits: Limits, num_samples: int | None = None
                        ) -> WeightsMessage:
    """A client's phase-1 reply (its locally trained state)."""
    _check_reply(msg, WeightsMessage, round_idx, "WEIGHTS")
    _check_array(msg.values, np.float32, "WEIGHTS values", limits.state_size)
    _check_values(msg.values, "WEIGHTS values")
    _check_samples(msg, num_samples, "WEIGHTS")
    return msg


def check_grads_reply(msg, round_idx: int, task: SeedsMessage, limits: Limits,
                      num_samples: int | None = None, require_checksum: bool = False
                      ) -> GradsMessage:
    """A client's ZO reply to ``task``: one finite projected gradient per seed."""
    _check_reply(msg, GradsMessage, round_idx, "GRADS", require_checksum)
    _check_array(msg.values, np.float32, "GRADS values", int(task.seeds.size))
    _check_values(msg.values, "GRADS values")
    _check_samples(msg, num_samples, "GRADS")
    return msg


def check_kseed_reply(msg, round_idx: int, limits: Limits, num_samples: int | None = None,
                      require_checksum: bool = False) -> KSeedUpdate:
    """A client's FedKSeed reply: pool indices in range, strictly increasing, finite values
    (and, in deployments, the checksum of the state it probed)."""
    _check_reply(msg, KSeedUpdate, round_idx, "KSEED_UPDATE", require_checksum)
    idx = _check_array(msg.indices, np.uint32, "KSEED_UPDATE indices")
    _check_array(msg.values, np.float32, "KSEED_UPDATE values", idx.size)
    if idx.size > limits.kseed_steps:
        raise Rejected(f"KSEED_UPDATE: wrong count {idx.size}, at most {limits.kseed_steps} "
                       "(one per local step)")
    if idx.size and int(idx.max()) >= limits.pool_size:
        raise Rejected(f"KSEED_UPDATE: seed index {int(idx.max())} out of range for a pool of "
                       f"{limits.pool_size}")
    if idx.size > 1 and not bool(np.all(np.diff(idx.astype(np.int64)) > 0)):
        raise Rejected("KSEED_UPDATE: indices are not strictly increasing")
    _check_values(msg.values, "KSEED_UPDATE values")
    _check_samples(msg, num_samples, "KSEED_UPDATE")
    return msg


def check_submodel_reply(msg, round_idx: int, task: SubModelTask, limits: Limits,
                         num_samples: int | None = None) -> SubModelUpdate:
    """A client's HeteroFL reply to ``task``: the trained sub-network (the task's parameter count,
    finite) and its classes (a mask of the run's K, at least one class held)."""
    _check_reply(msg, SubModelUpdate, round_idx, "SUBMODEL_UPDATE")
    _check_array(msg.values, np.float32, "SUBMODEL_UPDATE values", int(task.values.size))
    _check_values(msg.values, "SUBMODEL_UPDATE values")
    lab = _check_array(msg.labels, np.bool_, "SUBMODEL_UPDATE labels", limits.num_classes)
    if not lab.any():
        raise Rejected("SUBMODEL_UPDATE labels: no class held (a client with samples holds one)")
    _check_samples(msg, num_samples, "SUBMODEL_UPDATE")
    return msg


def check_stats_reply(msg, round_idx: int, limits: Limits, num_samples: int | None = None
                      ) -> StatsMessage:
    """A client's BatchNorm statistics: one finite value per statistic of the model."""
    _check_reply(msg, StatsMessage, round_idx, "STATS")
    _check_array(msg.values, np.float32, "STATS values", limits.stats_size)
    _check_values(msg.values, "STATS values")
    _check_samples(msg, num_samples, "STATS")
    return msg


def check_status(msg, round_idx: int) -> StatusMessage:
    """A client's status reply."""
    _check_reply(msg, StatusMessage, round_idx, "STATUS")
    if not _is_int(msg.code) or int(msg.code) not in {int(s) for s in Status}:
        raise Rejected(f"STATUS: unknown code {msg.code!r}")
    if not _is_int(msg.version) or not -1 <= int(msg.version) <= 2 ** 32:
        raise Rejected(f"STATUS: version {msg.version!r} out of range")
    if not isinstance(msg.reason, str):
        raise Rejected(f"STATUS: reason must be a string, got {type(msg.reason).__name__}")
    return msg


# -- server -> client ----------------------------------------------------------------------------
def check_task_round(r, last_round: int, limits: Limits, what: str, phase: str | None = None
                     ) -> int:
    """A task's round: an integer, not older than the client's last task, inside the run, and
    (``phase`` ``"warmup"``, or ``"zo"`` for any phase-2 round, when ``limits.pivot`` is known)
    inside that phase."""
    if not _is_int(r):
        raise Rejected(f"{what}: round must be an integer, got {type(r).__name__}")
    r = int(r)
    if r < last_round:
        raise Rejected(f"{what}: stale round {r} (this client already saw round {last_round})")
    if r >= limits.rounds:
        raise Rejected(f"{what}: round {r} is from the future (the run has {limits.rounds} rounds)")
    if limits.pivot is not None and phase == "warmup" and r >= limits.pivot:
        raise Rejected(f"{what}: round {r} is not a warm-up round (phase 2 starts at round "
                       f"{limits.pivot})")
    if limits.pivot is not None and phase == "zo" and r < limits.pivot:
        raise Rejected(f"{what}: round {r} is a warm-up round (phase 2 starts at round "
                       f"{limits.pivot})")
    return r


#: The tasks a phase-2 round of each deployable kind carries (a STATUS sync request aside).
PHASE2_TASKS = {"zo": (MsgType.SEEDS,), "fedkseed": (MsgType.KSEED_TASK,),
                "heterofl": (MsgType.SUBMODEL, MsgType.STATS_REQUEST)}


def check_task_kind(msg, limits: Limits) -> None:
    """A phase-2 task must be the kind the run's phase 2 sends (``limits.phase2``; no check when
    it is unknown): e.g. no SEEDS task in a FedKSeed run, no SUBMODEL task in a ZO run."""
    allowed = PHASE2_TASKS.get(limits.phase2)
    t = msg.TYPE
    if allowed is None or not any(t in ts for ts in PHASE2_TASKS.values()):
        return
    if t not in allowed:
        raise Rejected(f"{t.name} task, but this run's phase 2 ({limits.phase2}) sends "
                       f"{' or '.join(a.name for a in allowed)}")


def check_seeds_task(msg, last_round: int, limits: Limits) -> SeedsMessage:
    """The server's ZO task: the run's step count and S seeds per step, a plausible round."""
    if not isinstance(msg, SeedsMessage):
        raise Rejected(f"expected a SeedsMessage, got {type(msg).__name__}")
    check_task_round(msg.round, last_round, limits, "SEEDS", "zo")
    check_checksum(msg, "SEEDS")
    if not _is_int(msg.steps) or int(msg.steps) != limits.local_steps:
        raise Rejected(f"SEEDS: wrong step count {msg.steps!r}, the run uses "
                       f"{limits.local_steps}")
    _check_array(msg.seeds, np.uint64, "SEEDS seeds", limits.seeds_per_task)
    return msg


def check_broadcast(msg, limits: Limits, what: str = "BROADCAST") -> BroadcastMessage:
    """A round's (seed, coeff) list: bounded count, equal lengths, finite float32 coefficients."""
    if not isinstance(msg, BroadcastMessage):
        raise Rejected(f"{what}: expected a BroadcastMessage, got {type(msg).__name__}")
    if not _is_int(msg.round) or not 0 <= int(msg.round) < limits.rounds:
        raise Rejected(f"{what}: round {msg.round!r} outside the run's {limits.rounds} rounds")
    check_checksum(msg, what)
    s = _check_array(msg.seeds, np.uint64, f"{what} seeds")
    _check_array(msg.coeffs, np.float32, f"{what} coefficients", s.size)
    if s.size > limits.max_broadcast:
        raise Rejected(f"{what}: wrong count {s.size}, at most {limits.max_broadcast} entries")
    _check_values(msg.coeffs, f"{what} coefficients")
    return msg


def check_replay(msg, version: int, limits: Limits) -> ReplayMessage:
    """A seed-log replay bringing a client from some version to ``msg.round``: consecutive
    rounds, ending at ``msg.round - 1``, covering the client's ``version`` onwards."""
    if not isinstance(msg, ReplayMessage):
        raise Rejected(f"expected a ReplayMessage, got {type(msg).__name__}")
    if not _is_int(msg.round) or not 0 <= int(msg.round) <= limits.rounds:
        raise Rejected(f"REPLAY: target round {msg.round!r} outside the run")
    check_checksum(msg, "REPLAY")
    if not isinstance(msg.entries, list) or len(msg.entries) > limits.rounds:
        raise Rejected(f"REPLAY: wrong count: at most {limits.rounds} entries")
    for i, e in enumerate(msg.entries):
        check_broadcast(e, limits, f"REPLAY entry {i}")
    rounds = [int(e.round) for e in msg.entries]
    if rounds != list(range(int(msg.round) - len(rounds), int(msg.round))):
        raise Rejected(f"REPLAY: entries for rounds {rounds[:5]}{'...' if len(rounds) > 5 else ''}"
                       f" are not the consecutive rounds before {int(msg.round)}")
    first = int(msg.round) - len(rounds)
    if version < first:
        raise Rejected(f"REPLAY: starts at round {first} but this client holds version {version}")
    return msg


def check_weights_download(msg, limits: Limits) -> WeightsMessage:
    """A weights download from the server (catch-up or repair)."""
    if not isinstance(msg, WeightsMessage):
        raise Rejected(f"expected a WeightsMessage, got {type(msg).__name__}")
    if not _is_int(msg.round) or not 0 <= int(msg.round) <= limits.rounds:
        raise Rejected(f"WEIGHTS: round {msg.round!r} outside the run")
    check_checksum(msg, "WEIGHTS")
    _check_array(msg.values, np.float32, "WEIGHTS values", limits.state_size)
    _check_values(msg.values, "WEIGHTS values")
    return msg


def check_kseed_task(msg, last_round: int, limits: Limits) -> KSeedTask:
    """The server's FedKSeed task: the run's step count, a phase-2 round."""
    if not isinstance(msg, KSeedTask):
        raise Rejected(f"expected a KSeedTask, got {type(msg).__name__}")
    check_task_round(msg.round, last_round, limits, "KSEED_TASK", "zo")
    check_checksum(msg, "KSEED_TASK")
    if not _is_int(msg.steps) or int(msg.steps) != limits.kseed_steps:
        raise Rejected(f"KSEED_TASK: wrong step count {msg.steps!r}, the run uses "
                       f"{limits.kseed_steps}")
    return msg


def check_submodel_task(msg, last_round: int, limits: Limits, rate: float | None = None
                        ) -> SubModelTask:
    """The server's HeteroFL task: a width rate of the run (``rate``, the client's own, when
    given), exactly that sub-network's parameter count, finite values, a phase-2 round."""
    if not isinstance(msg, SubModelTask):
        raise Rejected(f"expected a SubModelTask, got {type(msg).__name__}")
    check_task_round(msg.round, last_round, limits, "SUBMODEL", "zo")
    check_checksum(msg, "SUBMODEL")
    if isinstance(msg.rate, bool) or not isinstance(msg.rate, (float, int, np.floating)):
        raise Rejected(f"SUBMODEL: rate must be a number, got {type(msg.rate).__name__}")
    size = limits.submodel_size(msg.rate)
    if size is None:
        raise Rejected(f"SUBMODEL: width rate {msg.rate!r} is not one of the run's "
                       f"{[q for q, _ in limits.submodels]}")
    if rate is not None and float(np.float32(msg.rate)) != float(np.float32(rate)):
        raise Rejected(f"SUBMODEL: width rate {msg.rate!r}, but this client trains width "
                       f"{rate!r}")
    _check_array(msg.values, np.float32, "SUBMODEL values", size)
    _check_values(msg.values, "SUBMODEL values")
    return msg


def check_stats_request(msg, last_round: int, limits: Limits) -> StatsRequest:
    """The server's request for BatchNorm statistics: the global state (its size, finite), a
    phase-2 round."""
    if not isinstance(msg, StatsRequest):
        raise Rejected(f"expected a StatsRequest, got {type(msg).__name__}")
    check_task_round(msg.round, last_round, limits, "STATS_REQUEST", "zo")
    check_checksum(msg, "STATS_REQUEST")
    if limits.stats_size <= 0:
        raise Rejected("STATS_REQUEST: this run's model has no BatchNorm statistics")
    _check_array(msg.values, np.float32, "STATS_REQUEST values", limits.state_size)
    _check_values(msg.values, "STATS_REQUEST values")
    return msg

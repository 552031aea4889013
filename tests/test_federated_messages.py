"""Protocol messages: exact serialized sizes (from the documented layout, computed independently),
round trips, and malformed input."""
import struct

import numpy as np
import pytest

from zowarmup.federated import messages as M

RNG = np.random.default_rng(7)
HDR = 8  # "ZW", version, type, uint32 round


def _seeds(n):
    s = RNG.integers(0, 2 ** 63, size=n, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    if n:
        s[0] = np.uint64(2 ** 64 - 1)  # the largest seed must survive
    return s


@pytest.mark.parametrize("S", [1, 20, 333])
def test_zo_round_message_sizes_follow_the_layout(S):
    seeds = _seeds(S)
    down = M.SeedsMessage(5, seeds, 1).to_bytes()
    up = M.GradsMessage(5, RNG.standard_normal(S).astype(np.float32), 29).to_bytes()
    assert len(down) == HDR + 2 + 4 + 8 * S
    assert len(up) == HDR + 4 + 4 + 4 * S
    K = 3 * S
    b = M.BroadcastMessage(5, _seeds(K), RNG.standard_normal(K)).to_bytes()
    assert len(b) == HDR + 4 + 12 * K


def test_round_trips_preserve_every_field():
    s = _seeds(12)
    m = M.SeedsMessage.from_bytes(M.SeedsMessage(2 ** 32 - 1, s, 3).to_bytes())
    assert m.round == 2 ** 32 - 1 and m.steps == 3 and m.per_step == 4
    assert m.seeds.dtype == np.uint64 and np.array_equal(m.seeds, s)
    assert int(m.seeds[0]) == 2 ** 64 - 1

    v = np.array([1.5, -0.0, np.nan, np.inf, 3e38], dtype=np.float32)
    g = M.GradsMessage.from_bytes(M.GradsMessage(1, v, 17).to_bytes())
    assert g.num_samples == 17 and g.values.tobytes() == v.tobytes()  # bit for bit, NaN included

    w = RNG.standard_normal(1001).astype(np.float32)
    wm = M.WeightsMessage.from_bytes(M.WeightsMessage(4, w, 64).to_bytes())
    assert wm.num_samples == 64 and np.array_equal(wm.values, w)
    assert len(M.WeightsMessage(4, w, 64).to_bytes()) == HDR + 4 + 8 + 4 * 1001

    c = RNG.standard_normal(9).astype(np.float32)
    b = M.BroadcastMessage(9, s[:9], c)
    r = M.ReplayMessage(11, [b, M.BroadcastMessage(10, s[:2], c[:2])])
    r2 = M.ReplayMessage.from_bytes(r.to_bytes())
    assert len(r.to_bytes()) == HDR + 4 + len(b.to_bytes()) + (HDR + 4 + 24)
    assert [e.round for e in r2.entries] == [9, 10]
    assert np.array_equal(r2.entries[0].seeds, s[:9]) and np.array_equal(r2.entries[0].coeffs, c)

    t = M.KSeedTask.from_bytes(M.KSeedTask(3, 10).to_bytes())
    assert (t.round, t.steps) == (3, 10) and len(M.KSeedTask(3, 10).to_bytes()) == HDR + 2
    u = M.KSeedUpdate(3, [2, 7, 1023], [0.5, -1.0, 2.0], 30)
    u2 = M.KSeedUpdate.from_bytes(u.to_bytes())
    assert len(u.to_bytes()) == HDR + 8 + 8 * 3
    assert u2.indices.tolist() == [2, 7, 1023] and u2.values.tolist() == [0.5, -1.0, 2.0]
    # generic decode dispatches on the type byte
    assert isinstance(M.decode(u.to_bytes()), M.KSeedUpdate)
    assert isinstance(M.decode(b.to_bytes()), M.BroadcastMessage)


def test_header_layout_is_as_documented():
    buf = M.GradsMessage(0x01020304, np.zeros(2, np.float32), 5).to_bytes()
    magic, ver, typ, rnd = struct.unpack_from("<2sBBI", buf)
    assert (magic, ver, typ, rnd) == (b"ZW", 1, int(M.MsgType.GRADS), 0x01020304)
    assert struct.unpack_from("<II", buf, HDR) == (5, 2)


def test_malformed_messages_raise_value_error():
    good = M.GradsMessage(1, np.ones(4, np.float32), 3).to_bytes()
    with pytest.raises(ValueError, match="truncated"):
        M.GradsMessage.from_bytes(good[:-1])
    with pytest.raises(ValueError, match="trailing"):
        M.GradsMessage.from_bytes(good + b"\0")
    with pytest.raises(ValueError, match="magic"):
        M.GradsMessage.from_bytes(b"XX" + good[2:])
    with pytest.raises(ValueError, match="expected a SEEDS"):
        M.SeedsMessage.from_bytes(good)
    with pytest.raises(ValueError, match="version"):
        M.decode(good[:2] + b"\x09" + good[3:])
    with pytest.raises(ValueError, match="unknown message type"):
        M.decode(good[:3] + b"\x63" + good[4:])
    with pytest.raises(ValueError, match="too short"):
        M.decode(b"ZW")
    with pytest.raises(ValueError, match="seeds but"):
        M.BroadcastMessage(0, [1, 2], [0.5])
    with pytest.raises(ValueError, match="uint32"):
        M.KSeedTask(2 ** 32, 1).to_bytes()

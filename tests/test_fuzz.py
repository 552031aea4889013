"""Seeded fuzzing of every place the project reads untrusted input: the CLI on damaged run folders,
the config loader, the data loaders, checkpoint loading and message decoding. Random corruptions
(truncation, byte flips, inserted and random bytes, wrong types, extreme values) must end in a clear
one-line error or a counted rejection: never a traceback, never a changed file or state, never a
multi-GiB allocation. Each family is a fixed, seeded list of cases (reproducible, a few seconds)."""
import copy
import io
import json
import pickle
import random
import shutil
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from zowarmup import data as zdata
from zowarmup.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = ["rounds=3", "pivot=2", "data.num_clients=6", "data.hi_fraction=0.5", "zo.num_seeds=2",
        "zo.clients_per_round=3", "measure_memory=false", "threads=1", "model.options.hidden=[8]",
        "checkpoint_every=1", "baselines=[]", "name=fz"]
#: Most bytes a single load may allocate (numpy, traced): far below "multi-GiB".
MEM_CAP = 256 * 2 ** 20


def corrupt(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One random corruption of ``data``: (kind, corrupted bytes), never equal to ``data``."""
    kinds = ["truncate", "flip", "flips", "insert", "random", "zero-tail", "empty", "duplicate"]
    while True:
        k = rng.choice(kinds)
        b = bytearray(data)
        if k == "truncate" and len(b) > 1:
            b = b[:rng.randrange(len(b))]
        elif k == "flip" and b:
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif k == "flips" and b:
            for _ in range(rng.randint(2, 50)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        elif k == "insert":
            i = rng.randrange(len(b) + 1)
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif k == "random":
            b = bytearray(rng.randbytes(rng.randint(1, 4096)))
        elif k == "zero-tail" and len(b) > 8:
            i = rng.randrange(len(b) // 2, len(b))
            b[i:] = bytes(len(b) - i)
        elif k == "empty":
            b = bytearray()
        elif k == "duplicate":
            b = b + b
        if bytes(b) != data:
            return k, bytes(b)


def one_line_error(err: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("zowarmup: error: "), err
    assert "Traceback" not in err and "unexpected" not in err, err


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in ("run.log", ".zowarmup.lock")}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fz")
    assert main(["run", "-q", "--out", str(out)] + TINY) == 0
    (run,) = out.glob("fz-*/zowarmup-seed0")
    return run


# ---- the CLI on damaged run folders --------------------------------------------------------------
@pytest.mark.parametrize("seed", range(10))
def test_cli_resume_and_compare_on_a_damaged_run_folder(finished_run, tmp_path, capsys, seed):
    rng = random.Random(1400 + seed)
    d = tmp_path / "run"
    shutil.copytree(finished_run, d)
    target = rng.choice(["checkpoint.pt", "checkpoint.prev.pt", "config.json", "metrics.jsonl",
                         "summary.json"])
    kind, bad = corrupt((d / target).read_bytes(), rng)
    (d / target).write_bytes(bad)
    if target != "summary.json" and rng.random() < 0.7:
        (d / "summary.json").unlink()  # make the resume read the damaged file
    before = snapshot(d)
    rc = main(["run", "-q", "--resume", str(d)])
    err = capsys.readouterr().err
    if rc != 0:
        one_line_error(err)
        assert snapshot(d) == before, (target, kind)
    else:
        assert (d / "summary.json").exists()
    rc = main(["compare", str(d)])
    cap = capsys.readouterr()
    if rc != 0:
        one_line_error(cap.err)


@pytest.mark.parametrize("argv", [
    ["run", "--resume"], ["run", "--resume", "/nonexistent/zw"], ["compare", "/nonexistent/zw"],
    ["run", "rounds=-1"], ["run", "rounds=1e400"], ["config", "data.alpha=nan"],
    ["run", "zo.num_seeds=[1,2]"], ["run", "seed=-5"], ["run", "data.num_clients=0"],
    ["run", "no_such_key=1"], ["run", "data.name=\x00"], ["config", "--config", "/nonexistent.toml"],
    ["run", "=3"], ["run", "eval_batch_size=true"], ["config", "zo.lr=inf"],
    ["config", "threads=2**70"], ["config", "zo.num_seeds=1000000000000"],
    # accepted by the config, refused when the model is sized (before any weight is allocated)
    ["run", "-q", "model.options.hidden=[100000000000]", "rounds=1", "num_seeds=1", "baselines=[]"],
    ["run", "-q", "model.options={x=1}", "rounds=1", "num_seeds=1", "baselines=[]"],
    ["run", "-q", "data.num_clients=100000000000", "rounds=1", "num_seeds=1", "baselines=[]"],
])
def test_cli_bad_command_lines(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse usage errors exit 2 with a usage line
        rc = e.code
        assert rc == 2
        return
    err = capsys.readouterr().err
    assert rc in (1, 2), (argv, err)
    one_line_error(err)


# ---- the config loader -----------------------------------------------------------------------------
_EXTREME = ["-1", "0", "1e308", "-1e308", "nan", "inf", "-inf", "99999999999999999999999",
            "'x'", "''", "[]", "[1, 'a']", "{a = 1}", "true", "1.5", "'\\u0000'", "2e-324"]


@pytest.mark.parametrize("seed", range(40))
def test_config_file_fuzz(tmp_path, capsys, seed):
    rng = random.Random(2800 + seed)
    base = (REPO / "configs" / "digits.toml").read_bytes()
    if seed % 2:  # a value replaced by a wrong type or an extreme value
        lines = base.decode().splitlines()
        idx = [i for i, ln in enumerate(lines) if "=" in ln and not ln.lstrip().startswith("#")]
        i = rng.choice(idx)
        key = lines[i].split("=")[0]
        lines[i] = f"{key}= {rng.choice(_EXTREME)}"
        bad, kind = "\n".join(lines).encode(), f"value {lines[i]!r}"
    else:
        kind, bad = corrupt(base, rng)
    suffix = rng.choice([".toml", ".json"])
    p = tmp_path / f"c{suffix}"
    if suffix == ".json":
        cfg = json.loads(_config_json(capsys))
        bad = json.dumps(cfg).encode() if kind.startswith("value") else corrupt(
            json.dumps(cfg).encode(), rng)[1]
    p.write_bytes(bad)
    rc = main(["config", "--config", str(p)])
    cap = capsys.readouterr()
    assert p.read_bytes() == bad
    if rc != 0:
        assert rc == 2, (kind, cap.err)
        one_line_error(cap.err)
    else:
        json.loads(cap.out)  # a corruption that still parses gives a valid, validated config


def _config_json(capsys) -> str:
    assert main(["config"]) == 0
    return capsys.readouterr().out


# ---- the data loaders --------------------------------------------------------------------------------
def _load_within_memory(name, root):
    """load_dataset and, when it succeeds, the Dirichlet split of its labels, under tracemalloc."""
    tracemalloc.start()
    try:
        try:
            ds = zdata.load_dataset(name, root)
        except (ValueError, FileNotFoundError) as e:
            msg = str(e)
            assert "\n" not in msg and len(msg) < 2000, msg
            return msg
        finally:
            peak = tracemalloc.get_traced_memory()[1]
        assert peak < MEM_CAP, peak
        n = len(ds.y_train)
        zdata.dirichlet_partition(ds.y_train, min(3, n), 0.5, 0, num_classes=ds.num_classes)
        assert tracemalloc.get_traced_memory()[1] < MEM_CAP
        return None
    finally:
        tracemalloc.stop()


def _small_npz(path: Path, rng: np.random.Generator, **over):
    arrays = {"x": rng.random((40, 16)).astype(np.float32), "y": np.arange(40) % 4}
    arrays.update(over)
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("seed", range(30))
def test_npz_bytes_fuzz(tmp_path, seed):
    rng = random.Random(4200 + seed)
    good = _small_npz(tmp_path / "good.npz", np.random.default_rng(seed),
                      **({} if seed % 3 else {"x_test": np.zeros((8, 16), np.float32),
                                               "y_test": np.arange(8) % 4}))
    kind, bad = corrupt(good.read_bytes(), rng)
    p = tmp_path / "bad.npz"
    p.write_bytes(bad)
    msg = _load_within_memory("npz", p)
    assert p.read_bytes() == bad
    if msg is not None:
        assert "bad.npz" in msg, (kind, msg)


_BAD_ARRAYS = [
    {"y": np.array([0, 1, 2, 2 ** 63 - 1] * 10)}, {"y": np.array([0, -1, 2, 3] * 10)},
    {"y": np.array([0.0, np.nan, 1, 2] * 10)}, {"y": np.array([0.0, np.inf, 1, 2] * 10)},
    {"y": np.array([0.5, 1, 2, 3] * 10)}, {"y": np.array([0, 1, 1e30, 2] * 10)},
    {"y": np.array(["a", "b", "c", "d"] * 10)}, {"y": np.array([0, 1, 2, 3] * 10, np.uint64) * 2 ** 62},
    {"y": np.zeros((40, 2), np.int64)}, {"y": np.arange(39)}, {"y": np.array([True, False] * 20)},
    {"x": np.full((40, 16), np.nan, np.float32)}, {"x": np.zeros((40, 15))},
    {"x": np.zeros((40, 16), np.complex64)}, {"x": np.array([[b"ab"] * 16] * 40)},
    {"x": np.zeros((40,))}, {"x": np.zeros((40, 2, 3, 5, 7))}, {"x": np.zeros((0, 16))},
    {"y": np.array([object()] * 40, dtype=object)}, {"y": np.array([7] * 40)},
    {"y": np.array([0, 1, 2, 99_999] * 10)}, {"y": np.array([0, 1, 2, 100_000] * 10)},
    {"x_test": np.zeros((8, 16)), "y_test": np.array([0, 1, 2, 10 ** 12] * 2)},
    {"x_test": np.zeros((8, 25)), "y_test": np.arange(8) % 4},
]


@pytest.mark.parametrize("case", range(len(_BAD_ARRAYS)))
def test_npz_wrong_types_and_extreme_values(tmp_path, case):
    p = _small_npz(tmp_path / "v.npz", np.random.default_rng(case), **_BAD_ARRAYS[case])
    msg = _load_within_memory("npz", p)
    if msg is not None:
        assert "v.npz" in msg, msg


def _mnist_folder(d: Path) -> dict:
    def idx(arr, code):
        return struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(
            f">{arr.ndim}I", *arr.shape) + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    rng = np.random.default_rng(0)
    files = {"train-images-idx3-ubyte": idx(rng.integers(0, 255, (30, 6, 6), dtype=np.uint8), 8),
             "train-labels-idx1-ubyte": idx((np.arange(30) % 10).astype(np.uint8), 8),
             "t10k-images-idx3-ubyte": idx(rng.integers(0, 255, (10, 6, 6), dtype=np.uint8), 8),
             "t10k-labels-idx1-ubyte": idx((np.arange(10) % 10).astype(np.int32), 0x0C)}
    d.mkdir()
    for k, v in files.items():
        (d / k).write_bytes(v)
    return files


@pytest.mark.parametrize("seed", range(16))
def test_mnist_idx_fuzz(tmp_path, seed):
    rng = random.Random(5600 + seed)
    files = _mnist_folder(tmp_path / "mnist")
    assert _load_within_memory("mnist", tmp_path / "mnist") is None  # the clean folder loads
    name = rng.choice(sorted(files))
    kind, bad = corrupt(files[name], rng)
    if seed % 4 == 0:  # an extreme label in the int32 label file
        name = "t10k-labels-idx1-ubyte"
        arr = (np.arange(10) % 10).astype(">i4")
        arr[rng.randrange(10)] = rng.choice([2 ** 31 - 1, -7, 10 ** 9])
        bad = files[name][:8] + arr.tobytes()
    (tmp_path / "mnist" / name).write_bytes(bad)
    msg = _load_within_memory("mnist", tmp_path / "mnist")
    if msg is not None:
        assert name in msg, (kind, msg)


@pytest.mark.parametrize("seed", range(12))
def test_cifar_pickle_fuzz(tmp_path, seed):
    rng = random.Random(7000 + seed)
    d = tmp_path / "cifar"
    d.mkdir()
    r = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for n in names:
        with open(d / n, "wb") as f:
            pickle.dump({b"data": r.integers(0, 255, (4, 3072), dtype=np.uint8),
                         b"labels": list(range(4))}, f)
    name = rng.choice(names)
    kind, bad = corrupt((d / name).read_bytes(), rng)
    if seed % 3 == 0:  # wrong types and extreme labels inside a well-formed pickle
        bad = pickle.dumps({b"data": r.integers(0, 255, (4, 3072), dtype=np.uint8),
                            b"labels": rng.choice([[0, 1, 2, 10 ** 12], [0, -1, 2, 3], "abcd",
                                                   [0.5, 1, 2, 3], None, [0, 1, 2]])})
    (d / name).write_bytes(bad)
    msg = _load_within_memory("cifar10", d)
    if msg is not None:
        assert name in msg, (kind, msg)


# ---- checkpoint loading ---------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(40))
def test_checkpoint_bytes_fuzz(finished_run, tmp_path, seed):
    from zowarmup.federated.checkpoint import CheckpointError, load_checkpoint
    rng = random.Random(8400 + seed)
    good = (finished_run / "checkpoint.pt").read_bytes()
    kind, bad = corrupt(good, rng)
    (tmp_path / "checkpoint.pt").write_bytes(bad)
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(tmp_path)
    msg = str(ei.value)
    assert msg.startswith(str(tmp_path / "checkpoint.pt")) and "\n" not in msg, (kind, msg)
    assert (tmp_path / "checkpoint.pt").read_bytes() == bad


def _edit(st: dict, path: str, value):
    cur = st
    keys = path.split(".")
    for k in keys[:-1]:
        cur = cur[k]
    if value is _DEL:
        del cur[keys[-1]]
    else:
        cur[keys[-1]] = value


_DEL = object()
_STATE_EDITS = [
    ("next_round", -1), ("next_round", 1e30), ("next_round", "3"), ("next_round", True),
    ("next_round", _DEL), ("model", [1, 2]), ("model", {"w": 3}), ("config_hash", 5),
    ("rng", None), ("rng.torch", torch.zeros(3)), ("rng.numpy", ("MT19937", 1, 2, 3, 4.0)),
    ("rng.python", (3, (1, 2), None)), ("server", "x"), ("server.held", [1, 2]),
    ("server.log", {0: 5}), ("server.adam_zo", {"m": 1}), ("elapsed", "x"), ("format", 99),
]


@pytest.mark.parametrize("case", range(len(_STATE_EDITS)))
def test_checkpoint_wrong_types_with_a_valid_integrity_frame(finished_run, tmp_path, case):
    """A forged checkpoint with a correct SHA-256 but wrong types is still refused clearly."""
    from zowarmup._safeio import frame, from_plain, to_plain, torch_save_bytes, unframe
    from zowarmup.federated.checkpoint import CheckpointError, load_checkpoint
    p = finished_run / "checkpoint.pt"
    st = from_plain(torch.load(io.BytesIO(unframe(p.read_bytes(), p)), weights_only=True))
    _edit(st, *_STATE_EDITS[case])
    (tmp_path / "checkpoint.pt").write_bytes(frame(torch_save_bytes(to_plain(st))))
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(tmp_path)
    assert "\n" not in str(ei.value) and "checkpoint.pt" in str(ei.value)


# ---- message decoding ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    return zdata.load_dataset("digits")


@pytest.fixture(scope="module")
def server(digits):
    from zowarmup.federated.config import RunConfig, apply_overrides, validate
    from zowarmup.federated.federation import build_global_model
    from zowarmup.federated.server import Server
    cfg = validate(apply_overrides(RunConfig(), TINY + ["progress=false", "rounds=6"])
                   ).for_run("zowarmup", 0)
    srv = Server(cfg, build_global_model(cfg, digits), 6)
    srv.registered[:] = 30
    return srv


def _server_state(srv):
    return (copy.deepcopy(srv.model.state_dict()), srv.held.copy(),
            {r: None if m is None else m.to_bytes() for r, m in srv.log.items()},
            srv.registered.copy())


def _same(srv, st):
    sd, held, logd, reg = st
    return (all(torch.equal(a, b) for a, b in zip(sd.values(), srv.model.state_dict().values()))
            and np.array_equal(held, srv.held) and np.array_equal(reg, srv.registered)
            and logd == {r: None if m is None else m.to_bytes() for r, m in srv.log.items()})


def _replies(srv):
    from zowarmup.federated import messages as M
    task = M.SeedsMessage(2, np.arange(1, 3, dtype=np.uint64), 1)
    return task, [
        ("weights", M.WeightsMessage(1, srv.layout.flatten(srv.model), 30)),
        ("grads", M.GradsMessage(2, np.array([0.5, -1.5], np.float32), 30, 123)),
        ("status", M.StatusMessage(2, M.Status.OK, 2, "fine", 7)),
    ]


@pytest.mark.parametrize("seed", range(60))
def test_server_accept_byte_fuzz(server, seed):
    rng = random.Random(9900 + seed)
    task, replies = _replies(server)
    kind_name, msg = replies[seed % len(replies)]
    rnd = msg.round
    kind, bad = corrupt(msg.to_bytes(), rng)
    st, n_rej = _server_state(server), int(server.rejected[1])
    out = server.accept(1, bad, rnd, task=task, kind=kind_name)
    assert _same(server, st)
    if out is None:
        assert int(server.rejected[1]) == n_rej + 1
    else:  # a corruption that kept the message legal (e.g. a flipped bit in a value)
        assert int(server.rejected[1]) == n_rej and out.TYPE == msg.TYPE


_FIELD_EDITS = [
    ("round", -1), ("round", 2 ** 40), ("round", 1.0), ("round", "2"), ("round", None),
    ("round", True), ("values", [0.5, 1.0]), ("values", np.zeros(2, np.float64)),
    ("values", np.zeros((1, 2), np.float32)), ("values", np.zeros(3, np.float32)),
    ("values", np.array([np.nan, 1], np.float32)), ("values", np.array([3e38, 1], np.float32)),
    ("values", None), ("num_samples", 0), ("num_samples", -5), ("num_samples", 2 ** 40),
    ("num_samples", 29), ("num_samples", 30.0), ("checksum", -1), ("checksum", 2 ** 32),
    ("checksum", "abc"), ("TYPE", "GRADS"), ("TYPE", 3.0), ("TYPE", None),
]


@pytest.mark.parametrize("case", range(len(_FIELD_EDITS)))
def test_server_accept_wrong_types_and_extreme_values(server, case):
    task, replies = _replies(server)
    msg = copy.deepcopy(replies[1][1])  # grads
    field, value = _FIELD_EDITS[case]
    if field == "TYPE":
        msg = type("Forged", (), {"TYPE": value, "round": 2, "values": msg.values,
                                  "num_samples": 30, "checksum": None})()
    else:
        object.__setattr__(msg, field, value)
    st, n_rej = _server_state(server), int(server.rejected[2])
    assert server.accept(2, msg, 2, task=task, kind=("grads", "status")) is None
    assert int(server.rejected[2]) == n_rej + 1 and _same(server, st)


@pytest.mark.parametrize("seed", range(40))
def test_client_side_decoding_fuzz(seed):
    """Server -> client messages (tasks, broadcasts, replays, downloads) decoded by
    decode_checked and the client-side checks: a Rejected or a legal message, nothing else."""
    from zowarmup.federated import messages as M
    from zowarmup.federated.validation import (Limits, Rejected, check_broadcast, check_replay,
                                               check_seeds_task, check_weights_download,
                                               decode_checked)
    rng = random.Random(11000 + seed)
    lim = Limits(state_size=8, seeds_per_task=4, local_steps=2, num_clients=4, rounds=10,
                 max_broadcast=8, pivot=2)
    b0 = M.BroadcastMessage(2, np.arange(1, 5, dtype=np.uint64), np.ones(4, np.float32))
    b1 = M.BroadcastMessage(3, np.arange(5, 9, dtype=np.uint64), -np.ones(4, np.float32))
    msgs = [(M.SeedsMessage(4, np.arange(1, 5, dtype=np.uint64), 2, 99),
             lambda m: check_seeds_task(m, 3, lim)),
            (b0, lambda m: check_broadcast(m, lim)),
            (M.ReplayMessage(4, [b0, b1]), lambda m: check_replay(m, 2, lim)),
            (M.WeightsMessage(4, np.zeros(8, np.float32), 0), lambda m: check_weights_download(m, lim))]
    msg, check = msgs[seed % len(msgs)]
    kind, bad = corrupt(msg.to_bytes(), rng)
    tracemalloc.start()
    try:
        try:
            out = check(decode_checked(bad, msg.TYPE, lim))
            assert out.TYPE == msg.TYPE
        except Rejected as e:
            assert "\n" not in str(e)
        assert tracemalloc.get_traced_memory()[1] < MEM_CAP
    finally:
        tracemalloc.stop()

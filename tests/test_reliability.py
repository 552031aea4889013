"""Issue 14: safe to resume and safe to load. Every file the project reads back is untrusted: no code
runs from a checkpoint, a damaged checkpoint is refused (naming the file) and the previous good one
is used, a bad metrics line never makes a run unfinishable, labels and npz files are checked before
anything is sized by them, and every error is one line naming the problem, before state changes."""
import copy
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from zowarmup import data as zdata
from zowarmup.cli import main
from zowarmup.federated.checkpoint import CHECKPOINT, load_checkpoint
from zowarmup.federated.config import RunConfig, apply_overrides, validate
from zowarmup.federated.loop import read_metrics

# What this file tests is new API; imported lazily so that, run against the code before the fix,
# each test fails on its own behaviour instead of the whole module failing to import.
PREVIOUS = "checkpoint.prev.pt"
FRAME_HEADER_BYTES = 48


def frame(payload):
    from zowarmup._safeio import frame as f
    return f(payload)


def torch_save_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def run_lock(d):
    from zowarmup._safeio import run_lock as lock
    return lock(d)


def _ck_error():
    try:
        from zowarmup.federated.checkpoint import CheckpointError
        return CheckpointError
    except ImportError:
        return type("CheckpointErrorMissing", (Exception,), {})

REPO = Path(__file__).resolve().parents[1]
TINY = ["rounds=4", "pivot=2", "data.num_clients=10", "data.hi_fraction=0.3", "zo.num_seeds=3",
        "zo.clients_per_round=4", "measure_memory=false", "threads=1", "model.options.hidden=[16]",
        "checkpoint_every=1", "baselines=[]", "name=rel"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished tiny run folder (checkpoint every round, so checkpoint.prev.pt exists)."""
    out = tmp_path_factory.mktemp("runs")
    assert main(["run", "-q", "--out", str(out)] + TINY) == 0
    (exp,) = out.glob("rel-*")
    return exp / "zowarmup-seed0"


@pytest.fixture()
def run_copy(finished_run, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(finished_run, d)
    return d


def _final_weights(run_dir):
    return load_checkpoint(run_dir)["model"]


class _Evil:
    """Pickles into a call that creates ``path`` when unpickled by a code-running loader."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


# ---- bug 1: no code from the run folder ----------------------------------------------------------
@pytest.mark.parametrize("framed", [False, True], ids=["bare-torch-save", "framed-valid-sha256"])
def test_resume_never_runs_code_from_a_checkpoint(run_copy, tmp_path, capsys, framed):
    marker = tmp_path / "pwned"
    st = torch.load(io.BytesIO(_payload(run_copy / CHECKPOINT)), weights_only=True)
    st["memory"] = _Evil(marker)
    raw = torch_save_bytes(st)
    for name in (CHECKPOINT, PREVIOUS):
        (run_copy / name).write_bytes(frame(raw) if framed else raw)
    (run_copy / "summary.json").unlink()
    rc = main(["run", "-q", "--resume", str(run_copy)])
    err = capsys.readouterr().err
    assert not marker.exists()
    assert rc == 1 and "checkpoint.pt" in err and "refused" in err, err
    assert len(err.strip().splitlines()) == 1


def _payload(p):
    return Path(p).read_bytes()[FRAME_HEADER_BYTES:]


def test_format_1_checkpoints_still_resume(run_copy, finished_run):
    """A checkpoint written before framing (a bare torch.save holding numpy arrays) loads with
    weights_only=True plus numpy's plain-array globals, and the run resumes bit-identically."""
    st = load_checkpoint(run_copy)
    assert isinstance(st["server"]["held"], np.ndarray)
    (run_copy / PREVIOUS).unlink()
    st3 = load_checkpoint(finished_run)  # the final state the resumed run must reach
    from zowarmup._safeio import from_plain
    prev = from_plain(torch.load(io.BytesIO(_payload(finished_run / PREVIOUS)), weights_only=True))
    legacy = dict(prev, format=1)
    (run_copy / CHECKPOINT).write_bytes(torch_save_bytes(legacy))
    assert (run_copy / CHECKPOINT).read_bytes()[:2] == b"PK"
    ck = load_checkpoint(run_copy)
    assert ck["next_round"] == 3 and np.array_equal(ck["server"]["held"], prev["server"]["held"])
    (run_copy / "summary.json").unlink()
    assert main(["run", "-q", "--resume", str(run_copy)]) == 0
    assert (run_copy / "metrics.jsonl").read_bytes() == (finished_run / "metrics.jsonl").read_bytes()
    a = _final_weights(run_copy)
    assert all(torch.equal(a[k], v) for k, v in st3["model"].items())


def test_no_code_running_loads_in_the_project():
    """Every torch.load / pickle load in python/ and benchmarks/ is weights_only=True or a
    restricted unpickler (independent check: the source text)."""
    offenders = []
    for root in ("python", "benchmarks"):
        for f in (REPO / root).rglob("*.py"):
            for i, line in enumerate(f.read_text().splitlines(), 1):
                if "torch.load(" in line and "weights_only=True" not in line:
                    offenders.append(f"{f}:{i}")
                if ("pickle.load(" in line or "pickle.loads(" in line) and "_Safe" not in line:
                    offenders.append(f"{f}:{i}")
    assert offenders == []


# ---- bug 2: integrity, with a fallback to the previous good checkpoint ---------------------------
def test_corrupted_checkpoint_falls_back_and_the_run_ends_as_if_never_damaged(run_copy, finished_run,
                                                                              caplog):
    b = bytearray((run_copy / CHECKPOINT).read_bytes())
    for k in range(40):  # flip 40 bytes inside the payload
        b[FRAME_HEADER_BYTES + 50 + 7 * k] ^= 0xA5
    (run_copy / CHECKPOINT).write_bytes(bytes(b))
    with pytest.raises(_ck_error(), match=r"checkpoint\.pt: integrity check failed"):
        from zowarmup.federated.checkpoint import read_checkpoint_file
        read_checkpoint_file(run_copy / CHECKPOINT)
    ck = load_checkpoint(run_copy)
    assert ck["next_round"] == 3  # the previous checkpoint (rounds = 4, one per round)
    assert "checkpoint.pt: integrity check failed" in caplog.text
    (run_copy / "summary.json").unlink()
    assert main(["run", "-q", "--resume", str(run_copy)]) == 0
    assert (run_copy / "metrics.jsonl").read_bytes() == (finished_run / "metrics.jsonl").read_bytes()
    a, b = _final_weights(run_copy), _final_weights(finished_run)
    assert all(torch.equal(a[k], b[k]) for k in b)
    s0 = json.loads((finished_run / "summary.json").read_text())
    s1 = json.loads((run_copy / "summary.json").read_text())
    assert s1["final_accuracy"] == s0["final_accuracy"]


def test_one_flipped_weight_bit_is_detected(run_copy):
    b = bytearray((run_copy / CHECKPOINT).read_bytes())
    b[-2000] ^= 0x01
    (run_copy / CHECKPOINT).write_bytes(bytes(b))
    (run_copy / PREVIOUS).unlink()
    with pytest.raises(_ck_error(), match=r"checkpoint\.pt: integrity check failed"):
        load_checkpoint(run_copy)


# ---- bug 3: truncated / empty / garbage checkpoints -----------------------------------------------
@pytest.mark.parametrize("damage,match", [
    (lambda b: b"", "empty"),
    (lambda b: b[:100], "truncated"),
    (lambda b: b[:10], "not a zowarmup file"),
    (lambda b: os.urandom(3000), "not a zowarmup checkpoint"),
    (lambda b: b"PK\x03\x04" + b"\x00" * 60, "not a readable checkpoint"),
    (lambda b: frame(torch_save_bytes([1, 2, 3])), "format"),
    (lambda b: frame(b"garbage that is not a torch file"), "not a readable checkpoint"),
    (lambda b: frame(torch_save_bytes({"format": 2, "next_round": 1})), "missing 'model'"),
    (lambda b: b + b"tail", "trailing bytes"),
], ids=["empty", "truncated", "cut-header", "random", "bad-zip", "list", "framed-garbage",
        "missing-keys", "padded"])
def test_damaged_checkpoint_gives_one_line_naming_the_file(run_copy, capsys, damage, match):
    (run_copy / PREVIOUS).unlink()
    p = run_copy / CHECKPOINT
    p.write_bytes(damage(p.read_bytes()))
    before = {f.name: f.read_bytes() for f in run_copy.iterdir() if f.is_file()}
    with pytest.raises(_ck_error(), match=match) as ei:
        load_checkpoint(run_copy)
    assert str(ei.value).startswith(str(p)) and "\n" not in str(ei.value)
    (run_copy / "summary.json").unlink()
    del before["summary.json"]
    rc = main(["run", "-q", "--resume", str(run_copy)])
    err = capsys.readouterr().err
    assert rc == 1 and "checkpoint.pt" in err and len(err.strip().splitlines()) == 1, err
    after = {f.name: f.read_bytes() for f in run_copy.iterdir() if f.is_file()
             if f.name in before}
    assert after == before  # nothing rewritten


# ---- bug 4: metrics.jsonl --------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ['{"round": 1, oops}', "[1, 2]", '{"round": "x", "phase": "zo"}',
                                 "\udcff"], ids=["invalid-json", "not-object", "bad-field", "bad-utf8"])
def test_an_invalid_metrics_line_does_not_make_the_run_unfinishable(run_copy, finished_run, capsys,
                                                                    bad):
    p = run_copy / "metrics.jsonl"
    lines = p.read_text().splitlines(keepends=True)
    lines[1] = bad + "\n"
    p.write_bytes("".join(lines).encode("utf-8", "surrogateescape"))
    (run_copy / "summary.json").unlink()
    assert main(["run", "-q", "--resume", str(run_copy)]) == 0
    s = json.loads((run_copy / "summary.json").read_text())
    s0 = json.loads((finished_run / "summary.json").read_text())
    assert s["final_accuracy"] == s0["final_accuracy"]
    assert [r["round"] for r in read_metrics(run_copy)] == [0, 2, 3]
    assert "metrics.jsonl:2" in (run_copy / "run.log").read_text()


@pytest.mark.parametrize("how", ["deleted", "shortened"])
def test_missing_metrics_lines_give_one_line_error(run_copy, capsys, how):
    p = run_copy / "metrics.jsonl"
    if how == "deleted":
        p.unlink()
    else:
        p.write_text("".join(p.read_text().splitlines(keepends=True)[:1]))
    (run_copy / "summary.json").unlink()
    rc = main(["run", "-q", "--resume", str(run_copy)])
    err = capsys.readouterr().err
    assert rc == 1 and "metrics.jsonl" in err and len(err.strip().splitlines()) == 1, err


def test_metrics_missing_its_last_line_resumes_from_the_previous_checkpoint(run_copy, finished_run):
    p = run_copy / "metrics.jsonl"
    p.write_text("".join(p.read_text().splitlines(keepends=True)[:-1]))
    (run_copy / "summary.json").unlink()
    assert main(["run", "-q", "--resume", str(run_copy)]) == 0
    assert p.read_bytes() == (finished_run / "metrics.jsonl").read_bytes()


@pytest.mark.parametrize("damage", [lambda b: b[:len(b) // 2], lambda b: b"", lambda b: b"[]"])
def test_unreadable_summary_of_a_finished_run_is_rebuilt(run_copy, finished_run, damage):
    p = run_copy / "summary.json"
    p.write_bytes(damage(p.read_bytes()))
    assert main(["run", "-q", "--resume", str(run_copy)]) == 0
    s0 = json.loads((finished_run / "summary.json").read_text())
    s1 = json.loads(p.read_text())
    assert s1["final_accuracy"] == s0["final_accuracy"] and s1["rounds"] == s0["rounds"]
    assert "run summary" in (run_copy / "run.log").read_text()


def test_checkpoint_from_another_run_gives_one_line_error(run_copy, tmp_path, capsys):
    out = tmp_path / "other"
    assert main(["run", "-q", "--out", str(out)] + TINY + ["seed=5"]) == 0
    (other,) = out.glob("rel-*/zowarmup-seed5")
    shutil.copy(other / CHECKPOINT, run_copy / CHECKPOINT)
    (run_copy / "summary.json").unlink()
    rc = main(["run", "-q", "--resume", str(run_copy)])
    err = capsys.readouterr().err
    assert rc == 1 and "different config" in err and len(err.strip().splitlines()) == 1, err


# ---- lock: two --resume on one folder ---------------------------------------------------------------
def test_second_resume_on_a_folder_in_use_is_refused(run_copy, capsys):
    (run_copy / "summary.json").unlink()
    before = (run_copy / "metrics.jsonl").read_bytes()
    with run_lock(run_copy):  # as another process would hold it (flock: per open file)
        rc = main(["run", "-q", "--resume", str(run_copy)])
    err = capsys.readouterr().err
    assert rc == 1 and "in use by another zowarmup process" in err, err
    assert (run_copy / "metrics.jsonl").read_bytes() == before
    assert not (run_copy / "summary.json").exists()
    assert main(["run", "-q", "--resume", str(run_copy)]) == 0  # released: it finishes


def test_lock_is_held_across_processes(tmp_path):
    code = ("import sys, time; sys.path[:0] = [%r, %r]\n"
            "from zowarmup._safeio import run_lock\n"
            "l = run_lock(%r); print('locked', flush=True); sys.stdin.read()\n"
            % (str(REPO / "python"), str(REPO / "src"), str(tmp_path)))
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        from zowarmup._safeio import FolderBusyError
        with pytest.raises(FolderBusyError, match=f"pid {p.pid}"):
            run_lock(tmp_path)
    finally:
        p.stdin.close()
        p.wait(timeout=30)
    run_lock(tmp_path).release()  # free again once the holder is gone


def test_a_file_system_without_locks_runs_unlocked(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with run_lock(tmp_path):  # not mistaken for "in use by another process"
        pass


# ---- bug 5 / 6: labels and npz files ----------------------------------------------------------------
def _npz(path, y, x=None):
    x = np.random.default_rng(0).random((len(y), 64)).astype(np.float32) if x is None else x
    np.savez(path, x=x, y=y)
    return path


@pytest.mark.parametrize("value", [10 ** 9, 2 ** 62, 2 ** 40])
def test_huge_label_is_refused_naming_file_index_and_value(tmp_path, value):
    y = np.arange(200) % 10
    y[3] = value
    p = _npz(tmp_path / "huge.npz", y)
    with pytest.raises(ValueError) as ei:
        zdata.load_dataset("npz", p)
    msg = str(ei.value)
    assert "huge.npz" in msg and "'y'[3]" in msg and str(value) in msg, msg


def test_outlier_label_far_above_the_classes_present_is_refused(tmp_path):
    y = np.arange(200) % 10
    y[7] = 5000
    with pytest.raises(ValueError, match=r"'y'\[7\] = 5000 implies 5001 classes but only 11"):
        zdata.load_dataset("npz", _npz(tmp_path / "o.npz", y))
    y[7] = 999  # a sparse but plausible label set stays accepted
    assert zdata.load_dataset("npz", _npz(tmp_path / "ok.npz", y)).num_classes == 1000


def test_partition_checks_labels_before_allocating():
    with pytest.raises(ValueError, match=r"labels\[2\] = 4611686018427387904 is not a plausible"):
        zdata.dirichlet_partition(np.array([0, 1, 2 ** 62, 1]), 2, 0.5, 0)
    with pytest.raises(ValueError, match=r"labels\[1\] = 10 is outside the 10 classes"):
        zdata.dirichlet_partition(np.array([0, 10, 1, 1]), 2, 0.5, 0, num_classes=10)


@pytest.mark.parametrize("cut", [500, 30, 0])
def test_truncated_npz_is_a_clear_error(tmp_path, cut):
    p = _npz(tmp_path / "ok.npz", np.arange(200) % 10)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(p.read_bytes()[:cut])
    with pytest.raises(ValueError, match=r"bad\.npz.*not a readable \.npz file"):
        zdata.load_dataset("npz", bad)


def _npy_bytes(arr, shape=None):
    """An .npy member whose header claims ``shape`` (default: the array's own)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(arr.dtype),
                                               "fortran_order": False,
                                               "shape": shape or arr.shape})
    return buf.getvalue() + arr.tobytes()


@pytest.mark.parametrize("compress", [False, True])
def test_npz_header_claiming_a_huge_shape_is_refused_before_allocating(tmp_path, compress):
    import tracemalloc
    import zipfile
    x = np.zeros((200, 64), np.float32)
    y = (np.arange(200) % 10).astype(np.int64)
    forged = tmp_path / "forged.npz"
    mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(forged, "w", mode) as z:
        z.writestr("x.npy", _npy_bytes(x, (10 ** 10, 64)))  # claims 2.3 TiB
        z.writestr("y.npy", _npy_bytes(y))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"forged\.npz.*claims shape \(10000000000, 64\)"):
            zdata.load_dataset("npz", forged)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2 ** 20


# ---- ZOOptimizer.load_state_dict and meta parameters -------------------------------------------------
@pytest.mark.parametrize("key,value", [("step", float("nan")), ("step", float("inf")),
                                       ("step", 3.7), ("step", "12"), ("step", True),
                                       ("step", -1), ("skipped_steps", -3),
                                       ("skipped_steps", 99), ("consecutive_skips", 1),
                                       ("seed", -1), ("seed", 2 ** 64), ("seed", 1.0)])
def test_optimizer_load_state_dict_is_strict_about_zo(key, value):
    from zowarmup.optim import ZOOptimizer
    p = torch.nn.Parameter(torch.zeros(5))
    opt = ZOOptimizer([p], lr=0.1)
    sd = opt.state_dict()
    before = copy.deepcopy(opt.state_dict())
    bad = dict(sd, zo=dict(sd["zo"], **{key: value}))
    with pytest.raises(ValueError, match=rf"zo\['{key}'\]") as ei:
        opt.load_state_dict(bad)
    assert "\n" not in str(ei.value)
    assert opt.state_dict() == before


@pytest.mark.parametrize("zo", [None, 5, "x", [1]])
def test_optimizer_load_state_dict_refuses_a_non_dict_zo(zo):
    from zowarmup.optim import ZOOptimizer
    opt = ZOOptimizer([torch.nn.Parameter(torch.zeros(5))], lr=0.1)
    with pytest.raises(ValueError, match="'zo' must be a dict"):
        opt.load_state_dict(dict(opt.state_dict(), zo=zo))


@pytest.mark.parametrize("n", [1, 2])
def test_meta_parameters_are_refused_clearly(n):
    import zo_kernels
    from zowarmup.optim import ZOOptimizer
    ps = [torch.nn.Parameter(torch.empty(4, device="meta")) for _ in range(n)]
    with pytest.raises(ValueError, match="meta device"):
        ZOOptimizer(ps, lr=0.1)
    with pytest.raises(ValueError, match="meta tensor"):
        zo_kernels.apply_seeds_([p.detach() for p in ps], [1], [1.0])


# ---- config, --out, compare ------------------------------------------------------------------------------
def test_non_utf8_config_names_the_file(tmp_path, capsys):
    p = tmp_path / "latin1.toml"
    p.write_bytes("name = 'caf\u00e9'\n".encode("latin-1"))
    assert main(["config", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert "latin1.toml" in err and "UTF-8" in err and len(err.strip().splitlines()) == 1


def test_out_pointing_at_a_file(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("keep me\n")
    assert main(["run", "-q", "--out", str(f)] + TINY) == 2
    err = capsys.readouterr().err
    assert "afile" in err and "is a file" in err and len(err.strip().splitlines()) == 1
    assert f.read_text() == "keep me\n"


@pytest.mark.parametrize("damage,what", [
    (lambda s: {k: v for k, v in s.items() if k != "final_accuracy"}, "final_accuracy"),
    (lambda s: {k: v for k, v in s.items() if k != "communication"}, "communication"),
    (lambda s: dict(s, final_accuracy="high"), "final_accuracy"),
    (lambda s: dict(s, communication={"zo": {}}), "communication"),
    (lambda s: [1, 2], "JSON object"),
    (lambda s: "{not json", "not valid JSON"),
], ids=["no-acc", "no-comm", "acc-str", "comm-empty", "list", "invalid"])
def test_compare_on_malformed_summary(run_copy, capsys, damage, what):
    p = run_copy / "summary.json"
    d = damage(json.loads(p.read_text()))
    p.write_text(d if isinstance(d, str) else json.dumps(d))
    assert main(["compare", str(run_copy)]) == 1
    err = capsys.readouterr().err
    assert "summary.json" in err and what in err and len(err.strip().splitlines()) == 1, err


def test_compare_on_malformed_run_config(run_copy, capsys):
    p = run_copy / "config.json"
    d = json.loads(p.read_text())
    del d["data"]["alpha"]
    p.write_text(json.dumps(d))
    assert main(["compare", str(run_copy)]) == 1
    err = capsys.readouterr().err
    assert "config.json" in err and "data.alpha" in err


# ---- messages ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    return zdata.load_dataset("digits")


@pytest.fixture()
def server(digits):
    from zowarmup.federated.federation import build_global_model
    from zowarmup.federated.server import Server
    cfg = validate(apply_overrides(RunConfig(), TINY + ["progress=false"])).for_run("zowarmup", 0)
    srv = Server(cfg, build_global_model(cfg, digits), 10)
    srv.registered[:] = 30
    return srv


def test_wrong_type_message_objects_are_counted_rejections(server):
    from zowarmup.federated import messages as M

    class Fake:
        def __init__(self, t):
            self.TYPE = t
            self.round, self.values, self.num_samples, self.checksum = 0, np.zeros(3, np.float32), 30, None

    before = copy.deepcopy(server.model.state_dict()), server.held.copy()
    fakes = [Fake("WEIGHTS"), Fake(99), Fake(None), Fake(M.MsgType.WEIGHTS), Fake(M.MsgType.STATUS),
             Fake(True), M.SeedsMessage(0, [1, 2, 3], 1)]
    for i, f in enumerate(fakes):
        assert server.accept(1, f, 0, kind="weights" if i == len(fakes) - 1 else None) is None
    assert int(server.rejected[1]) == len(fakes)
    assert all(torch.equal(a, b) for a, b in zip(before[0].values(),
                                                 server.model.state_dict().values()))
    assert np.array_equal(before[1], server.held)


def test_projected_gradient_of_exactly_the_bound_is_accepted():
    from zowarmup.federated import messages as M
    from zowarmup.federated.validation import (MAX_ABS_VALUE, Limits, Rejected,
                                               check_grads_reply)
    lim = Limits(state_size=10, seeds_per_task=2, local_steps=1, num_clients=2, rounds=3,
                 max_broadcast=2)
    task = M.SeedsMessage(0, [1, 2], 1)
    ok = M.GradsMessage(0, np.array([np.float32(MAX_ABS_VALUE), -np.float32(MAX_ABS_VALUE)]), 5)
    assert check_grads_reply(M.GradsMessage.from_bytes(ok.to_bytes()), 0, task, lim) is not None
    over = np.nextafter(np.float32(MAX_ABS_VALUE), np.float32(np.inf))
    with pytest.raises(Rejected, match="exceeds"):
        check_grads_reply(M.GradsMessage(0, np.array([1.0, over], np.float32), 5), 0, task, lim)


# ---- Flower entry points ----------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["app", "x"], ["local", "--supernodes", "2"],
                                  ["simulate", "--supernodes", "2"]])
def test_flower_without_flwr_says_which_extra(monkeypatch, capsys, argv, tmp_path):
    monkeypatch.setitem(sys.modules, "flwr", None)  # import flwr -> ImportError
    from zowarmup.flower.__main__ import main as fmain
    assert fmain([a.replace("x", str(tmp_path / "app")) for a in argv]) == 2
    err = capsys.readouterr().err
    assert 'pip install -e ".[flower]"' in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "app").exists()


def test_flower_local_module_without_flwr_says_which_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "flwr", None)
    monkeypatch.delitem(sys.modules, "zowarmup.flower.apps", raising=False)
    monkeypatch.delitem(sys.modules, "zowarmup.flower.local", raising=False)
    from zowarmup.flower.local import main as lmain  # importable without flwr
    assert lmain(["--supernodes", "2"]) == 2
    assert 'pip install -e ".[flower]"' in capsys.readouterr().err


def test_flower_finish_run_folder_plots_and_prints_like_zowarmup_run(tmp_path):
    from zowarmup.flower.local import finish_run_folder, new_run_dir
    cfg = validate(apply_overrides(RunConfig(), TINY))
    d = new_run_dir(tmp_path / "runs", "flower-rel")
    recs = [{"round": r, "phase": "warmup" if r < 2 else "zo", "accuracy": 0.5 + r / 10}
            for r in range(4)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (d / "summary.json").write_text(json.dumps({"final_accuracy": 0.8125}))
    lines = []
    assert finish_run_folder(d, cfg, 3, echo=lines.append) == 0
    assert (d / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert lines == [f"ZOWarmUp on Flower (3 SuperNodes) seed 0: final accuracy 81.2% -> {d}"]
    assert d.parent == tmp_path / "runs" and d.name.startswith("flower-rel-")


def test_flower_local_command_ends_like_zowarmup_run(tmp_path):
    """The README's one-command deployment (SuperLink + 3 SuperNodes; about a minute)."""
    pytest.importorskip("flwr", reason="Flower is an extra: pip install '.[flower]'")
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "python"), str(REPO / "src"),
                                           os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-m", "zowarmup.flower", "local", "--supernodes", "3",
                          "--overrides", "data.hi_fraction=0.34 rounds=2 pivot=1 "
                          "model.options.hidden=[16] zo.num_seeds=2 measure_memory=false",
                          "--deadline", "60", "--timeout", "240"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
    last = res.stdout.strip().splitlines()[-1]
    (run_dir,) = (tmp_path / "runs").glob("flower-*")
    s = json.loads((run_dir / "summary.json").read_text())
    assert last == (f"ZOWarmUp on Flower (3 SuperNodes) seed 0: final accuracy "
                    f"{100 * s['final_accuracy']:.1f}% -> {Path('runs') / run_dir.name}")
    for f in ("metrics.jsonl", "final_state.pt", "accuracy.png"):
        assert (run_dir / f).exists(), f

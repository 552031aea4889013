"""The README's quickstart runs as written; the command line's error paths (a malformed data file,
``--resume`` with overrides, ``compare`` on a missing folder) end with one ``zowarmup: error:``
line, the documented exit status and no traceback; and subprocesses test the same copy of the code
as this process (they import the installed package, nothing put first on their path)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# README quickstart
# ------------------------------------------------------------------------------------------------
def quickstart_code() -> str:
    """The first ```python block of README.md's "## Quickstart" section."""
    text = (REPO / "README.md").read_text()
    m = re.search(r"^## Quickstart.*?$(.*?)^## ", text, re.S | re.M)
    assert m, "README.md has no '## Quickstart' section"
    block = re.search(r"```python\n(.*?)```", m.group(1), re.S)
    assert block, "the Quickstart section has no ```python block"
    return block.group(1)


def test_readme_quickstart_runs_and_trains():
    """Executed as extracted from README.md (so an edit that breaks it fails here): it runs, the
    optimizer took its 100 steps, the returned loss is a finite float, and the weights moved."""
    code = quickstart_code()
    assert "ZOOptimizer" in code and "opt.step(closure)" in code
    ns: dict = {"__name__": "__readme__"}
    torch.manual_seed(0)
    exec(compile(code, "README.md:Quickstart", "exec"), ns)
    model, opt, loss = ns["model"], ns["opt"], ns["loss"]
    assert isinstance(loss, float) and np.isfinite(loss)
    assert opt.state_dict()["zo"]["step"] == 100
    torch.manual_seed(0)
    fresh = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    moved = [not torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters())]
    assert all(moved)


def test_quickstart_extraction_fails_on_a_broken_readme(tmp_path, monkeypatch):
    """The extraction is strict: a README whose snippet no longer runs fails the test."""
    text = (REPO / "README.md").read_text().replace("lr=0.02,", "lr=0.02, momentum=0.9,")
    fake = tmp_path / "repo"
    fake.mkdir()
    (fake / "README.md").write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "REPO", fake)
    with pytest.raises(TypeError, match="momentum"):
        test_readme_quickstart_runs_and_trains()


# ------------------------------------------------------------------------------------------------
# command-line error paths
# ------------------------------------------------------------------------------------------------
TINY = ["rounds=2", "pivot=1", "data.num_clients=4", "data.hi_fraction=0.5", "zo.num_seeds=2",
        "measure_memory=false", "threads=1", "model.options.hidden=[8]", "baselines=[]",
        "num_seeds=1"]


def _bad_npz(kind: str, path: Path) -> Path:
    if kind == "not a zip":
        path.write_bytes(b"garbage, not an npz file")
    elif kind == "missing arrays":
        np.savez(path, a=np.zeros(3))
    elif kind == "length mismatch":
        np.savez(path, x=np.zeros((10, 8, 8), np.float32), y=np.zeros(7, np.int64))
    elif kind == "NaN pixels":
        np.savez(path, x=np.full((20, 8, 8), np.nan, np.float32), y=np.arange(20) % 2)
    return path


@pytest.mark.parametrize("kind", ["not a zip", "missing arrays", "length mismatch", "NaN pixels"])
def test_malformed_data_file_is_one_error_line(tmp_path, capsys, kind):
    from zowarmup.cli import main
    f = _bad_npz(kind, tmp_path / "data.npz")
    rc = main(["run", "-q", "--out", str(tmp_path / "out"), "data.name=npz",
               f"data.root={f}"] + TINY)
    err = capsys.readouterr().err
    assert rc == 1, err
    assert err.startswith("zowarmup: error: ") and err.count("\n") == 1, err
    assert "data.npz" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())  # no folder left


def test_absurd_round_count_is_refused_before_anything_is_written(tmp_path, capsys):
    from zowarmup.cli import main
    rc = main(["run", "-q", "--out", str(tmp_path / "out")] + TINY + ["rounds=10**23"])
    assert rc in (1, 2)
    rc = main(["run", "-q", "--out", str(tmp_path / "out")] + TINY[1:] + [f"rounds={10**23}"])
    err = capsys.readouterr().err
    assert rc in (1, 2) and "'rounds'" in err and "allowed range" in err, err
    assert err.strip().count("\n") <= 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_resume_with_overrides_or_config_is_refused(tmp_path, capsys):
    from zowarmup.cli import main
    for extra in (["rounds=3"], ["--config", str(REPO / "configs" / "digits_alpha0.5.toml")]):
        rc = main(["run", "--resume", str(tmp_path)] + extra)
        err = capsys.readouterr().err
        assert rc == 2, err
        assert err.startswith("zowarmup: error: --resume") and "saved config" in err, err
    assert list(tmp_path.iterdir()) == []


def test_compare_on_a_missing_folder_names_it(tmp_path, capsys):
    from zowarmup.cli import main
    missing = tmp_path / "no-such-run"
    rc = main(["compare", str(missing)])
    err = capsys.readouterr().err
    assert rc == 2 and str(missing) in err and err.startswith("zowarmup: error: "), err
    # a folder that exists but is neither a run nor an experiment: the same
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(tmp_path / "empty")]) == 2
    assert "neither a run folder" in capsys.readouterr().err


def test_cli_error_paths_in_a_subprocess_exit_with_the_status(tmp_path):
    """The console entry point maps the same errors to the process exit status."""
    res = subprocess.run([sys.executable, "-m", "zowarmup", "compare", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.startswith("zowarmup: error: ")


# ------------------------------------------------------------------------------------------------
# one copy of the code
# ------------------------------------------------------------------------------------------------
_WHERE = "import zowarmup, zo_kernels, zo_kernels._C as c; print(zowarmup.__file__); " \
         "print(zo_kernels.__file__); print(c.__file__)"


def test_subprocesses_import_the_same_copy_as_the_tests():
    """A plain subprocess (the environment the suite's subprocess tests use: no PYTHONPATH
    prepended) imports zowarmup, zo_kernels and the compiled extension from the same files as this
    process; and no test module puts the source tree first on a subprocess's path."""
    import zo_kernels
    import zo_kernels._C as c
    import zowarmup
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    res = subprocess.run([sys.executable, "-c", _WHERE], capture_output=True, text=True,
                         env=env, timeout=600, cwd="/")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == [zowarmup.__file__, zo_kernels.__file__, c.__file__]
    offenders = []
    for p in sorted(Path(__file__).parent.glob("test_*.py")):
        src = p.read_text()
        if re.search(r'REPO\s*/\s*"python"|REPO\s*/\s*"src"', src):
            offenders.append(p.name)
    assert offenders == [], f"tests that put the source tree on a subprocess path: {offenders}"

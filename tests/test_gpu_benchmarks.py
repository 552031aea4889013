"""The GPU benchmark scripts run end to end without a GPU (``--dry-run``): every GPU row is marked
not measured, and the parts a CPU can run do run (the stubbed host cost; one ZO step of a tiny model
of the benchmark's structure)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_kernels_gpu  # noqa: E402
import bench_zo_step_gpu  # noqa: E402


def test_opt125m_shapes_match_the_model():
    """The kernel benchmark's 196-tensor list is the ZO-step benchmark's model, in order."""
    shapes = bench_kernels_gpu.opt125m_shapes()
    with torch.device("meta"):
        model = bench_zo_step_gpu.OPTShaped(**bench_zo_step_gpu.OPT125M)
    assert [tuple(p.shape) for p in model.parameters()] == [tuple(s) for s in shapes]
    assert len(shapes) == 196
    assert sum(torch.Size(s).numel() for s in shapes) == 125_239_296


def test_kernel_benchmark_dry_run(capsys):
    rc = bench_kernels_gpu.main(["--dry-run", "--no-write", "--host-repeats", "3",
                                 "--dtypes", "float32", "--lists", "flat,opt125m"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.count("not measured: --dry-run") == 2 * (1 + 2 * 3)   # 2 lists x (copy_ + 2x3 ops)
    host_rows = [line for line in out.splitlines() if "launch stubbed" not in line
                 and line.startswith(("perturb_", "apply_seeds_")) and "not measured" not in line]
    assert len(host_rows) == 2 * 3 * 2, out                          # lists x ops x backends


def test_zo_step_benchmark_dry_run(capsys):
    rc = bench_zo_step_gpu.main(["--dry-run", "--no-write", "--dtypes", "float32", "--samples", "1",
                                 "--batch", "2", "--seq", "8"])
    out = capsys.readouterr().out
    assert rc == 0 and out.count("not measured: --dry-run") == 2, out

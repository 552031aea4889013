"""The C++ backend's CPU paths as test parameters: backend ``"cpu"`` once per path (avx512, avx2,
portable), so every bit-exact test runs on every path this machine executes.

A :class:`CpuPath` *is* the string ``"cpu"`` (it compares, hashes and is passed to the API as
``"cpu"``) and carries the path to select; :func:`select` selects it or skips the test with the reason,
and the autouse fixture :func:`restore_cpu_path` (import it into a test module) puts the previous
path back after each test.
"""
from __future__ import annotations

import pytest

from zo_kernels import _backends

PATHS = ("avx512", "avx2", "portable")


class CpuPath(str):
    """``"cpu"``, forcing one CPU path of the C++ backend."""

    path: str

    def __new__(cls, path: str):
        obj = super().__new__(cls, "cpu")
        obj.path = path
        return obj

    def __repr__(self) -> str:
        return f"cpu[{self.path}]"


def backend_params(names) -> list:
    """pytest params for backend ``names``, with "cpu" expanded into one param per CPU path."""
    out = []
    for b in names:
        if b == "cpu":
            out += [pytest.param(CpuPath(p), id=f"cpu-{p}") for p in PATHS]
        else:
            out.append(pytest.param(b, id=b))
    return out


def select(backend) -> None:
    """For a :class:`CpuPath`, select its path, or skip the test when this CPU does not run it."""
    if not isinstance(backend, CpuPath):
        return
    if _backends.cpu_extension() is None:
        pytest.skip("the C++ CPU backend is not built")
    paths = _backends.cpu_paths()
    if backend.path not in paths:
        pytest.skip(f"this CPU does not run the {backend.path} path (it runs {', '.join(paths)})")
    _backends.set_cpu_path(backend.path)


@pytest.fixture(autouse=True)
def restore_cpu_path():
    prev = _backends.cpu_path()
    yield
    if prev is not None:
        _backends.set_cpu_path(prev)

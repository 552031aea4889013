"""Test configuration. Triton runs on the CPU through its interpreter, which must be switched on
before triton is first imported, so it is set here, at the top of the first file pytest loads."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic_torch_seed():
    torch.manual_seed(0)
    yield

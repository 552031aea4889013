"""Test configuration. Without a GPU, Triton runs on the CPU through its interpreter, which must be
switched on before triton is first imported, so it is set here, in the first file pytest loads."""
import os

import torch  # importing torch does not import triton

if not torch.cuda.is_available():
    # No GPU: run the Triton kernels on CPU tensors in the interpreter. With a GPU they compile.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic_torch_seed():
    torch.manual_seed(0)
    yield

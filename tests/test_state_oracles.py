"""The oracles other tests rely on: ``states_equal`` (about 22 bit-identity assertions use it) is
strict -- same keys in the same order, same dtypes, shapes and bits -- and ``measure_peak`` raises
when it cannot measure instead of returning a number that passes a comparison."""
import copy

import pytest
import torch
from torch import nn

from zowarmup import memory
from zowarmup.federated.state import states_equal


class Holder(nn.Module):
    """A module whose state_dict is exactly the given name -> tensor entries (as buffers)."""

    def __init__(self, entries: dict):
        super().__init__()
        for k, v in entries.items():
            self.register_buffer(k, v.clone())


def _base():
    torch.manual_seed(0)
    return {"w": torch.randn(3, 4), "b": torch.randn(4).bfloat16(), "n": torch.tensor(7)}


def test_identical_states_are_equal_and_a_copy_of_a_real_model_too():
    assert states_equal(Holder(_base()), Holder(_base()))
    m = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    assert states_equal(m, copy.deepcopy(m))
    # non-contiguous tensors compare by value (row-major), not by storage layout
    t = torch.randn(4, 3)
    a, b = Holder({"w": t.t().contiguous()}), Holder({"w": t.clone()})
    b.w = b.w.t()  # same values, transposed view
    assert not b.w.is_contiguous() and states_equal(a, b)


def _variants():
    """(name, entries of b) pairs that differ from _base() in exactly one respect."""
    base = _base()
    extra = dict(base, extra=torch.zeros(1))
    missing = {k: v for k, v in base.items() if k != "n"}
    renamed = {("W" if k == "w" else k): v for k, v in base.items()}
    reordered = {k: base[k] for k in ("b", "w", "n")}
    dtype = dict(base, w=base["w"].double())
    dtype_same_bits = dict(base, w=base["w"].view(torch.int32))  # same bytes, another dtype
    shape = dict(base, w=base["w"].reshape(4, 3))                 # same bytes, another shape
    one_bit = dict(base)
    w = base["w"].clone()
    w.view(torch.int32)[1, 2] ^= 1                                # one ulp in one element
    one_bit["w"] = w
    int_buf = dict(base, n=torch.tensor(8))
    bf = dict(base)
    b2 = base["b"].clone()
    b2[0] = -b2[0]
    bf["b"] = b2
    return {"one extra key (zip would stop early)": extra,
            "one key missing": missing, "a key renamed": renamed, "keys reordered": reordered,
            "dtype float64": dtype, "dtype int32 with the same bytes": dtype_same_bits,
            "shape (4, 3) with the same bytes": shape, "one bit flipped": one_bit,
            "integer buffer differs": int_buf, "bfloat16 sign flipped": bf}


@pytest.mark.parametrize("name", list(_variants()))
def test_any_difference_makes_states_unequal(name):
    a, b = Holder(_base()), Holder(_variants()[name])
    assert not states_equal(a, b), name
    assert not states_equal(b, a), name + " (reversed)"


def test_signed_zero_and_nan_payloads_are_bits_not_values():
    """``torch.equal`` says -0.0 == 0.0 and NaN != NaN; the oracle compares bits: -0.0 differs
    from 0.0, a NaN equals itself, and two NaNs with different payloads differ."""
    z, nz = Holder({"x": torch.tensor([0.0])}), Holder({"x": torch.tensor([-0.0])})
    assert torch.equal(z.x, nz.x) and not states_equal(z, nz)
    nan = torch.tensor([float("nan")])
    assert not torch.equal(nan, nan) and states_equal(Holder({"x": nan}), Holder({"x": nan}))
    other = nan.clone()
    other.view(torch.int32)[0] ^= 1
    assert torch.isnan(other).all() and not states_equal(Holder({"x": nan}), Holder({"x": other}))


def test_measure_peak_raises_when_it_cannot_measure(monkeypatch):
    """No sentinel: without the CPU tracker's StorageWeakRef, or on a device it has no counter
    for, measure_peak raises, so ``peak_a - peak_b <= bound`` can never pass on two -1s."""
    buf = []
    assert memory.measure_peak(lambda: buf.append(torch.ones(1000))) >= 4000  # it does measure
    monkeypatch.setattr(memory, "StorageWeakRef", None)
    with pytest.raises(RuntimeError, match="StorageWeakRef"):
        memory.measure_peak(lambda: torch.ones(10))
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="device type 'meta'"):
        memory.measure_peak(lambda: None, "meta")


def test_memory_report_fails_loudly_instead_of_recording_none(monkeypatch, tmp_path):
    """The runner's memory report (the only caller in the package) propagates the error before
    any round runs; with measure_memory=false the run needs no measurement."""
    from zowarmup import data as zdata
    from zowarmup.federated.config import RunConfig, apply_overrides, validate
    from zowarmup.federated.loop import Runner
    over = ["rounds=1", "pivot=0", "num_seeds=1", "baselines=[]", "data.num_clients=4",
            "data.hi_fraction=0.5", "zo.num_seeds=2", "progress=false", "threads=1",
            "model.options.hidden=[8]"]
    ds = zdata.load_dataset("digits")
    monkeypatch.setattr(memory, "StorageWeakRef", None)
    cfg = validate(apply_overrides(RunConfig(), over + ["measure_memory=true"])).for_run("zowarmup", 0)
    with pytest.raises(RuntimeError, match="StorageWeakRef"):
        Runner(cfg, tmp_path / "a", dataset=ds).run()
    assert not (tmp_path / "a" / "metrics.jsonl").read_text()  # no round ran
    cfg = validate(apply_overrides(RunConfig(), over + ["measure_memory=false"])).for_run("zowarmup", 0)
    assert Runner(cfg, tmp_path / "b", dataset=ds).run()["memory"] is None

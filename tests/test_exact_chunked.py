"""Chunked exact evaluation (optim/exact_chunked.py): every perturbed weight a forward reads is
fl(w + alpha z) bit for bit (checked against the independent numpy Philox), the stored weights are
never written, big Linear / Embedding / Conv weights are made in chunks no bigger than the bound,
and reads outside a module's forward (tied weights) see the perturbation too."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import _philox_np as ref
import zo_kernels
from zowarmup.optim.exact_chunked import ChunkedPerturbation


def perturbed_np(p: torch.Tensor, seed: int, alpha: float, offset: int) -> torch.Tensor:
    """fl(w + alpha z) in float32 from the numpy Philox (independent of zo_kernels)."""
    z = ref.rademacher(seed, p.numel(), offset).astype(np.float32)
    w = p.detach().float().reshape(-1).numpy()
    out = (w + np.float32(alpha) * z).astype(np.float32)
    return torch.from_numpy(out).to(p.dtype).reshape(p.shape)


def bits(ps):
    return [p.detach().clone() for p in ps]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_linear_embedding_conv_read_exact_perturbed_weights(dtype):
    """Identity/one-hot probes make each op output the (perturbed) weights themselves, so the
    comparison is bit for bit; chunk_bytes forces several chunks per weight."""
    torch.manual_seed(0)
    lin = nn.Linear(12, 37).to(dtype)
    emb = nn.Embedding(50, 6).to(dtype)
    conv = nn.Conv2d(4, 10, 3, padding=1, bias=False).to(dtype)
    conv_b = nn.Conv2d(4, 10, 3, padding=1, bias=True).to(dtype)
    gconv = nn.Conv2d(4, 6, 1, groups=2, bias=False).to(dtype)
    params = [lin.weight, lin.bias, emb.weight, conv.weight, conv_b.weight, conv_b.bias, gconv.weight]
    offs = zo_kernels.offsets(params, 1000)  # a non-zero start: offsets are passed through
    cp = ChunkedPerturbation(params, offsets=offs, chunk_bytes=64)
    before = bits(params)
    seed, alpha = 2**64 - 5, 0.37
    want = {id(p): perturbed_np(p, seed, alpha, o) for p, o in zip(params, offs)}
    eye = torch.eye(12, dtype=dtype)
    idx = torch.tensor([[49, 0, 7], [7, 23, 48]])
    delta = torch.zeros(1, 4, 3, 3, dtype=dtype)
    delta[0, :, 1, 1] = 1  # conv of a centred one-hot: the kernel, flipped, per input channel
    with cp.perturb(seed, alpha):
        y_lin = F.linear(eye, lin.weight)                  # = W^T exactly
        y_lin_b = lin(torch.zeros(1, 12, dtype=dtype))     # = bias exactly
        y_emb = emb(idx)
        y_conv = torch.stack([conv(delta * (torch.arange(4) == c).view(1, 4, 1, 1).to(dtype))
                              for c in range(4)])
        y_b = conv_b(torch.zeros(1, 4, 3, 3, dtype=dtype))  # = bias exactly
        y_g = gconv(torch.eye(4, dtype=dtype).view(4, 4, 1, 1))
    assert torch.equal(y_lin, want[id(lin.weight)].t())
    assert torch.equal(y_lin_b[0], want[id(lin.bias)])
    assert torch.equal(y_emb, want[id(emb.weight)][idx])
    W = want[id(conv.weight)]
    for c in range(4):  # output (o, i, j) = W[o, c, 2-i, 2-j]: one non-zero product per output
        assert torch.equal(y_conv[c, 0], W[:, c].flip(-1).flip(-2))
    assert torch.equal(y_b[0], want[id(conv_b.bias)].view(10, 1, 1).expand(10, 3, 3))
    Wg = want[id(gconv.weight)].reshape(6, 2)
    exp_g = torch.zeros(4, 6, dtype=dtype)
    for i in range(4):
        g = i // 2
        exp_g[i, 3 * g:3 * g + 3] = Wg[3 * g:3 * g + 3, i % 2]
    assert torch.equal(y_g.reshape(4, 6), exp_g)
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    # chunks respected the bound where one row/channel fits; nothing fell back but the biases
    row_bytes = max(12, 3) * lin.weight.element_size()
    assert cp.chunk_max_bytes <= max(64, row_bytes, 9 * 4 * 4)
    assert cp.fallback_max_bytes <= 37 * 4


@pytest.mark.parametrize("autocast", [False, True])
def test_chunked_linear_writes_each_chunk_into_its_columns_for_batched_inputs(autocast):
    """A 3-D input (batch, tokens, features) through a chunked Linear with a bias: one-hot token
    rows make each output row a perturbed weight column plus the perturbed bias, bit for bit; the
    chunks' GEMMs write straight into the output's column slices (the direct path) and, under CPU
    autocast, through a copied chunk output (the other path) -- both give the same bits."""
    torch.manual_seed(3)
    lin = nn.Linear(6, 23)
    params = [lin.weight, lin.bias]
    offs = zo_kernels.offsets(params)
    cp = ChunkedPerturbation(params, chunk_bytes=48)  # 2 rows of 6 floats per chunk
    seed, alpha = 77, -0.25
    W = perturbed_np(lin.weight, seed, alpha, offs[0])
    b = perturbed_np(lin.bias, seed, alpha, offs[1])
    x = torch.eye(6).repeat(2, 1).view(2, 6, 6)
    with torch.autocast("cpu", dtype=torch.float32, enabled=autocast), cp.perturb(seed, alpha):
        y = lin(x)
    assert y.shape == (2, 6, 23) and y.is_contiguous()
    want = (W.t() + b).expand(2, 6, 23)
    assert torch.equal(y, want)
    assert cp.chunk_max_bytes <= 48


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_makes_only_the_rows_looked_up_with_their_own_offsets(dtype):
    """Few indices into a large table: only the rows looked up are perturbed (runs of consecutive
    rows at their own offsets, pre-batches first), bit for bit the whole-table values; the memory
    made is the rows', not the table's."""
    torch.manual_seed(4)
    emb = nn.Embedding(5000, 8).to(dtype)
    lin = nn.Linear(3, 2).to(dtype)  # another parameter first: the table's base is not 0
    params = [lin.weight, emb.weight]
    offs = zo_kernels.offsets(params, 7)
    cp = ChunkedPerturbation(params, offsets=offs, chunk_bytes=4096)
    idx = torch.tensor([[4999, 0, 17, 18, 19], [17, 4000, 4001, 2, 0]])
    pre = [([31, 32], [0.01, -0.03])]
    want = emb.weight.detach().clone()
    for s_, c_ in pre:
        zo_kernels.apply_seeds_(want, s_, c_, 1.0, "rademacher", None, offs[1])
    zo_kernels.apply_seeds_(want, [9], [0.5], 1.0, "rademacher", None, offs[1])
    before = emb.weight.detach().clone()
    with cp.perturb(9, 0.5, pre=pre):
        got = emb(idx)
    assert torch.equal(got, want[idx])
    assert torch.equal(emb.weight, before)
    assert cp.chunk_max_bytes <= 8 * 8 * emb.weight.element_size()  # 8 distinct rows, not 5000


def test_pre_batches_and_per_parameter_alphas_match_in_place_application():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Embedding(40, 8), nn.Flatten(), nn.Linear(24, 30), nn.GELU(),
                          nn.LayerNorm(30), nn.Linear(30, 5))
    params = list(model.parameters())
    x = torch.randint(0, 40, (4, 3))
    pre = [([11, 12], [0.01, -0.02]), ([13], [0.5])]
    alphas = [0.1 * (i + 1) for i in range(len(params))]
    ref_model = copy.deepcopy(model)
    rp = list(ref_model.parameters())
    offs = zo_kernels.offsets(rp)
    for p, o, a in zip(rp, offs, alphas):  # in place, one tensor at a time, same op sequence
        for s, c in pre:
            zo_kernels.apply_seeds_(p.data, s, c, 1.0, "rademacher", None, o)
        zo_kernels.apply_seeds_(p.data, [99], [a], 1.0, "rademacher", None, o)
    with torch.no_grad():
        want = ref_model(x)
    before = bits(params)
    cp = ChunkedPerturbation(params, chunk_bytes=96)
    with cp.perturb(99, alphas, pre=pre):
        got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    with torch.no_grad():
        assert not torch.allclose(model(x), want)  # outside perturb(): the stored weights


def test_reads_outside_the_owning_module_see_the_perturbation():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Linear(4, 4)
            self.out = nn.Linear(4, 3)

        def forward(self, x):
            return self.out(F.linear(x, self.emb.weight.t().contiguous())) + self.emb.bias.sum()

    torch.manual_seed(2)
    m = Tied()
    x = torch.randn(2, 4)
    r = copy.deepcopy(m)
    zo_kernels.apply_seeds_([p.data for p in r.parameters()], [5], [0.2])
    cp = ChunkedPerturbation(list(m.parameters()))
    with cp.perturb(5, 0.2):
        got = m(x)
    assert torch.equal(got, r(x).detach())
    assert cp.fallbacks  # t() and the bias sum fell back (whole copies of small tensors)


def test_bad_arguments():
    p = nn.Parameter(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="chunk_bytes"):
        ChunkedPerturbation([p], chunk_bytes=0)
    with pytest.raises(ValueError, match="offsets"):
        ChunkedPerturbation([p], offsets=[0, 128])
    with pytest.raises(ValueError, match="contiguous"):
        ChunkedPerturbation([nn.Parameter(torch.zeros(4, 3).t())])
    cp = ChunkedPerturbation([p])
    with pytest.raises(ValueError):
        with cp.perturb(-1, 0.1):
            pass
    with pytest.raises(ValueError, match="alphas"):
        with cp.perturb(1, [0.1, 0.2]):
            pass


# ------------------------------------------------------------------------------------------------
# ZOOptimizer(exact=True)
# ------------------------------------------------------------------------------------------------
from zowarmup import memory as accounting  # noqa: E402
from zowarmup.optim import ZOOptimizer  # noqa: E402
from zowarmup.seeds import sample_seeds  # noqa: E402


def _net(dtype=torch.float32):
    torch.manual_seed(3)
    return nn.Sequential(nn.Embedding(30, 16), nn.Flatten(), nn.Linear(48, 40), nn.Tanh(),
                         nn.LayerNorm(40), nn.Linear(40, 5)).to(dtype)


def _reference_exact_steps(model, x, y, steps, lr, eps, scale, S, seed):
    """Independent reference: perturbed copies from the numpy Philox (fl(w +- eps c z) in float32,
    then the parameter dtype), losses, g, and the update w + sum_s coeff_s z_s with the fp32
    sequential sum of the kernel's contract for S <= 4 (no decay)."""
    model = copy.deepcopy(model)
    ps = list(model.parameters())
    offs = zo_kernels.offsets(ps)
    a32 = float(np.float32(eps * scale))
    for t in range(steps):
        seeds = sample_seeds(seed, t, S)
        grads = []
        for s in seeds:
            vals = []
            for sign in (1.0, -1.0):
                m = copy.deepcopy(model)
                with torch.no_grad():
                    for p, q, o in zip(m.parameters(), ps, offs):
                        p.copy_(perturbed_np(q, s, sign * a32, o))
                    vals.append(float(F.cross_entropy(m(x).float(), y)))
            grads.append((vals[0] - vals[1]) / (2 * eps))
        coeffs = [np.float32(-lr * scale * g / S) for g in grads]
        with torch.no_grad():
            for p, o in zip(ps, offs):
                acc = np.zeros(p.numel(), np.float32)
                for s, c in zip(seeds, coeffs):
                    acc = (acc + c * ref.rademacher(s, p.numel(), o).astype(np.float32)
                           ).astype(np.float32)
                w = p.detach().float().reshape(-1).numpy()
                p.copy_(torch.from_numpy((w + acc).astype(np.float32)).to(p.dtype)
                        .reshape(p.shape))
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_step_equals_the_independent_reference_bit_for_bit(dtype):
    model = _net(dtype)
    x, y = torch.randint(0, 30, (8, 3)), torch.randint(0, 5, (8,))
    want = _reference_exact_steps(model, x, y, 3, 0.05, 1e-2, 1.0, 3, 11)
    opt = ZOOptimizer(model.parameters(), lr=0.05, eps=1e-2, scale=1.0, num_samples=3, seed=11,
                      exact=True)
    for _ in range(3):
        opt.step(lambda: F.cross_entropy(model(x).float(), y))
    for p, q in zip(model.parameters(), want.parameters()):
        assert torch.equal(p, q)
    assert not torch.equal(next(model.parameters()), next(_net(dtype).parameters()))


def test_exact_bf16_estimates_leave_weights_bit_identical_while_in_place_drifts():
    x, y = torch.randint(0, 30, (8, 3)), torch.randint(0, 5, (8,))
    drift = {}
    for exact in (False, True):
        model = _net(torch.bfloat16)
        w0 = [p.detach().clone() for p in model.parameters()]
        opt = ZOOptimizer(model.parameters(), lr=0.0, eps=1e-3, num_samples=2, exact=exact)
        for t in range(20):
            opt.estimate(lambda: F.cross_entropy(model(x).float(), y), seeds=opt.sample_seeds(t))
        opt.step(lambda: F.cross_entropy(model(x).float(), y))  # lr = 0: a step changes nothing
        drift[exact] = max(float((p.detach().float() - q.float()).abs().max())
                           for p, q in zip(model.parameters(), w0))
    assert drift[True] == 0.0 and drift[False] > 0.0


def test_exact_step_extra_memory_is_bounded_by_the_chunk_not_the_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 2048), nn.ReLU(), nn.Linear(2048, 8))  # 2 MiB layer
    x, y = torch.randn(16, 256), torch.randint(0, 8, (16,))
    chunk = 64 << 10
    opt = ZOOptimizer(model.parameters(), lr=1e-3, exact=True, exact_chunk_bytes=chunk)

    def loss():
        return F.cross_entropy(model(x), y)
    infer = accounting.measure_peak(lambda: float(loss()))
    step = accounting.measure_peak(lambda: opt.step(loss))
    if infer < 0:
        pytest.skip("this torch has no StorageWeakRef: the CPU peak tracker is unavailable")
    layer = 2048 * 256 * 4
    assert step - infer <= 2 * chunk + 2048 * 4 + 4096, (infer, step)  # chunk, its output, bias
    assert step - infer < layer / 4


def test_exact_argument_checks():
    m = _net()
    with pytest.raises(ValueError, match="exact"):
        ZOOptimizer(m.parameters(), exact=1)
    with pytest.raises(ValueError, match="exact_chunk_bytes"):
        ZOOptimizer(m.parameters(), exact=True, exact_chunk_bytes=0)

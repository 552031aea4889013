"""Tests for zowarmup.models: output shapes per config, norm selection, agreement with independent
reference implementations (torchvision's ResNet-18, torch's TransformerEncoderLayer), determinism,
forward-only / bf16 use, and the memory-by-formula table."""
import pytest
import torch
import torch.nn as nn

from zowarmup import models as M
from zowarmup import memory as MEM

CONFIGS = [
    # name, in_channels, image_size, norm
    ("cnn", 1, 8, "bn"), ("cnn", 1, 28, "gn"), ("cnn", 3, 32, "none"),
    ("mlp", 1, 8, "bn"), ("mlp", 3, 32, "gn"), ("mlp", 1, 28, "none"),
    ("resnet18", 3, 32, "bn"), ("resnet18", 3, 16, "gn"), ("resnet18", 1, 8, "none"),
    ("vit_small", 3, 32, None), ("vit_small", 1, 28, None), ("vit_small", 1, 8, "ln"),
]


@pytest.mark.parametrize("name,cin,size,norm", CONFIGS)
def test_output_shape_and_backward(name, cin, size, norm):
    model = M.build_model(name, 7, cin, size, norm=norm)
    x = torch.randn(2, cin, size, size)
    out = model(x)
    assert out.shape == (2, 7) and out.dtype == torch.float32 and torch.isfinite(out).all()
    out.square().mean().backward()  # backprop works (the FedAvg warm-up path)
    assert all(p.grad is not None for p in model.parameters())


def _norm_types(model):
    return {type(m) for m in model.modules()
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm))}


@pytest.mark.parametrize("name,cin,size", [("resnet18", 3, 32), ("cnn", 1, 8), ("mlp", 1, 8)])
def test_norm_selection(name, cin, size):
    bn = M.build_model(name, 10, cin, size, norm="bn")
    gn = M.build_model(name, 10, cin, size, norm="gn", gn_groups=4)
    none = M.build_model(name, 10, cin, size, norm="none")
    default = M.build_model(name, 10, cin, size)
    assert _norm_types(bn) == {nn.BatchNorm1d if name == "mlp" else nn.BatchNorm2d}
    assert _norm_types(default) == _norm_types(bn)
    assert _norm_types(gn) == {nn.GroupNorm}
    assert all(m.num_groups == 4 for m in gn.modules() if isinstance(m, nn.GroupNorm))
    assert _norm_types(none) == set()
    assert len(list(bn.buffers())) > 0 and len(list(gn.buffers())) == 0  # GN has no running stats
    if name == "resnet18":  # 20 norm layers: stem, 16 in blocks, 3 in downsampling shortcuts
        assert sum(isinstance(m, nn.GroupNorm) for m in gn.modules()) == 20


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown model"):
        M.build_model("resnet50", 10, 3, 32)
    with pytest.raises(ValueError, match="norm must be one of"):
        M.build_model("resnet18", 10, 3, 32, norm="layer")
    with pytest.raises(ValueError, match="LayerNorm"):
        M.build_model("vit_small", 10, 3, 32, norm="bn")
    with pytest.raises(ValueError, match="gn_groups=3 does not divide"):
        M.build_model("resnet18", 10, 3, 32, norm="gn", gn_groups=3)
    with pytest.raises(TypeError, match="unknown keyword.*depth"):
        M.build_model("cnn", 10, 1, 8, depth=3)
    with pytest.raises(ValueError, match="patch_size=5 does not divide image_size=32"):
        M.build_model("vit_small", 10, 3, 32, patch_size=5)
    with pytest.raises(ValueError, match="num_classes"):
        M.build_model("mlp", 0, 1, 8)


def test_resnet18_matches_torchvision():
    """The CIFAR ResNet-18 is torchvision's ResNet-18 with a 3x3 stride-1 stem and no max-pool:
    load our weights into that reference and compare outputs."""
    tv = pytest.importorskip("torchvision")
    ours = M.build_model("resnet18", 10, 3, 32, norm="bn").eval()
    ref = tv.models.resnet18(num_classes=10)
    ref.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    ref.maxpool = nn.Identity()
    ref.eval()
    assert M.count_parameters(ours) == M.count_parameters(ref) == 11_173_962
    src, dst = list(ours.state_dict().values()), ref.state_dict()
    assert [tuple(v.shape) for v in src] == [tuple(v.shape) for v in dst.values()]
    # Give BN non-trivial running stats so the comparison exercises them.
    with torch.no_grad():
        for m in ours.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    ref.load_state_dict(dict(zip(dst.keys(), ours.state_dict().values())))
    x = torch.randn(2, 3, 16, 16)  # both are size-agnostic; 16x16 keeps the test fast
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)


def _vit_params(d, depth, cin, p, tokens, k):
    """ViT parameter count from its definition."""
    return depth * (12 * d * d + 13 * d) + (cin * p * p + 1) * d + (tokens + 2) * d + 2 * d + \
        (d + 1) * k


def test_vit_block_matches_torch_transformer_layer():
    model = M.build_model("vit_small", 10, 3, 32).eval()
    blk = model.blocks[0]
    ref = nn.TransformerEncoderLayer(192, 3, dim_feedforward=768, dropout=0.0, activation="gelu",
                                     layer_norm_eps=1e-6, batch_first=True, norm_first=True).eval()
    with torch.no_grad():
        ref.self_attn.in_proj_weight.copy_(blk.attn.qkv.weight)
        ref.self_attn.in_proj_bias.copy_(blk.attn.qkv.bias)
        ref.self_attn.out_proj.weight.copy_(blk.attn.proj.weight)
        ref.self_attn.out_proj.bias.copy_(blk.attn.proj.bias)
        ref.linear1.load_state_dict(blk.mlp[0].state_dict())
        ref.linear2.load_state_dict(blk.mlp[2].state_dict())
        ref.norm1.load_state_dict(blk.ln1.state_dict())
        ref.norm2.load_state_dict(blk.ln2.state_dict())
        x = torch.randn(2, 65, 192)
        torch.testing.assert_close(blk(x), ref(x), rtol=1e-4, atol=1e-5)


def test_vit_small_config():
    model = M.build_model("vit_small", 10, 3, 32)
    assert model.patch_size == 4 and len(model.blocks) == 6
    assert M.count_parameters(model) == _vit_params(192, 6, 3, 4, 64, 10)
    with torch.device("meta"):
        assert M.build_model("vit_small", 10, 1, 28).patch_size == 4  # 7x7 tokens
        assert M.build_model("vit_small", 10, 1, 8, patch_size=2).patch_size == 2


def test_vit_b16_config_on_meta():
    with torch.device("meta"):
        m224 = M.build_model("vit_b16", 1000, 3, 224)
        m32 = M.build_model("vit_b16", 10, 3, 32)
    assert m224.patch_size == 16 and m32.patch_size == 4
    # ViT-B/16 at 224 with 1000 classes: the published 86,567,656 parameters.
    assert M.count_parameters(m224) == _vit_params(768, 12, 3, 16, 196, 1000) == 86_567_656
    assert M.count_parameters(m32) == _vit_params(768, 12, 3, 4, 64, 10)
    blk = m32.blocks[0]
    assert blk.attn.heads == 12 and blk.mlp[0].out_features == 3072 and len(m32.blocks) == 12
    # Shapes through all 12 blocks on a tiny input, without computing (meta tensors). The same
    # VisionTransformer code runs on real weights in the vit_small tests.
    with torch.no_grad():
        assert m32(torch.zeros(2, 3, 32, 32, device="meta")).shape == (2, 10)


@pytest.mark.parametrize("name,cin,size,kw", [("resnet18", 3, 8, {"width": 16}),
                                              ("vit_small", 3, 8, {"dim": 48, "depth": 2}),
                                              ("cnn", 1, 8, {}), ("mlp", 1, 8, {})])
def test_deterministic_init(name, cin, size, kw):
    torch.manual_seed(11)
    a = M.build_model(name, 10, cin, size, **kw)
    torch.manual_seed(11)
    b = M.build_model(name, 10, cin, size, **kw)
    torch.manual_seed(12)
    c = M.build_model(name, 10, cin, size, **kw)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("name,cin,size,norm", [("cnn", 1, 8, "gn"), ("mlp", 1, 8, "bn"),
                                                ("resnet18", 3, 8, "gn"),
                                                ("vit_small", 3, 8, None)])
def test_forward_only_and_bf16(name, cin, size, norm):
    kw = {"patch_size": 2} if name == "vit_small" else {}
    model = M.build_model(name, 10, cin, size, norm=norm, **kw).eval()
    x = torch.randn(4, cin, size, size)
    ref = model(x).detach()
    with torch.no_grad():  # forward-only training: same result, nothing recorded for backward
        out = model(x)
    assert not out.requires_grad
    torch.testing.assert_close(out, ref)
    # In-place parameter updates under no_grad (what apply_seeds_ does) change the output.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
        assert not torch.equal(model(x), ref)
        for p in model.parameters():
            p.sub_(0.05)
        model16 = model.to(torch.bfloat16)
        out16 = model16(x.to(torch.bfloat16))
    assert out16.dtype == torch.bfloat16 and torch.isfinite(out16).all()
    scale = ref.abs().max().item()
    assert (out16.float() - ref).abs().max().item() < 0.1 * scale + 0.05


# ---- memory table --------------------------------------------------------------------------------

def test_memory_table_by_hand():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    b = 8
    tab = MEM.model_memory_table(model, b, (10,))
    w = 4 * (10 * 20 + 20 + 20 * 5 + 5)           # 1300 bytes of fp32 weights
    a1 = 4 * b * (20 + 20)                       # the ReLU: 20 in + 20 out per sample
    a = 4 * b * (10 + 20 + 20 + 5)               # input + every layer's output
    p = 4 * 10 * 20                              # largest tensor: first weight
    assert tab["inference"]["total_bytes"] == w + a1
    assert tab["zo"]["total_bytes"] == w + a1
    assert tab["mezo"]["total_bytes"] == w + a1 + p
    assert tab["backprop_sgd"]["total_bytes"] == w + w + a
    assert tab["backprop_sgdm"]["total_bytes"] == w + 2 * w + a
    assert tab["backprop_adam"]["total_bytes"] == w + 3 * w + a
    assert tab["mezo"]["vs_inference"] == pytest.approx((w + a1 + p) / (w + a1))
    aliased = MEM.model_memory_table(model, b, (10,), methods=("fedavg", "zowarmup", "fedadam",
                                                              "adam"))
    assert aliased["fedavg"] == tab["backprop_sgd"] and aliased["zowarmup"] == tab["zo"]
    assert aliased["fedadam"] == tab["backprop_sgd"]  # FedAdam clients run SGD
    assert aliased["adam"] == tab["backprop_adam"]
    with pytest.raises(ValueError, match="unknown memory method"):
        MEM.model_memory_table(model, b, (10,), methods=("lora",))
    with pytest.raises(ValueError, match="input_shape"):
        MEM.model_memory_table(model, b, ())


def test_memory_table_frozen_params_bf16_and_modes():
    model = M.build_model("cnn", 10, 1, 8, norm="bn")
    model.train()
    model.features[0].eval()  # a mixed state must survive the profiling forward
    full = MEM.model_memory_table(model, 16, (1, 8, 8))
    assert model.training and not model.features[0].training and model.features[1].training
    n = M.count_parameters(model)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert full["inference"]["weights"] == 4 * n + buffers
    totals = [full[m]["total_bytes"] for m in MEM.MEMORY_METHODS]
    assert totals[0] == totals[1] < totals[2] < totals[3] < totals[4] < totals[5]
    # Frozen parameters need no gradient or optimizer state.
    model.fc.requires_grad_(False)
    frozen = MEM.model_memory_table(model, 16, (1, 8, 8), methods=("backprop_adam",))
    fc = 4 * (model.fc.weight.numel() + model.fc.bias.numel())
    assert frozen["backprop_adam"]["grads"] == full["backprop_adam"]["grads"] - fc
    # bf16 halves weights and activations (buffers: num_batches_tracked stays int64).
    half = MEM.model_memory_table(model.to(torch.bfloat16), 16, (1, 8, 8))
    assert half["inference"]["activations"] * 2 == full["inference"]["activations"]


def test_memory_table_meta_equals_real():
    torch.manual_seed(0)
    real = M.build_model("resnet18", 10, 3, 32, norm="gn")
    with torch.device("meta"):
        meta = M.build_model("resnet18", 10, 3, 32, norm="gn")
    t_real = MEM.model_memory_table(real, 32, (3, 32, 32))
    t_meta = MEM.model_memory_table(meta, 32, (3, 32, 32))
    assert t_real == t_meta
    # The largest single activation of this ResNet is a 64x32x32 map: A1 = in + out of one
    # 3x3 conv at full resolution, 2 * 64*32*32 floats per sample.
    assert t_real["zo"]["activations"] == 32 * 4 * 2 * 64 * 32 * 32

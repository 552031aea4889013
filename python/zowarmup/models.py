"""Models for ZOWarmUp experiments (the memory each training method needs is in :mod:`zowarmup.memory`).

Public API:

- :func:`build_model` - ``"resnet18"`` (CIFAR-style, BatchNorm or GroupNorm), ``"vit_small"``,
  ``"vit_b16"``, ``"cnn"``, ``"mlp"``; all take NCHW float input and return (N, num_classes)
  logits.
- :func:`count_parameters` - parameter elements (shared ones once).

All models are plain ``nn.Module`` s built only from standard layers: no in-place activation
tricks, so a forward under ``torch.no_grad()`` (zeroth-order training) and a backward (FedAvg
warm-up) both work, in float32, bfloat16 and float16 (``model.to(dtype)``). Initialization draws
from torch's global RNG in a fixed order, so ``torch.manual_seed(s)`` before :func:`build_model`
gives identical weights.

Note for zeroth-order training with BatchNorm: in train mode every forward uses batch statistics
and updates the running averages, so the 2S perturbed forwards of a ZO step each move the running
stats. GroupNorm (``norm="gn"``) or ``norm="none"`` have no such state.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["build_model", "MODELS", "NORMS", "ResNet18", "VisionTransformer", "SmallCNN", "MLP",
           "count_parameters"]

#: Names understood by :func:`build_model`.
MODELS = ("resnet18", "vit_small", "vit_b16", "cnn", "mlp")
#: Normalization choices for the convolutional models and the MLP.
NORMS = ("bn", "gn", "none")


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------

def _gn_groups(channels: int, groups: int) -> int:
    if channels % groups:
        raise ValueError(f"gn_groups={groups} does not divide a layer's {channels} channels")
    return groups


def _norm2d(norm: str, channels: int, gn_groups: int) -> nn.Module:
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "gn":
        return nn.GroupNorm(_gn_groups(channels, gn_groups), channels)
    return nn.Identity()


def _norm1d(norm: str, features: int, gn_groups: int) -> nn.Module:
    if norm == "bn":
        return nn.BatchNorm1d(features)
    if norm == "gn":
        return nn.GroupNorm(_gn_groups(features, gn_groups), features)
    return nn.Identity()


class _BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions and a shortcut (1x1 conv + norm on a shape
    change)."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str, gn_groups: int):
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=bias)
        self.n1 = _norm2d(norm, cout, gn_groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=bias)
        self.n2 = _norm2d(norm, cout, gn_groups)
        self.act1 = nn.ReLU()
        self.act2 = nn.ReLU()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=bias),
                                          _norm2d(norm, cout, gn_groups))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.n1(self.conv1(x)))
        out = self.n2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for small images (the CIFAR variant of He et al. 2016 used by the paper).

    Stem: 3x3 conv, stride 1, ``width`` channels, norm, ReLU, no max-pool. Four stages of two
    basic blocks with ``width * (1, 2, 4, 8)`` channels, strides (1, 2, 2, 2), global average
    pool, linear classifier. With ``width=64`` and 10 classes: 11,173,962 parameters.

    Args:
        num_classes: K.
        in_channels: C of the input (N, C, H, W); any H, W >= 1 (32x32 is the design size).
        norm: ``"bn"`` (BatchNorm, the paper's FedAvg setting), ``"gn"`` (GroupNorm with
            ``gn_groups`` groups, the paper's FedAdam setting; 2 groups as in Hsieh et al. 2020 and
            Reddi et al. 2021) or ``"none"`` (convolutions then carry a bias).
        width: channels of the stem and first stage.
        gn_groups: groups per GroupNorm layer.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, norm: str = "bn",
                 width: int = 64, gn_groups: int = 2):
        super().__init__()
        bias = norm == "none"
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=bias),
                                  _norm2d(norm, width, gn_groups), nn.ReLU())
        stages, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2 ** i
            stages.append(nn.Sequential(_BasicBlock(cin, cout, stride, norm, gn_groups),
                                        _BasicBlock(cout, cout, 1, norm, gn_groups)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, num_classes) logits."""
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class _SDPA(nn.Module):
    """Scaled dot-product attention as a leaf module, so that activation hooks see its output."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.core = _SDPA()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = self.core(qkv[0], qkv[1], qkv[2])  # (B, heads, T, d/heads)
        return self.proj(o.transpose(1, 2).reshape(b, t, d))


class _Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.ln1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def _auto_patch(image_size: int) -> int:
    """Patch size giving a token grid closest to 8x8 (ties: the smaller patch); it must divide
    ``image_size``. 32 -> 4 (8x8 tokens), 28 -> 4 (7x7), 64 -> 8, 8 -> 1."""
    divisors = [p for p in range(1, image_size + 1) if image_size % p == 0]
    return min(divisors, key=lambda p: (abs(image_size // p - 8), p))


class VisionTransformer(nn.Module):
    """Vision Transformer (Dosovitskiy et al. 2021): patch embedding, class token, learned
    position embeddings, ``depth`` pre-norm blocks, LayerNorm, linear head on the class token.

    Args:
        num_classes: K.
        in_channels: C.
        image_size: H == W of the input, pixels; must be divisible by ``patch_size``.
        patch_size: pixels per patch side.
        dim: embedding width.
        depth: number of blocks.
        heads: attention heads (must divide ``dim``).
        mlp_ratio: MLP hidden width / dim.

    Parameters (for checks): ``12 dim^2 + 13 dim`` per block, plus patch embedding
    ``(C p^2 + 1) dim``, class token and positions ``(T + 2) dim`` (T = (image_size / p)^2
    patches), final norm ``2 dim`` and head ``(dim + 1) K``.
    """

    def __init__(self, num_classes: int, in_channels: int, image_size: int, patch_size: int,
                 dim: int, depth: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"patch_size={patch_size} does not divide image_size={image_size}")
        if dim % heads:
            raise ValueError(f"heads={heads} does not divide dim={dim}")
        self.patch_size = patch_size
        tokens = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*[_Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, num_classes) logits."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, T, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class SmallCNN(nn.Module):
    """Small CNN for CPU-scale runs (8x8 digits, 28x28 MNIST, 32x32 CIFAR).

    ``len(widths)`` stages of [3x3 conv (padding 1), norm, ReLU]; a 2x2 max-pool follows every
    stage but the last while the feature map is at least 4 pixels wide (8 -> 4 -> 2, 28 -> 14 -> 7,
    32 -> 16 -> 8); then adaptive average pooling to 2x2 and a linear classifier. With the default
    widths (16, 32, 64), 1 input channel and 10 classes: 26,570 parameters (``norm="bn"``).
    """

    def __init__(self, num_classes: int, in_channels: int, image_size: int, norm: str = "bn",
                 widths: tuple = (16, 32, 64), gn_groups: int = 2):
        super().__init__()
        layers, cin, size = [], in_channels, image_size
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(cin, w, 3, 1, 1, bias=norm == "none"), _norm2d(norm, w, gn_groups),
                       nn.ReLU()]
            if i < len(widths) - 1 and size >= 4:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            cin = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(cin * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, num_classes) logits."""
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class MLP(nn.Module):
    """Multi-layer perceptron on the flattened image: [Linear, norm, ReLU] per hidden width, then
    a linear classifier. Input (N, C, H, W) or (N, C*H*W)."""

    def __init__(self, num_classes: int, in_features: int, norm: str = "bn",
                 hidden: tuple = (128,), gn_groups: int = 2):
        super().__init__()
        layers, fin = [], in_features
        for h in hidden:
            layers += [nn.Linear(fin, h), _norm1d(norm, h, gn_groups), nn.ReLU()]
            fin = h
        layers.append(nn.Linear(fin, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (N, num_classes) logits."""
        return self.net(torch.flatten(x, 1))


# --------------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------------

_VIT_CONFIGS = {
    # A small ViT for CPU-scale runs (ViT-Tiny width, half depth): 2.7M params at 32x32.
    "vit_small": dict(dim=192, depth=6, heads=3, mlp_ratio=4.0),
    # ViT-B/16 (Dosovitskiy et al.): 12 layers, width 768, 12 heads, MLP 3072, patch 16.
    "vit_b16": dict(dim=768, depth=12, heads=12, mlp_ratio=4.0),
}
_KWARGS = {
    "resnet18": {"width", "gn_groups"},
    "cnn": {"widths", "gn_groups"},
    "mlp": {"hidden", "gn_groups"},
    "vit_small": {"patch_size", "dim", "depth", "heads", "mlp_ratio"},
    "vit_b16": {"patch_size", "dim", "depth", "heads", "mlp_ratio"},
}


def _pos_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return int(v)


def _int_tuple(name: str, v) -> tuple:
    if isinstance(v, numbers.Integral):
        v = (v,)
    try:
        v = tuple(v)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of positive ints, got {v!r}") from None
    return tuple(_pos_int(name, x) for x in v)


def build_model(name: str, num_classes: int, in_channels: int, image_size: int,
                norm: str | None = None, **kw) -> nn.Module:
    """Build a classifier by name.

    Args:
        name: one of :data:`MODELS`:

            - ``"resnet18"``: :class:`ResNet18` (CIFAR-style 3x3 stem, no max-pool). kw: ``width``
              (64), ``gn_groups`` (2).
            - ``"vit_small"``: :class:`VisionTransformer` with dim 192, depth 6, 3 heads, MLP 768
              (a CPU-scale ViT, not DeiT's ViT-S).
            - ``"vit_b16"``: ViT-B/16's transformer (12 layers, dim 768, 12 heads, MLP 3072).
              Patch 16 when ``image_size >= 128`` (e.g. 224 -> 14x14 tokens); smaller images would
              give too few tokens (32 / 16 = 2x2), so there the patch defaults to the size giving a
              grid closest to 8x8: 4 for 32x32 inputs. Pass ``patch_size=16`` to force it.
              ViT kw: ``patch_size``, ``dim``, ``depth``, ``heads``, ``mlp_ratio``.
            - ``"cnn"``: :class:`SmallCNN`. kw: ``widths`` ((16, 32, 64)), ``gn_groups`` (2).
            - ``"mlp"``: :class:`MLP` on ``in_channels * image_size**2`` features. kw: ``hidden``
              ((128,)), ``gn_groups`` (2).
        num_classes: K >= 1, output width.
        in_channels: C of the (N, C, H, W) input.
        image_size: H == W, pixels.
        norm: ``"bn"``, ``"gn"`` or ``"none"`` for resnet18 / cnn / mlp (default ``"bn"``). The
            ViTs always use LayerNorm: pass ``None`` or ``"ln"``.

    Returns:
        ``nn.Module`` in float32 on the CPU, train mode; ``model(x)`` maps (N, C, H, W) to
        (N, K) logits.

    Raises:
        ValueError: unknown name, norm, or a bad size; TypeError: an unknown keyword.
    """
    if not isinstance(name, str) or name.lower() not in MODELS:
        raise ValueError(f"unknown model name {name!r}; expected one of {', '.join(MODELS)}")
    # With a large option, size the model on the meta device first (no memory, and the RNG state
    # restored so the real build draws the same initial weights): a config asking for billions of
    # weights is refused before anything is allocated. (Skipped for ordinary sizes: the first
    # meta build of a ResNet costs seconds.)
    if max(_largest_int(kw), _largest_int(num_classes), _largest_int(image_size),
           _largest_int(in_channels)) <= 4096:
        return _build(name, num_classes, in_channels, image_size, norm, **kw)
    rng = torch.get_rng_state()
    try:
        with torch.device("meta"):
            probe = _build(name, num_classes, in_channels, image_size, norm, **kw)
    finally:
        torch.set_rng_state(rng)
    n = sum(t.numel() for t in list(probe.parameters()) + list(probe.buffers()))
    if n > MAX_MODEL_ELEMENTS:
        raise ValueError(f"{name} with these options has {n:,} weights ({4 * n / 2 ** 30:.1f} GiB "
                         f"as float32); the limit is {MAX_MODEL_ELEMENTS:,}")
    return _build(name, num_classes, in_channels, image_size, norm, **kw)


def _largest_int(v) -> int:
    """The largest integer inside an option value (nested lists/tuples/dicts), 0 when none."""
    if isinstance(v, bool):
        return 0
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return int(min(float(v), 2 ** 62)) if v == v else 0
    if isinstance(v, dict):
        v = list(v.values())
    if isinstance(v, (list, tuple)):
        return max((_largest_int(x) for x in v), default=0)
    return 0


#: Most weights (parameters and buffers) a model built by :func:`build_model` may have (4 GiB as
#: float32): more is a mistyped option, not a model this project can train.
MAX_MODEL_ELEMENTS = 2 ** 30


def _build(name: str, num_classes: int, in_channels: int, image_size: int,
           norm: str | None = None, **kw) -> nn.Module:
    name = name.lower()
    num_classes = _pos_int("num_classes", num_classes)
    in_channels = _pos_int("in_channels", in_channels)
    image_size = _pos_int("image_size", image_size)
    unknown = set(kw) - _KWARGS[name]
    if unknown:
        raise TypeError(f"build_model({name!r}) got unknown keyword(s) {sorted(unknown)}; "
                        f"allowed: {sorted(_KWARGS[name])}")
    gn_groups = _pos_int("gn_groups", kw.get("gn_groups", 2))

    if name.startswith("vit"):
        if norm not in (None, "ln"):
            raise ValueError(f"{name} uses LayerNorm; norm must be None or 'ln', got {norm!r}")
        cfg = dict(_VIT_CONFIGS[name])
        for k in ("dim", "depth", "heads"):
            if k in kw:
                cfg[k] = _pos_int(k, kw[k])
        if "mlp_ratio" in kw:
            r = kw["mlp_ratio"]
            if not isinstance(r, numbers.Real) or isinstance(r, bool) or not r > 0:
                raise ValueError(f"mlp_ratio must be a positive number, got {r!r}")
            cfg["mlp_ratio"] = float(r)
        if "patch_size" in kw:
            patch = _pos_int("patch_size", kw["patch_size"])
        elif name == "vit_b16" and image_size >= 128 and image_size % 16 == 0:
            patch = 16
        else:
            patch = _auto_patch(image_size)
        if image_size % patch:
            raise ValueError(f"patch_size={patch} does not divide image_size={image_size}")
        if cfg["dim"] % cfg["heads"]:
            raise ValueError(f"heads={cfg['heads']} does not divide dim={cfg['dim']}")
        return VisionTransformer(num_classes, in_channels, image_size, patch, **cfg)

    norm = "bn" if norm is None else norm
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)} for {name}, got {norm!r}")
    if name == "resnet18":
        width = _pos_int("width", kw.get("width", 64))
        if norm == "gn":
            _gn_groups(width, gn_groups)  # every layer has width * 2^i channels
        return ResNet18(num_classes, in_channels, norm, width, gn_groups)
    if name == "cnn":
        widths = _int_tuple("widths", kw.get("widths", (16, 32, 64)))
        if norm == "gn":
            for w in widths:
                _gn_groups(w, gn_groups)
        return SmallCNN(num_classes, in_channels, image_size, norm, widths, gn_groups)
    hidden = _int_tuple("hidden", kw.get("hidden", (128,)))
    if norm == "gn":
        for h in hidden:
            _gn_groups(h, gn_groups)
    return MLP(num_classes, in_channels * image_size * image_size, norm, hidden, gn_groups)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)

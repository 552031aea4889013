"""Image classification data, read offline from standard on-disk formats (nothing is downloaded).

:class:`Dataset` and :func:`load_dataset` give normalized float32 NCHW tensors:


  ============  =================================================================================
  name          what ``root`` must be
  ============  =================================================================================
  digits        ignored: scikit-learn's bundled ``load_digits`` (1,797 8x8 grey digits)
  cifar10       folder with the python-pickle batches ``data_batch_1`` .. ``data_batch_5``,
                ``test_batch`` (and optionally ``batches.meta``), or its parent holding
                ``cifar-10-batches-py/``
  cifar100      folder with ``train``, ``test`` (and optionally ``meta``), or its parent holding
                ``cifar-100-python/``
  imagenet32    folder with ``train_data_batch_1`` .. ``train_data_batch_10`` and ``val_data``
                (each optionally ending in ``.npz``), keys ``data`` (N, 3072) uint8 and
                ``labels`` (N,) in 1..1000; the 16x16 / 64x64 variants are read the same way
  mnist         folder with ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
                ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``),
                or its parent holding ``MNIST/raw/``; Fashion-MNIST / KMNIST files work too
  npz           path to one ``.npz`` file with arrays ``x`` and ``y`` (optionally ``x_test`` and
                ``y_test``; without them a stratified split is made)
  ============  =================================================================================

Every random choice (the stratified split of an npz without a test set, the optional subset) uses
its own numpy ``SeedSequence([seed, tag, ...])`` with a tag from :mod:`zowarmup.seeds`.
"""
from __future__ import annotations

import gzip
import math
import numbers
import os
import pickle
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ._util import TAG_DATA_SPLIT as _TAG_SPLIT
from ._util import TAG_DATA_SUBSET as _TAG_SUBSET
from ._util import _check_int, _check_seed, _rng
from .partition import MAX_CLASSES  # the largest class count a data file may imply

__all__ = ["Dataset", "load_dataset", "DATASETS", "stratified_split", "read_idx"]

#: Dataset names understood by :func:`load_dataset`.
DATASETS = ("digits", "cifar10", "cifar100", "imagenet32", "mnist", "npz")


# --------------------------------------------------------------------------------------------------
# Dataset container
# --------------------------------------------------------------------------------------------------

@dataclass
class Dataset:
    """An image classification dataset held in memory.

    Attributes:
        x_train: float32 tensor (N_train, C, H, W), H == W == ``image_size``, standardized per
            channel with the training set's mean and std (see ``mean``/``std``).
        y_train: int64 tensor (N_train,), labels in ``[0, num_classes)``.
        x_test: float32 tensor (N_test, C, H, W), standardized with the *training* statistics.
        y_test: int64 tensor (N_test,).
        num_classes: number of classes K (for the image datasets: the dataset's nominal count,
            e.g. 10 for CIFAR-10 even if a tiny file holds fewer).
        in_channels: C.
        image_size: H (== W), pixels.
        name: dataset name as passed to :func:`load_dataset`.
        mean, std: per-channel statistics (length C) in the file's raw units (e.g. 0..255 for
            uint8 images, 0..16 for digits) used for ``x = (raw - mean) / std``; identity (0, 1)
            when loaded with ``normalize=False``.
        classes: class names when the format stores them (CIFAR meta files), else ``None``.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    in_channels: int
    image_size: int
    name: str
    mean: tuple = field(default=())
    std: tuple = field(default=())
    classes: list | None = None

    def __post_init__(self):
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.dim() != 4 or x.shape[1:] != (self.in_channels, self.image_size, self.image_size):
                raise ValueError(f"Dataset.x_{split} must have shape (N, {self.in_channels}, "
                                 f"{self.image_size}, {self.image_size}), got {tuple(x.shape)}")
            if y.dim() != 1 or y.shape[0] != x.shape[0]:
                raise ValueError(f"Dataset.y_{split} must have shape ({x.shape[0]},), "
                                 f"got {tuple(y.shape)}")
            if y.dtype != torch.int64 or x.dtype != torch.float32:
                raise ValueError(f"Dataset.x_{split}/y_{split} must be float32/int64, "
                                 f"got {x.dtype}/{y.dtype}")
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(f"Dataset.y_{split} has labels outside [0, {self.num_classes})")

    @property
    def input_shape(self) -> tuple:
        """Per-sample input shape ``(C, H, W)``."""
        return (self.in_channels, self.image_size, self.image_size)

    def __repr__(self) -> str:
        return (f"Dataset(name={self.name!r}, train={tuple(self.x_train.shape)}, "
                f"test={tuple(self.x_test.shape)}, num_classes={self.num_classes})")

# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------

_LAYOUTS = {
    "cifar10": "a folder with the CIFAR-10 python-pickle batches data_batch_1 .. data_batch_5 and "
               "test_batch (optionally batches.meta), as extracted from cifar-10-python.tar.gz, "
               "or its parent folder holding cifar-10-batches-py/",
    "cifar100": "a folder with the CIFAR-100 python-pickle files train and test (optionally meta), "
                "as extracted from cifar-100-python.tar.gz, or its parent holding "
                "cifar-100-python/",
    "imagenet32": "a folder with the downsampled-ImageNet npz batches train_data_batch_1 .. "
                  "train_data_batch_10 and val_data (with or without the .npz suffix), each "
                  "holding 'data' (N, 3*S*S) uint8 and 'labels' (N,) in 1..1000",
    "mnist": "a folder with the IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, "
             "t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (each optionally gzipped as "
             ".gz), or its parent holding MNIST/raw/",
    "npz": "a path to one .npz file holding arrays 'x' (N, H, W), (N, C, H, W), (N, H, W, C) or "
           "(N, D) with D = S*S or 3*S*S, and 'y' (N,) integer labels; optionally 'x_test' and "
           "'y_test'",
}


def load_dataset(name: str, root: str | os.PathLike | None = None, *, normalize: bool = True,
                 test_fraction: float = 0.2, split_seed: int = 0,
                 max_train: int | None = None) -> Dataset:
    """Load a dataset by name from local files; never downloads.

    Args:
        name: one of :data:`DATASETS` (see the module docstring for the layout each expects).
        root: folder (or, for ``"npz"``, file) holding the data; ignored for ``"digits"``.
        normalize: standardize every channel with the training set's mean and std (computed in
            float64 over all training pixels; a constant channel gets std 1).
        test_fraction: for ``"digits"`` and ``"npz"`` without ``x_test``: fraction of each class
            held out for testing (stratified, rounded per class).
        split_seed: seed of that split (deterministic; default 0).
        max_train: keep only this many training samples, a seeded uniform subset (the full
            ImageNet32 training set is 1.28M images = 15.7 GB as float32; this bounds it, and for
            imagenet32 only the chosen rows are converted).

    Returns:
        :class:`Dataset` with float32 NCHW images and int64 labels.

    Raises:
        ValueError: unknown name, bad argument, or a file that does not match its format.
        FileNotFoundError: ``root`` missing or lacking a required file (the message names the
            expected layout).
    """
    if not isinstance(name, str) or name.lower() not in DATASETS:
        raise ValueError(f"unknown dataset name {name!r}; expected one of {', '.join(DATASETS)}")
    name = name.lower()
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {normalize!r}")
    if not (isinstance(test_fraction, numbers.Real) and 0.0 < float(test_fraction) < 1.0):
        raise ValueError(f"test_fraction must be a float in (0, 1), got {test_fraction!r}")
    split_seed = _check_int("split_seed", split_seed, 0)
    if max_train is not None:
        max_train = _check_int("max_train", max_train, 1)
    if name != "digits":
        if root is None:
            raise FileNotFoundError(f"dataset {name!r} is read from local files and needs root=: "
                                    f"{_LAYOUTS[name]}")
        root = Path(root).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"{name}: {str(root)!r} does not exist; expected "
                                    f"{_LAYOUTS[name]}")

    classes = None
    sel = None  # training rows kept (for the loaders that subset before converting)
    if name == "digits":
        from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

        d = load_digits()
        x = d.images.astype(np.float32)[:, None]  # (1797, 1, 8, 8), values 0..16
        y = d.target.astype(np.int64)
        tr, te = stratified_split(y, test_fraction, split_seed)
        x_tr, y_tr, x_te, y_te = x[tr], y[tr], x[te], y[te]
        num_classes = 10
    elif name in ("cifar10", "cifar100"):
        x_tr, y_tr, x_te, y_te, num_classes, classes = _load_cifar(name, root)
    elif name == "imagenet32":
        x_tr, y_tr, x_te, y_te, sel = _load_imagenet32(root, max_train, split_seed)
        num_classes = 1000
    elif name == "mnist":
        x_tr, y_tr, x_te, y_te = _load_mnist(root)
        num_classes = max(10, int(max(y_tr.max(initial=0), y_te.max(initial=0))) + 1)
    else:
        x_tr, y_tr, x_te, y_te = _load_npz(root, test_fraction, split_seed)
        num_classes = int(max(y_tr.max(initial=0), y_te.max(initial=0))) + 1

    if max_train is not None and sel is None and max_train < len(y_tr):
        keep = np.sort(_rng(split_seed, _TAG_SUBSET).choice(len(y_tr), max_train, replace=False))
        x_tr, y_tr = x_tr[keep], y_tr[keep]

    x_train = x_tr if isinstance(x_tr, torch.Tensor) else _to_float(x_tr)
    x_test = x_te if isinstance(x_te, torch.Tensor) else _to_float(x_te)
    channels = x_train.shape[1]
    if normalize:
        mean, std = _channel_stats(x_train)
        for x in (x_train, x_test):
            x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))
        mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    else:
        mean, std = (0.0,) * channels, (1.0,) * channels
    return Dataset(x_train=x_train, y_train=torch.as_tensor(np.asarray(y_tr, dtype=np.int64)),
                   x_test=x_test, y_test=torch.as_tensor(np.asarray(y_te, dtype=np.int64)),
                   num_classes=num_classes, in_channels=channels, image_size=x_train.shape[-1],
                   name=name, mean=mean, std=std, classes=classes)


def _to_float(x: np.ndarray) -> torch.Tensor:
    # astype copies into a fresh, writable, C-contiguous float32 array that torch then shares.
    return torch.from_numpy(np.asarray(x).astype(np.float32, order="C"))


def _channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of (N, C, H, W) float32, accumulated in float64 chunk by chunk so
    that a large set needs no float64 copy."""
    c = x.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    ss = torch.zeros(c, dtype=torch.float64)
    for i in range(0, x.shape[0], chunk):
        xc = x[i:i + chunk].double()
        s += xc.sum(dim=(0, 2, 3))
        ss += (xc * xc).sum(dim=(0, 2, 3))
    n = max(1, x.shape[0] * x.shape[2] * x.shape[3])
    mean = s / n
    std = (ss / n - mean * mean).clamp_min(0).sqrt()
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    return mean.float(), std.float()


def stratified_split(labels, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified train/test split.

    For every class c (in increasing order) its indices are shuffled with
    ``numpy.random.default_rng(SeedSequence([seed, tag]))`` and the first
    ``round(test_fraction * n_c)`` go to the test set.

    Args:
        labels: (N,) integer labels.
        test_fraction: in (0, 1).
        seed: non-negative int.

    Returns:
        ``(train_idx, test_idx)``: sorted int64 index arrays, disjoint, covering ``range(N)``.
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    if not (0.0 < float(test_fraction) < 1.0):
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    rng = _rng(_check_seed(seed), _TAG_SPLIT)
    test = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test.append(idx[:int(round(test_fraction * len(idx)))])
    test_idx = np.sort(np.concatenate(test)).astype(np.int64) if test else np.zeros(0, np.int64)
    mask = np.ones(len(y), dtype=bool)
    mask[test_idx] = False
    return np.flatnonzero(mask).astype(np.int64), test_idx


# ---- CIFAR (python pickles) ----------------------------------------------------------------------

class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds plain containers and numpy arrays: a CIFAR batch is a pickle,
    and a pickle can run arbitrary code, so every other global is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("builtins", "bytearray"), ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"),
        ("__builtin__", "object"), ("builtins", "object"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a dataset pickle")


def _unpickle(path: Path, fmt: str) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            ImportError, IndexError, KeyError) as e:
        raise ValueError(f"{fmt}: {str(path)!r} is not a readable CIFAR python pickle ({e}); "
                         f"expected {_LAYOUTS[fmt]}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{fmt}: {str(path)!r} holds a {type(obj).__name__}, expected a dict; "
                         f"expected {_LAYOUTS[fmt]}")
    # Files written by Python 2 have bytes keys; files re-pickled by Python 3 may have str keys.
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _find_root(root: Path, required: Sequence[str], subdirs: Sequence[str]) -> Path | None:
    for cand in [root, *[root / s for s in subdirs]]:
        if cand.is_dir() and all((cand / r).is_file() for r in required):
            return cand
    return None


def _load_cifar(fmt: str, root: Path):
    if fmt == "cifar10":
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_files, meta_file, label_key = ["test_batch"], "batches.meta", "labels"
        names_key, num_classes, sub = "label_names", 10, "cifar-10-batches-py"
    else:
        train_files, test_files, meta_file, label_key = ["train"], ["test"], "meta", "fine_labels"
        names_key, num_classes, sub = "fine_label_names", 100, "cifar-100-python"
    folder = _find_root(root, train_files + test_files, [sub])
    if folder is None:
        base = root / sub if (root / sub).is_dir() else root
        missing = [f for f in train_files + test_files if not (base / f).is_file()]
        raise FileNotFoundError(f"{fmt}: {str(base)!r} lacks {', '.join(missing)}; expected "
                                f"{_LAYOUTS[fmt]}")

    def read(files):
        xs, ys = [], []
        for fn in files:
            d = _unpickle(folder / fn, fmt)
            if "data" not in d or label_key not in d:
                raise ValueError(f"{fmt}: {str(folder / fn)!r} lacks key 'data' or "
                                 f"'{label_key}' (has {sorted(map(str, d))}); expected "
                                 f"{_LAYOUTS[fmt]}")
            x = np.asarray(d["data"])
            y = np.asarray(d[label_key])
            if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
                raise ValueError(f"{fmt}: {str(folder / fn)!r} 'data' must be uint8 (N, 3072), "
                                 f"got {x.dtype} {x.shape}")
            if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
                raise ValueError(f"{fmt}: {str(folder / fn)!r} '{label_key}' must be {len(x)} "
                                 f"integers, got {y.dtype} {y.shape}")
            if len(y) and (y.min() < 0 or y.max() >= num_classes):
                raise ValueError(f"{fmt}: {str(folder / fn)!r} has labels outside "
                                 f"[0, {num_classes})")
            xs.append(x.reshape(-1, 3, 32, 32))  # rows are channel-planar: R(1024) G B
            ys.append(y.astype(np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    x_tr, y_tr = read(train_files)
    x_te, y_te = read(test_files)
    classes = None
    if (folder / meta_file).is_file():
        meta = _unpickle(folder / meta_file, fmt)
        names = meta.get(names_key)
        if names is not None:
            classes = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
    return x_tr, y_tr, x_te, y_te, num_classes, classes


# ---- ImageNet32 (npz batches) --------------------------------------------------------------------

#: What a damaged .npz can raise from numpy / zipfile / zlib while it is opened or read.
_NPZ_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError,
               struct.error, SyntaxError, NotImplementedError, OverflowError, MemoryError)
#: A deflated member expands at most ~1032x; a header promising more than this is a lie.
_MAX_EXPANSION = 1100


def _npz_prescan(path: Path, fmt: str) -> None:
    """Check every ``.npy`` member's header against the bytes that can back it, so a damaged or
    forged header (say a shape of 10**12) is refused before numpy allocates the array."""
    disk = path.stat().st_size
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            if dtype.hasobject:
                continue  # refused when read (needs pickle)
            nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
            if nbytes > info.file_size or nbytes > _MAX_EXPANSION * max(disk, 1) + (1 << 20):
                raise ValueError(f"array '{info.filename[:-4]}' claims shape {shape} of {dtype} "
                                 f"({nbytes} bytes) but its member holds {info.file_size} bytes")


def _npz_open(path: Path, fmt: str):
    try:
        _npz_prescan(path, fmt)
        return np.load(path, allow_pickle=False)
    except _NPZ_ERRORS as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{fmt}: {str(path)!r} is not a readable .npz file ({why}); expected "
                         f"{_LAYOUTS[fmt]}") from None


def _npz_get(z, key: str, path: Path, fmt: str) -> np.ndarray:
    if key not in z.files:
        raise ValueError(f"{fmt}: {str(path)!r} lacks array '{key}' (has {z.files}); expected "
                         f"{_LAYOUTS[fmt]}")
    try:
        return z[key]
    except _NPZ_ERRORS as e:  # object arrays need pickle (refused); damaged members
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{fmt}: {str(path)!r} array '{key}' is unreadable ({why})") from None


def check_label_range(y: np.ndarray, path, key: str, fmt: str, limit: int = MAX_CLASSES) -> None:
    """Refuse labels that imply an absurd class count, before anything is sized by them.

    A label must be below ``limit``; and when labels go past 1000 they must not leave most of
    the implied classes empty (more than 10x the distinct labels present), the mark of one
    corrupted value. The message names the file, the array, the index and the value.
    """
    if not len(y):
        return
    i = int(np.argmax(y))
    top = int(y[i])
    if top >= limit:
        raise ValueError(f"{fmt}: {str(path)!r} '{key}'[{i}] = {top} is not a plausible class "
                         f"label (labels must be 0..{limit - 1})")
    if top >= 1000:
        present = len(np.unique(y))
        if top + 1 > 10 * present:
            raise ValueError(f"{fmt}: {str(path)!r} '{key}'[{i}] = {top} implies {top + 1} classes "
                             f"but only {present} distinct labels occur; a corrupted label? "
                             f"(renumber the labels 0..K-1)")


def _load_imagenet32(root: Path, max_train: int | None, split_seed: int):
    fmt = "imagenet32"

    def find(stem: str) -> Path | None:
        for cand in (root / stem, root / f"{stem}.npz"):
            if cand.is_file():
                return cand
        return None

    train_paths = [find(f"train_data_batch_{i}") for i in range(1, 11)]
    val_path = find("val_data")
    if not root.is_dir() or val_path is None or any(p is None for p in train_paths):
        missing = [f"train_data_batch_{i}" for i, p in enumerate(train_paths, 1) if p is None]
        missing += [] if val_path is not None else ["val_data"]
        raise FileNotFoundError(f"{fmt}: {str(root)!r} lacks {', '.join(missing) or 'files'}; "
                                f"expected {_LAYOUTS[fmt]}")

    # Pass 1: labels only (an npz member is read on access), to validate and pick the subset.
    def labels_of(path):
        with _npz_open(path, fmt) as z:
            y = np.asarray(_npz_get(z, "labels", path, fmt))
            if "data" not in z.files:
                raise ValueError(f"{fmt}: {str(path)!r} lacks array 'data' (has {z.files}); "
                                 f"expected {_LAYOUTS[fmt]}")
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{fmt}: {str(path)!r} 'labels' must be 1-D integers, got "
                             f"{y.dtype} {y.shape}")
        if len(y) and (y.min() < 1 or y.max() > 1000):
            raise ValueError(f"{fmt}: {str(path)!r} 'labels' must be 1-based in 1..1000, got "
                             f"range [{y.min()}, {y.max()}]")
        return y.astype(np.int64) - 1

    train_labels = [labels_of(p) for p in train_paths]
    y_all = np.concatenate(train_labels)
    keep = None
    if max_train is not None and max_train < len(y_all):
        keep = np.sort(_rng(split_seed, _TAG_SUBSET).choice(len(y_all), max_train, replace=False))

    def data_of(path, n_expected, rows=None):
        with _npz_open(path, fmt) as z:
            x = np.asarray(_npz_get(z, "data", path, fmt))
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[0] != n_expected:
            raise ValueError(f"{fmt}: {str(path)!r} 'data' must be uint8 ({n_expected}, 3*S*S), "
                             f"got {x.dtype} {x.shape}")
        s = math.isqrt(x.shape[1] // 3)
        if 3 * s * s != x.shape[1]:
            raise ValueError(f"{fmt}: {str(path)!r} 'data' rows have {x.shape[1]} bytes, not "
                             f"3*S*S for a square RGB image")
        if rows is not None:
            x = x[rows]
        return x.reshape(-1, 3, s, s)  # channel-planar rows, like CIFAR

    # Pass 2: convert batch by batch into one preallocated float32 tensor (no uint8 concat copy).
    starts = np.cumsum([0] + [len(y) for y in train_labels])
    x_train = None
    pos = 0
    for b, path in enumerate(train_paths):
        rows = None
        if keep is not None:
            rows = keep[(keep >= starts[b]) & (keep < starts[b + 1])] - starts[b]
        xb = data_of(path, len(train_labels[b]), rows)
        if x_train is None:
            n_total = len(y_all) if keep is None else len(keep)
            x_train = torch.empty((n_total, *xb.shape[1:]), dtype=torch.float32)
        elif xb.shape[1:] != x_train.shape[1:]:
            raise ValueError(f"{fmt}: {str(path)!r} holds {xb.shape[-1]}x{xb.shape[-1]} images, "
                             f"earlier batches {x_train.shape[-1]}x{x_train.shape[-1]}")
        x_train[pos:pos + len(xb)] = torch.from_numpy(xb)
        pos += len(xb)
    y_train = y_all if keep is None else y_all[keep]
    y_val = labels_of(val_path)
    x_val = data_of(val_path, len(y_val))
    if x_val.shape[1:] != tuple(x_train.shape[1:]):
        raise ValueError(f"{fmt}: val_data image size {x_val.shape[-1]} differs from the "
                         f"training batches' {x_train.shape[-1]}")
    return x_train, y_train, x_val, y_val, keep


# ---- MNIST (IDX) ---------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (the MNIST format), gzipped or not (detected from the magic bytes).

    Layout: 2 zero bytes, a dtype code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
    0x0E float64), the number of dimensions d, then d big-endian uint32 sizes, then the data
    row-major big-endian.

    Returns:
        numpy array of that shape and dtype.

    Raises:
        ValueError: a bad header or a size that does not match the header.
    """
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f"mnist: {str(path)!r} is a corrupt gzip file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"mnist: {str(path)!r} is not an IDX file (bad magic {raw[:4].hex()}); "
                         f"expected {_LAYOUTS['mnist']}")
    dt, nd = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * nd
    if len(raw) < header:
        raise ValueError(f"mnist: {str(path)!r} is truncated inside its IDX header")
    dims = struct.unpack(f">{nd}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64)) * dt.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"mnist: {str(path)!r} holds {len(raw) - header} data bytes, its IDX "
                         f"header {dims} says {expected}")
    return np.frombuffer(raw, dtype=dt, offset=header).reshape(dims)


def _load_mnist(root: Path):
    fmt = "mnist"
    stems = {"x_tr": "train-images-idx3-ubyte", "y_tr": "train-labels-idx1-ubyte",
             "x_te": "t10k-images-idx3-ubyte", "y_te": "t10k-labels-idx1-ubyte"}
    folders = [root, root / "MNIST" / "raw", root / "raw"]

    def find(stem: str) -> Path | None:
        alt = stem.replace("-idx", ".idx")  # some mirrors name them train-images.idx3-ubyte
        for folder in folders:
            for name in (stem, stem + ".gz", alt, alt + ".gz"):
                if (folder / name).is_file():
                    return folder / name
        return None

    paths = {k: find(s) for k, s in stems.items()}
    missing = [stems[k] for k, p in paths.items() if p is None]
    if missing:
        raise FileNotFoundError(f"{fmt}: {str(root)!r} lacks {', '.join(missing)} (or .gz); "
                                f"expected {_LAYOUTS[fmt]}")
    arrays = {k: read_idx(p) for k, p in paths.items()}
    for split in ("tr", "te"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or x.shape[1] != x.shape[2] or x.dtype != np.uint8:
            raise ValueError(f"{fmt}: {str(paths[f'x_{split}'])!r} must hold uint8 (N, S, S) "
                             f"images, got {x.dtype} {x.shape}")
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{fmt}: {str(paths[f'y_{split}'])!r} must hold {len(x)} integer "
                             f"labels, got {y.dtype} {y.shape}")
        if len(y) and int(y.min()) < 0:
            i = int(np.argmin(y))
            raise ValueError(f"{fmt}: {str(paths[f'y_{split}'])!r} label [{i}] = {int(y[i])} is "
                             "negative")
        check_label_range(y, paths[f"y_{split}"], "labels", fmt)
    if arrays["x_tr"].shape[1:] != arrays["x_te"].shape[1:]:
        raise ValueError(f"{fmt}: train and test images differ in size")
    return (arrays["x_tr"][:, None], arrays["y_tr"].astype(np.int64),
            arrays["x_te"][:, None], arrays["y_te"].astype(np.int64))


# ---- generic npz ---------------------------------------------------------------------------------

def _as_nchw(x: np.ndarray, path: Path, key: str) -> np.ndarray:
    """Interpret x as images: (N,H,W) -> 1 channel; (N,D) with D = S*S (1 channel) or 3*S*S
    (3 channels, channel-planar like CIFAR rows); 4-D is NCHW when dims 2 and 3 are equal (square
    images), else NHWC when dims 1 and 2 are equal."""
    if x.ndim == 2:
        d = x.shape[1]
        s1, s3 = math.isqrt(d), math.isqrt(d // 3)
        if s1 * s1 == d:
            return x.reshape(len(x), 1, s1, s1)
        if 3 * s3 * s3 == d:
            return x.reshape(len(x), 3, s3, s3)
        raise ValueError(f"npz: {str(path)!r} '{key}' has {d} features per row, neither S*S nor "
                         f"3*S*S; expected {_LAYOUTS['npz']}")
    if x.ndim == 3:
        if x.shape[1] != x.shape[2]:
            raise ValueError(f"npz: {str(path)!r} '{key}' images must be square, got {x.shape}")
        return x[:, None]
    if x.ndim == 4:
        if x.shape[2] == x.shape[3]:
            return x
        if x.shape[1] == x.shape[2]:
            return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        raise ValueError(f"npz: {str(path)!r} '{key}' must hold square images as NCHW or NHWC, "
                         f"got {x.shape}")
    raise ValueError(f"npz: {str(path)!r} '{key}' must be 2-, 3- or 4-D, got shape {x.shape}; "
                     f"expected {_LAYOUTS['npz']}")


def _labels(y: np.ndarray, path: Path, key: str, n: int) -> np.ndarray:
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"npz: {str(path)!r} '{key}' must have shape ({n},), got {y.shape}")
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            raise ValueError(f"npz: {str(path)!r} '{key}' must hold integer class labels")
    elif not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"npz: {str(path)!r} '{key}' must hold integer class labels, got "
                         f"{y.dtype}")
    if np.issubdtype(y.dtype, np.floating) and len(y) and float(np.max(np.abs(y))) >= 2 ** 62:
        i = int(np.argmax(np.abs(y)))
        raise ValueError(f"npz: {str(path)!r} '{key}'[{i}] = {y[i]:g} is not a plausible class "
                         f"label (labels must be 0..{MAX_CLASSES - 1})")
    if y.dtype == np.uint64 and len(y) and int(y.max()) >= 2 ** 63:
        i = int(np.argmax(y))
        raise ValueError(f"npz: {str(path)!r} '{key}'[{i}] = {int(y[i])} is not a plausible class "
                         f"label (labels must be 0..{MAX_CLASSES - 1})")
    y = y.astype(np.int64)
    if len(y) and y.min() < 0:
        i = int(np.argmin(y))
        raise ValueError(f"npz: {str(path)!r} '{key}'[{i}] = {int(y[i])} is negative; labels "
                         f"must be 0..K-1")
    check_label_range(y, path, key, "npz")
    return y


def _load_npz(path: Path, test_fraction: float, split_seed: int):
    fmt = "npz"
    if not path.is_file():
        raise FileNotFoundError(f"{fmt}: {str(path)!r} is not a file; expected {_LAYOUTS[fmt]}")
    with _npz_open(path, fmt) as z:
        arrays = {k: _npz_get(z, k, path, fmt) for k in ("x", "y")}
        has_test = "x_test" in z.files or "y_test" in z.files
        if has_test:
            arrays.update({k: _npz_get(z, k, path, fmt) for k in ("x_test", "y_test")})
    for k, v in arrays.items():
        if k.startswith("x") and not (np.issubdtype(v.dtype, np.number)
                                      and not np.issubdtype(v.dtype, np.complexfloating)):
            raise ValueError(f"npz: {str(path)!r} '{k}' must be a real numeric array, got "
                             f"{v.dtype}")
        if k.startswith("x") and np.issubdtype(v.dtype, np.floating) and not np.all(
                np.isfinite(v)):
            raise ValueError(f"npz: {str(path)!r} '{k}' contains NaN or inf")
    x = _as_nchw(arrays["x"], path, "x")
    y = _labels(arrays["y"], path, "y", len(x))
    if has_test:
        x_te = _as_nchw(arrays["x_test"], path, "x_test")
        y_te = _labels(arrays["y_test"], path, "y_test", len(x_te))
        if x_te.shape[1:] != x.shape[1:]:
            raise ValueError(f"npz: {str(path)!r} 'x_test' samples have shape {x_te.shape[1:]}, "
                             f"'x' samples {x.shape[1:]}")
        return x, y, x_te, y_te
    if len(y) < 2:
        raise ValueError(f"npz: {str(path)!r} holds {len(y)} samples; need at least 2 to split")
    tr, te = stratified_split(y, test_fraction, split_seed)
    return x[tr], y[tr], x[te], y[te]


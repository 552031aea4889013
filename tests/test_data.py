"""Tests for zowarmup.data: loaders for each real on-disk format (tiny files written here), their
error messages, and the federated split helpers (Dirichlet partition, resources, sampling)."""
import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from zowarmup import data as D

RNG = np.random.default_rng(1234)


def _planar(rows: np.ndarray, s: int = 32) -> np.ndarray:
    """Independent re-statement of the CIFAR / ImageNet32 row layout: pixel (c, h, w) of a row is
    byte c*s*s + h*s + w."""
    n = len(rows)
    out = np.empty((n, 3, s, s), dtype=rows.dtype)
    for c in range(3):
        for h in range(s):
            out[:, c, h, :] = rows[:, c * s * s + h * s: c * s * s + (h + 1) * s]
    return out


# ---- digits --------------------------------------------------------------------------------------

def test_digits_split_is_stratified_deterministic_and_normalized():
    from sklearn.datasets import load_digits

    ds = D.load_dataset("digits")
    y_all = load_digits().target
    assert (ds.in_channels, ds.image_size, ds.num_classes) == (1, 8, 10)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert len(ds.y_train) + len(ds.y_test) == len(y_all) == 1797
    # Each class holds out round(0.2 * n_c) samples.
    for c in range(10):
        n_c = int((y_all == c).sum())
        assert int((ds.y_test == c).sum()) == round(0.2 * n_c)
    # Train statistics after standardization.
    assert abs(float(ds.x_train.mean())) < 1e-4
    assert abs(float(ds.x_train.std(unbiased=False)) - 1) < 1e-4
    # Same split again; a different split seed gives a different split.
    again = D.load_dataset("digits")
    assert torch.equal(again.x_train, ds.x_train) and torch.equal(again.y_test, ds.y_test)
    other = D.load_dataset("digits", split_seed=1)
    assert not torch.equal(other.y_test, ds.y_test)


def test_digits_raw_values_match_sklearn():
    from sklearn.datasets import load_digits

    ds = D.load_dataset("digits", normalize=False)
    images = load_digits().images
    # Every training image occurs in sklearn's array with the same label.
    flat = images.reshape(len(images), -1)
    lookup = {row.tobytes(): i for i, row in enumerate(flat.astype(np.float32))}
    y_all = load_digits().target
    for x, y in zip(ds.x_train[:50], ds.y_train[:50]):
        i = lookup[x.numpy().reshape(-1).tobytes()]
        assert y_all[i] == int(y)


def test_unknown_name_and_missing_root():
    with pytest.raises(ValueError, match="unknown dataset"):
        D.load_dataset("svhn")
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        D.load_dataset("cifar10")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.load_dataset("mnist", "/nonexistent/folder")


# ---- CIFAR ---------------------------------------------------------------------------------------

def _write_cifar10(folder, n_per=6, n_test=5, protocol=2, str_keys=False):
    os.makedirs(folder, exist_ok=True)
    key = (lambda k: k) if str_keys else (lambda k: k.encode())
    batches = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if name == "test_batch" else n_per
        x = RNG.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        y = RNG.integers(0, 10, size=n).tolist()  # the originals store a list of ints
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({key("batch_label"): b"tiny", key("labels"): y, key("data"): x,
                         key("filenames"): [b"f.png"] * n}, f, protocol=protocol)
        batches.append((x, np.array(y)))
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({key("label_names"): [f"class{i}".encode() for i in range(10)],
                     key("num_vis"): 3072}, f, protocol=protocol)
    return batches


@pytest.mark.parametrize("protocol,str_keys", [(2, False), (4, True), (5, False)])
def test_cifar10_pickle_batches(tmp_path, protocol, str_keys):
    batches = _write_cifar10(tmp_path / "cifar-10-batches-py", protocol=protocol,
                             str_keys=str_keys)
    # The parent folder is accepted as well as the batches folder itself.
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        ds = D.load_dataset("cifar10", root, normalize=False)
        assert ds.x_train.shape == (30, 3, 32, 32) and ds.x_test.shape == (5, 3, 32, 32)
        assert (ds.num_classes, ds.in_channels, ds.image_size) == (10, 3, 32)
        x_tr = np.concatenate([b[0] for b in batches[:5]])
        y_tr = np.concatenate([b[1] for b in batches[:5]])
        assert np.array_equal(ds.x_train.numpy(), _planar(x_tr).astype(np.float32))
        assert np.array_equal(ds.y_train.numpy(), y_tr)
        assert np.array_equal(ds.x_test.numpy(), _planar(batches[5][0]).astype(np.float32))
        assert np.array_equal(ds.y_test.numpy(), batches[5][1])
        assert ds.classes == [f"class{i}" for i in range(10)]


def test_cifar10_normalization_uses_train_statistics(tmp_path):
    batches = _write_cifar10(tmp_path)
    ds = D.load_dataset("cifar10", tmp_path)
    raw_tr = _planar(np.concatenate([b[0] for b in batches[:5]])).astype(np.float64)
    raw_te = _planar(batches[5][0]).astype(np.float64)
    mean = raw_tr.mean(axis=(0, 2, 3))
    std = raw_tr.std(axis=(0, 2, 3))
    np.testing.assert_allclose(ds.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(ds.std, std, rtol=1e-6)
    expect = (raw_te - mean[None, :, None, None]) / std[None, :, None, None]
    np.testing.assert_allclose(ds.x_test.numpy(), expect, rtol=1e-5, atol=1e-5)


def test_cifar10_missing_and_malformed(tmp_path):
    _write_cifar10(tmp_path)
    os.remove(tmp_path / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="data_batch_3.*data_batch_1 .. data_batch_5"):
        D.load_dataset("cifar10", tmp_path)
    (tmp_path / "data_batch_3").write_bytes(b"this is not a pickle")
    with pytest.raises(ValueError, match="data_batch_3.*not a readable CIFAR python pickle"):
        D.load_dataset("cifar10", tmp_path)
    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"'data' must be uint8 \(N, 3072\)"):
        D.load_dataset("cifar10", tmp_path)
    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, f)
    with pytest.raises(ValueError, match="labels outside"):
        D.load_dataset("cifar10", tmp_path)
    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump({b"pixels": np.zeros((2, 3072), np.uint8)}, f)
    with pytest.raises(ValueError, match="lacks key 'data'"):
        D.load_dataset("cifar10", tmp_path)


class _Payload:
    def __reduce__(self):
        return (os.getcwd, ())


def test_cifar_pickle_refuses_code(tmp_path):
    _write_cifar10(tmp_path)
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _Payload(), b"labels": []}, f)
    with pytest.raises(ValueError, match=r"getcwd is not allowed"):
        D.load_dataset("cifar10", tmp_path)


def test_cifar100(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = {}
    for name, n in (("train", 7), ("test", 3)):
        x = RNG.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        y = RNG.integers(0, 100, size=n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": x, b"fine_labels": y, b"coarse_labels": [0] * n}, f)
        data[name] = (x, np.array(y))
    ds = D.load_dataset("cifar100", tmp_path, normalize=False)
    assert ds.num_classes == 100 and ds.x_train.shape == (7, 3, 32, 32)
    assert np.array_equal(ds.y_test.numpy(), data["test"][1])
    assert np.array_equal(ds.x_train.numpy(), _planar(data["train"][0]).astype(np.float32))


# ---- ImageNet32 ----------------------------------------------------------------------------------

def _write_imagenet32(folder, n_per=3, n_val=4, s=32):
    os.makedirs(folder, exist_ok=True)
    out = []
    for i, name in enumerate([f"train_data_batch_{i}" for i in range(1, 11)] + ["val_data"]):
        n = n_val if name == "val_data" else n_per
        x = RNG.integers(0, 256, size=(n, 3 * s * s), dtype=np.uint8)
        y = RNG.integers(1, 1001, size=n)  # 1-based, as in the originals
        mean = x.mean(axis=0)
        if i % 2:  # half the files without the .npz suffix, as both forms exist in the wild
            with open(os.path.join(folder, name), "wb") as f:
                np.savez(f, data=x, labels=y, mean=mean)
        else:
            np.savez(os.path.join(folder, name + ".npz"), data=x, labels=y, mean=mean)
        out.append((x, y))
    return out


def test_imagenet32_npz_batches(tmp_path):
    batches = _write_imagenet32(tmp_path)
    ds = D.load_dataset("imagenet32", tmp_path, normalize=False)
    assert ds.x_train.shape == (30, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    assert ds.num_classes == 1000
    x_tr = np.concatenate([b[0] for b in batches[:10]])
    y_tr = np.concatenate([b[1] for b in batches[:10]])
    assert np.array_equal(ds.x_train.numpy(), _planar(x_tr).astype(np.float32))
    assert np.array_equal(ds.y_train.numpy(), y_tr - 1)
    assert np.array_equal(ds.y_test.numpy(), batches[10][1] - 1)
    # A seeded subset keeps exactly the chosen rows, converted from their batches.
    sub = D.load_dataset("imagenet32", tmp_path, normalize=False, max_train=7)
    assert sub.x_train.shape == (7, 3, 32, 32)
    rows = {x.numpy().tobytes(): int(y) for x, y in zip(ds.x_train, ds.y_train)}
    for x, y in zip(sub.x_train, sub.y_train):
        assert rows[x.numpy().tobytes()] == int(y)
    again = D.load_dataset("imagenet32", tmp_path, normalize=False, max_train=7)
    assert torch.equal(again.x_train, sub.x_train)


def test_imagenet16_variant_size_is_inferred(tmp_path):
    _write_imagenet32(tmp_path, s=16)
    ds = D.load_dataset("imagenet32", tmp_path)
    assert ds.image_size == 16 and ds.x_train.shape == (30, 3, 16, 16)


def test_imagenet32_missing_and_malformed(tmp_path):
    _write_imagenet32(tmp_path)
    os.remove(tmp_path / "val_data.npz")
    with pytest.raises(FileNotFoundError, match="val_data.*train_data_batch_1 .. "):
        D.load_dataset("imagenet32", tmp_path)
    np.savez(tmp_path / "val_data.npz", data=np.zeros((2, 3072), np.uint8), labels=[0, 5])
    with pytest.raises(ValueError, match="1-based in 1..1000"):
        D.load_dataset("imagenet32", tmp_path)
    np.savez(tmp_path / "val_data.npz", images=np.zeros((2, 3072), np.uint8), labels=[1, 5])
    with pytest.raises(ValueError, match="lacks array 'data'"):
        D.load_dataset("imagenet32", tmp_path)
    np.savez(tmp_path / "val_data.npz", data=np.zeros((2, 3000), np.uint8), labels=[1, 5])
    with pytest.raises(ValueError, match="3\\*S\\*S"):
        D.load_dataset("imagenet32", tmp_path)
    (tmp_path / "val_data.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable .npz"):
        D.load_dataset("imagenet32", tmp_path)


# ---- MNIST (IDX) ---------------------------------------------------------------------------------

def _idx_bytes(arr: np.ndarray) -> bytes:
    """IDX encoding written from the format's definition: 0, 0, type 0x08, ndim, sizes, data."""
    return struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(
        f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def _write_mnist(folder, gz_train=True, gz_test=False, n_tr=9, n_te=4):
    os.makedirs(folder, exist_ok=True)
    arrays = {}
    for split, n, gz in (("train", n_tr, gz_train), ("t10k", n_te, gz_test)):
        x = RNG.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = RNG.integers(0, 10, size=n, dtype=np.uint8)
        for stem, a in ((f"{split}-images-idx3-ubyte", x), (f"{split}-labels-idx1-ubyte", y)):
            raw = _idx_bytes(a)
            if gz:
                with open(os.path.join(folder, stem + ".gz"), "wb") as f:
                    f.write(gzip.compress(raw))
            else:
                with open(os.path.join(folder, stem), "wb") as f:
                    f.write(raw)
        arrays[split] = (x, y)
    return arrays


@pytest.mark.parametrize("gz_train,gz_test", [(True, False), (False, True), (False, False)])
def test_mnist_idx_files(tmp_path, gz_train, gz_test):
    arrays = _write_mnist(tmp_path, gz_train, gz_test)
    ds = D.load_dataset("mnist", tmp_path, normalize=False)
    assert ds.x_train.shape == (9, 1, 28, 28) and ds.x_test.shape == (4, 1, 28, 28)
    assert (ds.num_classes, ds.in_channels, ds.image_size) == (10, 1, 28)
    assert np.array_equal(ds.x_train[:, 0].numpy(), arrays["train"][0].astype(np.float32))
    assert np.array_equal(ds.y_train.numpy(), arrays["train"][1])
    assert np.array_equal(ds.x_test[:, 0].numpy(), arrays["t10k"][0].astype(np.float32))
    assert np.array_equal(ds.y_test.numpy(), arrays["t10k"][1])


def test_mnist_torchvision_layout(tmp_path):
    _write_mnist(tmp_path / "MNIST" / "raw")
    assert D.load_dataset("mnist", tmp_path).x_train.shape == (9, 1, 28, 28)


def test_mnist_missing_and_malformed(tmp_path):
    _write_mnist(tmp_path, gz_train=False, gz_test=False)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte")
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.*IDX files"):
        D.load_dataset("mnist", tmp_path)
    lab = tmp_path / "t10k-labels-idx1-ubyte"
    lab.write_bytes(b"\x08\x08\x08\x01" + bytes(8))
    with pytest.raises(ValueError, match="not an IDX file"):
        D.load_dataset("mnist", tmp_path)
    lab.write_bytes(_idx_bytes(np.zeros(4, np.uint8))[:-1])  # one byte short
    with pytest.raises(ValueError, match="its IDX header"):
        D.load_dataset("mnist", tmp_path)
    lab.write_bytes(_idx_bytes(np.zeros(3, np.uint8)))  # 3 labels for 4 images
    with pytest.raises(ValueError, match="must hold 4 integer labels"):
        D.load_dataset("mnist", tmp_path)
    lab.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(ValueError, match="corrupt gzip"):
        D.load_dataset("mnist", tmp_path)


# ---- generic npz ---------------------------------------------------------------------------------

def test_npz_nhwc_with_test_split(tmp_path):
    x = RNG.integers(0, 256, size=(12, 6, 6, 3), dtype=np.uint8)
    y = RNG.integers(0, 4, size=12)
    xt = RNG.integers(0, 256, size=(5, 6, 6, 3), dtype=np.uint8)
    yt = np.array([0, 1, 2, 3, 4])
    np.savez(tmp_path / "d.npz", x=x, y=y, x_test=xt, y_test=yt)
    ds = D.load_dataset("npz", tmp_path / "d.npz", normalize=False)
    assert ds.x_train.shape == (12, 3, 6, 6) and ds.x_test.shape == (5, 3, 6, 6)
    assert ds.num_classes == 5  # max label over train and test, plus one
    for n, h, w, c in [(0, 0, 0, 0), (3, 5, 2, 1), (11, 4, 5, 2)]:
        assert float(ds.x_train[n, c, h, w]) == float(x[n, h, w, c])
    assert np.array_equal(ds.y_test.numpy(), yt)


def test_npz_without_test_split_and_flat_rows(tmp_path):
    y = np.repeat(np.arange(3), [10, 5, 6])
    x = RNG.normal(size=(len(y), 16)).astype(np.float32)  # 16 = 4*4 -> one channel 4x4
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = D.load_dataset("npz", tmp_path / "d.npz", normalize=False)
    assert ds.x_train.shape[1:] == (1, 4, 4)
    assert [int((ds.y_test == c).sum()) for c in range(3)] == [2, 1, 1]  # round(0.2 * n_c)
    assert len(ds.y_train) + len(ds.y_test) == len(y)
    got = np.concatenate([ds.x_train.reshape(-1, 16).numpy(), ds.x_test.reshape(-1, 16).numpy()])
    assert sorted(map(bytes, got)) == sorted(map(bytes, x))  # each row used once


def test_npz_malformed(tmp_path):
    p = tmp_path / "d.npz"
    with pytest.raises(FileNotFoundError, match="arrays 'x'"):
        D.load_dataset("npz", p)
    np.savez(p, x=np.zeros((4, 4, 4)), labels=np.zeros(4, int))
    with pytest.raises(ValueError, match="lacks array 'y'"):
        D.load_dataset("npz", p)
    np.savez(p, x=np.zeros((4, 4, 4)), y=np.zeros(3, int))
    with pytest.raises(ValueError, match=r"'y' must have shape \(4,\)"):
        D.load_dataset("npz", p)
    np.savez(p, x=np.zeros((4, 4, 5)), y=np.zeros(4, int))
    with pytest.raises(ValueError, match="square"):
        D.load_dataset("npz", p)
    np.savez(p, x=np.zeros((4, 4, 4)), y=np.array([0.5, 1, 2, 3]))
    with pytest.raises(ValueError, match="integer class labels"):
        D.load_dataset("npz", p)
    np.savez(p, x=np.zeros((4, 7)), y=np.zeros(4, int))
    with pytest.raises(ValueError, match="neither S\\*S nor 3\\*S\\*S"):
        D.load_dataset("npz", p)
    np.savez(p, x=np.array([[1, 2]], dtype=object), y=np.zeros(1, int))
    with pytest.raises(ValueError, match="unreadable"):
        D.load_dataset("npz", p)


# ---- partition -----------------------------------------------------------------------------------

def _entropy(y, shards, k):
    """Mean per-shard label entropy (nats), computed independently of D.label_entropy."""
    out = []
    for s in shards:
        counts = np.array([np.sum(y[s] == c) for c in range(k)], dtype=float)
        p = counts[counts > 0] / counts.sum()
        out.append(-np.sum(p * np.log(p)))
    return float(np.mean(out))


LABELS = np.repeat(np.arange(10), [150, 120, 100, 100, 90, 90, 80, 60, 60, 53])  # n = 903


@pytest.mark.parametrize("alpha", [0.01, 0.3, 5.0, float("inf")])
@pytest.mark.parametrize("num_clients", [1, 7, 50])
def test_partition_equal_disjoint_complete(alpha, num_clients):
    y = RNG.permutation(LABELS)
    shards = D.dirichlet_partition(y, num_clients, alpha, seed=3)
    assert len(shards) == num_clients
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    allidx = np.concatenate(shards)
    assert len(allidx) == len(y) and len(np.unique(allidx)) == len(y)  # disjoint, all used
    assert all(s.dtype == np.int64 and np.all(np.diff(s) > 0) for s in shards)


def test_partition_deterministic_and_seed_dependent():
    a = D.dirichlet_partition(LABELS, 20, 0.1, seed=7)
    b = D.dirichlet_partition(torch.as_tensor(LABELS), 20, 0.1, seed=7)
    c = D.dirichlet_partition(LABELS, 20, 0.1, seed=8)
    assert all(np.array_equal(x, z) for x, z in zip(a, b))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c))


def test_partition_skew_grows_as_alpha_falls():
    alphas = [0.01, 0.1, 0.5, 2.0, 100.0]
    ent = [np.mean([_entropy(LABELS, D.dirichlet_partition(LABELS, 30, a, seed=s), 10)
                    for s in range(3)]) for a in alphas]
    assert all(e1 < e2 for e1, e2 in zip(ent, ent[1:])), ent
    # Near-IID at large alpha: close to the global label entropy (log 10 = 2.30; this mix 2.27).
    glob = _entropy(LABELS, [np.arange(len(LABELS))], 10)
    iid = _entropy(LABELS, D.dirichlet_partition(LABELS, 30, float("inf"), seed=0), 10)
    assert glob - 0.25 < iid <= glob + 1e-9 and glob - 0.4 < ent[-1]
    # Strong skew at tiny alpha: most clients are dominated by one class.
    shards = D.dirichlet_partition(LABELS, 30, 0.01, seed=0)
    top = np.mean([np.bincount(LABELS[s]).max() / len(s) for s in shards])
    iid_top = np.mean([np.bincount(LABELS[s]).max() / len(s)
                       for s in D.dirichlet_partition(LABELS, 30, 100.0, seed=0)])
    # Equal shards bound the skew (30 clients want ~3 classes' worth each of 10), hence 0.6.
    assert top > 0.6 and iid_top < 0.3, (top, iid_top)
    assert D.label_entropy(LABELS, shards) == pytest.approx(_entropy(LABELS, shards, 10))


def test_partition_bad_input():
    with pytest.raises(ValueError, match="alpha"):
        D.dirichlet_partition(LABELS, 5, 0.0, 0)
    with pytest.raises(ValueError, match="num_clients must be <= 903"):
        D.dirichlet_partition(LABELS, 904, 0.5, 0)
    with pytest.raises(ValueError, match="integers"):
        D.dirichlet_partition(LABELS.astype(float), 5, 0.5, 0)
    with pytest.raises(ValueError, match="seed"):
        D.dirichlet_partition(LABELS, 5, 0.5, -1)
    with pytest.raises(TypeError, match="num_clients"):
        D.dirichlet_partition(LABELS, 5.0, 0.5, 0)


# ---- resources and sampling ----------------------------------------------------------------------

@pytest.mark.parametrize("frac", [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
def test_assign_resources_exact_count(frac):
    for n in (1, 7, 50):
        mask = D.assign_resources(n, frac, seed=5)
        assert mask.dtype == bool and mask.shape == (n,)
        assert int(mask.sum()) == round(frac * n)
        assert np.array_equal(mask, D.assign_resources(n, frac, seed=5))


def test_assign_resources_uniform_and_validated():
    hits = sum(D.assign_resources(10, 0.3, seed=s).astype(int) for s in range(600))
    # each client is high-resource with probability 0.3: 180 +- 5 sigma (sigma = 11.2)
    assert np.all(np.abs(hits - 180) < 56), hits
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="hi_fraction"):
            D.assign_resources(10, bad, 0)


def test_sample_clients():
    a = D.sample_clients(50, 10, round_idx=3, seed=1)
    assert a.shape == (10,) and len(np.unique(a)) == 10 and np.all(np.diff(a) > 0)
    assert a.min() >= 0 and a.max() < 50
    assert np.array_equal(a, D.sample_clients(50, 10, 3, 1))
    rounds = [D.sample_clients(50, 10, r, 1) for r in range(300)]
    assert len({r.tobytes() for r in rounds}) > 290  # rounds differ
    counts = np.bincount(np.concatenate(rounds), minlength=50)  # 60 expected, sigma 6.9
    assert np.all(np.abs(counts - 60) < 35), counts
    assert np.array_equal(D.sample_clients(5, 5, 0, 0), np.arange(5))
    cand = np.array([3, 9, 20, 41])
    sub = D.sample_clients(50, 2, 4, 0, candidates=cand)
    assert len(sub) == 2 and set(sub) <= set(cand)
    assert np.array_equal(D.sample_clients(50, 10, 4, 0, candidates=cand), cand)
    with pytest.raises(ValueError, match="per_round"):
        D.sample_clients(5, 6, 0, 0)
    with pytest.raises(ValueError, match="round_idx"):
        D.sample_clients(5, 2, -1, 0)
    with pytest.raises(ValueError, match="candidates must lie"):
        D.sample_clients(5, 2, 0, 0, candidates=[1, 7])
    with pytest.raises(TypeError, match="mask"):
        D.sample_clients(5, 2, 0, 0, candidates=np.ones(5, bool))

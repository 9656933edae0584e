import gzip

import numpy as np
import pytest
import torch

from pyro_vae.config import DataConfig
from conftest import write_torchvision_set
from pyro_vae.data import (DataError, epoch_inputs, linear_gaussian_params, load_dataset,
                           read_idx)


def test_bundled_mnist_is_split_9000_1000_disjointly_and_reproducibly():
    ds = load_dataset(DataConfig(binarize="none"))
    assert ds.x_train.shape == (9000, 784) and ds.x_test.shape == (1000, 784)
    assert ds.x_train.min() >= 0 and ds.x_train.max() <= 1 and ds.num_classes == 10
    assert set(ds.y_test.tolist()) == set(range(10))
    # the split is a permutation: no test image occurs in train
    train_keys = {hash(r.numpy().tobytes()) for r in ds.x_train}
    assert sum(hash(r.numpy().tobytes()) in train_keys for r in ds.x_test) <= 2  # MNIST has near-dups
    again = load_dataset(DataConfig(binarize="none"))
    assert torch.equal(ds.x_test, again.x_test)
    other = load_dataset(DataConfig(binarize="none", seed=1))
    assert not torch.equal(ds.x_test, other.x_test)


def test_binarization_modes():
    grey = load_dataset(DataConfig(binarize="none", subset=300))
    dyn = load_dataset(DataConfig(binarize="dynamic", subset=300))
    static = load_dataset(DataConfig(binarize="static", subset=300))
    assert torch.equal(dyn.x_train, grey.x_train)  # kept grey, resampled per epoch
    assert torch.equal(dyn.x_test, static.x_test)  # test binarized once, deterministically
    assert set(dyn.x_test.unique().tolist()) == {0.0, 1.0}
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    e1, e2 = epoch_inputs(dyn, g1), epoch_inputs(dyn, g2)
    assert set(e1.unique().tolist()) == {0.0, 1.0} and not torch.equal(e1, e2)
    # Bernoulli(x) draws average to the grey value
    assert (e1.mean() - grey.x_train.mean()).abs() < 0.005
    assert torch.equal(epoch_inputs(static, g1), static.x_train)


def test_ring_lies_on_the_pushed_forward_circle():
    cfg = DataConfig(name="ring", binarize="none", noise=1e-4)
    ds = load_dataset(cfg)
    x = torch.cat([ds.x_train, ds.x_test])
    r = x.norm(dim=1)
    # |x| = 1 + |z| / alpha, |z| ~ chi_2 with mean sqrt(pi/2)
    assert (r >= 1 - 1e-3).all()
    assert abs((r - 1).mean().item() * cfg.alpha - (np.pi / 2) ** 0.5) < 0.05
    assert ds.y_train.max() == 7 and ds.support == "real"


def test_linear_gaussian_has_the_model_covariance():
    cfg = DataConfig(name="linear-gaussian", binarize="none", size=40000, noise=0.5)
    ds = load_dataset(cfg)
    W, b, s = linear_gaussian_params(cfg)
    x = torch.cat([ds.x_train, ds.x_test])
    assert torch.allclose(x.mean(0), b, atol=0.06)
    cov = torch.cov(x.T)
    assert torch.allclose(cov, W @ W.T + s**2 * torch.eye(10), atol=0.15)


def test_binarizing_real_data_is_refused():
    with pytest.raises(DataError, match="real-valued; use data.binarize = 'none'"):
        load_dataset(DataConfig(name="ring", binarize="dynamic"))


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST"),
                                          ("kmnist", "KMNIST")])
def test_torchvision_sets_load_from_idx_files_in_torchvision_layout(tmp_path, name, folder):
    raw = write_torchvision_set(tmp_path, folder, n_train=12, n_test=5)
    ds = load_dataset(DataConfig(name=name, root=str(tmp_path), binarize="none"))
    assert ds.x_train.shape == (12, 784) and ds.x_test.shape == (5, 784)
    expected = read_idx(raw / "t10k-images-idx3-ubyte").reshape(5, -1) / 255.0
    assert torch.allclose(ds.x_test, torch.from_numpy(expected).float())


def test_missing_torchvision_files_say_where_and_how(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset(DataConfig(name="fashion-mnist", root=str(tmp_path)))
    msg = str(err.value)
    assert "'fashion-mnist' not found under" in msg and str(tmp_path / "FashionMNIST" / "raw") in msg
    assert "data.download=true" in msg


def test_truncated_idx_is_refused(tmp_path):
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\0" * 100)
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="bad magic number"):
        read_idx(tmp_path / "bad")


def test_train_test_split_is_a_seeded_partition_with_labels_kept_beside_their_rows():
    from pyro_vae.arrays import train_test_split

    x = torch.arange(20.0).repeat_interleave(3).reshape(20, 3)  # row i holds i
    y = torch.arange(20) * 10
    x_tr, y_tr, x_te, y_te = train_test_split(x, y, n_test=6, seed=3)
    assert x_te.shape == (6, 3) and x_tr.shape == (14, 3)
    rows = torch.cat([x_te[:, 0], x_tr[:, 0]]).long()
    assert sorted(rows.tolist()) == list(range(20))  # every row once, none twice
    assert torch.equal(torch.cat([y_te, y_tr]), rows * 10)  # labels moved with their rows
    again = train_test_split(x, y, n_test=6, seed=3)
    assert torch.equal(again[2], x_te) and not torch.equal(train_test_split(x, y, 6, 4)[2], x_te)
    assert train_test_split(x, None, 6, 3)[1] is None

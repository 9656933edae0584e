"""Shared test setup: Pyro validation on, param store cleared, one seed per test."""

import contextlib
import importlib
import json
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no windows from the tests

import numpy as np
import pyro
import pytest
import torch

from pyro_vae.config import load_config
from pyro_vae.data import linear_gaussian_params, load_dataset
from pyro_vae.model import VAE

MAX_WORKERS = 4  # pytest-xdist processes for `-n auto` (pyproject): each holds ~1 GiB
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
# Two threads per process, or a fair share of the cores per worker: two workers with two
# threads each on two cores would contend.
torch.set_num_threads(max(1, min(2, CORES // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1)))))


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: unknown where it is not loaded
def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per core this process may run on, at most ``MAX_WORKERS``."""
    return min(CORES, MAX_WORKERS)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` run only where torch sees a GPU; elsewhere they are skipped
    with the reason (every other test runs on whatever device ``train.device = auto`` picks)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False here")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _pyro_state():
    pyro.clear_param_store()
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


def small_config(*overrides, subset=500, epochs=1):
    """A fast config on the bundled MNIST subset; extra ``section.key=value`` overrides."""
    return load_config(None, [f"data.subset={subset}", f"train.epochs={epochs}",
                              "model.hidden=[64]", "model.latent_dim=4", *overrides])


def build_vae(*overrides, subset=200):
    """(dataset, vae) for a small config."""
    cfg = small_config(*overrides, subset=subset)
    ds = load_dataset(cfg.data)
    return cfg, ds, VAE(cfg, ds.x_dim, ds.num_classes)


def linear_setup(noise=0.3):
    """(vae, dataset, params): a linear VAE whose decoder and likelihood are exactly the
    pPCA generative model of the linear-gaussian data (so p(z|x) and p(x) are known)."""
    cfg = load_config(None, ["data.name=linear-gaussian", "data.binarize=none", f"data.noise={noise}",
                             "model.latent_dim=2", "model.hidden=[]", "likelihood.name=gaussian",
                             f"likelihood.sigma={noise}"])
    ds = load_dataset(cfg.data)
    params = linear_gaussian_params(cfg.data)
    vae = VAE(cfg, ds.x_dim)
    with torch.no_grad():
        vae.decoder.net[0].weight.copy_(params.W)
        vae.decoder.net[0].bias.copy_(params.b)
    return vae, ds, params


def metrics_without_seconds(run_dir):
    """A run's metrics.jsonl without the wall-clock field: what must match across runs."""
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def write_idx(path, array):
    """Write a uint8 array as an (uncompressed) IDX file, the format of MNIST's files."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_torchvision_set(root, folder, n_train, n_test, seed=0):
    """Random 28x28 images and labels in torchvision's layout ``root/folder/raw/``."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, (n,)))
    return raw


@contextlib.contextmanager
def no_host_reads(monkeypatch, what: str = "a training step"):
    """Within: reading a tensor's value on the host (``item``, ``tolist``, ``bool``,
    ``float``, ``int``, ``cpu``, ``numpy``) or building one from Python data
    (``torch.tensor``: on a GPU a copy from host memory) fails the test; on a GPU each
    stalls the queue."""

    def host_read(*args, **kwargs):
        raise AssertionError(f"a host read in {what}")

    def host_copy(*args, **kwargs):
        raise AssertionError(f"a tensor built from Python data in {what}")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
            m.setattr(torch.Tensor, name, host_read)
        m.setattr(torch, "tensor", host_copy)
        yield


@contextlib.contextmanager
def flaky_likelihood(nan_at: int):
    """Registers likelihood ``flaky``: a Bernoulli whose ``nan_at``-th forward pass has NaN
    logits (a transient fault), healthy before and after; unregistered on exit."""
    import pyro.distributions as dist

    from pyro_vae.likelihoods import LIKELIHOODS, Likelihood, register_likelihood

    calls = {"n": 0}

    def flaky(cfg, x_dim):
        def make(logits):
            calls["n"] += 1
            poison = float("nan") if calls["n"] == nan_at else 1.0
            return dist.Bernoulli(logits=logits * poison, validate_args=False)
        return Likelihood(make, 1, "unit")

    register_likelihood("flaky", flaky)
    try:
        yield
    finally:
        LIKELIHOODS.pop("flaky")


def benchmark(name: str):
    """The script ``benchmarks/<name>.py`` as a module (they import each other by name)."""
    folder = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, folder)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(folder)

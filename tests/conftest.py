"""Shared test setup: Pyro validation on, param store cleared, one seed per test."""

import pyro
import pytest
import torch

from pyro_vae.config import load_config
from pyro_vae.data import load_dataset
from pyro_vae.model import VAE

torch.set_num_threads(2)


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

"""Posterior problems with a fixed decoder: the points x whose p(z | x) VI and MCMC approximate.

A :class:`Setting` is a trained VAE held fixed and a few of its test points. The toy settings
train the VAE of a bundled config (``pyro_vae/configs/``, the one source of their
hyper-parameters); on linear-gaussian the trained decoder is linear-Gaussian, so p(z | x)
and log p(x) are known in closed form (``toys.py``). :func:`run_setting` takes a trained run.
"""

from __future__ import annotations

from typing import NamedTuple

import pyro.distributions as dist
import torch

from .config import BUNDLED_CONFIGS, Config, load_config
from .data import LinearGaussian
from .model import VAE
from .toys import linear_gaussian_evidence, linear_gaussian_posterior
from .training import train

TOY_CONFIGS = {"linear-gaussian": "linear_gaussian", "ring": "ring_2d"}  # name -> bundled config


class Setting(NamedTuple):
    """A fixed-decoder posterior problem: points x ``[N, X]`` (labels y ``[N]`` or None) under
    ``vae``; ``exact`` is p(z | x) (batch [N], event [D]) and ``log_px`` ``[N]`` where known."""

    name: str
    vae: VAE
    x: torch.Tensor
    y: torch.Tensor | None
    exact: dist.Distribution | None
    log_px: torch.Tensor | None


def _freeze(vae: VAE) -> VAE:
    vae.eval()
    return vae.requires_grad_(False)


def toy_setting(name: str, points: int = 5, seed: int = 0, run_dir=None,
                overrides: tuple[str, ...] = ()) -> Setting:
    """Train the toy VAE of the bundled config ``TOY_CONFIGS[name]`` with ``section.key=value``
    ``overrides`` (e.g. ``guide.name=iaf``; saved as a run in ``run_dir`` when given, for
    ``pyro-vae evaluate`` and ``inspect``) and take ``points`` of its test points."""
    cfg = load_config(BUNDLED_CONFIGS / f"{TOY_CONFIGS[name]}.toml",
                      [f"train.seed={seed}", *overrides])
    result = train(cfg, run_dir)
    vae, ds = _freeze(result.vae), result.dataset
    x = ds.x_test[:points]
    exact = log_px = None
    params = ppca_params(cfg, vae) if name == "linear-gaussian" else None
    if params is not None:  # the trained model is probabilistic PCA: posterior exact
        exact = linear_gaussian_posterior(params, x)
        log_px = linear_gaussian_evidence(params).log_prob(x)
    return Setting(name, vae, x, None, exact, log_px)


def ppca_params(cfg: Config, vae: VAE) -> LinearGaussian | None:
    """(W ``[X, D]``, b ``[X]``, s) of ``vae`` when its model is probabilistic PCA,
    z ~ N(0, I), x | z ~ N(W z + b, s^2 I) (``toys.py``), else None: a linear MLP decoder
    without labels, a Gaussian likelihood with one scale (fixed, or learned: read from the
    model), and the fixed standard normal prior. Overrides such as ``prior.learnable=true``
    or ``likelihood.scale=per-pixel`` leave a model with no closed form here."""
    m, lik = cfg.model, cfg.likelihood
    if (m.network != "mlp" or m.hidden or m.conditional or lik.name != "gaussian"
            or lik.scale == "per-pixel" or cfg.prior.name != "normal" or cfg.prior.learnable):
        return None
    layer = vae.decoder.net[0]
    scale = (vae.likelihood.scale if lik.scale == "fixed"
             else vae.likelihood.learnable["log_scale"].exp())
    return LinearGaussian(layer.weight, layer.bias, scale)


def run_setting(run, points: int = 3) -> Setting:
    """``points`` test points of a trained run (``runs.Run``)."""
    ds = run.dataset
    y = ds.y_test[:points] if run.vae.num_classes else None
    return Setting(str(run.path), _freeze(run.vae), ds.x_test[:points], y, None, None)

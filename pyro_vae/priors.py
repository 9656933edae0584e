"""Priors p(z): a registry of plain builder functions.

``PRIORS[name](cfg, latent_dim, x_dim) -> Prior``. A :class:`Prior` is an ``nn.Module``
holding the prior's learnable parameters (so they live on the model and move with it);
calling it with ``encode`` (the model's ``VAE.encode_gaussian``: points ``[K, X]`` -> the
guide's Gaussian ``(loc, scale)``, each ``[K, D]``) returns a distribution over z with
``batch_shape == ()`` and ``event_shape == [D]``; the model expands it over the data plate.

Add an entry from user code with :func:`register_prior`::

    def my_prior(cfg, latent_dim, x_dim):
        return Prior(lambda p, encode: dist.Normal(p["loc"], 2.0).to_event(1),
                     fixed={"loc": torch.zeros(latent_dim)})
    register_prior("wide-normal", my_prior)
"""

from __future__ import annotations

from typing import Callable

import pyro.distributions as dist
import torch
from torch import nn

from .config import PriorConfig, register_choices


class Prior(nn.Module):
    """p(z) = ``make(params, encode)`` (``encode``: see the module's docstring);
    ``learnable`` tensors become ``nn.Parameter``s, ``fixed`` ones buffers that follow
    ``.to(device)`` but are not saved. ``params`` is a dict name -> tensor passed to ``make``."""

    def __init__(self, make: Callable, learnable: dict | None = None, fixed: dict | None = None):
        super().__init__()
        self.make = make
        self.learnable = nn.ParameterDict({k: nn.Parameter(v) for k, v in (learnable or {}).items()})
        for k, v in (fixed or {}).items():  # from the config: a forced resume's new prior.df
            self.register_buffer(k, v, persistent=False)  # holds, not the checkpoint's
        self._fixed = list(fixed or {})

    def forward(self, encode: Callable | None = None) -> dist.Distribution:
        params = {**self.learnable, **{k: getattr(self, k) for k in self._fixed}}
        return self.make(params, encode)


def normal(cfg: PriorConfig, latent_dim: int, x_dim: int) -> Prior:
    """z ~ N(loc, diag(scale^2)); N(0, I) unless ``prior.learnable`` (then loc, log-scale learnt)."""
    params = {"loc": torch.zeros(latent_dim), "log_scale": torch.zeros(latent_dim)}
    make = lambda p, enc: dist.Normal(p["loc"], p["log_scale"].exp()).to_event(1)  # noqa: E731
    return Prior(make, learnable=params) if cfg.learnable else Prior(make, fixed=params)


def laplace(cfg: PriorConfig, latent_dim: int, x_dim: int) -> Prior:
    """z_d ~ Laplace(0, 1) i.i.d. (mean 0, variance 2): the probabilistic L1 penalty."""
    make = lambda p, enc: dist.Laplace(p["loc"], p["scale"]).to_event(1)  # noqa: E731
    return Prior(make, fixed={"loc": torch.zeros(latent_dim), "scale": torch.ones(latent_dim)})


class StudentT(dist.StudentT):
    """Pyro's StudentT from tensors ``df``, ``loc``, ``scale`` ``[D]``, its chi-square
    Gamma(df / 2, rate 1/2) built from them: torch's builds that rate from the Python number
    0.5, on a GPU a copy from host memory (a synchronisation) each time the prior is built,
    i.e. every training step."""

    def __init__(self, df: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor,
                 validate_args=None):
        self.df, self.loc, self.scale = torch.broadcast_tensors(df, loc, scale)
        self._chi2 = dist.Gamma(0.5 * self.df, torch.full_like(self.df, 0.5))
        torch.distributions.Distribution.__init__(self, self.df.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        return super().expand(batch_shape, self._get_checked_instance(StudentT, _instance))


def student_t(cfg: PriorConfig, latent_dim: int, x_dim: int) -> Prior:
    """z_d ~ StudentT(df, 0, 1) i.i.d. (variance df / (df - 2) for df > 2)."""
    make = lambda p, enc: StudentT(p["df"], p["loc"], p["scale"]).to_event(1)  # noqa: E731
    return Prior(make, fixed={
        "df": torch.full((latent_dim,), float(cfg.df)),
        "loc": torch.zeros(latent_dim),
        "scale": torch.ones(latent_dim),
    })


def _gaussian_mixture(logits, locs, scales) -> dist.Distribution:
    """sum_k softmax(logits)_k N(z; locs_k, diag(scales_k^2));  locs, scales ``[K, D]``."""
    return dist.MixtureSameFamily(
        dist.Categorical(logits=logits), dist.Normal(locs, scales).to_event(1)
    )


def mixture(cfg: PriorConfig, latent_dim: int, x_dim: int) -> Prior:
    """Learnable mixture of ``prior.components`` diagonal Gaussians (weights, locs, scales)."""
    k = cfg.components
    g = torch.Generator().manual_seed(0)
    make = lambda p, enc: _gaussian_mixture(p["logits"], p["locs"], p["log_scales"].exp())  # noqa: E731
    return Prior(make, learnable={
        "logits": torch.zeros(k),
        "locs": torch.randn(k, latent_dim, generator=g),
        "log_scales": torch.zeros(k, latent_dim),
    })


def vamp(cfg: PriorConfig, latent_dim: int, x_dim: int) -> Prior:
    """VampPrior (Tomczak & Welling 2018): p(z) = (1/K) sum_k q(z | u_k), learnable
    pseudo-inputs u_k ``[K, X]`` pushed through the model's own encoder."""
    k = cfg.components
    g = torch.Generator().manual_seed(0)

    def make(p, encode):
        loc, scale = encode(p["pseudo_inputs"])  # (K, D) each
        return _gaussian_mixture(torch.zeros(k, device=loc.device), loc, scale)

    return Prior(make, learnable={"pseudo_inputs": 0.5 + 0.1 * torch.randn(k, x_dim, generator=g)})


PRIORS: dict[str, Callable[[PriorConfig, int, int], Prior]] = {
    "normal": normal,
    "laplace": laplace,
    "student-t": student_t,
    "mixture": mixture,
    "vamp": vamp,
}
register_choices("prior.name", PRIORS)


def register_prior(name: str, builder: Callable[[PriorConfig, int, int], Prior]) -> None:
    """Make ``builder`` available as ``prior.name = name`` in configs."""
    PRIORS[name] = builder

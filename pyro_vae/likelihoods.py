"""Likelihoods p(x|z): a registry of plain builder functions.

``LIKELIHOODS[name](cfg, x_dim) -> Likelihood``. A :class:`Likelihood` is an ``nn.Module``
that declares how many decoder outputs it needs per pixel (``outputs_per_pixel``), which
data it accepts (``support``), holds any learnable parameter (a global scale), and maps
the decoder output ``h [..., X * K]`` (pixel-major: ``h.unflatten(-1, (X, K))``) to a
distribution over x with ``event_shape == [X]``.

``support`` is one of:
- ``"unit"``: x in [0, 1] (binary or grey),
- ``"open-unit"``: x in (0, 1) strictly (exact 0/1 pixels have infinite density),
- ``"real"``: any finite x (binary data allowed, with a warning).

``unbounded_on_binary`` (default: support ``"real"``): a density with no upper bound on
binary pixels (ever-smaller scales; the continuous Bernoulli's saturating logits), so binary
data trains with a :class:`DataWarning`.

Add an entry from user code with :func:`register_likelihood`.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import pyro.distributions as dist
import torch
from torch import nn

from .config import LikelihoodConfig, register_choices
from .data import DataError, Dataset
from .networks import softplus

MIN_LIKELIHOOD_SCALE = 1e-3  # floor of learned likelihood scales and Beta concentrations


class DataWarning(UserWarning):
    """The data can be used with the likelihood but probably should not be."""


class Likelihood(nn.Module):
    """p(x|z) = ``make(params..., **learnable, **fixed)`` from ``K = outputs_per_pixel``
    decoder outputs per pixel. ``learnable``: name -> initial tensor, held as ``nn.Parameter``;
    ``fixed``: name -> tensor, held as a buffer on the model's device (built from the config,
    not checkpointed): a Python number given to a distribution would be copied to the GPU
    at every call, a host synchronisation (and a CUDA graph cannot capture it)."""

    def __init__(self, make: Callable, outputs_per_pixel: int, support: str,
                 learnable: dict | None = None, fixed: dict | None = None,
                 unbounded_on_binary: bool | None = None):
        super().__init__()
        self.make = make
        self.outputs_per_pixel = outputs_per_pixel
        self.support = support
        self.unbounded_on_binary = (support == "real" if unbounded_on_binary is None
                                    else unbounded_on_binary)
        self.learnable = nn.ParameterDict({k: nn.Parameter(v) for k, v in (learnable or {}).items()})
        for k, v in (fixed or {}).items():
            self.register_buffer(k, v, persistent=False)
        self._fixed = list(fixed or {})

    def forward(self, h: torch.Tensor) -> dist.Distribution:
        params = h.unflatten(-1, (-1, self.outputs_per_pixel)).unbind(-1)  # K x (..., X)
        fixed = {k: getattr(self, k) for k in self._fixed}
        return self.make(*params, **self.learnable, **fixed).to_event(1)


class Bernoulli(dist.Bernoulli):
    """Pyro's Bernoulli (logits), its log-density computed as x l - softplus(l) with
    :func:`pyro_vae.networks.softplus`: the same value as torch's
    ``-binary_cross_entropy_with_logits`` (to float rounding). On the CPU (the vectorized
    softplus) several times faster; elsewhere (torch's softplus kernel) three operations
    forward and four backward, as many as torch's own log-density."""

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return _bernoulli_form(value, self.logits)


def _bernoulli_form(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """x log p + (1 - x) log(1 - p) = x l - softplus(l) for p = sigmoid(l), elementwise."""
    return x * logits - softplus(logits)


def bernoulli(cfg: LikelihoodConfig, x_dim: int) -> Likelihood:
    """x_i ~ Bernoulli(sigmoid(h_i)). On grey x in [0, 1] the log-probability is the
    cross-entropy x log p + (1 - x) log(1 - p) (Pyro's VAE example), not a normalised density."""
    make = lambda logits: Bernoulli(logits=logits, validate_args=False)  # noqa: E731
    return Likelihood(make, 1, "unit")


class ContinuousBernoulli(dist.ContinuousBernoulli):
    """Pyro's ContinuousBernoulli (logits l), its log-density computed from l alone:
    log p(x|l) = x l - softplus(l) + log C(l), with the normaliser
    C = 2 atanh(1 - 2p) / (1 - 2p) = l / tanh(l / 2) for p = sigmoid(l), so
    log C(l) = log|l| + log1p(e^-|l|) - log(1 - e^-|l|), and log 2 + l^2 / 12 for |l| < 1e-2.
    torch's own log-density takes C from p clamped to [eps, 1 - eps]: in float32 it stops
    following l past |l| ~ 16.6 (wrong by 0.2 nats a pixel at |l| = 20, and no gradient
    through C there), a range a trained decoder reaches on most MNIST pixels (pytorch#72525).
    On pixels exactly 0 or 1 the density grows without bound as |l| does, like log|l|."""

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return _bernoulli_form(value, self.logits) + _log_cb_normaliser(self.logits)


def _log_cb_normaliser(logits: torch.Tensor) -> torch.Tensor:
    """log C(l) = log(l / tanh(l / 2)) ``[...]``, elementwise, stable for every float l."""
    a = logits.abs()
    small = a < 1e-2
    safe = torch.where(small, torch.ones_like(a), a)  # keeps the unused branch's gradient finite
    large = safe.log() + softplus(-safe) - torch.log(-torch.expm1(-safe))
    return torch.where(small, math.log(2.0) + logits * logits / 12, large)


def continuous_bernoulli(cfg: LikelihoodConfig, x_dim: int) -> Likelihood:
    """x_i ~ ContinuousBernoulli(sigmoid(h_i)) (Loaiza-Ganem & Cunningham 2019): the
    Bernoulli form with its normaliser C(p) = 2 atanh(1 - 2p) / (1 - 2p), a density on [0, 1]
    (:class:`ContinuousBernoulli`: computed from the logits, stable at any logit)."""
    return Likelihood(lambda logits: ContinuousBernoulli(logits=logits), 1, "unit",
                      unbounded_on_binary=True)


def _located(family, cfg: LikelihoodConfig) -> Likelihood:
    """Location-scale family with scale fixed (``sigma``), one learned global scale, or
    per-pixel from the decoder (softplus + 1e-3)."""
    if cfg.scale == "fixed":
        return Likelihood(lambda loc, scale: family(loc, scale), 1, "real",
                          fixed={"scale": torch.tensor(float(cfg.sigma))})
    if cfg.scale == "learned":
        make = lambda loc, log_scale: family(loc, log_scale.exp())  # noqa: E731
        return Likelihood(make, 1, "real",
                          learnable={"log_scale": torch.tensor(float(cfg.sigma)).log()})
    make = lambda loc, raw: family(loc, softplus(raw) + MIN_LIKELIHOOD_SCALE)  # noqa: E731
    return Likelihood(make, 2, "real")


def gaussian(cfg: LikelihoodConfig, x_dim: int) -> Likelihood:
    """x_i ~ N(h_i, sigma^2), sigma as ``likelihood.scale`` says."""
    return _located(dist.Normal, cfg)


def laplace(cfg: LikelihoodConfig, x_dim: int) -> Likelihood:
    """x_i ~ Laplace(h_i, b), b as ``likelihood.scale`` says."""
    return _located(dist.Laplace, cfg)


def beta(cfg: LikelihoodConfig, x_dim: int) -> Likelihood:
    """x_i ~ Beta(a_i, b_i), a, b = softplus(h) + 1e-3: needs x strictly inside (0, 1)."""
    floor = MIN_LIKELIHOOD_SCALE
    make = lambda a, b: dist.Beta(softplus(a) + floor, softplus(b) + floor)  # noqa: E731
    return Likelihood(make, 2, "open-unit")


LIKELIHOODS: dict[str, Callable[[LikelihoodConfig, int], Likelihood]] = {
    "bernoulli": bernoulli,
    "continuous-bernoulli": continuous_bernoulli,
    "gaussian": gaussian,
    "laplace": laplace,
    "beta": beta,
}
register_choices("likelihood.name", LIKELIHOODS)


def register_likelihood(name: str, builder: Callable[[LikelihoodConfig, int], Likelihood]) -> None:
    """Make ``builder`` available as ``likelihood.name = name`` in configs."""
    LIKELIHOODS[name] = builder


def check_data(likelihood: Likelihood, name: str, ds: Dataset) -> None:
    """Refuse (:class:`DataError`) or warn (:class:`DataWarning`) when ``ds`` does not fit
    the likelihood's support. The message names the data set, binarization and likelihood."""
    what = f"likelihood {name!r} on data set {ds.name!r} (data.binarize = {ds.binarize!r})"
    lo = min(ds.x_train.min().item(), ds.x_test.min().item())
    hi = max(ds.x_train.max().item(), ds.x_test.max().item())
    if likelihood.support == "unit" and (lo < 0 or hi > 1):
        raise DataError(
            f"{what}: needs x in [0, 1] but the data range is [{lo:.3g}, {hi:.3g}]; "
            "use likelihood.name = 'gaussian' or 'laplace' for real-valued data"
        )
    if likelihood.support == "open-unit" and (lo <= 0 or hi >= 1):
        raise DataError(
            f"{what}: needs x strictly inside (0, 1) but the data holds values in "
            f"[{lo:.3g}, {hi:.3g}] (exact 0/1 pixels have infinite density); use "
            "likelihood.name = 'continuous-bernoulli' for grey images in [0, 1]"
        )
    if likelihood.unbounded_on_binary and ds.support == "binary":
        warnings.warn(
            f"{what}: a continuous density on binary pixels has no upper bound there (it "
            "rewards ever-smaller scales or saturating logits); consider likelihood.name = "
            "'bernoulli'" + (" or data.binarize = 'none'" if ds.binarize != "none" else
                             " (the data itself holds only 0s and 1s)"),
            DataWarning,
            stacklevel=2,
        )

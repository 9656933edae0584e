"""Guides q(z | x): the family of the amortized posterior, a registry of plain builders.

``GUIDES[name](cfg, latent_dim) -> Guide``. A :class:`Guide` is an ``nn.Module`` that says how
many encoder outputs it needs per data point (``num_params`` = P), holds any parameters of
its own (flows), and maps the encoder output ``h [..., P]`` to q(z | x) with
``batch_shape == [...]`` and ``event_shape == [D]``. Every guide starts from the diagonal
Gaussian of the first 2D outputs, ``loc = h[..., :D]``,
``scale = softplus(h[..., D:2D]) + 1e-4``:

- ``gaussian``: q = N(loc, diag(scale^2)), P = 2D (the default; Kingma & Welling 2014).
- ``full``: q = N(loc, L L^T) with L lower-triangular, diagonal ``scale`` and the strictly
  lower part from D(D-1)/2 more outputs; with ``guide.rank = r > 0``, low rank plus diagonal,
  q = N(loc, W W^T + diag(scale^2)) with W ``[D, r]`` from rD more outputs (for large D).
- ``iaf``: the Gaussian pushed through ``guide.flows`` inverse autoregressive flows (Kingma
  et al. 2016, Pyro's ``conditional_affine_autoregressive`` in its ``stable`` form), whose
  MADE networks (``guide.hidden``) also see a context c(x) of ``guide.context`` outputs::

      z_0 ~ N(loc, diag(scale^2)),   z_k = s_k * z_{k-1} + (1 - s_k) * m_k(z_{k-1}, c)
      log q(z_K | x) = log N(z_0) - sum_k sum_d log s_k,d,     s_k = sigmoid(.)

  (P = 2D + context). Its moments have no closed form (:func:`moments` estimates them).

Add an entry from user code with :func:`register_guide`::

    def student_guide(cfg, latent_dim):
        def make(h, modules):
            loc, scale = gaussian_params(h, latent_dim)
            return dist.StudentT(4.0, loc, scale).to_event(1)
        return Guide(make, 2 * latent_dim)
    register_guide("student", student_guide)
"""

from __future__ import annotations

from typing import Callable

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from torch import nn
from torch.distributions import kl_divergence, register_kl

from .config import GuideConfig, register_choices
from .networks import MIN_ENCODER_SCALE, softplus


class Guide(nn.Module):
    """q(z | x) = ``make(h, modules)`` from ``num_params`` encoder outputs ``h [..., P]``;
    ``modules`` (an ``nn.ModuleList``) holds the guide's own parameters, if any.
    ``zero_from``: encoder outputs from this index on start at zero (their rows of the
    encoder's last layer are zeroed), so e.g. the full guide starts as the diagonal one."""

    def __init__(self, make: Callable, num_params: int, modules: list[nn.Module] = (),
                 zero_from: int | None = None):
        super().__init__()
        self.make, self.num_params, self.zero_from = make, num_params, zero_from
        self.flows = nn.ModuleList(modules)

    @torch.no_grad()
    def init_encoder(self, last: nn.Linear) -> None:
        """Zero the rows of the encoder's last layer ``last`` from ``zero_from`` on."""
        if self.zero_from is not None:
            last.weight[self.zero_from :].zero_()
            last.bias[self.zero_from :].zero_()

    def forward(self, h: torch.Tensor) -> dist.Distribution:
        return self.make(h, self.flows)


def gaussian_params(h: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loc, scale) ``[..., D]`` each from the first 2D encoder outputs ``h [..., P]``."""
    return h[..., :d], scale_from_raw(h[..., d : 2 * d])


def scale_from_raw(raw: torch.Tensor) -> torch.Tensor:
    """The Gaussian guide's scale map, any shape: softplus(raw) + MIN_ENCODER_SCALE (a floor
    that keeps log q finite). Per-point fits (``fits.py``) use it too: the same family."""
    return softplus(raw) + MIN_ENCODER_SCALE


def raw_from_scale(scale: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`scale_from_raw`: log(expm1(scale - floor)), for scales above the
    floor (within 1e-6 of it, the raw value of floor + 1e-6)."""
    return (scale - MIN_ENCODER_SCALE).clamp_min(1e-6).expm1().log()


def _diagonal(h: torch.Tensor, d: int) -> dist.Distribution:
    loc, scale = gaussian_params(h, d)
    return dist.Normal(loc, scale).to_event(1)


def gaussian(cfg: GuideConfig, latent_dim: int) -> Guide:
    """q(z|x) = N(loc(x), diag(scale(x)^2)): 2D outputs."""
    return Guide(lambda h, flows: _diagonal(h, latent_dim), 2 * latent_dim)


def full(cfg: GuideConfig, latent_dim: int) -> Guide:
    """q(z|x) = N(loc, L L^T) (Cholesky factor L: D(D-1)/2 more outputs), or with
    ``cfg.rank = r > 0`` N(loc, W W^T + diag(scale^2)) (W ``[D, r]``: rD more outputs)."""
    d, r = latent_dim, cfg.rank

    def make(h, flows):
        loc, scale = gaussian_params(h, d)  # (..., D) each
        rest = h[..., 2 * d :]
        if r:
            return dist.LowRankMultivariateNormal(loc, rest.unflatten(-1, (d, r)), scale**2)
        tril = torch.diag_embed(scale)  # (..., D, D)
        rows, cols = torch.tril_indices(d, d, offset=-1, device=h.device)  # made there: no copy
        tril[..., rows, cols] = rest
        return dist.MultivariateNormal(loc, scale_tril=tril)

    # the correlations start at zero: random ones over D(D-1)/2 entries start far from any
    # posterior (measured on MNIST, D = 50: test ELBO -126 against -107 for the diagonal)
    return Guide(make, 2 * d + (d * r if r else d * (d - 1) // 2), zero_from=2 * d)


def iaf(cfg: GuideConfig, latent_dim: int) -> Guide:
    """The diagonal Gaussian pushed through ``cfg.flows`` conditional inverse autoregressive
    flows with MADE hidden widths ``cfg.hidden``, conditioned on ``cfg.context`` outputs."""
    d = latent_dim
    flows = [T.conditional_affine_autoregressive(d, cfg.context, list(cfg.hidden), stable=True)
             for _ in range(cfg.flows)]

    def make(h, flows):
        context = h[..., 2 * d :]  # (..., context)
        return dist.TransformedDistribution(_diagonal(h, d), [f.condition(context) for f in flows])

    return Guide(make, 2 * d + cfg.context, flows)


GUIDES: dict[str, Callable[[GuideConfig, int], Guide]] = {
    "gaussian": gaussian,
    "full": full,
    "iaf": iaf,
}
register_choices("guide.name", GUIDES)

def register_guide(name: str, builder: Callable[[GuideConfig, int], Guide]) -> None:
    """Make ``builder`` available as ``guide.name = name`` in configs."""
    GUIDES[name] = builder


def base_gaussian(q: dist.Distribution) -> dist.Distribution:
    """The Gaussian a guide starts from: q itself, or a flow's base distribution."""
    return q.base_dist if isinstance(q, torch.distributions.TransformedDistribution) else q


def is_gaussian(q: dist.Distribution) -> bool:
    """Whether q is a Gaussian (diagonal, full or low-rank): what the analytic-KL ELBO needs."""
    if isinstance(q, torch.distributions.Independent):
        q = q.base_dist
    return isinstance(q, (torch.distributions.Normal, torch.distributions.MultivariateNormal,
                          torch.distributions.LowRankMultivariateNormal))


def moments(q: dist.Distribution, draws: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of q ``[..., D]`` each: closed form where q has one, else estimated from
    ``draws`` draws (flows: Monte Carlo error ~ std / sqrt(draws))."""
    try:
        return q.mean, q.stddev
    except NotImplementedError:
        z = q.sample((draws,))  # (S, ..., D)
        return z.mean(0), z.std(0)


def mean_and_covariance(q: dist.Distribution, dims=(0, 1), draws: int = 4000):
    """Mean ``[..., k]`` and covariance ``[..., k, k]`` of q's latent dims ``dims`` (k of
    them): closed form for a Gaussian (full, low-rank or diagonal), else estimated from
    ``draws`` draws (flows: q's first two moments, not its shape)."""
    idx = list(dims)
    if hasattr(q, "covariance_matrix"):
        return q.mean[..., idx], q.covariance_matrix[..., idx, :][..., idx]
    if is_gaussian(q):
        return q.mean[..., idx], torch.diag_embed(q.variance[..., idx])
    z = q.sample((draws,))[..., idx]  # (S, ..., k)
    mean = z.mean(0)
    centred = z - mean
    return mean, torch.einsum("s...i,s...j->...ij", centred, centred) / (draws - 1)


@register_kl(dist.MultivariateNormal, dist.Independent)
@register_kl(dist.LowRankMultivariateNormal, dist.Independent)
def _kl_gaussian_to_diagonal(q, p):
    """KL(q || p) for a full or low-rank Gaussian q and a diagonal Normal p (the ``normal``
    prior), through p as a MultivariateNormal, so the analytic-KL ELBO serves ``full``."""
    if not isinstance(p.base_dist, torch.distributions.Normal) or p.reinterpreted_batch_ndims != 1:
        raise NotImplementedError
    p_full = dist.MultivariateNormal(p.base_dist.loc, scale_tril=torch.diag_embed(p.base_dist.scale))
    return kl_divergence(q, p_full)

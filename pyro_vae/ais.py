"""Annealed importance sampling (AIS) of log p(x) with HMC transitions, and its reverse (BDMC).

Anneal from a normalised start q0(z | x) (the guide, or the prior) to the posterior along
the geometric path (Neal 2001; Wu, Burda, Salakhutdinov & Grosse 2017)::

    log g_t(z) = log q0(z|x) + beta_t f(z),    f(z) = log p(x, z) - log q0(z|x),
    0 = beta_0 < beta_1 < ... < beta_T = 1     (sigmoid schedule)

Forward: z_0 ~ q0; for t = 1..T: log w += (beta_t - beta_{t-1}) f(z), then an HMC move
that leaves g_t invariant. exp(log w) is unbiased for p(x), so log mean_c exp(log w_c) over
C chains is a stochastic *lower* bound on log p(x). That needs each move's kernel to be
independent of the weighted chains: the HMC step sizes, one per step and data point, are
adapted towards an acceptance rate of 0.65 (as Wu et al. adapt theirs) from the acceptance
of ``PILOT_CHAINS`` unweighted *pilot* chains that anneal beside the weighted ones.
(Adapting them from the weighted chains' own acceptance would couple the chains and bias
the weights.)

Reverse (Grosse et al. 2015, bidirectional Monte Carlo): start at an exact posterior draw
(available for data simulated from the model: (z, x) ~ p(z) p(x|z)), run the schedule
backwards; exp(log w_rev) is unbiased for 1/p(x), so -log mean_c exp(log w_rev) is a
stochastic *upper* bound. It uses the forward run's step sizes in reverse order, so both
runs apply the same kernels. The two sandwich log p(x) on simulated data, and their gap
bounds the error of forward AIS there. Reverse chains of one point all start at its one exact
draw, so they are correlated and their Monte Carlo SE understates the upper bound's error.

Everything is vectorised over chains and data points: z ``[C, B, D]``; step sizes
``[T - 1, B]`` (the moves at beta_1..beta_{T-1}).
"""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import pyro
import torch

from .evaluate import batches, check_counts, log_mean_exp, log_terms, seeded, with_errors
from .guides import base_gaussian
from .model import VAE

PILOT_CHAINS = 4  # unweighted chains that anneal beside the weighted ones, setting step sizes


class AISResult(NamedTuple):
    """Per data point ``[B]``: the estimate of log p(x) (a lower bound forward, an upper
    bound in reverse), its Monte Carlo standard error over chains (delta method), and the
    mean HMC acceptance rate of the weighted chains over the run. ``log_weights`` ``[C, B]``
    are the weighted chains' log weights, ``step_sizes`` ``[T - 1, B]`` the HMC step sizes
    of the moves at beta_1..beta_{T-1} (set by the pilot chains, or given)."""

    log_px: torch.Tensor
    mc_se: torch.Tensor
    acceptance: torch.Tensor
    log_weights: torch.Tensor
    step_sizes: torch.Tensor


def sigmoid_schedule(steps: int, delta: float = 4.0, device=None) -> torch.Tensor:
    """beta_0..beta_T ``[T + 1]`` from 0 to 1: sigmoid(delta (2t/T - 1)), rescaled to [0, 1]
    (dense near both ends, where the log weights change fastest)."""
    s = torch.sigmoid(delta * (2 * torch.arange(steps + 1, device=device, dtype=torch.float64)
                               / steps - 1))
    return ((s - s[0]) / (s[-1] - s[0])).float()


class _Path:
    """The annealing path for data x ``[B, X]``: f(z) = log p(x, z) - log q0(z|x), and
    log g_beta(z) = log q0(z|x) + beta f(z) with its gradient, for z ``[C, B, D]``."""

    def __init__(self, vae: VAE, x: torch.Tensor, y1h, q0):
        self.vae, self.x, self.y1h, self.q0 = vae, x, y1h, q0

    def f(self, z: torch.Tensor) -> torch.Tensor:
        """f(z) ``[C, B]``: the log importance weight of z under q0 (``evaluate.log_terms``)."""
        return log_terms(self.vae, self.x, z, self.y1h, self.q0).log_w

    def log_target_and_grad(self, z: torch.Tensor, beta):
        """(log g_beta(z), its gradient in z, f(z)) from one pass through the decoder."""
        with torch.enable_grad():
            z = z.detach().requires_grad_()
            t = log_terms(self.vae, self.x, z, self.y1h, self.q0)
            log_g = t.log_q + beta * t.log_w  # (C, B)
            (grad,) = torch.autograd.grad(log_g.sum(), z)
        return log_g.detach(), grad, t.log_w.detach()


def _hmc(path: _Path, z, beta, step: torch.Tensor, leapfrogs: int, log_g0, grad):
    """One HMC move leaving g_beta invariant from z ``[C, B, D]``, where log g_beta is
    ``log_g0`` and its gradient ``grad``: momentum ~ N(0, I), ``leapfrogs`` leapfrog steps
    of size ``step`` ``[B]``, Metropolis accept per chain and point. Returns the new z and
    the acceptance indicator ``[C, B]``."""
    eps = step[None, :, None]  # broadcast over chains and latent dims
    p0 = torch.randn_like(z)
    z1, p = z, p0 + 0.5 * eps * grad
    for i in range(leapfrogs):
        z1 = z1 + eps * p
        log_g1, grad, _ = path.log_target_and_grad(z1, beta)
        p = p + (eps if i < leapfrogs - 1 else 0.5 * eps) * grad
    log_accept = (log_g1 - 0.5 * (p**2).sum(-1)) - (log_g0 - 0.5 * (p0**2).sum(-1))  # (C, B)
    accept = torch.rand_like(log_accept).log() < log_accept.nan_to_num(nan=-math.inf)
    return torch.where(accept[..., None], z1, z), accept


def _anneal(path: _Path, z: torch.Tensor, betas: torch.Tensor, leapfrogs: int,
            step_sizes: torch.Tensor | None = None, reverse: bool = False, pilot: int = 0,
            first_step: torch.Tensor | None = None, target_accept: float = 0.65) -> AISResult:
    """Run the path through ``betas`` ``[T + 1]`` (increasing; walked backwards when
    ``reverse``) from chains z ``[P + C, B, D]``: weight increments, then HMC moves, with

    - fixed ``step_sizes`` ``[T - 1, B]``, indexed by beta (reverse reads them backwards), or
    - (forward only) ``pilot = P > 0``: z's first P chains are unweighted *pilot* chains.
      The first move's step is ``first_step`` ``[B]``; after each move each point's step is
      scaled by 1.02 if the pilot chains' acceptance rate beat ``target_accept``, else by
      0.98. (With 4 pilot chains the rate moves in quarters: any target in [0.5, 0.75)
      grows the step when 3 or 4 accept, which balances near 0.61 acceptance per move.)

    All chains make each move with the same step, which depends on the pilot chains' past
    alone: given the pilot, the C weighted chains' kernels are fixed, so exp(log w) stays
    unbiased. The pilot chains are dropped from the result (log weights ``[C, B]``)."""
    assert (step_sizes is None) == (pilot > 0) and not (reverse and pilot)
    betas = betas.flip(0) if reverse else betas
    log_w = z.new_zeros(z.shape[:2])  # (P + C, B)
    accepted = z.new_zeros(z.shape[1])  # (B,)
    step, used = first_step, []  # the pilot's step sizes, in the order of the moves
    for t in range(1, len(betas) - 1):
        if not pilot:
            step = step_sizes[len(betas) - 2 - t if reverse else t - 1]
        log_g, grad, f = path.log_target_and_grad(z, betas[t])  # f is reused by the move
        log_w = log_w + (betas[t] - betas[t - 1]) * f
        z, accept = _hmc(path, z, betas[t], step, leapfrogs, log_g, grad)
        accepted = accepted + accept[pilot:].float().mean(0)  # (B,) over weighted chains
        if pilot:
            used.append(step)
            step = step * torch.where(accept[:pilot].float().mean(0) > target_accept, 1.02, 0.98)
    z, log_w = z[pilot:], log_w[pilot:]  # the weights are complete after a last increment:
    log_w = log_w + (betas[-1] - betas[-2]) * path.f(z)  # a last move would change nothing
    log_px, se = log_mean_exp(log_w)  # reverse: exp(log_w) estimates 1 / p(x)
    step_sizes = torch.stack(used) if pilot else step_sizes  # (T - 1, B)
    return AISResult(-log_px if reverse else log_px, se, accepted / (len(betas) - 2), log_w,
                     step_sizes)


def _start(vae: VAE, x: torch.Tensor, y1h, start: str):
    """q0(z|x), batch ``[B]``, event ``[D]``: the guide (a flow guide's base Gaussian, whose
    density needs no inverse flow) or the prior."""
    if start == "guide":
        return base_gaussian(vae.q_z_onehot(x, y1h))
    if start == "prior":
        return vae.prior_dist().expand([x.shape[0]])
    raise ValueError(f"start = {start!r}: allowed: guide, prior")


def _check(x: torch.Tensor, latent_dim: int, steps: int, z_exact, step_sizes) -> None:
    """Refuse ``z_exact`` (expected ``[C, B, D]`` for x ``[B, X]``, with step sizes) or
    ``step_sizes`` (expected ``[steps - 1, B]``, all > 0) of the wrong shape, naming what is
    expected."""
    if z_exact is not None and tuple(z_exact.shape[1:]) != (x.shape[0], latent_dim):
        raise ValueError(f"z_exact has shape {list(z_exact.shape)}; expected [C, "
                         f"{x.shape[0]}, {latent_dim}] (chains, points, latent dims)")
    if z_exact is not None and step_sizes is None:
        raise ValueError("z_exact given without step_sizes: reverse AIS runs the forward run's "
                         "step sizes backwards (pass ais(...).step_sizes of the forward run, "
                         "as bdmc does)")
    if step_sizes is not None and (tuple(step_sizes.shape) != (steps - 1, x.shape[0])
                                   or not (step_sizes > 0).all()):
        raise ValueError(f"step_sizes has shape {list(step_sizes.shape)}; expected "
                         f"[{steps - 1}, {x.shape[0]}] (the moves at beta_1..beta_T-1, "
                         "points), every size > 0")


@torch.no_grad()
def ais(vae: VAE, x: torch.Tensor, y: torch.Tensor | None = None, steps: int = 500,
        chains: int = 16, leapfrogs: int = 10, start: str = "guide", step_size: float = 0.05,
        target_accept: float = 0.65, z_exact: torch.Tensor | None = None,
        step_sizes: torch.Tensor | None = None) -> AISResult:
    """AIS estimate of log p(x) for x ``[B, X]`` (labels y ``[B]`` if conditional) with
    ``chains`` chains of ``steps`` annealing steps, each an HMC move of ``leapfrogs`` leapfrog
    steps, from q0 = the guide q(z|x) (``start="guide"``) or the prior. The step sizes are
    ``step_sizes`` ``[steps - 1, B]`` if given, else set along the way by ``PILOT_CHAINS``
    unweighted pilot chains from q0 that run beside the weighted ones, starting at
    ``step_size``, each move's step grown when the pilot chains' acceptance rate beats
    ``target_accept`` and shrunk otherwise (:func:`_anneal` says where that settles).

    With ``z_exact`` ``[C, B, D]`` (exact posterior draws, e.g. the latents that simulated
    x) and the forward run's ``step_sizes``, runs *reverse* AIS from them instead
    (``chains`` is then C): the stochastic upper bound of BDMC."""
    if steps < 2 or leapfrogs < 1 or chains < 1:
        raise ValueError(f"steps = {steps}, leapfrogs = {leapfrogs}, chains = {chains}: "
                         "steps must be >= 2 (one step makes no HMC move: plain importance "
                         "sampling from q0), leapfrogs and chains >= 1")
    if not step_size > 0 or not 0 < target_accept < 1:
        raise ValueError(f"step_size = {step_size}, target_accept = {target_accept}: step_size "
                         "must be > 0 (a zero step never moves the chains), target_accept in "
                         "(0, 1)")
    _check(x, vae.latent_dim, steps, z_exact, step_sizes)
    y1h = vae.onehot(y)
    q0 = _start(vae, x, y1h, start)
    path = _Path(vae, x, y1h, q0)
    betas = sigmoid_schedule(steps, device=x.device)
    path.f(q0.sample((1,)))  # shapes and supports checked once (when Pyro validation is on)
    with pyro.validation_enabled(False):  # ... not in each of the steps * leapfrogs calls
        if step_sizes is None:  # set on the way by pilot chains, placed first in z
            z0 = q0.sample((PILOT_CHAINS + chains,))  # (P + C, B, D)
            return _anneal(path, z0, betas, leapfrogs, pilot=PILOT_CHAINS,
                           first_step=x.new_full((x.shape[0],), step_size),
                           target_accept=target_accept)
        z0 = q0.sample((chains,)) if z_exact is None else z_exact  # (C, B, D)
        return _anneal(path, z0, betas, leapfrogs, step_sizes.to(x),  # x's device and dtype
                       reverse=z_exact is not None)


def ais_errors(values: torch.Tensor, mc_se: torch.Tensor, chains: int) -> dict:
    """:func:`evaluate.with_errors` of per-point AIS estimates ``[N]`` from ``chains`` chains
    each. One chain gives no Monte Carlo SE (None, with the reason). From several, the delta
    method's SE (:func:`evaluate.log_mean_exp`) with ``mc_se_note``: from a few chains it
    reads low, since the sample misses the weights' heavy tail."""
    if chains == 1:
        return with_errors(values, None, "not available: one chain per point has no spread")
    return {**with_errors(values, mc_se),
            "mc_se_note": f"delta method over {chains} chains per point: a lower estimate"}


@torch.no_grad()
def simulate(vae: VAE, n: int, chains: int, y: torch.Tensor | None = None):
    """Data simulated from the model with its exact posterior draws, for BDMC: z ~ p(z),
    x ~ p(x|z); returns x ``[n, X]`` and z ``[chains, n, D]`` (the true z repeated, each an
    exact draw from p(z|x))."""
    z = vae.prior_dist().sample((n,))  # (n, D)
    x = vae.likelihood_dist(z, vae.onehot(y)).sample()  # (n, X)
    return x, z.expand(chains, *z.shape).clone()


@torch.no_grad()
def bdmc(vae: VAE, n: int, steps: int = 500, chains: int = 16, leapfrogs: int = 10,
         seed: int = 0) -> dict:
    """Bidirectional Monte Carlo on ``n`` points simulated from the model (:func:`simulate`;
    a conditional model gets labels 0, 1, 2, ... in turn): forward AIS from the guide gives
    a stochastic lower bound, reverse AIS from the true z an upper bound, per point. Their
    gap, upper - lower (mean over points, with its Monte Carlo SE and test-set SE), bounds
    how far forward AIS with these settings sits from log p(x), on data like the model's."""
    with seeded(seed, vae.device):
        y = (torch.arange(n, device=vae.device) % vae.num_classes) if vae.num_classes else None
        x, z = simulate(vae, n, chains, y)
        lower = ais(vae, x, y, steps, chains, leapfrogs)
        upper = ais(vae, x, y, steps, chains, leapfrogs, z_exact=z,
                    step_sizes=lower.step_sizes)  # the same kernels, run backwards
    gap_se = (lower.mc_se**2 + upper.mc_se**2).sqrt()  # (n,): independent runs
    return {"points": n, "steps": steps, "chains": chains, "leapfrogs": leapfrogs, "seed": seed,
            "lower": ais_errors(lower.log_px, lower.mc_se, chains),
            "upper": ais_errors(upper.log_px, upper.mc_se, chains),
            "gap": ais_errors(upper.log_px - lower.log_px, gap_se, chains),
            "gap_per_point": (upper.log_px - lower.log_px).tolist()}


@torch.no_grad()
def evaluate_ais(vae: VAE, x: torch.Tensor, y: torch.Tensor | None = None, steps: int = 500,
                 chains: int = 16, leapfrogs: int = 10, batch_size: int = 100,
                 seed: int = 0) -> dict:
    """Forward AIS (from the guide) on data x ``[N, X]``, ``batch_size`` points at a time:
    log p(x) as a mean over points with its Monte Carlo SE (over chains, per point,
    combined) and test-set SE, the mean HMC acceptance rate and the seconds per point."""
    check_counts(x, batch_size=batch_size)  # the others are checked by ais()
    t0 = time.perf_counter()
    with seeded(seed, x.device):
        runs = [ais(vae, xb, yb, steps, chains, leapfrogs) for xb, yb in batches(x, y, batch_size)]
    log_px = torch.cat([r.log_px for r in runs])  # (N,)
    return {
        "n": x.shape[0], "steps": steps, "chains": chains, "leapfrogs": leapfrogs, "seed": seed,
        "log_px": ais_errors(log_px, torch.cat([r.mc_se for r in runs]), chains),
        "acceptance": torch.cat([r.acceptance for r in runs]).mean().item(),
        "seconds_per_point": (time.perf_counter() - t0) / x.shape[0],
    }

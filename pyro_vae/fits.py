"""Approximations of p(z | x) for a fixed decoder: the amortized guide and per-point Gaussians.

(a) :func:`amortized`: q_phi(z | x) for all points at once, one encoder pass;
(b) :func:`fit_gaussian`: a Gaussian fitted to each point by SVI with the decoder fixed
    (diagonal, or full covariance): the best a Gaussian family can do, so the ELBO of (b)
    minus that of (a) is the amortization gap.
"""

from __future__ import annotations

import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO

from .guides import moments, raw_from_scale, scale_from_raw
from .model import LATENT, PLATE
from .objectives import pyro_host_reads_deferred
from .settings import Setting
from .training import make_optimizer


def amortized(setting: Setting) -> tuple[dist.Distribution, float]:
    """(a) q_phi(z | x) for all points and the seconds per point of one encoder pass."""
    vae, x = setting.vae, setting.x
    vae.q_z(x, setting.y)  # warm-up
    t0 = time.perf_counter()
    q = vae.q_z(x, setting.y)
    return q, (time.perf_counter() - t0) / x.shape[0]


def fit_gaussian(setting: Setting, full: bool = False, steps: int = 1500, lr: float = 0.02,
                 particles: int = 16) -> tuple[dist.Distribution, float]:
    """(b) one Gaussian per point, fitted by SVI (Trace_ELBO, ``particles`` draws) with the
    decoder fixed, started from the amortized guide. Diagonal, or full covariance
    (scale_tril) with ``full``. Returns the distribution (batch [N], event [D]) and seconds
    per point. Pyro's argument and support checks (host reads) run in the first step only."""
    vae, x = setting.vae, setting.x
    with torch.no_grad():
        q0 = vae.q_z(x, setting.y)
    mean, std = moments(q0)  # (N, D) each
    loc = mean.clone().requires_grad_()
    raw = raw_from_scale(std).requires_grad_()  # the scale below is the guide's at the start
    n, d = loc.shape
    off = loc.new_zeros(n, d, d).requires_grad_()  # (N, D, D) strictly lower part
    params = [loc, raw, off] if full else [loc, raw]

    def q():
        scale = scale_from_raw(raw)  # the guide's map and floor: the same family
        if not full:
            return dist.Normal(loc, scale).to_event(1)
        tril = torch.tril(off, diagonal=-1) + torch.diag_embed(scale)
        return dist.MultivariateNormal(loc, scale_tril=tril)

    def guide(x, y=None, kl_weight=1.0):
        with pyro.plate(PLATE, x.shape[0], device=x.device):
            pyro.sample(LATENT, q())

    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    opt = make_optimizer(params, lr)  # fused: its step count stays on the device
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    args = (x,) if setting.y is None else (x, setting.y)
    t0 = time.perf_counter()
    validate = pyro.poutine.util.is_validation_enabled()
    with pyro_host_reads_deferred():  # no host read per step: a GPU runs ahead
        for i in range(steps):
            opt.zero_grad()
            with pyro.validation_enabled(validate and i == 0):  # its checks read on the host
                elbo.differentiable_loss(vae.model, guide, *args).backward()
            opt.step()
            sched.step()
    seconds = (time.perf_counter() - t0) / n
    if not all(torch.isfinite(p).all() for p in params):  # Pyro's NaN warning was deferred
        raise FloatingPointError(f"the per-point {'full' if full else 'diagonal'} Gaussian fit "
                                 f"went non-finite within {steps} steps (lr = {lr}); no result")
    loc, raw, off = loc.detach(), raw.detach(), off.detach()  # q() reads the rebound names
    return q(), seconds

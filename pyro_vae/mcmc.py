"""MCMC reference: NUTS (``pyro.infer.MCMC``) on the same Pyro model, with the decoder fixed.

Chains run one after another, each started at its own draw from the amortized guide with
doubled scale (dispersed starts make R-hat meaningful); the draws go to ArviZ through
``arviz_bridge`` with their divergence flags.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide.initialization import init_to_value

from . import arviz_bridge
from .evaluate import seeded
from .guides import moments
from .model import LATENT
from .objectives import jit_notice_silenced
from .settings import Setting


class NutsResult(NamedTuple):
    """NUTS draws ``samples [C, S, N, D]``, the same as ArviZ data (``arviz_bridge``, with
    sample_stats/diverging), the number of divergences and seconds per point."""

    samples: torch.Tensor
    idata: object
    divergences: int
    seconds_per_point: float


def _chain(vae, args: tuple, start: torch.Tensor, warmup: int, draws: int, jit: bool,
           progress: bool) -> tuple[torch.Tensor, dict]:
    """One NUTS chain on ``VAE.model`` at data ``args`` from latents ``start`` ``[N, D]``:
    its draws ``[S, N, D]`` and Pyro's divergences (their draw indices, by chain name)."""
    kernel = NUTS(vae.model, jit_compile=jit, ignore_jit_warnings=True,
                  init_strategy=init_to_value(values={LATENT: start}), max_plate_nesting=1)
    mcmc = MCMC(kernel, num_samples=draws, warmup_steps=warmup, disable_progbar=not progress)
    with jit_notice_silenced():  # Pyro's jit_compile traces with torch.jit
        mcmc.run(*args)
    return mcmc.get_samples()[LATENT], mcmc.diagnostics()["divergences"]


def run_nuts(setting: Setting, chains: int = 4, warmup: int = 500, draws: int = 1000,
             jit: bool = True, seed: int = 0, progress: bool = False) -> NutsResult:
    """(c) NUTS on ``VAE.model`` conditioned on the points, chains run one after another,
    each started at its own draw from the amortized guide with doubled scale (dispersed
    starts make R-hat meaningful). The guide's moments (drawn for a flow guide) are seeded
    with ``seed``, chain c with ``seed + c``, on torch's streams alone: the caller's torch,
    numpy and Python streams are left as they were."""
    vae, x = setting.vae, setting.x
    args = (x,) if setting.y is None else (x, setting.y)
    with torch.no_grad(), seeded(seed, x.device):  # a flow guide's moments are drawn
        mean, std = moments(vae.q_z(x, setting.y))  # (N, D) each
    samples, diverging = [], []
    t0 = time.perf_counter()
    for c in range(chains):
        with seeded(seed + c, x.device):  # torch's streams only, restored after the chain
            z, divergences = _chain(vae, args, mean + 2 * std * torch.randn_like(mean),
                                    warmup, draws, jit, progress)
        flags = torch.zeros(draws, dtype=torch.bool)  # (S,)
        flags[[i for v in divergences.values() for i in v]] = True
        samples.append(z)
        diverging.append(flags)
    seconds = (time.perf_counter() - t0) / x.shape[0]
    samples, diverging = torch.stack(samples), torch.stack(diverging)  # (C, S, N, D), (C, S)
    idata = arviz_bridge.from_draws(samples, diverging)
    return NutsResult(samples, idata, int(diverging.sum()), seconds)

"""Evaluation: ELBO, importance-weighted log-likelihood, KL per dimension, active units.

Everything is built on one quantity, the log importance weights of K draws from the guide::

    z_k ~ q(z | x),  log w_k = log p(x | z_k) + log p(z_k) - log q(z_k | x)     [K, B]

    ELBO(x)    = E_q[log w]                          ~ mean_k log w_k
    log p(x)  >= log (1/K) sum_k w_k  (IWAE bound; -> log p(x) as K -> oo, and >= ELBO)

Values are nats per data point; bits per dimension = -value / (X ln 2).
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch

from .model import VAE


class LogWeights(NamedTuple):
    """Terms of log w for K draws per data point, each ``[K, B]``."""

    log_lik: torch.Tensor  # log p(x | z_k)
    log_prior: torch.Tensor  # log p(z_k)
    log_q: torch.Tensor  # log q(z_k | x)

    @property
    def log_w(self) -> torch.Tensor:
        return self.log_lik + self.log_prior - self.log_q


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device | str = "cpu"):
    """Run the block with torch's RNG seeded, leaving the caller's RNG stream untouched."""
    if seed is None:
        yield
        return
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cpu"):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def log_weights(vae: VAE, x: torch.Tensor, y: torch.Tensor | None = None, k: int = 1) -> LogWeights:
    """K reparameterized draws z_k ~ q(z|x) for x ``[B, X]``; returns the terms ``[K, B]``."""
    y1h = vae.onehot(y)
    q = vae.posterior(x, y1h)  # batch [B], event [D]
    z = q.rsample((k,))  # (K, B, D)
    log_lik = vae.likelihood_dist(z, y1h).log_prob(x)  # (K, B)
    return LogWeights(log_lik, vae.prior_dist().log_prob(z), q.log_prob(z))


def _batches(x: torch.Tensor, y: torch.Tensor | None, batch_size: int):
    for i in range(0, x.shape[0], batch_size):
        yield x[i : i + batch_size], None if y is None else y[i : i + batch_size]


@torch.no_grad()
def elbo_terms(vae: VAE, x, y=None, k: int = 1, batch_size: int = 1000, seed: int | None = 0):
    """Per data point ``[N]``: (reconstruction E_q[log p(x|z)], KL estimate E_q[log q - log p]),
    Monte Carlo with K draws; ELBO = reconstruction - KL."""
    recs, kls = [], []
    with seeded(seed, x.device):
        for xb, yb in _batches(x, y, batch_size):
            lw = log_weights(vae, xb, yb, k)
            recs.append(lw.log_lik.mean(0))
            kls.append((lw.log_q - lw.log_prior).mean(0))
    return torch.cat(recs), torch.cat(kls)


def elbo(vae: VAE, x, y=None, k: int = 1, batch_size: int = 1000, seed: int | None = 0) -> float:
    """Mean ELBO over the data set, nats per data point (K-draw Monte Carlo, seeded)."""
    rec, kl = elbo_terms(vae, x, y, k, batch_size, seed)
    return (rec - kl).mean().item()


@torch.no_grad()
def iw_log_likelihood(vae: VAE, x, y=None, k: int = 1000, chunk: int = 100,
                      batch_size: int = 100, seed: int | None = 0) -> torch.Tensor:
    """Importance-weighted estimate of log p(x) per data point ``[N]``:
    log (1/K) sum_k w_k, accumulated over chunks of draws with a streaming logsumexp, so
    memory is O(chunk * B) for any K."""
    out = []
    with seeded(seed, x.device):
        for xb, yb in _batches(x, y, batch_size):
            acc = torch.full((xb.shape[0],), -math.inf, device=x.device)
            for start in range(0, k, chunk):
                lw = log_weights(vae, xb, yb, min(chunk, k - start)).log_w  # (k', B)
                acc = torch.logaddexp(acc, lw.logsumexp(0))
            out.append(acc - math.log(k))
    return torch.cat(out)

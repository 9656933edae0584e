"""Closed forms for the tractable toy model (probabilistic PCA).

Linear-Gaussian model: z ~ N(0, I_D), x | z ~ N(W z + b, s^2 I_X), W ``[X, D]``.

    p(x)     = N(x; b, W W^T + s^2 I)
    p(z | x) = N(mu, Sigma),  Sigma = (I + W^T W / s^2)^-1,  mu = Sigma W^T (x - b) / s^2

These are the references that ELBOs, importance-weighted bounds and NUTS are checked
against.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch

from .data import LinearGaussian


def linear_gaussian_evidence(params: LinearGaussian) -> dist.MultivariateNormal:
    """p(x) = N(b, W W^T + s^2 I): event_shape [X]."""
    W, b, s = params
    cov = W @ W.T + s**2 * torch.eye(W.shape[0], dtype=W.dtype, device=W.device)
    return dist.MultivariateNormal(b, covariance_matrix=cov)


def linear_gaussian_posterior(params: LinearGaussian, x: torch.Tensor) -> dist.MultivariateNormal:
    """p(z | x) for x ``[B, X]``: batch_shape [B], event_shape [D] (full covariance)."""
    W, b, s = params
    eye = torch.eye(W.shape[1], dtype=W.dtype, device=W.device)
    cov = torch.linalg.inv(eye + W.T @ W / s**2)  # (D, D)
    mean = (x - b) @ W @ cov / s**2  # (B, D); cov is symmetric
    return dist.MultivariateNormal(mean, covariance_matrix=cov.expand(x.shape[0], -1, -1))

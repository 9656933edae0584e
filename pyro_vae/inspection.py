"""Figures: data in, matplotlib Axes (or Figure for grids) out; nothing is shown.

Data preparation (``*_data`` functions, pure torch) is kept apart from drawing. Callers
save with :func:`save_figure`. The Agg backend is used, so no window ever opens.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .model import VAE  # noqa: E402


def tile(images: torch.Tensor, image_shape: tuple[int, ...], nrow: int) -> torch.Tensor:
    """Images ``[N, X]`` (X = C*H*W, C = 1) -> one mosaic ``[rows*H, nrow*W]``, blank-padded."""
    _, h, w = image_shape
    n = images.shape[0]
    rows = -(-n // nrow)
    canvas = torch.ones(rows * nrow, h, w)
    canvas[:n] = images.detach().float().cpu().reshape(n, h, w)
    return canvas.reshape(rows, nrow, h, w).permute(0, 2, 1, 3).reshape(rows * h, nrow * w)


def image_grid(images, image_shape, nrow: int = 8, ax=None, title: str | None = None):
    """Draw images ``[N, X]`` as a grid of ``nrow`` columns; returns the Axes."""
    ax = ax or plt.figure(figsize=(nrow * 0.6, max(1, -(-len(images) // nrow)) * 0.6)).gca()
    ax.imshow(tile(images, image_shape, nrow).numpy(), cmap="gray", vmin=0, vmax=1)
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax


def scatter(points: torch.Tensor, ax=None, c=None, title: str | None = None, **kw):
    """Scatter the first two coordinates of ``[N, >=2]`` points; returns the Axes."""
    ax = ax or plt.figure(figsize=(4, 4)).gca()
    p = points.detach().cpu().numpy()
    ax.scatter(p[:, 0], p[:, 1], s=kw.pop("s", 3), c=None if c is None else c.cpu().numpy(), **kw)
    ax.set_xlabel("dim 1")
    ax.set_ylabel("dim 2")
    ax.set_aspect("equal", adjustable="datalim")
    if title:
        ax.set_title(title)
    return ax


def reconstructions_figure(vae: VAE, x, y=None, image_shape=None, n: int = 16):
    """Top: n test inputs; bottom: mean of p(x | z = E_q[z|x]). Points for vector data."""
    x, y = x[:n], None if y is None else y[:n]
    recon = vae.reconstruct(x, y)  # (n, X)
    if image_shape is None:
        ax = scatter(x, label="data")
        scatter(recon, ax=ax, label="reconstruction", marker="x", s=12)
        ax.legend()
        ax.set_title("test points and reconstructions")
        return ax.figure
    fig, axes = plt.subplots(2, 1, figsize=(n * 0.6, 1.6))
    image_grid(x, image_shape, nrow=n, ax=axes[0], title="test images")
    image_grid(recon, image_shape, nrow=n, ax=axes[1], title="reconstructions")
    fig.tight_layout()
    return fig


def samples_figure(vae: VAE, n: int = 64, image_shape=None, y=None, reference=None):
    """Decoded prior samples (means of p(x|z), z ~ p(z)); for vector data, draws
    x ~ p(x|z) over ``reference`` data points."""
    if image_shape is None:
        with torch.no_grad():
            z = vae.prior_dist().sample((n,))
            x = vae.likelihood_dist(z, vae.onehot(y)).sample()
        ax = scatter(reference, label="data", alpha=0.3) if reference is not None else None
        ax = scatter(x, ax=ax, label="model samples", s=3)
        ax.legend()
        ax.set_title("x ~ p(x | z), z ~ p(z)")
        return ax.figure
    ax = image_grid(vae.sample(n, y), image_shape, nrow=8,
                    title="samples: mean of p(x|z), z ~ p(z)")
    return ax.figure


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` to ``path`` and close it."""
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


# --------------------------------------------------------------------------- posteriors

APPROX_COLOURS = {"amortized": "tab:red", "gaussian-diag": "tab:orange",
                  "gaussian-full": "tab:green", "exact": "black"}


def marginal_overlay(draws, gaussians: dict, ax=None, title: str | None = None):
    """Histogram of reference draws ``[S]`` (NUTS) with Gaussian marginal densities
    ``gaussians: name -> (mean, std)`` drawn over it; returns the Axes."""
    import numpy as np

    ax = ax or plt.figure(figsize=(4, 3)).gca()
    d = draws.detach().cpu().numpy()
    ax.hist(d, bins=60, density=True, color="tab:blue", alpha=0.35, label="NUTS")
    lo, hi = np.percentile(d, [0.1, 99.9])
    pad = 0.3 * (hi - lo)
    grid = np.linspace(lo - pad, hi + pad, 400)
    for name, (mean, std) in gaussians.items():
        pdf = np.exp(-0.5 * ((grid - mean) / std) ** 2) / (std * np.sqrt(2 * np.pi))
        ax.plot(grid, pdf, color=APPROX_COLOURS.get(name), label=name,
                ls="--" if name == "exact" else "-")
    ax.set_xlabel("z")
    ax.set_ylabel("density")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=7)
    return ax


def pair_overlay(draws, gaussians: dict, ax=None, title: str | None = None):
    """NUTS draws ``[S, 2]`` as a cloud with the 1- and 2-sigma ellipses of Gaussians
    ``gaussians: name -> (mean [2], covariance [2, 2])``; returns the Axes."""
    import numpy as np

    ax = ax or plt.figure(figsize=(4, 4)).gca()
    d = draws.detach().cpu().numpy()
    ax.scatter(d[:, 0], d[:, 1], s=2, alpha=0.25, color="tab:blue", label="NUTS")
    t = np.linspace(0, 2 * np.pi, 200)
    circle = np.stack([np.cos(t), np.sin(t)])  # (2, T)
    for name, (mean, cov) in gaussians.items():
        chol = np.linalg.cholesky(np.asarray(cov, dtype=float))
        for k, ls in ((1, "-"), (2, ":")):
            e = np.asarray(mean)[:, None] + k * chol @ circle
            ax.plot(e[0], e[1], color=APPROX_COLOURS.get(name), ls=ls,
                    label=name if k == 1 else None)
    ax.set_xlabel("z[0]")
    ax.set_ylabel("z[1]")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=7)
    return ax

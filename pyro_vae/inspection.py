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

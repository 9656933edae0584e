"""Figures: data in, matplotlib Axes (or Figure for grids) out; nothing is shown.

Data preparation (``*_data`` functions, pure torch) is kept apart from drawing. Callers
save with :func:`save_figure`. No function calls ``plt.show()``; the CLI (and the tests)
select the Agg backend, so no window opens, while notebooks keep their inline backend.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import torch

from .evaluate import kl_per_dimension, posterior_means
from .guides import moments
from .model import VAE


def tile(images: torch.Tensor, image_shape: tuple[int, ...], nrow: int) -> torch.Tensor:
    """Images ``[N, X]`` (X = C*H*W) -> one mosaic, blank-padded: ``[rows*H, nrow*W]`` for
    grey images (C = 1; other C but 3: the channel mean), ``[rows*H, nrow*W, 3]`` in [0, 1]
    for colour (C = 3)."""
    c, h, w = image_shape
    n = images.shape[0]
    rows = -(-n // nrow)
    canvas = torch.ones(rows * nrow, c, h, w)
    canvas[:n] = images.detach().float().cpu().reshape(n, c, h, w)
    mosaic = canvas.reshape(rows, nrow, c, h, w).permute(0, 3, 1, 4, 2)  # (rows, H, nrow, W, C)
    mosaic = mosaic.reshape(rows * h, nrow * w, c)
    return mosaic.clamp(0, 1) if c == 3 else mosaic.mean(-1)


def _label(ax, xlabel: str, ylabel: str, title: str | None = None):
    """Axis labels, and the title when one is given; returns the Axes."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    return ax


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
    ax.set_aspect("equal", adjustable="datalim")
    return _label(ax, "dim 1", "dim 2", title)


def reconstructions_figure(x, recon, image_shape=None):
    """Top: inputs ``[n, X]``; bottom: their reconstructions ``[n, X]``. Vector data: both
    as points. Returns the Figure."""
    if image_shape is None:
        ax = scatter(x, label="data")
        scatter(recon, ax=ax, label="reconstruction", marker="x", s=12)
        ax.legend()
        ax.set_title("test points and reconstructions")
        return ax.figure
    n = x.shape[0]
    fig, axes = plt.subplots(2, 1, figsize=(n * 0.6, 1.6))
    image_grid(x, image_shape, nrow=n, ax=axes[0], title="test images")
    image_grid(recon, image_shape, nrow=n, ax=axes[1], title="reconstructions")
    fig.tight_layout()
    return fig


def samples_figure(samples, image_shape=None, reference=None, title="samples: mean of p(x|z), z ~ p(z)"):
    """Model samples ``[n, X]`` as an image grid, or (vector data) as points over the
    ``reference`` data points. Returns the Figure."""
    if image_shape is None:
        ax = scatter(reference, label="data", alpha=0.3) if reference is not None else None
        ax = scatter(samples, ax=ax, label="model samples", s=3, title=title)
        ax.legend()
        return ax.figure
    return image_grid(samples, image_shape, nrow=8, title=title).figure


def write_basic_figures(vae: VAE, ds, out, n: int = 16) -> list[Path]:
    """``reconstructions.png`` (n test points) and ``samples.png`` (64 prior samples; for
    vector data draws x ~ p(x|z) over the test data) of a trained model into ``out``."""
    out = Path(out)
    y = ds.y_test[:n] if vae.num_classes else None
    recon = save_figure(reconstructions_figure(ds.x_test[:n], vae.reconstruct(ds.x_test[:n], y),
                                               ds.image_shape), out / "reconstructions.png")
    count = 64 if ds.image_shape else 2000
    ys = torch.arange(count, device=ds.x_test.device) % vae.num_classes if vae.num_classes else None
    if ds.image_shape is None:
        fig = samples_figure(vae.sample(count, ys, mean=False), reference=ds.x_test,
                             title="x ~ p(x | z), z ~ p(z)")
    else:
        fig = samples_figure(vae.sample(count, ys), ds.image_shape)
    return [recon, save_figure(fig, out / "samples.png")]


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
    ax.legend(fontsize=7)
    return _label(ax, "z", "density", title)


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
    ax.legend(fontsize=7)
    return _label(ax, "z[0]", "z[1]", title)


# --------------------------------------------------------------------------- data preparation


def pca(x: torch.Tensor, k: int = 2):
    """Principal components of ``x [N, D]``: (projections ``[N, k]``, directions ``[k, D]``,
    share of variance explained ``[k]``)."""
    centred = x - x.mean(0)
    _, s, vt = torch.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:k].T, vt[:k], (s[:k] ** 2) / (s**2).sum()


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between the column spaces of ``a [X, k]`` and
    ``b [X, k]``: arccos of the singular values of Q_a^T Q_b."""
    qa, _ = torch.linalg.qr(a)
    qb, _ = torch.linalg.qr(b)
    return torch.arccos(torch.linalg.svdvals(qa.T @ qb).clamp(-1, 1)).flip(0)


@torch.no_grad()
def manifold_data(vae: VAE, n: int = 15, quantiles=(0.03, 0.97), num_prior: int = 20000):
    """Decoded means over an n x n grid of prior quantiles of a 2-D latent: ``[n*n, X]``
    (rows: z[1] from high to low, columns: z[0] from low to high)."""
    z = vae.prior_dist().sample((num_prior,))  # (P, 2)
    qs = torch.linspace(*quantiles, n, device=z.device)
    g0, g1 = torch.quantile(z[:, 0], qs), torch.quantile(z[:, 1], qs).flip(0)
    grid = torch.stack(torch.meshgrid(g1, g0, indexing="ij"), -1).flip(-1).reshape(-1, 2)
    return vae.likelihood_dist(grid).mean


@torch.no_grad()
def traversal_data(vae: VAE, x0, dims, steps: int = 9, span: float = 3.0, scale=None, y0=None):
    """Decoded means moving one latent dim at a time from z = E_q[z | x0], over
    ``span`` standard deviations (``scale [D]``, default 1): ``[len(dims) * steps, X]``."""
    y1h = vae.onehot(y0)
    z0 = moments(vae.q_z_onehot(x0[None], y1h))[0][0]  # (D,)
    scale = torch.ones_like(z0) if scale is None else scale
    offsets = torch.linspace(-span, span, steps, device=z0.device)
    rows = []
    for d in dims:
        z = z0.repeat(steps, 1)
        z[:, d] = z0[d] + offsets * scale[d]
        rows.append(vae.likelihood_dist(z, None if y1h is None else y1h.expand(steps, -1)).mean)
    return torch.cat(rows)


@torch.no_grad()
def interpolation_data(vae: VAE, xa, xb, steps: int = 10, ya=None):
    """Decoded means along the straight line between E_q[z | xa] and E_q[z | xb]: ``[steps, X]``."""
    y1h = vae.onehot(ya)
    za = moments(vae.q_z_onehot(xa[None], y1h))[0]
    zb = moments(vae.q_z_onehot(xb[None], y1h))[0]
    t = torch.linspace(0, 1, steps, device=za.device)[:, None]
    return vae.likelihood_dist(za + t * (zb - za), None if y1h is None else y1h.expand(steps, -1)).mean


# --------------------------------------------------------------------------- drawing


def training_curves(metrics: list[dict], axes=None):
    """ELBO (train, test), test reconstruction and KL, and the KL weight per epoch; returns
    the Figure."""
    if axes is None:
        _, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    epochs = [m["epoch"] for m in metrics]
    axes[0].plot(epochs, [m["train_elbo"] for m in metrics], label="train ELBO")
    axes[0].plot(epochs, [m["test_elbo"] for m in metrics], label="test ELBO")
    axes[0].set_ylabel("nats per data point")
    axes[1].plot(epochs, [m["test_reconstruction"] for m in metrics], label="E_q[log p(x|z)]")
    axes[1].plot(epochs, [-m["test_kl"] for m in metrics], label="-KL(q || p)")
    axes[1].set_title("test ELBO terms")
    axes[2].plot(epochs, [m["kl_weight"] for m in metrics], color="tab:gray")
    axes[2].set_title("KL weight (beta)")
    axes[2].set_ylim(bottom=0)
    for ax in axes:
        ax.set_xlabel("epoch")
    for ax in axes[:2]:
        ax.legend(fontsize=8)
    axes[0].set_title("ELBO")
    axes[0].figure.tight_layout()
    return axes[0].figure


def latent_scatter(points: torch.Tensor, labels=None, ax=None, title=None, xlabel="z[0]",
                   ylabel="z[1]"):
    """2-D points ``[N, 2]`` coloured by integer labels ``[N]`` with a colour bar."""
    ax = ax or plt.figure(figsize=(5, 4.3)).gca()
    p = points.detach().cpu().numpy()
    c = None if labels is None else labels.detach().cpu().numpy()
    sc = ax.scatter(p[:, 0], p[:, 1], c=c, cmap="tab10" if c is not None else None, s=4)
    if c is not None:
        ax.figure.colorbar(sc, ax=ax, label="label")
    return _label(ax, xlabel, ylabel, title)


def kl_bars(kl: torch.Tensor, ax=None, title="KL(q(z_d|x) || p(z_d)) per dimension"):
    """Bar chart of the mean KL per latent dimension ``[D]``."""
    ax = ax or plt.figure(figsize=(max(4, 0.15 * len(kl) + 2), 3)).gca()
    ax.bar(range(len(kl)), kl.detach().cpu().numpy(), color="tab:purple")
    return _label(ax, "latent dimension", "nats", title)


def posterior_ellipses(means: torch.Tensor, stds: torch.Tensor, ax=None, dims=(0, 1), title=None):
    """1- and 2-sigma ellipses of diagonal q(z|x) for a few points (``means``, ``stds``
    ``[n, D]``) in the latent dims ``dims``."""
    import numpy as np
    from matplotlib.patches import Ellipse

    ax = ax or plt.figure(figsize=(4.5, 4.5)).gca()
    m = means[:, list(dims)].detach().cpu().numpy()
    s = stds[:, list(dims)].detach().cpu().numpy()
    colours = plt.get_cmap("tab10")(np.arange(len(m)) % 10)
    for i in range(len(m)):
        for k in (1, 2):
            ax.add_patch(Ellipse(m[i], 2 * k * s[i, 0], 2 * k * s[i, 1], fill=False,
                                 color=colours[i], ls="-" if k == 1 else ":"))
        ax.plot(*m[i], "o", color=colours[i], ms=3)
    pad = 2.5 * s.max()
    ax.set_xlim(m[:, 0].min() - pad, m[:, 0].max() + pad)
    ax.set_ylim(m[:, 1].min() - pad, m[:, 1].max() + pad)
    return _label(ax, f"z[{dims[0]}]", f"z[{dims[1]}]",
                  title or "q(z|x) of test points: 1 and 2 sigma")


@torch.no_grad()
def write_figures(run, out, n: int = 16) -> list[Path]:
    """Every figure of ``pyro-vae inspect`` for a loaded run (``runs.Run``) into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vae, ds, shape = run.vae, run.dataset, run.dataset.image_shape
    y = ds.y_test if vae.num_classes else None
    written = [save_figure(training_curves(run.metrics), out / "training_curves.png"),
               *write_basic_figures(vae, ds, out, n)]
    means = posterior_means(vae, ds.x_test, y)  # (N, D)
    variances = means.var(0)
    active = variances.argsort(descending=True)  # most active dims first
    if vae.latent_dim == 2:
        ax = latent_scatter(means, ds.y_test, title="posterior means E_q[z|x] of test points")
        written.append(save_figure(ax.figure, out / "latent_space.png"))
        if shape is not None and not vae.num_classes:
            ax = image_grid(manifold_data(vae), shape, nrow=15,
                            title="decoded manifold over prior quantiles")
            written.append(save_figure(ax.figure, out / "manifold.png"))
    else:
        proj, _, share = pca(means)
        ax = latent_scatter(proj, ds.y_test, title="PCA of posterior means E_q[z|x]",
                            xlabel=f"PC 1 ({share[0]:.0%} of variance)",
                            ylabel=f"PC 2 ({share[1]:.0%} of variance)")
        written.append(save_figure(ax.figure, out / "latent_pca.png"))
    if shape is not None:
        dims = active[: min(8, vae.latent_dim)].tolist()
        y0 = None if y is None else y[:1]
        ax = image_grid(traversal_data(vae, ds.x_test[0], dims, scale=variances.sqrt(), y0=y0),
                        shape, nrow=9, title=f"traversals of dims {dims} (+-3 std of the means)")
        written.append(save_figure(ax.figure, out / "traversals.png"))
        ax = image_grid(interpolation_data(vae, ds.x_test[0], ds.x_test[1], ya=y0), shape,
                        nrow=10, title="latent interpolation between two test images")
        written.append(save_figure(ax.figure, out / "interpolation.png"))
    q_mean, q_std = moments(vae.q_z(ds.x_test[:8], None if y is None else y[:8]))
    ax = posterior_ellipses(q_mean, q_std, dims=tuple(active[:2].tolist()),
                            title="q(z|x) of 8 test points in the two most active dims")
    written.append(save_figure(ax.figure, out / "posterior_uncertainty.png"))
    kl = kl_per_dimension(vae, ds.x_test, y)
    if kl is not None:
        written.append(save_figure(kl_bars(kl).figure, out / "kl_per_dimension.png"))
    return written

"""Figures: data in, matplotlib Axes (or Figure for grids) out; nothing is shown.

Data preparation (``*_data`` functions, pure torch) is kept apart from drawing. Callers
save with :func:`save_figure`. No function calls ``plt.show()``; the CLI (and the tests)
select the Agg backend, so no window opens, while notebooks keep their inline backend.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .evaluate import kl_per_dimension, posterior_means
from .guides import is_gaussian, mean_and_covariance, moments
from .model import VAE


def tile(images: torch.Tensor, image_shape: tuple[int, ...], nrow: int) -> torch.Tensor:
    """Images ``[N, X]`` (X = C*H*W) -> one mosaic, blank-padded: ``[rows*H, nrow*W]`` for
    grey images (C = 1; any other C except 3: the mean over channels), ``[rows*H, nrow*W,
    3]`` in [0, 1] for colour (C = 3)."""
    c, h, w = image_shape
    n = images.shape[0]
    rows = -(-n // nrow)
    canvas = torch.ones(rows * nrow, c, h, w)
    canvas[:n] = images.detach().float().cpu().reshape(n, c, h, w)
    mosaic = canvas.reshape(rows, nrow, c, h, w).permute(0, 3, 1, 4, 2)  # (rows, H, nrow, W, C)
    mosaic = mosaic.reshape(rows * h, nrow * w, c)
    return mosaic.clamp(0, 1) if c == 3 else mosaic.mean(-1)


def _plt():
    """matplotlib.pyplot, imported on first draw (~0.5 s; ``import pyro_vae`` stays light)."""
    import matplotlib.pyplot as plt

    return plt


def _axes(ax, figsize: tuple[float, float]):
    """``ax``, or the Axes of a new figure of ``figsize`` inches."""
    return ax if ax is not None else _plt().figure(figsize=figsize).gca()


def _label(ax, xlabel: str, ylabel: str, title: str | None = None):
    """Axis labels, and the title when one is given; returns the Axes."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    return ax


def image_grid(images, image_shape, nrow: int = 8, ax=None, title: str | None = None):
    """Draw images ``[N, X]`` as a grid of ``nrow`` columns; returns the Axes."""
    ax = _axes(ax, (nrow * 0.6, max(1, -(-len(images) // nrow)) * 0.6))
    ax.imshow(tile(images, image_shape, nrow).numpy(), cmap="gray", vmin=0, vmax=1)
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax


def scatter(points: torch.Tensor, ax=None, c=None, title: str | None = None, xlabel="x[0]",
            ylabel="x[1]", **kw):
    """Scatter the first two coordinates of ``[N, >=2]`` points (data x by default; name
    latents with ``xlabel="z[0]", ylabel="z[1]"``); returns the Axes."""
    ax = _axes(ax, (4, 4))
    p = points.detach().cpu().numpy()
    ax.scatter(p[:, 0], p[:, 1], s=kw.pop("s", 3), c=None if c is None else c.cpu().numpy(), **kw)
    ax.set_aspect("equal", adjustable="datalim")
    return _label(ax, xlabel, ylabel, title)


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
    fig, axes = _plt().subplots(2, 1, figsize=(n * 0.6, 1.6))
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
    """``reconstructions.png`` (n test points) and ``samples.png`` (images: 64 prior
    samples; vectors: 2000 draws x ~ p(x|z), z ~ p(z), over the test data) of a trained
    model into ``out``."""
    out = Path(out)
    y = ds.y_test[:n] if vae.num_classes else None
    recon = save_figure(reconstructions_figure(ds.x_test[:n], vae.reconstruct(ds.x_test[:n], y),
                                               ds.image_shape), out / "reconstructions.png")
    count = 64 if ds.image_shape else 2000
    ys = torch.arange(count, device=ds.x_test.device) % vae.num_classes if vae.num_classes else None
    return [recon, save_figure(prior_samples_figure(vae, ds, count, ys), out / "samples.png")]


def prior_samples_figure(vae: VAE, ds, n: int, y=None, title_suffix: str = ""):
    """n prior draws z ~ p(z) (labels ``y [n]`` for a conditional model) through the
    decoder: images as a grid of the means of p(x|z); vector data as draws x ~ p(x|z) over
    the test points (means would hide the likelihood's noise). Returns the Figure."""
    vector = ds.image_shape is None
    x = vae.sample(n, y, mean=not vector)  # (n, X)
    title = ("x ~ p(x | z)" if vector else "mean of p(x | z)") + ", z ~ p(z)" + title_suffix
    return samples_figure(x, ds.image_shape, reference=ds.x_test if vector else None, title=title)


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` to ``path`` and close it."""
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    _plt().close(fig)
    return Path(path)


# --------------------------------------------------------------------------- posteriors

APPROX_COLOURS = {"amortized": "tab:red", "gaussian-diag": "tab:orange",
                  "gaussian-full": "tab:green", "exact": "black"}


def _colour(name: str):
    """The colour of an approximation, also when its label qualifies it ("amortized (...)")."""
    return APPROX_COLOURS.get(name.split(" (")[0])


def _density(grid, spec):
    """Density ``[G]`` on ``grid``: of a Gaussian given as (mean, std), or a Gaussian-kernel
    estimate (Silverman's bandwidth) from 1-D draws ``[S]``."""
    if isinstance(spec, torch.Tensor):
        d = spec.detach().double().cpu().numpy()
        bandwidth = 1.06 * d.std() * len(d) ** -0.2
        u = (grid[:, None] - d[None, :]) / bandwidth  # (G, S)
        return np.exp(-0.5 * u**2).mean(1) / (bandwidth * np.sqrt(2 * np.pi))
    mean, std = spec
    return np.exp(-0.5 * ((grid - mean) / std) ** 2) / (std * np.sqrt(2 * np.pi))


def marginal_overlay(draws, approximations: dict, ax=None, title: str | None = None):
    """Histogram of reference draws ``[S]`` (NUTS) with the marginal densities of
    ``approximations: name -> (mean, std)`` (a Gaussian) or ``name -> draws [S']`` (any
    other q: a kernel density estimate, labelled so) drawn over it; returns the Axes."""
    ax = _axes(ax, (4, 3))
    d = draws.detach().cpu().numpy()
    ax.hist(d, bins=60, density=True, color="tab:blue", alpha=0.35, label="NUTS")
    lo, hi = np.percentile(d, [0.1, 99.9])
    pad = 0.3 * (hi - lo)
    grid = np.linspace(lo - pad, hi + pad, 400)
    for name, spec in approximations.items():
        label = f"{name} (KDE of draws)" if isinstance(spec, torch.Tensor) else name
        ax.plot(grid, _density(grid, spec), color=_colour(name), label=label,
                ls="--" if name == "exact" else "-")
    ax.legend(fontsize=7)
    return _label(ax, "z", "density", title)


def _sigma_legend(ax):
    """A legend of ``ax``'s labelled artists plus two grey keys for the line styles of
    ellipses and intervals: 1 sigma solid, 2 sigma dotted."""
    from matplotlib.lines import Line2D

    keys = [Line2D([], [], color="0.3", ls=ls, label=label)
            for ls, label in (("-", "1σ"), (":", "2σ"))]
    return ax.legend(handles=[*ax.get_legend_handles_labels()[0], *keys], fontsize=7)


def _ellipse(mean, cov, k: float):
    """Points ``[2, 200]`` of the k-sigma ellipse of a 2-D Gaussian: mean + k L u, L L^T = cov."""
    t = np.linspace(0, 2 * np.pi, 200)
    chol = np.linalg.cholesky(np.asarray(cov, dtype=float))
    return np.asarray(mean, dtype=float)[:, None] + k * chol @ np.stack([np.cos(t), np.sin(t)])


def pair_overlay(draws, gaussians: dict, ax=None, title: str | None = None):
    """NUTS draws ``[S, 2]`` as a cloud with the 1- (solid) and 2-sigma (dotted) ellipses of
    Gaussians ``gaussians: name -> (mean [2], covariance [2, 2])``; returns the Axes."""
    ax = _axes(ax, (4, 4))
    d = draws.detach().cpu().numpy()
    ax.scatter(d[:, 0], d[:, 1], s=2, alpha=0.25, color="tab:blue", label="NUTS")
    for name, (mean, cov) in gaussians.items():
        for k, ls in ((1, "-"), (2, ":")):
            ax.plot(*_ellipse(mean, cov, k), color=_colour(name), ls=ls,
                    label=name if k == 1 else None)
    _sigma_legend(ax)
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
def interpolation_data(vae: VAE, xa, xb, steps: int = 10, ya=None, yb=None):
    """Decoded means along the straight line between E_q[z | xa] and E_q[z | xb]: ``[steps, X]``
    for points ``xa``, ``xb`` ``[X]``. A conditional VAE encodes each with its own label
    (``ya``, ``yb`` ``[1]``) and decodes with the one-hot labels interpolated alike."""
    ya1h, yb1h = vae.onehot(ya), vae.onehot(yb)
    za = moments(vae.q_z_onehot(xa[None], ya1h))[0]  # (1, D)
    zb = moments(vae.q_z_onehot(xb[None], yb1h))[0]
    t = torch.linspace(0, 1, steps, device=za.device)[:, None]  # (steps, 1)
    labels = None if ya1h is None else ya1h + t * (yb1h - ya1h)  # (steps, C)
    return vae.likelihood_dist(za + t * (zb - za), labels).mean


# --------------------------------------------------------------------------- drawing


def training_curves(metrics: list[dict], axes=None):
    """The training objective and the test ELBO, test reconstruction and KL, and the KL
    weight per epoch; returns the Figure."""
    if axes is None:
        _, axes = _plt().subplots(1, 3, figsize=(12, 3.2))
    epochs = [m["epoch"] for m in metrics]
    # the objective trained (KL-weighted; the IWAE bound for iwae), averaged over the epoch
    axes[0].plot(epochs, [m["train_elbo"] for m in metrics], label="train objective")
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
    axes[0].set_title("objective and ELBO")
    axes[0].figure.tight_layout()
    return axes[0].figure


def class_colours(num_classes: int):
    """One distinct colour per class, K of them (RGB triples from tab10 for K <= 10, tab20
    for K <= 20; else K evenly spaced viridis colours, RGBA ``[K, 4]``)."""
    plt = _plt()
    if num_classes <= 10:
        return plt.get_cmap("tab10").colors[:num_classes]
    if num_classes <= 20:
        return plt.get_cmap("tab20").colors[:num_classes]
    return plt.get_cmap("viridis")(np.linspace(0, 1, num_classes))


def latent_scatter(points: torch.Tensor, labels=None, ax=None, title=None, xlabel="z[0]",
                   ylabel="z[1]"):
    """2-D points ``[N, 2]`` coloured by class labels in 0..K-1 ``[N]`` (K = max + 1): one
    colour per class (:func:`class_colours`), and a colour bar of K bands, ticked at each
    band's centre with its class. Returns the Axes."""
    ax = _axes(ax, (5, 4.3))
    p = points.detach().cpu().numpy()
    if labels is None:
        ax.scatter(p[:, 0], p[:, 1], s=4)
        return _label(ax, xlabel, ylabel, title)
    from matplotlib.colors import BoundaryNorm, ListedColormap

    c = labels.detach().cpu().numpy()
    k = int(c.max()) + 1
    norm = BoundaryNorm(np.arange(k + 1) - 0.5, k)  # class i -> band [i - 1/2, i + 1/2)
    sc = ax.scatter(p[:, 0], p[:, 1], c=c, cmap=ListedColormap(class_colours(k)), norm=norm, s=4)
    bar = ax.figure.colorbar(sc, ax=ax, label="class")
    ticks = range(k) if k <= 20 else np.unique(np.linspace(0, k - 1, 11).round()).astype(int)
    bar.set_ticks(ticks, labels=[str(t) for t in ticks])
    return _label(ax, xlabel, ylabel, title)


def kl_bars(kl: torch.Tensor, ax=None, title="mean over x of KL(q(z[d]|x) || p(z[d]))"):
    """Bar chart of the mean KL per latent dimension d ``[D]``, ticked at whole d."""
    from matplotlib.ticker import MaxNLocator

    ax = _axes(ax, (max(4, 0.15 * len(kl) + 2), 3))
    ax.bar(range(len(kl)), kl.detach().cpu().numpy(), color="tab:purple")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _label(ax, "latent dimension d", "nats", title)


def posterior_ellipses(means: torch.Tensor, covariances: torch.Tensor, ax=None, dims=(0, 1),
                       title=None):
    """1- (solid) and 2-sigma (dotted) ellipses of q(z|x) for a few points: ``means [n, 2]``
    and ``covariances [n, 2, 2]`` of the latent dims ``dims`` (the axis labels), e.g. from
    :func:`pyro_vae.guides.mean_and_covariance` (a full guide's ellipses are tilted); a
    legend keys the line styles. Returns the Axes."""
    ax = _axes(ax, (4.5, 4.5))
    m = means.detach().double().cpu().numpy()
    c = covariances.detach().double().cpu().numpy()
    colours = _plt().get_cmap("tab10")(np.arange(len(m)) % 10)
    for i in range(len(m)):
        for k in (1, 2):
            ax.plot(*_ellipse(m[i], c[i], k), color=colours[i], ls="-" if k == 1 else ":")
        ax.plot(*m[i], "o", color=colours[i], ms=3)
    pad = 2.5 * np.sqrt(c[:, [0, 1], [0, 1]].max())
    ax.set_xlim(m[:, 0].min() - pad, m[:, 0].max() + pad)
    ax.set_ylim(m[:, 1].min() - pad, m[:, 1].max() + pad)
    _sigma_legend(ax)
    return _label(ax, f"z[{dims[0]}]", f"z[{dims[1]}]",
                  title or "q(z|x) of test points: 1 and 2 sigma")


def posterior_intervals(means: torch.Tensor, stds: torch.Tensor, ax=None, title=None,
                        dim: int = 0):
    """1- (solid) and 2-sigma (dotted) intervals of q(z[dim]|x) for a few points (``means``,
    ``stds`` ``[n]``), one row per point (whole-numbered); returns the Axes."""
    from matplotlib.ticker import MaxNLocator

    ax = _axes(ax, (4.5, 3))
    m, s = means.detach().cpu().numpy(), stds.detach().cpu().numpy()
    for i in range(len(m)):
        ax.plot([m[i] - 2 * s[i], m[i] + 2 * s[i]], [i, i], ":", color=f"C{i % 10}")
        ax.plot([m[i] - s[i], m[i] + s[i]], [i, i], "-", color=f"C{i % 10}", lw=2)
        ax.plot(m[i], i, "o", color=f"C{i % 10}", ms=3)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    _sigma_legend(ax)
    return _label(ax, f"z[{dim}]", "test point", title or "q(z|x) of test points: 1 and 2 sigma")


def latent_histogram(values: torch.Tensor, labels=None, ax=None, title=None):
    """Histogram of a one-dimensional latent ``[N]``, stacked by integer labels ``[N]`` when
    there are at most 10 of them."""
    ax = _axes(ax, (5, 3.5))
    v = values.detach().cpu().numpy()
    classes = [] if labels is None else labels.unique().tolist()
    if 1 < len(classes) <= 10:
        y = labels.cpu().numpy()
        ax.hist([v[y == c] for c in classes], bins=50, stacked=True,
                label=[str(c) for c in classes])
        ax.legend(fontsize=7, title="label")
    else:
        ax.hist(v, bins=50, color="tab:blue")
    return _label(ax, "z[0]", "test points", title)


def _latent_space_figures(vae: VAE, ds, means: torch.Tensor, out: Path) -> list[Path]:
    """The test points' posterior means ``[N, D]``: a histogram (D = 1), a scatter plot and
    the decoded manifold (D = 2), or their two principal components (D > 2)."""
    title = "posterior means E_q[z|x] of test points"
    if vae.latent_dim == 1:
        ax = latent_histogram(means[:, 0], ds.y_test, title=title)
        return [save_figure(ax.figure, out / "latent_space.png")]
    if vae.latent_dim == 2:
        written = [save_figure(latent_scatter(means, ds.y_test, title=title).figure,
                               out / "latent_space.png")]
        if ds.image_shape is not None and not vae.num_classes:
            ax = image_grid(manifold_data(vae), ds.image_shape, nrow=15,
                            title="decoded manifold over prior quantiles")
            written.append(save_figure(ax.figure, out / "manifold.png"))
        return written
    proj, _, share = pca(means)
    ax = latent_scatter(proj, ds.y_test, title="PCA of posterior means E_q[z|x]",
                        xlabel=f"PC 1 ({share[0]:.0%} of variance)",
                        ylabel=f"PC 2 ({share[1]:.0%} of variance)")
    return [save_figure(ax.figure, out / "latent_pca.png")]


def uncertainty_axes(q, dims: list[int], ax=None, what: str = "test points"):
    """q(z|x) of n points (``q``: batch ``[n]``, event ``[D]``) in the latent dims ``dims``:
    intervals (one dim) or ellipses (two), titled "q(z|x) of n ``what``". A Gaussian's are
    exact; any other q's (a flow) come from the moments of its draws, and the title says
    so. Returns the Axes."""
    n = q.batch_shape[0]
    mean, cov = mean_and_covariance(q, dims)  # (n, k), (n, k, k)
    title = f"q(z|x) of {n} {what}" + ("" if is_gaussian(q) else "\n(moments of draws)")
    if len(dims) == 1:
        return posterior_intervals(mean[:, 0], cov[:, 0, 0].sqrt(), ax=ax, title=title,
                                   dim=dims[0])
    return posterior_ellipses(mean, cov, ax=ax, dims=dims, title=title)


def _uncertainty_figure(vae: VAE, x: torch.Tensor, y, dims: list[int], out: Path) -> Path:
    """``posterior_uncertainty.png``: :func:`uncertainty_axes` of q(z|x) for ``x [n, X]``."""
    what = "test points" if len(dims) == 1 else "test points in the two most active dims"
    ax = uncertainty_axes(vae.q_z(x, y), dims, what=what)
    return save_figure(ax.figure, out / "posterior_uncertainty.png")


ONE_TEST_POINT = "not available: needs two test points (the run's test set has one)"


def skipped_figures(run) -> dict[str, str]:
    """The figures :func:`write_figures` leaves out for ``run``, each with the reason (the
    PCA and the interpolation need two test points)."""
    if len(run.dataset.x_test) > 1:
        return {}
    names = (["latent_pca.png"] if run.vae.latent_dim > 2 else []) + (
        ["interpolation.png"] if run.dataset.image_shape is not None else [])
    return {name: ONE_TEST_POINT for name in names}


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
    if len(means) > 1:
        spread = means.std(0)  # (D,)
        active = spread.argsort(descending=True)  # most active dims first
    else:  # one test point: dims in order, unit steps
        spread, active = None, torch.arange(vae.latent_dim, device=means.device)
    skipped = skipped_figures(run)
    if "latent_pca.png" not in skipped:
        written += _latent_space_figures(vae, ds, means, out)
    if shape is not None:
        dims = active[: min(8, vae.latent_dim)].tolist()
        y0 = None if y is None else y[:1]
        steps = "+-3 std of the means" if spread is not None else "+-3, one test point"
        ax = image_grid(traversal_data(vae, ds.x_test[0], dims, scale=spread, y0=y0),
                        shape, nrow=9, title=f"traversals of dims {dims} ({steps})")
        written.append(save_figure(ax.figure, out / "traversals.png"))
        if "interpolation.png" not in skipped:
            data = interpolation_data(vae, ds.x_test[0], ds.x_test[1], ya=y0,
                                      yb=None if y is None else y[1:2])
            ax = image_grid(data, shape, nrow=10,
                            title="latent interpolation between two test images")
            written.append(save_figure(ax.figure, out / "interpolation.png"))
    written.append(_uncertainty_figure(vae, ds.x_test[:8], None if y is None else y[:8],
                                       active[:2].tolist(), out))
    kl = kl_per_dimension(vae, ds.x_test, y)
    if kl is not None:
        written.append(save_figure(kl_bars(kl).figure, out / "kl_per_dimension.png"))
    return written

import matplotlib
import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from pyro_vae.cli import main
from pyro_vae.config import GuideConfig, load_config
from pyro_vae.guides import GUIDES, mean_and_covariance
from pyro_vae.inspection import (class_colours, image_grid, kl_bars, latent_scatter, marginal_overlay,
                                 pair_overlay, pca, posterior_ellipses, posterior_intervals,
                                 principal_angles, scatter, training_curves, uncertainty_axes)
from pyro_vae.runs import load_run
from pyro_vae.training import train

COMMON = ["--quiet", "--set", "data.subset=300", "--set", "train.epochs=2", "--set", "model.hidden=[32]"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert main(["train", *COMMON, "--set", "model.latent_dim=2", "--runs-dir", str(root), "--name", "z2"]) == 0
    assert main(["train", *COMMON, "--set", "model.latent_dim=6", "--runs-dir", str(root), "--name", "z6"]) == 0
    assert main(["train", *COMMON, "--set", "model.latent_dim=1", "--runs-dir", str(root), "--name", "z1"]) == 0
    return root


def _figures(run_dir):
    return {p.name: mpimg.imread(p) for p in (run_dir / "figures").glob("*.png")}


def test_inspect_writes_every_figure_with_a_sensible_size(runs, capsys):
    for name in ("z2", "z6", "z1"):
        assert main(["inspect", str(runs / name)]) == 0
    two, six, one = _figures(runs / "z2"), _figures(runs / "z6"), _figures(runs / "z1")
    common = {"training_curves.png", "reconstructions.png", "samples.png", "traversals.png",
              "interpolation.png", "posterior_uncertainty.png", "kl_per_dimension.png"}
    assert set(two) == common | {"latent_space.png", "manifold.png"}
    assert set(six) == common | {"latent_pca.png"}
    assert set(one) == common | {"latent_space.png"}  # a histogram, and intervals for q(z|x)
    for images in (two, six, one):
        for name, img in images.items():
            h, w = img.shape[:2]
            assert h >= 60 and w >= 250, (name, img.shape)
            assert img[..., :3].std() > 0.01, name  # not blank
    h, w = two["training_curves.png"].shape[:2]
    assert w > 3 * h  # three panels side by side
    h, w = two["manifold.png"].shape[:2]
    assert 0.9 < h / w < 1.2  # a square grid of 15 x 15 digits
    assert "wrote 8 figures" in capsys.readouterr().out.splitlines()[-1]  # z1's


def test_plot_functions_draw_on_the_given_axes_and_never_show():
    assert matplotlib.get_backend().lower() == "agg"
    fig, axes = plt.subplots(2, 4)
    pts, labels = torch.randn(50, 2), torch.randint(0, 10, (50,))
    assert image_grid(torch.rand(6, 784), (1, 28, 28), nrow=3, ax=axes[0, 0]) is axes[0, 0]
    assert scatter(pts, ax=axes[0, 1]) is axes[0, 1]
    assert latent_scatter(pts, labels, ax=axes[0, 2]) is axes[0, 2]
    assert kl_bars(torch.rand(5), ax=axes[0, 3]) is axes[0, 3]
    assert posterior_ellipses(pts[:3], torch.eye(2).expand(3, 2, 2), ax=axes[1, 0]) is axes[1, 0]
    assert marginal_overlay(torch.randn(500), {"amortized": (0.0, 1.0)}, ax=axes[1, 1]) is axes[1, 1]
    assert pair_overlay(torch.randn(300, 2), {"exact": ([0, 0], [[1, 0], [0, 1]])}, ax=axes[1, 2]) is axes[1, 2]
    assert len(axes[0, 1].collections) == 1 and len(axes[0, 3].patches) == 5
    metrics = [{"epoch": e, "train_elbo": -e, "test_elbo": -e, "test_reconstruction": -e,
                "test_kl": 1.0, "kl_weight": 1.0} for e in range(1, 4)]
    f2, ax3 = plt.subplots(1, 3)
    assert training_curves(metrics, axes=ax3) is f2
    plt.close("all")


def _visible_tick_labels(axis):
    """The texts of ``axis``'s tick labels inside its view limits (after a draw)."""
    axis.axes.figure.canvas.draw()
    lo, hi = sorted(axis.get_view_interval())
    return [t.get_text() for t, v in zip(axis.get_ticklabels(), axis.get_ticklocs()) if lo <= v <= hi]


def _style_keys(ax):
    """Legend text -> line style of ``ax``'s legend entries (None for a marker-only entry)."""
    legend = ax.get_legend()
    return {t.get_text(): h.get_linestyle() if isinstance(h, matplotlib.lines.Line2D) else None
            for t, h in zip(legend.get_texts(), legend.legend_handles)}


@pytest.mark.parametrize("num_classes", [3, 8, 13, 25])
def test_latent_scatter_colours_each_point_as_its_class_band_on_the_colour_bar(num_classes):
    torch.manual_seed(0)
    labels = torch.arange(200) % num_classes
    ax = latent_scatter(torch.randn(200, 2), labels)
    ax.figure.canvas.draw()
    sc = ax.collections[0]
    colours = np.asarray(class_colours(num_classes))[:, :3]  # (K, 3)
    assert len(np.unique(colours, axis=0)) == num_classes  # distinct
    np.testing.assert_allclose(sc.get_facecolors()[:, :3], colours[labels.numpy()])
    bar = sc.colorbar
    assert bar.cmap.N == num_classes  # no band of a colour no point has
    for i in range(num_classes):  # band i has class i's colour
        np.testing.assert_allclose(bar.cmap(bar.norm(i))[:3], colours[i])
    ticks = bar.get_ticks()
    assert all(float(t).is_integer() and 0 <= t < num_classes for t in ticks)  # at band centres
    assert [t.get_text() for t in bar.ax.get_yticklabels()] == [str(int(t)) for t in ticks]
    if num_classes <= 20:
        assert list(ticks) == list(range(num_classes))
    plt.close("all")


@pytest.mark.parametrize("num_dims", [2, 3, 7, 40])
def test_kl_bars_tick_whole_latent_dimensions(num_dims):
    ax = kl_bars(torch.rand(num_dims))
    labels = _visible_tick_labels(ax.xaxis)
    assert labels and all(t.replace("\u2212", "-").lstrip("-").isdigit() for t in labels), labels
    plt.close("all")


def test_scatter_names_data_axes_from_zero_like_the_latents():
    ax = scatter(torch.randn(20, 2))
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("x[0]", "x[1]")
    ax = scatter(torch.randn(20, 2), xlabel="z[0]", ylabel="z[1]")
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("z[0]", "z[1]")
    assert latent_scatter(torch.randn(20, 2)).get_xlabel() == "z[0]"
    plt.close("all")


@pytest.mark.parametrize("name", sorted(GUIDES))
@pytest.mark.parametrize("dims", [[1, 0], [2]])
def test_uncertainty_axes_key_line_styles_and_flag_moments_of_draws(name, dims):
    """Every guide's figure keys 1 sigma (solid) and 2 sigma (dotted); only a non-Gaussian
    q (the iaf flow) says its ellipses/intervals come from the moments of draws."""
    torch.manual_seed(0)
    guide = GUIDES[name](GuideConfig(name=name, hidden=(8,), context=2), 3)
    q = guide(torch.randn(5, guide.num_params))  # batch [5], event [3]
    ax = uncertainty_axes(q, dims)
    assert _style_keys(ax) == {"1σ": "-", "2σ": ":"}
    title = ax.get_title()
    assert title.startswith("q(z|x) of 5 test points")
    assert ("moments of draws" in title) == (name == "iaf"), title
    assert ax.get_xlabel() == f"z[{dims[0]}]"
    if len(dims) == 1:
        assert _visible_tick_labels(ax.yaxis) == ["0", "1", "2", "3", "4"]  # whole test points
    else:
        assert ax.get_ylabel() == f"z[{dims[1]}]"
    plt.close("all")


def test_pair_overlay_and_intervals_key_their_line_styles():
    gauss = {"exact": ([0, 0], [[1, 0], [0, 1]]), "amortized (moments)": ([0, 1], [[1, 0.5], [0.5, 1]])}
    ax = pair_overlay(torch.randn(300, 2), gauss)
    assert _style_keys(ax) == {"NUTS": None, "exact": "-", "amortized (moments)": "-",
                               "1σ": "-", "2σ": ":"}
    ax = posterior_intervals(torch.zeros(3), torch.ones(3))
    assert _style_keys(ax) == {"1σ": "-", "2σ": ":"}
    plt.close("all")


def test_posterior_ellipses_follow_a_full_covariance():
    """Each drawn k-sigma curve lies on (z - m)^T S^-1 (z - m) = k^2: tilted for a correlated S."""
    means = torch.tensor([[0.0, 0.0], [3.0, -1.0]])
    covs = torch.tensor([[[1.0, 0.9], [0.9, 1.0]], [[0.25, -0.1], [-0.1, 0.5]]])
    ax = posterior_ellipses(means, covs)
    curves = [line.get_xydata() for line in ax.lines if len(line.get_xydata()) > 1]  # (T, 2) each
    assert len(curves) == 4  # 1 and 2 sigma for each point
    for i, k in ((0, 1), (0, 2), (1, 1), (1, 2)):
        d = torch.from_numpy(curves[2 * i + k - 1]).float() - means[i]
        mahalanobis = (d @ torch.linalg.inv(covs[i]) * d).sum(-1)
        torch.testing.assert_close(mahalanobis, torch.full_like(mahalanobis, k * k), rtol=1e-4, atol=1e-4)
    plt.close("all")


def test_mean_and_covariance_is_closed_form_for_gaussians_and_estimated_for_flows():
    import pyro.distributions as dist
    from pyro.distributions.transforms import LowerCholeskyAffine

    torch.manual_seed(0)
    tril = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [-0.5, 0.3, 0.4]])
    loc = torch.tensor([1.0, -2.0, 0.5])
    gauss = dist.MultivariateNormal(loc, scale_tril=tril).expand([2])
    mean, cov = mean_and_covariance(gauss, dims=(2, 0))
    full = tril @ tril.T
    torch.testing.assert_close(cov, full[[2, 0]][:, [2, 0]].expand(2, 2, 2))
    torch.testing.assert_close(mean, loc[[2, 0]].expand(2, 2))
    diag = dist.Normal(loc, torch.tensor([1.0, 2.0, 3.0])).to_event(1)
    torch.testing.assert_close(mean_and_covariance(diag, dims=(1, 2))[1], torch.diag(torch.tensor([4.0, 9.0])))
    base = dist.Normal(torch.zeros(3), torch.ones(3)).to_event(1)  # a "flow" with known moments
    flow = dist.TransformedDistribution(base, [LowerCholeskyAffine(loc, tril)])
    mean, cov = mean_and_covariance(flow, dims=(0, 1), draws=200_000)
    torch.testing.assert_close(mean, loc[:2], atol=0.02, rtol=0)
    torch.testing.assert_close(cov, full[:2, :2], atol=0.02, rtol=0)


def test_marginal_overlay_draws_a_density_estimate_for_draws():
    torch.manual_seed(0)
    ax = marginal_overlay(torch.randn(5000), {"amortized": torch.randn(20_000) * 2 + 1, "exact": (1.0, 2.0)})
    kde, gauss = ax.lines
    assert kde.get_label() == "amortized (KDE of draws)" and gauss.get_label() == "exact"
    assert kde.get_color() == "tab:red"  # the qualified label keeps amortized's colour
    grid, estimate = kde.get_xdata(), kde.get_ydata()
    truth = torch.distributions.Normal(1.0, 2.0).log_prob(torch.from_numpy(grid)).exp().numpy()
    assert abs(estimate - truth).max() < 0.01  # peak 0.2
    plt.close("all")


def test_pca_and_principal_angles_recover_known_subspaces():
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(10, 2))[0]
    x = torch.randn(2000, 2) * torch.tensor([3.0, 2.0]) @ basis.T + 0.05 * torch.randn(2000, 10)
    _, directions, share = pca(x)
    assert share.sum() > 0.99
    assert principal_angles(directions.T, basis).max() < 0.02
    assert principal_angles(basis, torch.linalg.qr(torch.randn(10, 2))[0]).max() > 0.3


def test_linear_vae_decoder_spans_the_principal_subspace():
    cfg = load_config("linear_gaussian", ["train.epochs=15"])
    result = train(cfg)
    x = torch.cat([result.dataset.x_train, result.dataset.x_test])
    _, directions, _ = pca(x, k=2)
    W = result.vae.decoder.net[0].weight.detach()  # (X, 2): the decoder's column space
    assert principal_angles(W, directions.T).max() < 0.05  # radians


def test_run_api_gives_posterior_samples_and_inference_data(runs):
    run = load_run(runs / "z6")
    x = run.dataset.x_test[:4]
    q = run.q_z(x)
    assert q.batch_shape == (4,) and q.event_shape == (6,)
    idata = run.to_inference_data(x, num_samples=100)
    assert idata.posterior["z"].shape == (1, 100, 4, 6)
    assert idata.posterior["z"].dims == ("chain", "draw", "point", "latent")
    draws = torch.as_tensor(idata.posterior["z"].values)[0]
    assert torch.allclose(draws.mean(0), q.mean, atol=5 * q.stddev.max().item() / 10)


def test_interpolation_encodes_each_end_with_its_own_label():
    from pyro_vae.guides import moments
    from pyro_vae.inspection import interpolation_data
    from pyro_vae.model import VAE

    torch.manual_seed(0)
    vae = VAE(load_config(None, ["model.conditional=true", "model.latent_dim=2",
                                 "model.hidden=[8]"]), 6, num_classes=3)
    xa, xb = torch.rand(6).round(), torch.rand(6).round()
    ya, yb = torch.tensor([0]), torch.tensor([2])
    line = interpolation_data(vae, xa, xb, steps=5, ya=ya, yb=yb)  # (5, 6)
    for x, y, row in ((xa, ya, line[0]), (xb, yb, line[-1])):
        z = moments(vae.q_z(x[None], y))[0]
        assert torch.allclose(row, vae.likelihood_dist(z, vae.onehot(y)).mean[0])


def test_inspect_of_an_image_run_with_one_test_point_says_the_interpolation_is_missing(tmp_path,
                                                                                        capsys):
    import pyro_vae

    x = np.random.default_rng(0).random((10, 8, 8)).astype("float32")
    pyro_vae.fit(x, run_dir=tmp_path / "r", overrides=["train.epochs=1", "model.latent_dim=3",
                                                       "model.hidden=[8]"])
    assert load_run(tmp_path / "r").dataset.x_test.shape[0] == 1
    assert main(["inspect", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "traversals.png" in out
    for name in ("interpolation.png", "latent_pca.png"):
        assert f"{name} not available: needs two test points" in out


def _latents_of(vae, means: torch.Tensor) -> torch.Tensor:
    """z ``[M, 2]`` from decoded means W z + b ``[M, X]`` of a linear decoder (least squares)."""
    layer = vae.decoder.net[0]
    return torch.linalg.lstsq(layer.weight, (means - layer.bias).T).solution.T


def test_manifold_grid_runs_over_prior_quantiles_z0_across_z1_down():
    from conftest import linear_setup
    from pyro_vae.inspection import manifold_data

    vae, _, _ = linear_setup()
    z = _latents_of(vae, manifold_data(vae, n=5, quantiles=(0.1, 0.9))).reshape(5, 5, 2)
    assert torch.allclose(z[:, :, 0], z[:1, :, 0].expand(5, 5), atol=1e-4)  # columns: z[0]
    assert torch.allclose(z[:, :, 1], z[:, :1, 1].expand(5, 5), atol=1e-4)  # rows: z[1]
    assert (z[0, :, 0].diff() > 0).all() and (z[:, 0, 1].diff() < 0).all()
    q = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor([0.1, 0.9]))  # N(0, I) prior
    assert torch.allclose(z[0, [0, -1], 0], q, atol=0.05) and torch.allclose(
        z[[-1, 0], 0, 1], q, atol=0.05)


def test_traversals_move_one_latent_at_a_time_from_the_posterior_mean():
    from conftest import linear_setup
    from pyro_vae.guides import moments
    from pyro_vae.inspection import traversal_data

    vae, ds, _ = linear_setup()
    x0, scale = ds.x_test[0], torch.tensor([0.5, 2.0])
    z = _latents_of(vae, traversal_data(vae, x0, [1, 0], steps=5, span=2.0, scale=scale))
    z0 = moments(vae.q_z(x0[None]))[0][0]  # (2,)
    offsets = torch.linspace(-2, 2, 5)
    assert torch.allclose(z[:5, 0], z0[0].expand(5), atol=1e-4)  # dim 1 moves first ...
    assert torch.allclose(z[:5, 1], z0[1] + offsets * 2.0, atol=1e-4)
    assert torch.allclose(z[5:, 1], z0[1].expand(5), atol=1e-4)  # ... then dim 0
    assert torch.allclose(z[5:, 0], z0[0] + offsets * 0.5, atol=1e-4)

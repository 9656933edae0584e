import matplotlib
import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import pytest
import torch

from pyro_vae.cli import main
from pyro_vae.config import load_config
from pyro_vae.inspection import (image_grid, kl_bars, latent_scatter, marginal_overlay, pair_overlay,
                                 pca, posterior_ellipses, principal_angles, scatter, training_curves)
from pyro_vae.runs import load_run
from pyro_vae.training import train

COMMON = ["--quiet", "--set", "data.subset=300", "--set", "train.epochs=2", "--set", "model.hidden=[32]"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert main(["train", *COMMON, "--set", "model.latent_dim=2", "--runs-dir", str(root), "--name", "z2"]) == 0
    assert main(["train", *COMMON, "--set", "model.latent_dim=6", "--runs-dir", str(root), "--name", "z6"]) == 0
    return root


def _figures(run_dir):
    return {p.name: mpimg.imread(p) for p in (run_dir / "figures").glob("*.png")}


def test_inspect_writes_every_figure_with_a_sensible_size(runs, capsys):
    for name in ("z2", "z6"):
        assert main(["inspect", str(runs / name)]) == 0
    two, six = _figures(runs / "z2"), _figures(runs / "z6")
    common = {"training_curves.png", "reconstructions.png", "samples.png", "traversals.png",
              "interpolation.png", "posterior_uncertainty.png", "kl_per_dimension.png"}
    assert set(two) == common | {"latent_space.png", "manifold.png"}
    assert set(six) == common | {"latent_pca.png"}
    for images in (two, six):
        for name, img in images.items():
            h, w = img.shape[:2]
            assert h >= 60 and w >= 250, (name, img.shape)
            assert img[..., :3].std() > 0.01, name  # not blank
    h, w = two["training_curves.png"].shape[:2]
    assert w > 3 * h  # three panels side by side
    h, w = two["manifold.png"].shape[:2]
    assert 0.9 < h / w < 1.2  # a square grid of 15 x 15 digits
    assert "wrote 9 figures" in capsys.readouterr().out


def test_plot_functions_draw_on_the_given_axes_and_never_show():
    assert matplotlib.get_backend().lower() == "agg"
    fig, axes = plt.subplots(2, 4)
    pts, labels = torch.randn(50, 2), torch.randint(0, 10, (50,))
    assert image_grid(torch.rand(6, 784), (1, 28, 28), nrow=3, ax=axes[0, 0]) is axes[0, 0]
    assert scatter(pts, ax=axes[0, 1]) is axes[0, 1]
    assert latent_scatter(pts, labels, ax=axes[0, 2]) is axes[0, 2]
    assert kl_bars(torch.rand(5), ax=axes[0, 3]) is axes[0, 3]
    assert posterior_ellipses(pts[:3], torch.rand(3, 2) + 0.1, ax=axes[1, 0]) is axes[1, 0]
    assert marginal_overlay(torch.randn(500), {"amortized": (0.0, 1.0)}, ax=axes[1, 1]) is axes[1, 1]
    assert pair_overlay(torch.randn(300, 2), {"exact": ([0, 0], [[1, 0], [0, 1]])}, ax=axes[1, 2]) is axes[1, 2]
    assert len(axes[0, 1].collections) == 1 and len(axes[0, 3].patches) == 5
    metrics = [{"epoch": e, "train_elbo": -e, "test_elbo": -e, "test_reconstruction": -e,
                "test_kl": 1.0, "kl_weight": 1.0} for e in range(1, 4)]
    f2, ax3 = plt.subplots(1, 3)
    assert training_curves(metrics, axes=ax3) is f2
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

"""Every prior x every likelihood the data check allows; moments, normalisation, refusals."""

import math
import tomllib

import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyro_vae.config import BUNDLED_CONFIGS, LikelihoodConfig, PriorConfig, load_config
from pyro_vae.data import DataError, load_dataset
from pyro_vae.likelihoods import LIKELIHOODS, DataWarning, Likelihood, check_data, register_likelihood
from pyro_vae.model import LATENT, OBS, VAE
from pyro_vae.priors import PRIORS, Prior, register_prior
from pyro_vae.training import train

from conftest import small_config, write_torchvision_set


# likelihood -> (data overrides that it accepts)
DATA_FOR = {
    "bernoulli": ["data.binarize=dynamic"],
    "continuous-bernoulli": ["data.binarize=none"],
    "gaussian": ["data.binarize=none"],
    "laplace": ["data.binarize=none"],
    "beta": ["data.name=ring", "data.binarize=none"],  # needs x in (0, 1): see below
}


@pytest.mark.parametrize("prior", sorted(PRIORS))
@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous-bernoulli", "gaussian", "laplace"])
def test_every_prior_and_likelihood_trains_with_the_right_site_shapes(prior, likelihood):
    cfg = small_config(f"prior.name={prior}", f"likelihood.name={likelihood}",
                       "prior.components=3", *DATA_FOR[likelihood], subset=256, epochs=3)
    result = train(cfg)
    elbos = [m["train_elbo"] for m in result.metrics]
    assert all(math.isfinite(e) for e in elbos) and elbos[-1] > elbos[0]
    vae, x = result.vae, result.dataset.x_test[:5]
    guide_tr = poutine.trace(vae.guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x)
    for tr in (guide_tr, model_tr):
        assert tr.nodes[LATENT]["fn"].batch_shape == (5,)
        assert tr.nodes[LATENT]["fn"].event_shape == (4,)
    assert model_tr.nodes[OBS]["fn"].batch_shape == (5,)
    assert model_tr.nodes[OBS]["fn"].event_shape == (784,)


def test_beta_likelihood_trains_on_data_inside_the_unit_interval():
    cfg = small_config("likelihood.name=beta", "data.binarize=none", subset=256, epochs=3)
    ds = load_dataset(cfg.data)
    squeezed = ds._replace(x_train=0.01 + 0.98 * ds.x_train, x_test=0.01 + 0.98 * ds.x_test)
    vae = VAE(cfg, ds.x_dim)
    check_data(vae.likelihood, "beta", squeezed)  # accepted
    lp = vae.likelihood_dist(torch.zeros(3, 4)).log_prob(squeezed.x_test[:3])
    assert torch.isfinite(lp).all()


MOMENTS = {"normal": (0.0, 1.0), "laplace": (0.0, 2.0), "student-t": (0.0, 5.0 / 3.0)}


@pytest.mark.parametrize("name", sorted(MOMENTS))
def test_fixed_priors_have_their_stated_moments(name):
    p = PRIORS[name](PriorConfig(name=name, df=5.0), 3, 784)()
    z = p.sample((400_000,))
    mean, var = MOMENTS[name]
    assert p.event_shape == (3,) and p.batch_shape == ()
    assert torch.allclose(z.mean(0), torch.full((3,), mean), atol=0.02)
    assert torch.allclose(z.var(0), torch.full((3,), var), rtol=0.05)


@pytest.mark.parametrize("name", sorted(PRIORS))
def test_prior_densities_are_normalised_in_one_dimension(name):
    cfg = PriorConfig(name=name, components=3)
    encoder = lambda u: (u[:, :1] - 0.5, 0.5 + u[:, :1].abs())  # noqa: E731  (loc, scale) [K, 1]
    p = PRIORS[name](cfg, 1, 4)(encoder)
    grid = torch.linspace(-60, 60, 200_001).unsqueeze(-1)  # (G, 1)
    mass = torch.trapezoid(p.log_prob(grid).exp(), grid.squeeze(-1))
    assert mass.item() == pytest.approx(1.0, abs=2e-3 if name == "student-t" else 1e-4)


@pytest.mark.parametrize("name, params", [("mixture", ["logits", "locs", "log_scales"]),
                                          ("vamp", ["pseudo_inputs"])])
def test_learnable_prior_gradients_reach_their_parameters(name, params):
    cfg = small_config(f"prior.name={name}", "prior.components=3")
    ds = load_dataset(cfg.data)
    vae = VAE(cfg, ds.x_dim)
    z = torch.randn(8, 4)
    vae.prior_dist().log_prob(z).sum().backward()
    for k in params:
        g = vae.prior.learnable[k].grad
        assert g is not None and g.abs().sum() > 0, k
    if name == "vamp":  # the VampPrior also trains the encoder through its pseudo-inputs
        assert vae.encoder.net[0].weight.grad.abs().sum() > 0


def test_learnable_normal_prior_learns_loc_and_scale():
    p = PRIORS["normal"](PriorConfig(learnable=True), 2, 784)
    assert {k for k, _ in p.named_parameters()} == {"learnable.loc", "learnable.log_scale"}
    assert list(PRIORS["normal"](PriorConfig(), 2, 784).parameters()) == []


def test_likelihood_log_probs_match_closed_forms():
    x = torch.tensor([[0.0, 1.0, 0.3]])
    h = torch.tensor([[0.5, -1.0, 2.0]])
    p = torch.sigmoid(h)
    bern = LIKELIHOODS["bernoulli"](LikelihoodConfig(), 3)(h).log_prob(x)
    assert bern.item() == pytest.approx((x * p.log() + (1 - x) * (1 - p).log()).sum().item(), rel=1e-5)
    gauss = LIKELIHOODS["gaussian"](LikelihoodConfig(sigma=0.5), 3)(h).log_prob(x)
    manual = (-0.5 * ((x - h) / 0.5) ** 2 - math.log(0.5 * math.sqrt(2 * math.pi))).sum()
    assert gauss.item() == pytest.approx(manual.item(), rel=1e-5)
    lap = LIKELIHOODS["laplace"](LikelihoodConfig(sigma=0.5), 3)(h).log_prob(x)
    assert lap.item() == pytest.approx((-(x - h).abs() / 0.5 - math.log(1.0)).sum().item(), rel=1e-5)
    per_pixel = LIKELIHOODS["gaussian"](LikelihoodConfig(scale="per-pixel"), 3)
    assert per_pixel.outputs_per_pixel == 2
    hh = torch.stack([h, torch.zeros_like(h)], -1).reshape(1, 6)  # pixel-major (loc, raw scale)
    sigma = torch.nn.functional.softplus(torch.tensor(0.0)) + 1e-3
    assert per_pixel(hh).log_prob(x).item() == pytest.approx(
        dist.Normal(h, sigma).log_prob(x).sum().item(), rel=1e-5)
    learned = LIKELIHOODS["gaussian"](LikelihoodConfig(scale="learned", sigma=0.2), 3)
    assert learned.learnable["log_scale"].exp().item() == pytest.approx(0.2)


def test_continuous_bernoulli_is_normalised_numerically():
    grid = torch.linspace(0, 1, 100_001)
    for logit in (-3.0, -0.2, 0.0, 1.5):
        d = LIKELIHOODS["continuous-bernoulli"](LikelihoodConfig(), 1)(torch.full((grid.shape[0], 1), logit))
        mass = torch.trapezoid(d.log_prob(grid.unsqueeze(-1)).exp(), grid)
        assert mass.item() == pytest.approx(1.0, abs=1e-4)
        # C(p) = 2 atanh(1 - 2p) / (1 - 2p), the Bernoulli form times its normaliser
        p = torch.sigmoid(torch.tensor(logit))
        c = 2 * torch.atanh(1 - 2 * p) / (1 - 2 * p) if logit != 0 else torch.tensor(2.0)
        lp = d.log_prob(torch.full((grid.shape[0], 1), 0.3))[0]
        assert lp.item() == pytest.approx((0.3 * p.log() + 0.7 * (1 - p).log() + c.log()).item(), abs=1e-3)


def test_continuous_bernoulli_stays_exact_and_differentiable_at_large_logits():
    """float32 log-density and its gradient against float64 closed forms, where torch's own
    (probabilities clamped to [eps, 1 - eps]) freezes past |l| ~ 16.6 (pytorch#72525)."""
    logits = torch.tensor([-40.0, -30.0, -17.0, -1e-3, 0.0, 1e-3, 0.5, 5.0, 17.0, 30.0, 40.0])
    x = torch.tensor([0.0, 0.3, 1.0]).unsqueeze(-1)  # (3, 1) against the logits' (11,)
    like = LIKELIHOODS["continuous-bernoulli"](LikelihoodConfig(), 1)
    l32 = logits.clone().requires_grad_()
    lp = like(l32.unsqueeze(-1)).log_prob(x.unsqueeze(-1))  # (3, 11): one pixel each
    l64 = logits.double().requires_grad_()
    safe = torch.where(l64 == 0, 1.0, l64)  # l / tanh(l / 2) -> 2 at l = 0
    norm = torch.where(l64 == 0, 2.0, safe / torch.tanh(safe / 2)).log()
    exact = x.double() * l64 - torch.nn.functional.softplus(l64) + norm
    torch.testing.assert_close(lp.double(), exact.detach(), rtol=1e-6, atol=2e-5)
    lp.sum().backward(), exact.sum().backward()
    torch.testing.assert_close(l32.grad.double(), l64.grad, rtol=1e-5, atol=1e-5)
    assert (l32.grad[[1, -2]].abs() > 0.3).all()  # sum over x of (x - 1/2 + ...) is far from 0
    grid = torch.linspace(0, 1, 200_001).unsqueeze(-1)
    for logit in (-30.0, 20.0):  # still a density where torch's loses 20-47% of its mass
        d = like(torch.full_like(grid, logit))
        mass = torch.trapezoid(d.log_prob(grid).exp().double(), grid.squeeze(-1).double())
        assert mass.item() == pytest.approx(1.0, abs=2e-3)


@pytest.mark.parametrize("likelihood, overrides, message", [
    ("beta", ["data.binarize=none"], "likelihood 'beta' on data set 'mnist-10k' (data.binarize = 'none'): needs x strictly inside (0, 1)"),
    ("bernoulli", ["data.name=ring", "data.binarize=none", "model.hidden=[8]"], "likelihood 'bernoulli' on data set 'ring' (data.binarize = 'none'): needs x in [0, 1]"),
])
def test_data_that_does_not_fit_the_likelihood_is_refused(likelihood, overrides, message):
    with pytest.raises(DataError) as err:
        train(small_config(f"likelihood.name={likelihood}", *overrides))
    assert message in str(err.value) and "use likelihood.name" in str(err.value)


@pytest.mark.parametrize("likelihood", ["gaussian", "continuous-bernoulli"])
def test_a_continuous_density_on_binarized_data_warns(likelihood):
    # no upper bound on exact 0/1 pixels: ever-smaller scales, saturating logits
    with pytest.warns(DataWarning, match=f"likelihood '{likelihood}' on data set 'mnist-10k' "
                      r"\(data.binarize = 'dynamic'\): a continuous density on binary pixels has "
                      "no upper bound there.*consider"):
        train(small_config(f"likelihood.name={likelihood}", subset=64))


def test_binary_data_left_unbinarized_is_not_told_to_set_what_it_has(tmp_path):
    import numpy as np

    from pyro_vae.config import load_config

    np.save(tmp_path / "b.npy", (np.random.default_rng(0).random((40, 6)) > 0.5).astype(np.float32))
    cfg = load_config("own_data", [f"data.path={tmp_path / 'b.npy'}", "train.epochs=1"])
    with pytest.warns(DataWarning, match=r"\(data.binarize = 'none'\).*consider likelihood.name "
                      r"= 'bernoulli' \(the data itself holds only 0s and 1s\)"):
        train(cfg)


def test_a_prior_and_a_likelihood_registered_from_user_code_work_from_config(tmp_path):
    # exactly what README shows
    def wide_normal(cfg, latent_dim, x_dim):
        return Prior(lambda p, encoder: dist.Normal(p["loc"], 2.0).to_event(1),
                     fixed={"loc": torch.zeros(latent_dim)})

    def student_pixels(cfg, x_dim):
        return Likelihood(lambda loc: dist.StudentT(3.0, loc, cfg.sigma), 1, "real")

    register_prior("wide-normal", wide_normal)
    register_likelihood("student-pixels", student_pixels)
    try:
        cfg = small_config("prior.name=wide-normal", "likelihood.name=student-pixels",
                           "data.binarize=none", epochs=2)
        result = train(cfg, tmp_path / "custom", progress=True)
        assert result.metrics[-1]["train_elbo"] > result.metrics[0]["train_elbo"]
        assert (tmp_path / "custom" / "checkpoint.pt").is_file()
        assert (result.vae.prior_dist().base_dist.scale == 2.0).all()
    finally:
        PRIORS.pop("wide-normal")
        LIKELIHOODS.pop("student-pixels")


def test_conditional_vae_samples_depend_on_the_label():
    result = train(small_config("model.conditional=true", subset=500, epochs=3))
    vae = result.vae
    torch.manual_seed(0)
    z = vae.prior_dist().sample((16,))
    means = [vae.likelihood_dist(z, vae.onehot(torch.full((16,), c))).mean for c in (1, 8)]
    assert (means[0] - means[1]).abs().mean() > 0.01
    assert result.metrics[-1]["train_elbo"] > result.metrics[0]["train_elbo"]


def test_conv_networks_train_on_28x28_and_refuse_other_shapes():
    result = train(small_config("model.network=conv", subset=128, epochs=2))
    assert result.metrics[-1]["train_elbo"] > result.metrics[0]["train_elbo"]
    with pytest.raises(Exception, match="model.network = 'conv' needs images, but the data are vectors"):
        train(small_config("model.network=conv", "data.name=ring", "data.binarize=none",
                           "likelihood.name=gaussian"))


@pytest.mark.parametrize("path", sorted(BUNDLED_CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_every_bundled_config_validates_and_trains_a_few_steps(path, tmp_path):
    tree = tomllib.loads(path.read_text())
    name = tree.get("data", {}).get("name", "mnist-10k")
    extra = ["train.epochs=1", "train.batch_size=32"]
    if name in ("mnist-10k",):
        extra.append("data.subset=128")
    elif name == "fashion-mnist":  # no download here: tiny files in torchvision's layout
        write_torchvision_set(tmp_path, "FashionMNIST", n_train=64, n_test=16)
        extra.append(f"data.root='{tmp_path}'")
    elif name == "file":  # your own data: a small file made here
        torch.save(torch.randn(300, 5), tmp_path / "x.pt")
        extra.append(f"data.path='{tmp_path / 'x.pt'}'")
    else:
        extra.append("data.size=300")
    cfg = load_config(path, extra)
    result = train(cfg)
    assert math.isfinite(result.metrics[-1]["test_elbo"])


def test_the_student_t_prior_is_pyros_student_t_built_from_tensors_alone():
    from pyro_vae.priors import StudentT

    df, loc, scale = torch.tensor([3.0, 7.0]), torch.tensor([0.5, -1.0]), torch.tensor([2.0, 0.3])
    ours = StudentT(df, loc, scale).to_event(1).expand([4])
    pyros = dist.StudentT(df, loc, scale).to_event(1).expand([4])
    torch.manual_seed(1)
    a = ours.rsample((3,))  # (3, 4, 2)
    torch.manual_seed(1)
    b = pyros.rsample((3,))
    assert torch.equal(a, b) and ours.batch_shape == (4,) and type(ours.base_dist) is StudentT
    assert torch.allclose(ours.log_prob(a), pyros.log_prob(a))
    assert torch.allclose(ours.base_dist.variance, pyros.base_dist.variance)
    with pytest.raises(ValueError, match="scale"):
        StudentT(df, loc, -scale, validate_args=True)

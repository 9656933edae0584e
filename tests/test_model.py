"""The maths the VAE embodies, checked numerically."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import kl_divergence

from pyro_vae.config import load_config
from pyro_vae.data import linear_gaussian_params, load_dataset
from pyro_vae.model import LATENT, OBS, VAE
from pyro_vae.toys import linear_gaussian_evidence, linear_gaussian_posterior

from conftest import build_vae


def gaussian_kl(mu, sigma):
    """The seeds' formula: KL(N(mu, sigma^2) || N(0, 1)) = 1/2 sum(mu^2 + sigma^2 - 1 - log sigma^2)."""
    return 0.5 * (mu**2 + sigma**2 - 1 - torch.log(sigma**2)).sum(-1)


def test_closed_form_gaussian_kl_matches_monte_carlo_within_3_standard_errors():
    torch.manual_seed(1)
    mu, sigma = torch.randn(5, 3), torch.rand(5, 3) + 0.3
    q, p = dist.Normal(mu, sigma).to_event(1), dist.Normal(0.0, 1.0).expand([5, 3]).to_event(1)
    z = q.sample((200_000,))
    samples = q.log_prob(z) - p.log_prob(z)  # (S, 5)
    mc, se = samples.mean(0), samples.std(0) / math.sqrt(samples.shape[0])
    exact = gaussian_kl(mu, sigma)
    assert torch.allclose(exact, kl_divergence(q, p), atol=1e-5)
    assert ((mc - exact).abs() < 3 * se).all()


def test_meanfield_and_trace_elbo_agree_in_expectation():
    cfg, ds, vae = build_vae()
    x = ds.x_test[:32]
    kw = dict(num_particles=200, vectorize_particles=True, max_plate_nesting=1)
    with torch.no_grad():
        a = torch.tensor([Trace_ELBO(**kw).loss(vae.model, vae.guide, x) for _ in range(20)])
        b = torch.tensor([TraceMeanField_ELBO(**kw).loss(vae.model, vae.guide, x) for _ in range(20)])
    se = (a.var() / 20 + b.var() / 20).sqrt()
    assert (a.mean() - b.mean()).abs() < 4 * se


def test_model_and_guide_traces_have_shared_sites_with_batch_and_event_shapes():
    cfg, ds, vae = build_vae()
    x = ds.x_test[:7]
    guide_tr = poutine.trace(vae.guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x)
    assert guide_tr.nodes[LATENT]["fn"].batch_shape == (7,)
    assert guide_tr.nodes[LATENT]["fn"].event_shape == (cfg.model.latent_dim,)
    assert model_tr.nodes[LATENT]["fn"].batch_shape == (7,)
    assert model_tr.nodes[OBS]["fn"].event_shape == (784,) and model_tr.nodes[OBS]["is_observed"]
    assert torch.equal(model_tr.nodes[LATENT]["value"], guide_tr.nodes[LATENT]["value"])


def linear_setup(noise=0.3):
    """A linear VAE whose decoder/likelihood is exactly the pPCA generative model."""
    cfg = load_config(None, ["data.name=linear-gaussian", "data.binarize=none", f"data.noise={noise}",
                             "model.latent_dim=2", "model.hidden=[]", "likelihood.name=gaussian",
                             f"likelihood.sigma={noise}"])
    ds = load_dataset(cfg.data)
    params = linear_gaussian_params(cfg.data)
    vae = VAE(cfg, ds.x_dim)
    with torch.no_grad():
        vae.decoder.net[0].weight.copy_(params.W)
        vae.decoder.net[0].bias.copy_(params.b)
    return vae, ds, params


def test_elbo_is_below_log_evidence_and_equal_at_the_exact_posterior():
    vae, ds, params = linear_setup()
    x = ds.x_test[:20]
    log_px = linear_gaussian_evidence(params).log_prob(x).sum()
    elbo = Trace_ELBO(num_particles=2000, vectorize_particles=True, max_plate_nesting=1)

    def exact_guide(x, y=None, kl_weight=1.0):
        with pyro.plate("data", x.shape[0]):
            pyro.sample(LATENT, linear_gaussian_posterior(params, x))

    with torch.no_grad():
        encoder_elbo = -elbo.loss(vae.model, vae.guide, x)
        exact_elbo = -elbo.loss(vae.model, exact_guide, x)
    assert encoder_elbo < log_px.item()
    # log p(x, z) - log q(z|x) = log p(x) for every z when q is the exact posterior
    assert exact_elbo == pytest.approx(log_px.item(), abs=1e-3 * abs(log_px.item()))


def test_reparameterized_gradient_matches_finite_differences():
    torch.manual_seed(0)
    eps = torch.randn(200_000)
    f = lambda mu, s: ((mu + s * eps) ** 2).mean()  # E[z^2] = mu^2 + s^2  # noqa: E731
    mu, s = torch.tensor(0.7, requires_grad=True), torch.tensor(1.3, requires_grad=True)
    f(mu, s).backward()
    h = 1e-3
    fd_mu = (f(mu.detach() + h, s.detach()) - f(mu.detach() - h, s.detach())) / (2 * h)
    fd_s = (f(mu.detach(), s.detach() + h) - f(mu.detach(), s.detach() - h)) / (2 * h)
    assert mu.grad.item() == pytest.approx(fd_mu.item(), rel=1e-3)
    assert s.grad.item() == pytest.approx(fd_s.item(), rel=1e-3)
    assert mu.grad.item() == pytest.approx(2 * 0.7, rel=0.02) and s.grad.item() == pytest.approx(2 * 1.3, rel=0.02)


def test_conditional_vae_requires_labels_in_range():
    cfg, ds, vae = build_vae("model.conditional=true")
    x = ds.x_test[:4]
    with pytest.raises(ValueError, match="pass labels y"):
        vae.guide(x)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\], got \[0, 12\]"):
        vae.guide(x, torch.tensor([0, 1, 2, 12]))

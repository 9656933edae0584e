"""The maths the VAE embodies, checked numerically."""

import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyro_vae.evaluate import log_weights
from pyro_vae.model import LATENT, OBS
from pyro_vae.objectives import negative_elbo
from pyro_vae.toys import linear_gaussian_evidence, linear_gaussian_posterior

from conftest import build_vae, linear_setup


def test_vae_log_terms_give_the_closed_form_kl_in_expectation():
    # E_q[log q(z|x) - log p(z)] from the VAE's own log_terms (what every ELBO here is
    # built on) equals KL(q(z|x) || p(z)) = 1/2 sum(mu^2 + sigma^2 - 1 - log sigma^2)
    cfg, ds, vae = build_vae()
    x = ds.x_test[:5]
    q = vae.q_z(x)
    mu, sigma = q.mean, q.stddev  # (5, D)
    exact = 0.5 * (mu**2 + sigma**2 - 1 - torch.log(sigma**2)).sum(-1)  # (5,)
    with torch.no_grad():
        lw = log_weights(vae, x, k=40_000)  # terms (K, 5)
    samples = lw.log_q - lw.log_prior
    mc, se = samples.mean(0), samples.std(0) / math.sqrt(samples.shape[0])
    assert ((mc - exact).abs() < 4 * se).all(), (mc - exact) / se


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


def test_gradient_of_the_written_out_elbo_matches_finite_differences():
    # with the noise eps fixed, -ELBO is a deterministic function of the parameters: the
    # reparameterized autograd gradient (through the encoder, the vectorized softplus and
    # the Bernoulli log-density) must match central differences, in float64
    cfg, ds, vae = build_vae()
    vae = vae.double()
    x = ds.x_test[:16].double()
    eps = torch.randn(1, 16, vae.latent_dim, dtype=torch.float64)
    weight = torch.tensor(1.0, dtype=torch.float64)
    loss = lambda: negative_elbo(vae, x, eps, None, weight, analytic_kl=False)  # noqa: E731
    loss().backward()
    h = 1e-6
    for p in (vae.encoder.net[0].weight, vae.encoder.net[-1].bias, vae.decoder.net[0].weight):
        for idx in [(0,) * p.dim(), tuple(s - 1 for s in p.shape)]:
            with torch.no_grad():
                p[idx] += h
                up = loss()
                p[idx] -= 2 * h
                down = loss()
                p[idx] += h
            fd = (up - down) / (2 * h)
            assert p.grad[idx].item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-7)


def test_conditional_vae_requires_labels_in_range():
    cfg, ds, vae = build_vae("model.conditional=true")
    x = ds.x_test[:4]
    with pytest.raises(ValueError, match="pass labels y"):
        vae.guide(x)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\], got \[0, 12\]"):
        vae.guide(x, torch.tensor([0, 1, 2, 12]))
    y = torch.tensor([3, 0, 9, 3])
    assert torch.equal(vae.onehot(y), torch.nn.functional.one_hot(y, 10).float())
    with pyro.validation_enabled(False):  # a training step after the first: no host read
        assert vae.onehot(torch.tensor([0, 1, 2, 9])).argmax(-1).tolist() == [0, 1, 2, 9]


@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0])
def test_kl_weight_scales_only_the_latent_terms_of_the_elbo(weight):
    """model.kl_scaled, as the model and guide apply it around their latent site."""
    _, _, vae = build_vae()
    x = torch.rand(6, 784).round()
    guide_tr = poutine.trace(vae.guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x)
    g = poutine.trace(poutine.replay(vae.guide, trace=guide_tr)).get_trace(x, kl_weight=weight)
    m = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x, kl_weight=weight)
    for tr in (guide_tr, model_tr, g, m):  # the same draws, scored with and without the weight
        tr.compute_log_prob()
    kl = model_tr.nodes[LATENT]["log_prob_sum"] - guide_tr.nodes[LATENT]["log_prob_sum"]
    rec = model_tr.nodes[OBS]["log_prob_sum"]
    weighted = m.log_prob_sum() - g.log_prob_sum()  # the ELBO's single-draw estimate
    assert weighted.item() == pytest.approx((rec + weight * kl).item(), rel=1e-5)

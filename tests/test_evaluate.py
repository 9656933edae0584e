import math

import torch

from pyro_vae.evaluate import elbo, elbo_terms, iw_log_likelihood, log_weights
from pyro_vae.toys import linear_gaussian_evidence

from conftest import build_vae
from test_model import linear_setup


def test_iwae_bound_is_above_elbo_with_shared_samples():
    cfg, ds, vae = build_vae()
    x = ds.x_test[:50]
    lw = log_weights(vae, x, k=64).log_w  # (K, B)
    elbo_k = lw.mean(0)
    iwae_k = lw.logsumexp(0) - math.log(64)
    assert (iwae_k >= elbo_k - 1e-4).all()  # Jensen, per image, same draws


def test_iw_estimate_converges_to_exact_log_evidence_on_linear_gaussian():
    vae, ds, params = linear_setup()
    x = ds.x_test[:100]
    exact = linear_gaussian_evidence(params).log_prob(x)  # (B,)
    errors = [(iw_log_likelihood(vae, x, k=k, chunk=64) - exact).abs().mean().item()
              for k in (1, 16, 512)]
    assert errors[0] > errors[1] > errors[2]
    assert (iw_log_likelihood(vae, x, k=1, chunk=64) <= exact + 1e-3).float().mean() > 0.5
    elbo_value = elbo(vae, x, k=200)
    assert elbo_value < exact.mean().item()


def test_chunked_and_unchunked_estimates_agree_for_the_same_seed():
    cfg, ds, vae = build_vae()
    x = ds.x_test[:20]
    whole = iw_log_likelihood(vae, x, k=90, chunk=90, seed=3)
    chunked = iw_log_likelihood(vae, x, k=90, chunk=30, seed=3)
    assert torch.allclose(whole, chunked, atol=1e-4)


def test_elbo_terms_are_seeded_and_split_into_reconstruction_minus_kl():
    cfg, ds, vae = build_vae()
    x = ds.x_test[:30]
    rec, kl = elbo_terms(vae, x, k=4, seed=5)
    rec2, kl2 = elbo_terms(vae, x, k=4, seed=5)
    assert torch.equal(rec, rec2) and torch.equal(kl, kl2)
    assert elbo(vae, x, k=4, seed=5) == (rec - kl).mean().item()
    assert (rec <= 0).all()  # log of a probability mass (Bernoulli on binary x)

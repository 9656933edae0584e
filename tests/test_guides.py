"""Guides q(z|x) from the registry: normalised, reparameterised, exact where they can be, and
working everywhere a guide is used (ELBOs, checkpoints, evaluation, AIS, the CVAE)."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_vae.ais import ais
from pyro_vae.comparison import kl_to_exact
from pyro_vae.config import ConfigError, load_config
from pyro_vae.evaluate import evaluate_model, log_weights, posterior_means
from pyro_vae.guides import GUIDES, Guide, gaussian_params, moments, register_guide
from pyro_vae.model import VAE
from pyro_vae.toys import linear_gaussian_evidence, linear_gaussian_posterior
from pyro_vae.training import train

from conftest import build_vae, linear_setup, small_config

VARIANTS = {"gaussian": [], "full": [], "full-lowrank": ["guide.name=full", "guide.rank=1"],
            "iaf": ["guide.hidden=[8]"]}


def _ring_vae(variant):
    overrides = VARIANTS[variant] or [f"guide.name={variant}"]
    if variant == "iaf":
        overrides = ["guide.name=iaf", *overrides]
    torch.manual_seed(0)
    return build_vae("data.name=ring", "data.binarize=none", "model.latent_dim=2",
                     "model.hidden=[16]", "likelihood.name=gaussian", *overrides)


def test_every_registered_guide_has_a_variant_here():
    assert set(GUIDES) <= {v.split("-")[0] for v in VARIANTS}


@pytest.mark.parametrize("variant", VARIANTS)
def test_guide_density_integrates_to_one_on_a_2d_grid(variant):
    _, ds, vae = _ring_vae(variant)
    with torch.no_grad():  # a random encoder: flows and correlations far from trivial
        for p in vae.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = ds.x_test[:3]
    q = vae.q_z(x)
    assert q.batch_shape == (3,) and q.event_shape == (2,)
    g = torch.linspace(-10, 10, 501)
    z = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 1, 2).expand(-1, 3, -1)
    with torch.no_grad():
        mass = q.log_prob(z).exp().sum(0) * (g[1] - g[0]) ** 2  # (3,)
    assert torch.allclose(mass, torch.ones(3), atol=2e-3), mass


@pytest.mark.parametrize("variant", VARIANTS)
def test_guide_draws_are_reparameterised_so_gradients_reach_the_encoder(variant):
    _, ds, vae = _ring_vae(variant)
    q = vae.q_z(ds.x_test[:4])
    z = q.rsample((3,))  # (3, 4, 2)
    (z.sum() + q.log_prob(z).sum()).backward()
    grads = [p.grad for p in vae.encoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    if variant == "iaf":  # the flows' own parameters are trained too
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.family.parameters())


def _fit_encoder(vae, x, exact):
    """Fit the linear encoder alone to the points x by minimising KL(q(z|x) || p(z|x)), in
    closed form here (the decoder is the true pPCA model), with L-BFGS: a noise-free,
    well-solved objective, so what is left of the ELBO gap is the guide family's."""
    vae.decoder.requires_grad_(False)
    opt = torch.optim.LBFGS(vae.encoder.parameters(), max_iter=1000, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = kl_to_exact(vae.q_z(x), exact).mean()
        loss.backward()
        return loss

    opt.step(closure)
    return vae.requires_grad_(False)


def test_full_guide_reaches_the_exact_posterior_while_the_diagonal_stays_at_its_kl_floor():
    """ELBO gap = KL(q || p(z|x)), measured by Monte Carlo ELBO against the exact evidence.
    The best diagonal Gaussian's KL has a closed-form floor (0.042 nats here: posterior
    correlation 0.29); the full guide reaches 0."""
    pyro.set_rng_seed(0)
    gaps = {}
    for name in ("full", "gaussian"):
        vae, ds, params = linear_setup()
        vae = _rebuild_with_guide(vae, name)
        x = ds.x_test[:50]
        _fit_encoder(vae, x, linear_gaussian_posterior(params, x))
        lw = log_weights(vae, x, k=2000).log_w  # (K, N)
        elbo, se = lw.mean(0), lw.std(0) / math.sqrt(lw.shape[0])
        gap = linear_gaussian_evidence(params).log_prob(x) - elbo  # (N,)
        gaps[name] = (gap.mean().item(), (se.pow(2).sum().sqrt() / len(se)).item())
    exact = linear_gaussian_posterior(params, x)
    precision = torch.linalg.inv(exact.covariance_matrix[0])
    floor = 0.5 * (precision.diagonal().log().sum() + torch.logdet(exact.covariance_matrix[0]))
    assert floor > 0.04
    assert abs(gaps["full"][0]) < 3 * gaps["full"][1] + 0.002, (gaps, floor)
    assert abs(gaps["gaussian"][0] - floor) < 3 * gaps["gaussian"][1] + 0.002, (gaps, floor)


def _rebuild_with_guide(vae, name):
    """The linear VAE of ``linear_setup`` with guide ``name``; decoder copied over."""
    cfg = load_config(None, ["data.name=linear-gaussian", "data.binarize=none", "data.noise=0.3",
                             "model.latent_dim=2", "model.hidden=[]", "likelihood.name=gaussian",
                             "likelihood.sigma=0.3", f"guide.name={name}"])
    new = VAE(cfg, vae.x_dim)
    new.decoder.load_state_dict(vae.decoder.state_dict())
    return new


@pytest.mark.parametrize("elbo", ["trace", "jit", "iwae"])
def test_iaf_guide_trains_with_every_elbo_that_applies(elbo, tmp_path):
    extra = ["train.num_particles=2"] if elbo == "iwae" else []
    cfg = small_config("guide.name=iaf", f"train.elbo={elbo}", *extra, subset=200)
    result = train(cfg)
    assert math.isfinite(result.metrics[-1]["test_elbo"])


def test_guides_that_cannot_meet_the_chosen_objective_are_refused_by_name():
    with pytest.raises(ConfigError, match="train.elbo = 'meanfield'.*guide.name = 'iaf' is not one"):
        train(small_config("guide.name=iaf", "train.elbo=meanfield"))
    with pytest.raises(ConfigError, match="train.compile = true with guide.name = 'full'"):
        train(small_config("guide.name=full", "train.compile=true"))
    with pytest.raises(ConfigError, match="prior.name = 'vamp'.*guide.name = 'iaf'"):
        build_vae("guide.name=iaf", "prior.name=vamp")
    for hidden in ("[2]", "[]"):
        with pytest.raises(ConfigError, match=rf"guide.hidden = \{hidden[:-1]}\]: an IAF's MADE "
                                              r"needs .* >= model.latent_dim = 4"):
            build_vae("guide.name=iaf", f"guide.hidden={hidden}")
    with pytest.raises(ConfigError, match=r"guide.rank = 5: above model.latent_dim = 4; "
                                          r"allowed: 0 \(Cholesky factor\) or 1..4"):
        build_vae("guide.name=full", "guide.rank=5")
    assert build_vae("guide.name=full", "guide.rank=4")[2].family.num_params == 2 * 4 + 16


def test_bad_guide_values_get_one_clear_error_each():
    with pytest.raises(ConfigError, match="guide.name = 'gausian': unknown name \\(did you mean 'gaussian'\\?\\)"):
        load_config(None, ["guide.name=gausian"])
    with pytest.raises(ConfigError, match="guide.flows = 0: out of range, must be >= 1"):
        load_config(None, ["guide.name=iaf", "guide.flows=0"])
    with pytest.raises(ConfigError, match="guide.rank = -1"):
        load_config(None, ["guide.rank=-1"])


def test_analytic_kl_with_the_full_guide_equals_the_monte_carlo_kl():
    _, ds, vae = build_vae("guide.name=full")
    x = ds.x_test[:8]
    q, prior = vae.q_z(x), vae.prior_dist().expand([8])
    analytic = torch.distributions.kl_divergence(q, prior)  # (8,)
    z = q.sample((20000,))
    mc = (q.log_prob(z) - prior.log_prob(z)).mean(0)
    assert torch.allclose(analytic, mc, atol=0.05 * analytic.abs().max().item() + 0.02)


@pytest.mark.parametrize("guide", ["full", "iaf"])
def test_guide_run_resumes_bit_exactly_and_evaluates_with_ais(tmp_path, guide):
    cfg = small_config(f"guide.name={guide}", "train.batch_size=64", subset=300, epochs=2)
    full = train(cfg, tmp_path / "full")
    polls = iter(range(10**6))
    with pytest.raises(Exception, match="stopped at epoch 1, step 3"):
        train(cfg, tmp_path / "cut", should_stop=lambda: next(polls) >= 2)
    resumed = train(cfg, resume=tmp_path / "cut")
    for name, value in full.vae.state_dict().items():
        assert torch.equal(resumed.vae.state_dict()[name], value), name
    vae, x = resumed.vae.requires_grad_(False), resumed.dataset.x_test[:5]
    report = evaluate_model(vae, x, k=100)
    assert report["iw_log_likelihood"]["mean"] >= report["elbo"]["mean"] - 3 * report["elbo"]["mc_se"]
    if guide == "iaf":  # a flow's marginals are not Normal: per-dimension KL not offered
        assert report["kl_per_dimension"] is None
    else:
        assert len(report["kl_per_dimension"]) == 4
    r = ais(vae, x, steps=20, chains=4, leapfrogs=3)
    elbo = log_weights(vae, x, k=500).log_w.mean(0)
    assert (r.log_px > elbo - 3 * r.mc_se).all()  # AIS sits above the flow guide's ELBO
    assert posterior_means(vae, x).shape == (5, 4)


def test_conditional_vae_with_a_flow_guide_samples_and_encodes_by_label():
    cfg, ds, vae = build_vae("guide.name=iaf", "model.conditional=true")
    x, y = ds.x_test[:6], ds.y_test[:6]
    q = vae.q_z(x, y)
    assert q.rsample().shape == (6, 4)
    other = vae.q_z(x, (y + 1) % 10)
    z = q.sample()
    assert not torch.allclose(q.log_prob(z), other.log_prob(z))  # the label enters q
    mean, std = moments(q)
    assert mean.shape == std.shape == (6, 4) and (std > 0).all()


def test_a_registered_user_guide_is_accepted_by_config_and_trains():
    def student(cfg, latent_dim):
        def make(h, modules):
            loc, scale = gaussian_params(h, latent_dim)
            return dist.StudentT(5.0, loc, scale).to_event(1)
        return Guide(make, 2 * latent_dim)

    register_guide("student-test", student)
    try:
        result = train(small_config("guide.name=student-test"))
        assert isinstance(result.vae.q_z(result.dataset.x_test[:2]).base_dist, dist.StudentT)
        assert math.isfinite(result.metrics[-1]["test_elbo"])
    finally:
        del GUIDES["student-test"]


def test_trace_elbo_with_the_diagonal_guide_is_unchanged_by_the_registry():
    """The default guide is today's diagonal Gaussian: the same draws give the same ELBO as
    N(loc, softplus(raw) + 1e-4) written out."""
    _, ds, vae = build_vae()
    x = ds.x_test[:5]
    h = vae.encoder(x)
    loc, raw = h[:, :4], h[:, 4:]
    manual = dist.Normal(loc, torch.nn.functional.softplus(raw) + 1e-4).to_event(1)
    z = manual.sample((7,))
    assert torch.allclose(vae.q_z(x).log_prob(z), manual.log_prob(z), atol=1e-5)
    pyro.set_rng_seed(3)
    a = Trace_ELBO().loss(vae.model, vae.guide, x)
    assert math.isfinite(a)


def test_inspect_and_arviz_draws_work_for_a_flow_guide(tmp_path, capsys):
    from pyro_vae import arviz_bridge
    from pyro_vae.cli import main
    from pyro_vae.runs import load_run

    small = ["--quiet", "--set", "data.subset=200", "--set", "model.hidden=[16]",
             "--set", "model.latent_dim=4", "--set", "train.epochs=1", "--set", "guide.name=iaf",
             "--set", "guide.hidden=[8]", "--runs-dir", str(tmp_path), "--name", "flow"]
    assert main(["train", *small]) == 0
    assert main(["inspect", str(tmp_path / "flow")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert "figures" in printed[-2] and "kl_per_dimension.png" not in printed[-2]
    assert printed[-1] == "kl_per_dimension.png not available: needs a Gaussian guide (not a flow)" \
        " and a prior that factorises over dimensions with a closed-form KL from a Normal (normal, " \
        "laplace; not a mixture, VampPrior or Student-t)"
    run = load_run(tmp_path / "flow")
    post = arviz_bridge.group(run.to_inference_data(run.dataset.x_test[:3], num_samples=50))
    assert post["z"].dims == ("chain", "draw", "point", "latent") and post["z"].shape == (1, 50, 3, 4)


def test_full_guide_trains_with_the_analytic_kl_elbo():
    result = train(small_config("guide.name=full", "train.elbo=meanfield"))
    assert math.isfinite(result.metrics[-1]["test_elbo"]) and result.metrics[-1]["test_kl"] > 0


def test_full_guide_starts_as_the_diagonal_one():
    torch.manual_seed(0)
    _, ds, vae = build_vae("guide.name=full")
    cov = vae.q_z(ds.x_test[:3]).covariance_matrix  # (3, 4, 4)
    assert torch.equal(cov, torch.diag_embed(cov.diagonal(dim1=-2, dim2=-1)))
    assert (cov.diagonal(dim1=-2, dim2=-1) > 0).all()


def test_the_scale_map_and_its_inverse_round_trip_above_the_floor():
    from pyro_vae.guides import gaussian_params, raw_from_scale, scale_from_raw
    from pyro_vae.networks import MIN_ENCODER_SCALE

    scale = torch.logspace(-3, 1, 50)
    assert torch.allclose(scale_from_raw(raw_from_scale(scale)), scale, rtol=1e-4)
    assert (scale_from_raw(torch.tensor([-200.0, 0.0, 50.0])) >= MIN_ENCODER_SCALE).all()
    near = scale_from_raw(raw_from_scale(torch.tensor([MIN_ENCODER_SCALE])))  # clamped
    assert near.item() == pytest.approx(MIN_ENCODER_SCALE + 1e-6, rel=1e-3)
    h = torch.randn(3, 8)
    loc, s = gaussian_params(h, 4)  # the guide's own map is this one
    assert torch.equal(loc, h[:, :4]) and torch.equal(s, scale_from_raw(h[:, 4:]))


def test_base_gaussian_is_the_guide_itself_or_a_flows_starting_gaussian():
    from pyro_vae.guides import base_gaussian

    q = dist.Normal(torch.zeros(2, 3), torch.ones(2, 3)).to_event(1)
    assert base_gaussian(q) is q
    flow = dist.TransformedDistribution(q, [dist.transforms.AffineTransform(1.0, 2.0)])
    assert base_gaussian(flow) is q and base_gaussian(flow).mean.abs().max() == 0
    assert flow.sample((500,)).mean().item() == pytest.approx(1.0, abs=0.3)  # moved; base not

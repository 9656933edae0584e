"""VI versus MCMC on settings where the answer is known (pPCA) or NUTS is affordable (ring)."""

import json
import math
import warnings

import pytest
import torch

from pyro_vae import arviz_bridge
from pyro_vae.cli import main
from pyro_vae.comparison import (compare, energy_distance, energy_noise_floor,
                                 energy_sample_size, gaps)
from pyro_vae.report import _gaps_markdown, report_markdown
from pyro_vae.settings import toy_setting

pytestmark = pytest.mark.slow

SMALL = dict(chains=4, warmup=200, draws=400, iw_k=2000, ais_steps=200, ais_chains=16)


@pytest.fixture(scope="module")
def linear():
    setting = toy_setting("linear-gaussian", points=3)
    return setting, compare(setting, **SMALL)


@pytest.fixture(scope="module")
def ring():
    setting = toy_setting("ring", points=3)
    return setting, compare(setting, **SMALL)


def _mean(xs):
    return sum(xs) / len(xs)


def test_nuts_matches_the_closed_form_posterior(linear):
    setting, r = linear
    nuts = r.nuts
    draws = nuts.samples.flatten(0, 1).cpu()  # (C*S, N, D)
    exact = setting.exact  # on the setting's device: compared on the CPU below
    mcse = torch.as_tensor(arviz_bridge.mcse_mean(nuts.idata), dtype=torch.float32)
    err = (draws.mean(0) - exact.mean.cpu()).abs()  # (N, D)
    assert (err < 4 * mcse).all(), (err / mcse)
    cov = torch.stack([torch.cov(draws[:, n].T) for n in range(draws.shape[1])])
    assert torch.allclose(cov, exact.covariance_matrix.cpu(), rtol=0.15,
                          atol=0.15 * exact.variance.min().item())
    assert r.summary["nuts"]["passed"]


def test_full_covariance_gaussian_reaches_log_evidence_and_every_elbo_is_below_it(linear):
    setting, r = linear
    log_px = torch.tensor(r.summary["gaps"]["log_px"])
    assert r.summary["gaps"]["log_px_source"] == "exact"
    assert torch.allclose(log_px, setting.log_px.cpu())
    assert all(abs(g) < 0.01 for g in r.summary["gaps"]["approximation_gap"])
    for name, m in r.summary["methods"].items():
        assert (torch.tensor(m["elbo"]) <= log_px + 0.005).all(), name
    assert _mean(r.summary["gaps"]["amortization_gap"]) > -0.005  # per-point fit is at least as good


def test_every_gap_carries_its_monte_carlo_se_and_no_gap_is_negative_beyond_it(linear):
    setting, r = linear
    g = r.summary["gaps"]
    assert g["log_px_se"] == [0.0] * len(g["log_px"])  # exact evidence
    assert g["amortization_fit"] == "gaussian-diag"  # the default guide's own family
    inference = torch.tensor(g["log_px"]) - torch.tensor(r.summary["methods"]["amortized"]["elbo"])
    assert torch.allclose(torch.tensor(g["inference_gap"]), inference, atol=1e-5)
    for key in ("inference_gap", "approximation_gap", "approximation_gap_diag", "amortization_gap"):
        ses = g[f"{key}_se"]
        assert len(ses) == len(g[key]) and all(se > 0 for se in ses)
        assert all(v > -3 * se for v, se in zip(g[key], ses)), key
    # the full-covariance fit reaches the exact posterior: its gap is zero within noise
    assert "(0 within noise)" in report_markdown(r.summary)


def test_each_elbo_and_nuts_error_in_the_table_carries_its_monte_carlo_error(linear, ring):
    _, r = linear
    methods, nuts = r.summary["methods"], r.summary["nuts"]
    # the full-covariance fit is the exact posterior: log p(x, z) - log q(z) is nearly
    # constant, so its ELBO's SE vanishes while the diagonal guide's cannot
    full, amortized = methods["gaussian-full"]["elbo_se"], methods["amortized"]["elbo_se"]
    assert max(full) < 0.3 * min(amortized)
    assert all(len(m["elbo_se"]) == len(m["elbo"]) for m in methods.values())
    mcse = torch.tensor(nuts["mcse_mean_in_ref_std"])  # (N,)
    assert ((mcse > 0) & (mcse < 0.2)).all()
    assert (torch.tensor(nuts["mean_error_in_ref_std"]) < 4 * mcse).all()  # exact reference
    text = report_markdown(r.summary)
    assert "best per-point Gaussian: gaussian-full)" in text  # the fit each gap used, named
    assert "the guide's own family: gaussian-diag)" in text
    amortized_row = next(ln for ln in text.splitlines() if ln.startswith("| amortized |"))
    assert amortized_row.count(" +- ") == 1
    nuts_error = text.split("| NUTS |")[1].split("|")[0]  # against the exact posterior
    assert "(MCSE " in nuts_error and "noise floor" not in nuts_error, nuts_error
    ring_nuts_error = report_markdown(ring[1].summary).split("| NUTS |")[1].split("|")[0]
    assert "MCSE" in ring_nuts_error and "(noise floor)" in ring_nuts_error  # NUTS is the reference


def test_diagonal_guide_kl_is_at_least_the_analytic_floor(linear):
    setting, r = linear
    cov = setting.exact.covariance_matrix.cpu()  # (N, D, D)
    precision = torch.linalg.inv(cov)
    # best diagonal Gaussian: variances 1 / Lambda_ii, KL = 1/2 (sum log Lambda_ii + log det Sigma)
    floor = 0.5 * (torch.diagonal(precision, dim1=-2, dim2=-1).log().sum(-1) + torch.logdet(cov))
    kl_diag = torch.tensor(r.summary["methods"]["gaussian-diag"]["kl_to_exact"])
    kl_amortized = torch.tensor(r.summary["methods"]["amortized"]["kl_to_exact"])
    assert (kl_diag >= floor - 1e-4).all() and (kl_diag < floor + 0.02).all()
    assert (kl_amortized >= floor - 1e-4).all()
    assert _mean(r.summary["methods"]["gaussian-full"]["kl_to_exact"]) < 0.01


def test_ring_posterior_is_not_gaussian_and_nuts_passes_the_gates(ring):
    setting, r = ring
    nuts = r.summary["nuts"]
    assert r.summary["reference"] == "NUTS" and nuts["passed"], nuts
    assert nuts["max_rhat"] <= 1.01 and nuts["min_ess_bulk"] >= 400
    gaps = r.summary["gaps"]["approximation_gap_diag"]
    assert min(gaps) > 0.02  # well above the MC error (2000 draws) of the ELBO estimate
    assert _mean(r.summary["gaps"]["approximation_gap"]) > 0.01


def test_ring_log_px_is_ais_checked_by_quadrature_bdmc_and_iw(ring):
    setting, r = ring
    g, c = r.summary["gaps"], r.summary["log_px_checks"]
    assert g["log_px_source"].startswith("AIS from the guide, 200 steps x 16 chains")
    ais = torch.tensor(g["log_px"])
    quad = torch.tensor(c["quadrature_log_px"])
    se = torch.tensor(g["log_px_se"])
    assert (se > 0).all() and ((ais - quad).abs() < 3 * se + 0.01).all(), (ais, quad, se)
    assert torch.allclose(torch.tensor(c["ais_minus_quadrature"]), ais - quad, atol=1e-5)
    b = c["bdmc"]
    assert b["points"] == 3 and b["gap"]["mean"] > -3 * b["gap"]["mc_se"]
    assert b["gap"]["mean"] < 0.5  # a 2-D latent: 200 steps nearly close the sandwich
    iw_minus_ais = torch.tensor(c["iw_minus_ais"])  # IW is a lower bound: not above AIS
    assert (iw_minus_ais < 3 * torch.tensor(c["iw_minus_ais_se"]) + 0.01).all()
    text = report_markdown(r.summary)
    assert "BDMC on 3 points simulated from the model" in text
    assert "AIS - quadrature = " in text


def test_guide_and_nuts_inference_data_share_names_and_dims(ring):
    setting, r = ring
    nuts = r.nuts
    guide = arviz_bridge.from_draws(r.q["amortized"].sample((300,)).unsqueeze(0))
    post_nuts, post_guide = arviz_bridge.group(nuts.idata), arviz_bridge.group(guide)
    assert set(post_nuts.data_vars) == set(post_guide.data_vars) == {"z"}
    assert post_nuts["z"].dims == post_guide["z"].dims == ("chain", "draw", "point", "latent")
    for idata in (nuts.idata, guide):
        summary = arviz_bridge.summary(idata)
        assert len(summary) == 3 * 2  # points x latent dims
    assert arviz_bridge.group(nuts.idata, "sample_stats")["diverging"].dims == ("chain", "draw")


def test_energy_distance_is_zero_for_equal_samples_and_grows_with_a_shift():
    a = torch.randn(500, 2)
    assert energy_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert energy_distance(a, a + 1.0) > energy_distance(a, a + 0.1) > 0


def test_compare_cli_writes_every_file(tmp_path, capsys):
    out = tmp_path / "lg"
    assert main(["compare", "--setting", "linear-gaussian", "--points", "2", "--warmup", "100",
                 "--draws", "150", "--chains", "2", "--fit-steps", "200", "--out", str(out),
                 "--quiet"]) == 0
    for name in ("report.md", "comparison.json", "nuts.nc", "amortized.nc", "gaussian-diag.nc",
                 "gaussian-full.nc", "marginals.png", "pair.png", "trace.png"):
        assert (out / name).stat().st_size > 0, name
    assert main(["evaluate", str(out / "run"), "--k", "50"]) == 0  # the toy VAE is a run
    text = capsys.readouterr().out
    assert "NUTS health gates" in text.splitlines()[2]
    assert "per-point Gaussians fitted in 200 SVI steps" in text
    assert json.loads((out / "comparison.json").read_text())["fit_steps"] == 200
    assert main(["compare", "--setting", "run"]) == 2
    assert "--setting run needs --run RUN" in capsys.readouterr().err
    assert main(["compare", "--setting", "ring", "--ais-steps", "1"]) == 2
    assert "--ais-steps = 1: must be >= 2" in capsys.readouterr().err
    assert main(["compare", "--setting", "ring", "--iw-k", "1"]) == 2  # an SE needs 2 draws
    assert "--iw-k = 1: must be >= 2" in capsys.readouterr().err
    assert main(["compare", "--setting", "ring", "--fit-steps", "0"]) == 2
    assert "--fit-steps = 0: must be >= 1" in capsys.readouterr().err


def test_amortization_gap_is_taken_against_the_guide_s_own_family_or_not_split():
    one = (torch.tensor([1.0]), torch.tensor([0.1]))
    elbos = {"amortized": (torch.tensor([-2.0]), torch.tensor([0.1])),
             "gaussian-diag": (torch.tensor([-1.5]), torch.tensor([0.1])),
             "gaussian-full": (torch.tensor([-1.0]), torch.tensor([0.1]))}
    full = gaps(one, elbos, "exact", guide="full")
    assert full["amortization_fit"] == "gaussian-full" and full["amortization_gap"] == [1.0]
    assert full["inference_gap"] == [3.0] and full["approximation_gap"] == [2.0]
    flow = gaps(one, elbos, "exact", guide="iaf")  # no per-point flow fit: not split
    assert flow["amortization_fit"] is None and "amortization_gap" not in flow
    assert flow["amortization_note"] == "not split: guide 'iaf' has no per-point fit of its family here"
    table = "\n".join(_gaps_markdown(flow))
    assert "| inference_gap | 3.0000" in table and "amortization_gap" not in table
    wide = {k: v for k, v in elbos.items() if k != "gaussian-full"}  # D > 10: no full fit
    big = gaps(one, wide, "exact", guide="full")
    assert big["amortization_fit"] is None and big["approximation_fit"] == "gaussian-diag"
    assert big["amortization_note"] == "not split: gaussian-full is fitted per point only for D <= 10"
    assert big["approximation_gap"] == [2.5]  # against the diagonal fit, and named so
    from conftest import build_vae

    low_rank = build_vae("guide.name=full", "guide.rank=2")[2].guide_name  # not the full family
    assert gaps(one, elbos, "exact", guide=low_rank)["amortization_note"] == (
        "not split: guide 'full (rank 2)' has no per-point fit of its family here")


def test_gap_table_flags_a_gap_below_zero_beyond_noise_and_names_an_exact_log_px():
    exact = (torch.tensor([1.0, 1.0, 1.0]), torch.zeros(3))
    elbos = {"amortized": (torch.tensor([0.5, 1.3, 1.02]), torch.full((3,), 0.1)),
             "gaussian-diag": (torch.tensor([0.7, 0.9, 1.0]), torch.full((3,), 0.1))}
    table = "\n".join(_gaps_markdown(gaps(exact, elbos, "exact", guide="gaussian")))
    row = {ln.split(" | ")[0][2:]: ln for ln in table.splitlines() if ln.startswith("| ")}
    assert "| 1.0000 (exact), 1.0000 (exact)," in row["log_px"] and "+-" not in row["log_px"]
    # inference gaps 0.5, -0.3, -0.02 (SE 0.1): positive, below 0 beyond noise, 0 within noise
    assert row["inference_gap"].split(" | ")[2] == (
        "0.5000 +- 0.1000, -0.3000 +- 0.1000 (below 0 by over 2 SE: chance, or an error: log "
        "p(x) is exact), -0.0200 +- 0.1000 (0 within noise) |")
    assert "-0.4000 +- 0.1414 (below 0 by over 2 SE: chance, or the per-point fit unconverged: " \
        "more --fit-steps)" in row["amortization_gap"]  # gaps 0.2, -0.4, -0.02
    ais = "\n".join(_gaps_markdown(gaps((exact[0], torch.full((3,), 0.05)), elbos, "AIS")))
    assert "-0.3000 +- 0.1118 (below 0 by over 2 SE: chance, or the log p(x) estimate too low)" in ais
    from pyro_vae.report import _with_noise

    assert _with_noise(-1e-9, 0.0, True, "approximation_gap", True) == "-0.0000 +- 0.0000 (0 within noise)"
    assert _with_noise(-0.5, 0.1, True) == "-0.5000 +- 0.1000"  # a difference, not a gap: no flag


def test_nuts_health_says_why_r_hat_is_not_available_where_no_chain_moved(ring):
    from pyro_vae.comparison import nuts_health
    from pyro_vae.mcmc import NutsResult

    torch.manual_seed(0)
    samples = torch.randn(2, 500, 2, 3)
    samples[:, :, 0, 1] = 0.25  # no chain moved from its start in one element ...
    samples[0, :, 1, 2], samples[1, :, 1, 2] = 0.25, 0.5  # ... at one value, or at two
    nuts = NutsResult(samples, arviz_bridge.from_draws(samples), 0, 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy warning leaks out of ArviZ
        health = nuts_health(nuts, n_points=2)
        arviz_bridge.summary(nuts.idata)
    assert health["max_rhat"] is None and health["min_ess_bulk"] is None
    assert health["diagnostics_note"] == (
        "not available: in 2 of the 6 (point, latent) elements no chain moved (zero "
        "within-chain variance: R-hat undefined or unbounded)")
    assert not health["passed"]
    one_stuck = samples.normal_().clone()
    one_stuck[1, :, 0, 0] = 0.25  # one chain of two stuck: R-hat is defined, and fails
    mixed = nuts_health(NutsResult(one_stuck, arviz_bridge.from_draws(one_stuck), 0, 0.1), 2)
    assert mixed["max_rhat"] > 1.5 and not mixed["passed"]
    assert mixed["diagnostics_note"] == ("stuck chains: in 1 of the 6 (point, latent) "
                                         "elements chains [1] never moved (R-hat flags it)")
    text = report_markdown({**ring[1].summary, "nuts": {**ring[1].summary["nuts"], **mixed}})
    assert "**NUTS health gates FAILED**" in text
    assert "max R-hat n/a" not in text and ". Stuck chains: in 1 of the 6" in text
    text = report_markdown({**ring[1].summary, "nuts": {**ring[1].summary["nuts"], **health}})
    assert "max R-hat n/a (<= 1.01), min bulk ESS n/a (>= 400)" in text
    assert "R-hat and bulk ESS not available: in 2 of the 6" in text
    moving = nuts_health(NutsResult(samples, arviz_bridge.from_draws(samples), 0, 0.1), 2)
    assert moving["max_rhat"] < 1.05 and moving["diagnostics_note"] is None


def _log_joint_minus_exact(setting, draws=64):
    """log p(x, z) - log p(z | x) at exact posterior draws z ``[S, N, D]``: log p(x) at
    every z when ``exact`` is the model's posterior."""
    vae, x = setting.vae, setting.x
    z = setting.exact.sample((draws,))
    with torch.no_grad():
        joint = vae.likelihood_dist(z).log_prob(x) + vae.prior_dist().log_prob(z)
    return joint - setting.exact.log_prob(z)


def test_the_exact_reference_is_the_trained_models_own_posterior_with_a_learned_scale():
    # the learned noise scale moves away from the config's sigma (0.3): the closed form
    # must use the model's, or log p(x, z) - log p(z | x) varies with z
    setting = toy_setting("linear-gaussian", points=3, overrides=(
        "likelihood.scale=learned", "likelihood.sigma=1.0", "train.epochs=5"))
    assert abs(setting.vae.likelihood.learnable["log_scale"].exp().item() - 1.0) > 0.05
    diff = _log_joint_minus_exact(setting)  # (S, N)
    torch.testing.assert_close(diff, setting.log_px.expand_as(diff), rtol=0, atol=1e-3)


@pytest.mark.parametrize("override", ["prior.learnable=true", "likelihood.scale=per-pixel",
                                      "likelihood.name=laplace", "model.hidden=[8]"])
def test_a_linear_gaussian_setting_that_is_not_ppca_has_no_exact_reference(override):
    setting = toy_setting("linear-gaussian", points=2, overrides=(override, "train.epochs=1"))
    assert setting.exact is None and setting.log_px is None


@pytest.mark.parametrize("chains, draws", [(4, 1000), (2, 1500), (4, 200), (3, 101), (1, 800)])
def test_the_energy_noise_floor_compares_samples_of_the_methods_size(chains, draws):
    # iid "chains" of one posterior: the floor must read what the methods' comparison of two
    # independent samples of energy_sample_size draws reads (the V-statistic's bias ~1/n)
    torch.manual_seed(0)
    samples = torch.randn(chains, draws, 200, 2)  # (C, S, N, D)
    floor = torch.tensor(energy_noise_floor(samples)).mean()
    n = energy_sample_size(chains * draws)
    assert n == min(1000, chains * draws // 2)
    same_size = torch.tensor([energy_distance(torch.randn(n, 2), torch.randn(n, 2))
                              for _ in range(200)]).mean()
    assert abs(floor / same_size - 1) < 0.15, (floor, same_size)


def test_compare_refuses_one_ais_chain_naming_it():
    with pytest.raises(ValueError, match=r"ais_chains = 1: must be >= 2 \(one chain per point"):
        compare(toy_setting("linear-gaussian", points=1), ais_chains=1)


def test_the_per_point_fits_draw_from_the_seed_compare_is_given(linear, monkeypatch):
    import pyro_vae.comparison

    class Stop(Exception):
        pass

    drawn = []

    def fits(setting, fit_steps):  # what the fits' first particle would be, then stop
        drawn.append(torch.randn(3))
        raise Stop

    monkeypatch.setattr(pyro_vae.comparison, "_approximations", fits)
    for seed in (1, 1, 2):
        with pytest.raises(Stop):
            compare(linear[0], seed=seed)
    assert torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[0], drawn[2])


def test_kl_to_exact_of_a_student_t_guide_is_estimated_not_taken_as_gaussian():
    import pyro.distributions as dist

    from pyro_vae.comparison import kl_to_exact

    torch.manual_seed(0)
    exact = dist.MultivariateNormal(torch.zeros(1, 2), torch.eye(2))
    q = dist.StudentT(5.0, torch.zeros(1, 2), 0.5).to_event(1)  # df 5: a finite-variance KL
    z = q.sample((200_000,))
    terms = q.log_prob(z) - exact.log_prob(z)  # (S, 1)
    kl = kl_to_exact(q, exact, draws=200_000)
    assert (kl - terms.mean(0)).abs() < 4 * terms.std() / 200_000**0.5 * 2**0.5  # other draws
    gaussian = torch.distributions.kl_divergence(
        dist.MultivariateNormal(q.mean, scale_tril=torch.diag_embed(q.stddev)), exact)
    assert (kl - gaussian).abs().min() > 0.05  # what the moment-matched Gaussian would say


def test_nuts_is_reproducible_by_seed_and_leaves_the_callers_random_streams_alone(ring):
    import random

    import numpy as np

    from pyro_vae.mcmc import run_nuts

    setting = ring[0]
    np.random.seed(7), random.seed(7), torch.manual_seed(7)
    expected = (np.random.rand(), random.random(), torch.rand(()))
    np.random.seed(7), random.seed(7), torch.manual_seed(7)
    runs = [run_nuts(setting, chains=2, warmup=10, draws=10, jit=False, seed=s) for s in (3, 3, 4)]
    assert (np.random.rand(), random.random(), torch.rand(())) == expected  # untouched
    assert torch.equal(runs[0].samples, runs[1].samples)
    assert not torch.equal(runs[0].samples, runs[2].samples)
    assert not torch.equal(runs[0].samples[0], runs[0].samples[1])  # chains seeded apart


def test_ppca_params_read_the_linear_decoder_and_its_noise_and_refuse_other_models():
    from conftest import linear_setup
    from pyro_vae.config import load_config
    from pyro_vae.model import VAE
    from pyro_vae.settings import ppca_params

    vae, ds, params = linear_setup(noise=0.3)
    base = ["data.name=linear-gaussian", "data.binarize=none", "model.latent_dim=2",
            "model.hidden=[]", "likelihood.name=gaussian", "likelihood.sigma=0.3"]
    cfg = load_config(None, base)  # linear_setup's config
    W, b, s = ppca_params(cfg, vae)
    assert torch.equal(W, params.W) and torch.equal(b, params.b) and float(s) == pytest.approx(0.3)
    z = torch.randn(4, 2)
    assert torch.allclose(vae.likelihood_dist(z).mean, z @ W.T + b, atol=1e-5)  # x | z mean
    for extra in ("model.hidden=[8]", "prior.learnable=true", "likelihood.scale=per-pixel"):
        other = load_config(None, [*base, extra])
        assert ppca_params(other, VAE(other, ds.x_dim)) is None, extra


def test_coverage_mcse_matches_the_binomial_error_and_grows_with_autocorrelation():
    from pyro_vae.comparison import _inside, coverage_mcse

    torch.manual_seed(0)
    q = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(3, 8),
                                                                   torch.ones(3, 8)), 1)
    iid = torch.randn(4, 1000, 3, 8)  # (C, S, N, D) draws of q itself: coverage 0.9
    expected = math.sqrt(0.9 * 0.1 / 4000 / 8)  # sqrt(D p (1-p) / n) / D
    se = coverage_mcse(_inside(q, iid, 0.9))
    assert torch.allclose(se, torch.full((3,), expected), rtol=0.15), (se, expected)
    sticky = iid[:, :250].repeat_interleave(4, dim=1)  # each draw held 4 steps: 1/4 the ESS
    assert (coverage_mcse(_inside(q, sticky, 0.9)) > 1.6 * se).all()
    assert coverage_mcse(_inside(q, iid * 1e-3, 0.9)).eq(0).all()  # all inside: none vary


def test_std_ratio_mcse_is_the_delta_method_of_the_references_error():
    from pyro_vae.comparison import std_ratio_mcse

    std, ref, ref_mcse = torch.tensor([[2.0, 1.0]]), torch.tensor([[1.0, 2.0]]), \
        torch.tensor([[0.1, 0.2]])
    # ratios 2 and 0.5; each ratio's error r * mcse / ref: 0.2 and 0.05; combined / D
    assert std_ratio_mcse(std, ref, ref_mcse) == pytest.approx([math.hypot(0.2, 0.05) / 2])


def test_coverage_and_std_ratio_carry_their_nuts_monte_carlo_error(linear, ring):
    for setting, r in (linear, ring):
        exact = setting.exact is not None
        for name, m in r.summary["methods"].items():
            assert len(m["coverage_90_mcse"]) == 3 and all(0 < s < 0.05 for s in m["coverage_90_mcse"])
            assert ("std_ratio_mcse" in m) != exact, name  # only against NUTS' own std
        rows = report_markdown(r.summary).splitlines()
        amortized = next(ln for ln in rows if ln.startswith("| amortized |")).split("|")
        assert "(MCSE " in amortized[5] and ("(MCSE " in amortized[3]) != exact, amortized
        nuts = next(ln for ln in rows if ln.startswith("| NUTS |")).split("|")
        assert ("(MCSE " in nuts[3]) == exact, nuts  # NUTS' std against the exact one

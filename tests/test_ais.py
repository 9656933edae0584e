"""AIS and BDMC against closed forms: the linear-Gaussian evidence and 2-D quadrature."""

import json
import math

import pytest
import torch

from pyro_vae.ais import ais, bdmc, evaluate_ais, sigmoid_schedule, simulate
from pyro_vae.evaluate import iw_bound, log_weights, quadrature_log_px
from pyro_vae.networks import MIN_ENCODER_SCALE
from pyro_vae.toys import linear_gaussian_evidence

from conftest import build_vae, linear_setup

def _overdispersed_guide(vae, params, widen=1.5):
    """Set the linear encoder to the exact posterior mean map with 1.5x the exact marginal
    stds: a decent but wrong diagonal q(z|x) to start AIS from."""
    W, b, s = params
    d = W.shape[1]
    cov = torch.linalg.inv(torch.eye(d) + W.T @ W / s**2)  # (D, D)
    A = cov @ W.T / s**2  # (D, X)
    lin = vae.encoder.net[0]
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[:d] = A
        lin.bias[:d] = -A @ b
        lin.bias[d:] = (widen * cov.diagonal().sqrt() - MIN_ENCODER_SCALE).expm1().log()
    return vae.requires_grad_(False)


def _z(a, b, se_a, se_b):
    """Standardised mean difference over points: (mean(a - b)) / its standard error."""
    return (a - b).mean() / ((se_a**2 + se_b**2).sum().sqrt() / len(a))


def test_sigmoid_schedule_runs_from_0_to_1_increasing():
    betas = sigmoid_schedule(50)
    assert betas[0] == 0 and betas[-1] == 1 and (betas.diff() > 0).all()


def test_ais_reaches_the_exact_linear_gaussian_evidence_within_its_monte_carlo_error():
    vae, ds, params = linear_setup()
    vae = _overdispersed_guide(vae, params)
    x = ds.x_test[:8]
    exact = linear_gaussian_evidence(params).log_prob(x)  # (8,)
    r = ais(vae, x, steps=100, chains=16, leapfrogs=5)
    assert r.log_px.shape == r.mc_se.shape == (8,) and (r.mc_se > 0).all()
    assert abs(_z(r.log_px, exact, r.mc_se, torch.zeros(8))) < 3
    assert ((r.acceptance > 0.5) & (r.acceptance < 0.95)).all()  # adapted towards 0.65
    q_elbo = log_weights(vae, x, k=2000).log_w.mean(0)  # the start's ELBO: clearly below
    assert (exact - q_elbo).mean() > 10 * r.mc_se.mean() / math.sqrt(8)


def test_the_weighted_chains_run_with_fixed_step_sizes_set_by_the_pilot():
    vae, ds, _ = linear_setup()
    vae.requires_grad_(False)
    x = ds.x_test[:3]
    torch.manual_seed(0)
    r = ais(vae, x, steps=300, chains=8, leapfrogs=1)
    assert r.step_sizes.shape == (299, 3) and (r.step_sizes > 0).all()
    assert not torch.equal(r.step_sizes[0], r.step_sizes[-1])  # the pilot adapted them
    # given sizes are used as they are: no adaptation rescues a step far too small or large
    # (adapting by 0.98 per step would bring 50 down to 0.12 within these 300 steps)
    for size, accepted in ((1e-4, lambda a: a > 0.99), (50.0, lambda a: a < 0.05)):
        given = torch.full((299, 3), size)
        fixed = ais(vae, x, steps=300, chains=8, leapfrogs=1, step_sizes=given)
        assert fixed.step_sizes is given and accepted(fixed.acceptance).all(), fixed.acceptance
    with pytest.raises(ValueError, match=r"step_sizes has shape \[10, 3\]; expected \[299, 3\]"):
        ais(vae, x, steps=300, step_sizes=torch.ones(10, 3))
    with pytest.raises(ValueError, match="every size > 0"):
        ais(vae, x, steps=3, step_sizes=torch.zeros(2, 3))


def test_the_step_sizes_depend_on_the_pilot_chains_alone(monkeypatch):
    import pyro_vae.ais as ais_module

    vae, ds, _ = linear_setup()
    vae.requires_grad_(False)
    x = ds.x_test[:3]
    torch.manual_seed(0)
    free = ais(vae, x, steps=60, chains=6, leapfrogs=1)
    hmc = ais_module._hmc

    def weighted_chains_stuck(path, z, *args):  # every weighted chain rejects every move
        z1, accept = hmc(path, z, *args)
        weighted = torch.arange(z.shape[0]) >= ais_module.PILOT_CHAINS  # (P + C,)
        return torch.where(weighted[:, None, None], z, z1), accept & ~weighted[:, None]

    monkeypatch.setattr(ais_module, "_hmc", weighted_chains_stuck)
    torch.manual_seed(0)
    stuck = ais(vae, x, steps=60, chains=6, leapfrogs=1)
    assert (free.acceptance > 0.3).all() and (stuck.acceptance == 0).all()  # weighted only
    assert stuck.log_weights.shape == free.log_weights.shape == (6, 3)
    assert torch.equal(stuck.step_sizes, free.step_sizes)  # the pilot chains set them alone
    assert not torch.equal(free.step_sizes[0], free.step_sizes[-1])


def test_forward_and_reverse_runs_apply_each_step_size_at_the_same_beta(monkeypatch):
    import pyro_vae.ais as ais_module

    vae, ds, _ = linear_setup()
    vae.requires_grad_(False)
    x, z = simulate(vae, 2, chains=3)
    moves, hmc = [], ais_module._hmc

    def recording(path, z, beta, step, *args):
        moves.append((round(float(beta), 6), [round(s, 6) for s in step.tolist()]))
        return hmc(path, z, beta, step, *args)

    monkeypatch.setattr(ais_module, "_hmc", recording)
    schedule = torch.arange(1, 6, dtype=torch.float32)[:, None] * torch.tensor([0.01, 0.02])
    forward = ais(vae, x, steps=6, chains=3, leapfrogs=1, step_sizes=schedule)
    betas = sigmoid_schedule(6)
    assert moves == [(round(float(betas[t]), 6), [round(0.01 * t, 6), round(0.02 * t, 6)])
                     for t in range(1, 6)]  # the move at beta_t uses row t - 1
    fwd, moves[:] = list(moves), []
    ais(vae, x, steps=6, chains=3, leapfrogs=1, z_exact=z, step_sizes=forward.step_sizes)
    assert moves == fwd[::-1]  # BDMC's reverse run: the same kernels, in reverse order


def test_ais_weights_are_unbiased_for_p_x_given_the_pilots_step_sizes():
    vae, ds, params = linear_setup()
    vae = _overdispersed_guide(vae, params, widen=3.0)  # a poor start: AIS must do the work
    x = ds.x_test[:2]
    exact = linear_gaussian_evidence(params).log_prob(x)  # (2,)
    torch.manual_seed(1)
    r = ais(vae, x, steps=20, chains=4000, leapfrogs=2)
    assert r.log_weights.shape == (4000, 2)  # the pilot chains' (biased) weights left out
    ratio = (r.log_weights - exact).exp()  # (C, 2): w / p(x), mean 1 if unbiased
    se = ratio.std(0) / math.sqrt(ratio.shape[0])
    assert ((ratio.mean(0) - 1).abs() < 4 * se).all(), (ratio.mean(0), se)
    assert (se < 0.05).all()  # a test that can tell a bias of a few percent


def test_bdmc_sandwiches_the_exact_evidence_and_tightens_with_more_steps():
    vae, _, params = linear_setup()  # untrained encoder: a poor start, so the gap is wide
    vae.requires_grad_(False)
    x, z = simulate(vae, 6, chains=16)  # x ~ p(x), z: its exact posterior draw, repeated
    exact = linear_gaussian_evidence(params).log_prob(x)
    gaps = []
    for steps in (10, 100):
        lower = ais(vae, x, steps=steps, chains=16, leapfrogs=5)
        upper = ais(vae, x, steps=steps, chains=16, leapfrogs=5, z_exact=z,
                    step_sizes=lower.step_sizes)
        assert _z(lower.log_px, exact, lower.mc_se, 0 * exact) < 3
        assert _z(upper.log_px, exact, upper.mc_se, 0 * exact) > -3
        gaps.append((upper.log_px - lower.log_px).median().item())  # robust to one far point
    assert gaps[1] < gaps[0] / 2, gaps


def test_bdmc_summary_brackets_forward_ais_and_its_gap_shrinks_with_steps():
    vae, _, _ = linear_setup()
    vae.requires_grad_(False)
    short, long = (bdmc(vae, 4, steps=s, chains=8, leapfrogs=5, seed=1) for s in (5, 60))
    for b in (short, long):
        assert b["gap"]["mean"] > -3 * b["gap"]["mc_se"]  # upper - lower >= 0 within noise
        assert b["upper"]["mean"] - b["lower"]["mean"] == pytest.approx(b["gap"]["mean"], abs=1e-4)
    assert long["gap"]["mean"] < short["gap"]["mean"] / 2


def test_quadrature_equals_the_exact_linear_gaussian_evidence_for_a_2d_latent():
    vae, ds, params = linear_setup()
    assert vae.latent_dim == 2
    x = ds.x_test[:4]
    exact = linear_gaussian_evidence(params).log_prob(x)
    assert torch.allclose(quadrature_log_px(vae, x), exact, atol=1e-3)
    with pytest.raises(ValueError, match="needs a 2-D latent; this VAE has latent_dim = 3"):
        quadrature_log_px(build_vae("data.name=ring", "data.binarize=none",
                                    "model.latent_dim=3")[2], x[:, :2])


def test_quadrature_of_a_conditional_vae_gives_each_point_its_own_label():
    from pyro_vae.config import load_config
    from pyro_vae.model import VAE

    torch.manual_seed(0)
    vae = VAE(load_config(None, ["model.conditional=true", "model.latent_dim=2",
                                 "model.hidden=[8]"]), 4, num_classes=3)
    x, y = torch.rand(3, 4).round(), torch.tensor([0, 2, 1])
    together = quadrature_log_px(vae, x, y, n=41)  # (3,)
    alone = torch.cat([quadrature_log_px(vae, x[i:i + 1], y[i:i + 1], n=41) for i in range(3)])
    assert torch.allclose(together, alone)
    assert not torch.allclose(together, quadrature_log_px(vae, x, y.flip(0), n=41))


def test_ais_matches_quadrature_on_a_non_gaussian_2d_posterior_and_iwae_climbs_towards_it():
    torch.manual_seed(0)
    cfg, ds, vae = build_vae("data.name=ring", "data.binarize=none", "model.latent_dim=2",
                             "model.hidden=[16]", "model.activation=tanh",
                             "likelihood.name=gaussian", "likelihood.sigma=0.3")
    vae.requires_grad_(False)
    x = ds.x_test[:6]
    truth = quadrature_log_px(vae, x)
    r = ais(vae, x, steps=200, chains=16, leapfrogs=5, start="prior")
    assert abs(_z(r.log_px, truth, r.mc_se, 0 * truth)) < 3
    # IWAE from this (untrained, poor) guide is noisy in K, but climbs from K=1 to 10^4
    # and stays below the AIS value
    iw = [iw_bound(log_weights(vae, x, k=k).log_w).mean().item() for k in (1, 10_000)]
    assert iw[0] < iw[1] < r.log_px.mean().item() + 3 * r.mc_se.mean().item()


def test_ais_refuses_bad_arguments_naming_them():
    vae, ds, _ = linear_setup()
    x = ds.x_test[:2]
    with pytest.raises(ValueError, match="start = 'posterior': allowed: guide, prior"):
        ais(vae, x, steps=2, start="posterior")
    with pytest.raises(ValueError, match="leapfrogs = 0, chains = 16: steps must be >= 2"):
        ais(vae, x, steps=2, leapfrogs=0)
    with pytest.raises(ValueError, match="steps = 1, .*one step makes no HMC move"):
        ais(vae, x, steps=1)  # its acceptance rate would be 0 of 0 moves
    with pytest.raises(ValueError, match=r"z_exact has shape \[4, 3, 2\]; expected \[C, 2, 2\]"):
        ais(vae, x, steps=2, z_exact=torch.zeros(4, 3, 2))
    with pytest.raises(ValueError, match="z_exact given without step_sizes"):
        ais(vae, x, steps=2, z_exact=torch.zeros(4, 2, 2))
    with pytest.raises(ValueError, match=r"step_size = 0.0, target_accept = 0.65: step_size "
                                         r"must be > 0 \(a zero step never moves"):
        ais(vae, x, steps=2, step_size=0.0)
    with pytest.raises(ValueError, match=r"target_accept = 1.5: .*target_accept in \(0, 1\)"):
        ais(vae, x, steps=2, target_accept=1.5)


def test_one_chain_has_no_monte_carlo_se_and_several_carry_their_caveat():
    vae, ds, _ = linear_setup()
    x = ds.x_test[:3]
    one = evaluate_ais(vae, x, steps=3, chains=1, leapfrogs=1)["log_px"]
    assert one["mc_se"] is None and one["mc_se_note"] == ("not available: one chain per point "
                                                          "has no spread")
    json.dumps(one, allow_nan=False)  # strict JSON: no NaN stands in for the missing SE
    b = bdmc(vae, 2, steps=3, chains=3, leapfrogs=1)
    for key in ("lower", "upper", "gap"):
        assert b[key]["mc_se"] > 0
        assert b[key]["mc_se_note"] == "delta method over 3 chains per point: a lower estimate"


def test_ais_errors_combines_per_point_ses_and_says_when_there_are_none():
    from pyro_vae.ais import ais_errors

    values, se = torch.tensor([-1.0, -3.0, -5.0, -7.0]), torch.tensor([0.3, 0.4, 0.0, 0.0])
    out = ais_errors(values, se, chains=8)
    assert out["mean"] == pytest.approx(-4.0)
    assert out["mc_se"] == pytest.approx(0.5 / 4)  # sqrt(0.09 + 0.16) / N, not their mean
    assert out["test_set_se"] == pytest.approx(values.std().item() / 2)
    assert "over 8 chains per point: a lower estimate" in out["mc_se_note"]
    one = ais_errors(values, se, chains=1)
    assert one["mc_se"] is None and one["mc_se_note"].startswith("not available: one chain")

import json
import math

import pytest
import torch

from pyro_vae.evaluate import (active_units, all_log_weights, elbo, elbo_terms, evaluate_model,
                               in_bits_per_dim, iw_bound, iw_log_likelihood, kl_per_dimension,
                               log_mean_exp, log_weights, mean_se, posterior_means, psis_khat,
                               psis_khat_threshold, psis_khat_unavailable, wilson_interval)
from pyro_vae.toys import linear_gaussian_evidence, linear_gaussian_posterior

from conftest import build_vae, linear_setup


def test_iw_bound_is_the_log_of_the_mean_weight_and_the_elbo_at_k_1():
    w = torch.tensor([[1.0, 2.0], [3.0, 6.0]], dtype=torch.float64)  # (K=2, B=2)
    assert torch.allclose(iw_bound(w.log()), torch.tensor([2.0, 4.0], dtype=torch.float64).log())
    cfg, ds, vae = build_vae()
    lw = log_weights(vae, ds.x_test[:50], k=64).log_w  # (K, B) from the untrained guide
    assert torch.equal(iw_bound(lw[:1]), lw[0])  # one draw: the ELBO estimate itself
    assert (iw_bound(lw) > lw.mean(0)).all()  # unequal weights: strictly above (Jensen)


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


def test_active_units_count_collapsed_and_informative_encoders():
    cfg, ds, vae = build_vae()
    x = ds.x_test[:200]
    last = vae.encoder.net[-1]
    with torch.no_grad():  # collapsed: q(z|x) = N(0, 1) = p(z) for every x
        last.weight.zero_()
        last.bias.copy_(torch.cat([torch.zeros(4), torch.full((4,), 0.5413)]))  # softplus^-1(1)
    means = posterior_means(vae, x)
    assert active_units(means)[0] == 0
    assert kl_per_dimension(vae, x).abs().max() < 1e-3
    with torch.no_grad():  # informative: each z_d reads a different block of pixels
        last.weight.zero_()
        for d in range(4):
            vae.encoder.net[0].weight[d].zero_()
            vae.encoder.net[0].weight[d, 196 * d : 196 * (d + 1)] = 1.0
            last.weight[d, d] = 1.0
    assert active_units(posterior_means(vae, x))[0] == 4


def test_kl_per_dimension_sums_to_the_closed_form_kl():
    cfg, ds, vae = build_vae()
    x = ds.x_test[:64]
    q = vae.q_z(x)
    total = torch.distributions.kl_divergence(q, vae.prior_dist().expand([64])).mean()
    assert kl_per_dimension(vae, x).sum().item() == pytest.approx(total.item(), rel=1e-5)
    assert kl_per_dimension(build_vae("prior.name=mixture")[2], x) is None


def test_psis_khat_is_small_for_the_exact_posterior_and_flags_a_poor_proposal():
    vae, ds, params = linear_setup()
    x = ds.x_test[:20]
    good = all_log_weights(vae, x, k=2000)  # encoder untrained: poor proposal
    exact = linear_gaussian_evidence(params).log_prob(x)
    q = linear_gaussian_posterior(params, x)
    z = q.sample((2000,))  # (K, B, D)
    lw_exact = (vae.likelihood_dist(z).log_prob(x) + vae.prior_dist().log_prob(z) - q.log_prob(z))
    assert torch.allclose(lw_exact, exact.expand_as(lw_exact), atol=1e-3)
    lw_exact = lw_exact.double()  # float64: the 1e-6 jitter below survives rounding
    assert (psis_khat(lw_exact + 1e-6 * torch.randn_like(lw_exact)) < 0.5).all()
    assert psis_khat(lw_exact.round()).isnan().all()  # all weights tied: no tail to fit
    assert (psis_khat(good) > 0.7).float().mean() > 0.5


@pytest.mark.parametrize("xi", [0.3, 0.7, 1.2])
def test_psis_khat_recovers_the_tail_shape_of_pareto_weights(xi):
    # w = U^-xi is Pareto with tail index xi: k-hat estimates xi (sd about 0.1 per point)
    log_w = -xi * torch.rand(4000, 40, dtype=torch.float64).log()  # (K, B)
    khat = psis_khat(log_w)
    assert khat.shape == (40,) and khat.dtype == torch.float64
    assert khat.mean().item() == pytest.approx(xi, abs=0.06)


def test_khat_threshold_follows_the_draws_up_to_0_7():
    from pyro_vae.evaluate import _khat_summary

    assert psis_khat_threshold(1000) == pytest.approx(2 / 3)
    assert psis_khat_threshold(100) == pytest.approx(0.5)
    assert psis_khat_threshold(2154) < 0.7 and psis_khat_threshold(2155) == 0.7
    assert psis_khat_threshold(10**6) == 0.7
    with pytest.raises(ValueError, match="k = 1: the k-hat threshold needs K >= 2 draws"):
        psis_khat_threshold(1)
    # the share counts points above the threshold of *its* K: k-hat 0.6 is fine at K = 10^4
    # draws but not at K = 100 (where 0.5 is the limit)
    summaries = {k: _khat_summary(torch.tensor([0.2, 0.6, 0.68, float("nan")]), k)
                 for k in (100, 10_000)}
    assert [summaries[k]["khat_above_threshold"] for k in (100, 10_000)] == [2, 0]
    assert summaries[100]["khat_points"] == 3 and "1 of 4 points" in summaries[100]["khat_note"]


def test_psis_khat_is_not_available_from_too_few_draws():
    assert psis_khat(torch.randn(10, 3)).isnan().all()
    assert "not available" in psis_khat_unavailable(10) and "K >= 46" in psis_khat_unavailable(45)
    assert psis_khat_unavailable(46) is None and not psis_khat(torch.randn(46, 3)).isnan().any()


def test_log_mean_exp_is_the_log_of_the_mean_weight_with_a_delta_method_se():
    log_w = torch.tensor([[0.0, 1.0], [math.log(3.0), 1.0]])  # (K=2, B=2)
    value, se = log_mean_exp(log_w)
    assert torch.allclose(value, torch.tensor([math.log(2.0), 1.0]))
    # w / max w = (1/3, 1): sd sqrt(2)/3 over sqrt(2) times the mean 2/3 gives 1/2
    assert se[1] == 0 and se[0].item() == pytest.approx(0.5, rel=1e-5)


def test_log_mean_exp_se_matches_the_spread_of_repeated_iw_estimates():
    # the delta-method SE of one IW estimate predicts the sd of independent repeats
    torch.manual_seed(0)
    log_w = 0.5 * torch.randn(200, 400, 300, dtype=torch.float64)  # (repeats, K, B)
    values, se = zip(*(log_mean_exp(lw) for lw in log_w))
    spread = torch.stack(values).std(0)  # (B,) sd over repeats
    assert torch.stack(se).mean().item() == pytest.approx(spread.mean().item(), rel=0.03)


def test_mean_se_matches_the_spread_of_repeated_means_and_is_nan_for_one_draw():
    torch.manual_seed(0)
    draws = 3.0 + 2.0 * torch.randn(300, 50, 40, dtype=torch.float64)  # (repeats, K, B)
    spread = draws.mean(1).std(0)  # (B,) sd of the K-draw mean over repeats
    assert torch.stack([mean_se(d) for d in draws]).mean().item() == pytest.approx(
        spread.mean().item(), rel=0.03)
    assert mean_se(draws[0]).mean().item() == pytest.approx(2.0 / math.sqrt(50), rel=0.03)
    assert mean_se(draws[0, :1]).isnan().all()


def test_every_estimate_carries_its_errors_in_nats_and_bits_and_none_is_nan():
    cfg, ds, vae = build_vae()
    x = ds.x_test[:60]
    r = evaluate_model(vae, x, k=50, batch_size=25)
    for key in ("elbo", "reconstruction", "kl", "iw_log_likelihood"):
        assert r[key]["mc_se"] > 0 and r[key]["test_set_se"] > 0, key
    assert r["elbo"]["mean"] == pytest.approx(r["reconstruction"]["mean"] - r["kl"]["mean"], abs=1e-4)
    c = x.shape[1] * math.log(2)  # nats per point -> bits per dimension
    for nats, bits in (("elbo", "elbo_bits_per_dim"), ("iw_log_likelihood", "iw_bits_per_dim")):
        assert r[bits]["mean"] == pytest.approx(-r[nats]["mean"] / c)
        assert r[bits]["mc_se"] == pytest.approx(r[nats]["mc_se"] / c)
        assert r[bits]["test_set_se"] == pytest.approx(r[nats]["test_set_se"] / c)
    lo, hi = r["khat_share_interval_95"]
    assert r["khat_points"] == 60 and lo <= r["khat_share_above_threshold"] <= hi and hi > lo
    assert r["khat_share_above_threshold"] == r["khat_above_threshold"] / 60
    assert r["khat_threshold"] == pytest.approx(1 - 1 / math.log10(50))  # 0.41 at K = 50
    one = evaluate_model(vae, x, k=1, batch_size=25)  # no spread from one draw: named, not NaN
    for key in ("elbo", "reconstruction", "kl", "iw_log_likelihood", "iw_bits_per_dim"):
        assert one[key]["mc_se"] is None and "K=1" in one[key]["mc_se_note"], key
    json.dumps(one, allow_nan=False)  # strict JSON: no NaN anywhere in eval.json
    assert in_bits_per_dim({"mean": -10.0, "mc_se": None, "mc_se_note": "n/a"}, 5) == {
        "mean": 10.0 / (5 * math.log(2)), "mc_se": None, "mc_se_note": "n/a"}


def test_wilson_interval_covers_the_share_at_its_level_even_at_zero():
    assert wilson_interval(7, 200) == pytest.approx([0.0170, 0.0705], abs=5e-4)
    lo, hi = wilson_interval(0, 200)  # the plug-in SE would say 0 +- 0
    assert lo == 0 and hi == pytest.approx(1.96**2 / (200 + 1.96**2))
    assert wilson_interval(200, 200)[1] == 1 and wilson_interval(200, 200)[0] < 1
    gen = torch.Generator().manual_seed(0)
    for p, n in ((0.1, 50), (0.02, 200)):  # coverage near 95% where plug-in intervals fall short
        hits = (torch.rand(4000, n, generator=gen) < p).sum(1).tolist()
        covered = sum(lo <= p <= hi for lo, hi in (wilson_interval(h, n) for h in hits)) / 4000
        assert 0.92 < covered < 0.98, (p, n, covered)


def test_evaluate_cli_keeps_each_setting_and_names_both_errors(tmp_path, capsys):
    from pyro_vae.cli import main

    assert main(["train", "--quiet", "--set", "data.subset=200", "--set", "model.hidden=[16]",
                 "--set", "train.epochs=1", "--runs-dir", str(tmp_path), "--name", "r"]) == 0
    run = str(tmp_path / "r")
    assert main(["evaluate", run, "--k", "50", "--batch-size", "250"]) == 0
    out = json.loads((tmp_path / "r" / "eval.json").read_text())["iw k=50 n=1000 seed=0 batch=250 cpu"]
    iw, elbo = out["iw_log_likelihood"], out["elbo"]
    assert iw["mean"] >= elbo["mean"] - 0.5 and out["k"] == 50 and out["n"] == 1000
    assert 0 < iw["mc_se"] < iw["test_set_se"] and 0 < elbo["mc_se"]
    assert elbo["mean"] == pytest.approx(out["reconstruction"]["mean"] - out["kl"]["mean"], abs=1e-3)
    assert 0 <= out["active_units"] <= 50 and len(out["kl_per_dimension"]) == 50
    assert out["khat_share_above_threshold"] is not None and out["khat_note"] is None
    text = capsys.readouterr().out
    assert "log p(x), IW K=50" in text and "Monte Carlo SE" in text and "test-set SE" in text
    iw_line = next(line for line in text.splitlines() if line.startswith("log p(x), IW"))
    bits = next(line for line in text.splitlines() if line.startswith("-log p(x) (bits/dim)"))
    assert float(bits.split()[3]) == pytest.approx(-iw["mean"] / (784 * math.log(2)), abs=1e-4)
    flagged = out["khat_above_threshold"]  # the row says when k-hat makes its SE optimistic
    assert ("optimistic: k-hat > 0.41 on" in iw_line) == (flagged > 0), (iw_line, flagged)
    assert "PSIS k-hat > 0.41 (share; threshold for K=50)" in text
    first = json.loads((tmp_path / "r" / "eval.json").read_text())
    (tmp_path / "r" / "eval.json").write_text(json.dumps({**first, "note": "mine"}))
    assert main(["evaluate", run, "--k", "10", "--n", "20", "--ais-steps", "5",
                 "--ais-chains", "4"]) == 0
    saved = json.loads((tmp_path / "r" / "eval.json").read_text())
    assert set(saved) == {"iw k=50 n=1000 seed=0 batch=250 cpu", "iw k=10 n=20 seed=0 batch=100 cpu",
                          "ais steps=5 chains=4 n=20 seed=0 batch=100 cpu", "note"}  # all kept
    assert saved["note"] == "mine"  # a user's own key survives too
    assert saved["iw k=10 n=20 seed=0 batch=100 cpu"]["khat_share_above_threshold"] is None
    ais_px = saved["ais steps=5 chains=4 n=20 seed=0 batch=100 cpu"]["log_px"]
    assert ais_px["mc_se"] > 0 and "4 chains per point: a lower estimate" in ais_px["mc_se_note"]
    text = capsys.readouterr().out
    ais_line = next(line for line in text.splitlines() if "AIS" in line)
    assert "(delta method over 4 chains per point: a lower estimate)" in ais_line
    acc = saved["ais steps=5 chains=4 n=20 seed=0 batch=100 cpu"]["acceptance"]
    acc_line = next(line for line in text.splitlines() if "HMC acceptance" in line)
    assert acc_line.split()[4:6] == [f"{acc:.2f}", "(mean"], acc_line
    assert "not available: K=10" in text
    assert main(["evaluate", run, "--k", "1", "--n", "20"]) == 0
    text = capsys.readouterr().out
    assert "Monte Carlo SE n/a: one draw per point (K=1)" in text and "nan" not in text
    assert main(["evaluate", run, "--k", "10", "--n", "1"]) == 0
    text = capsys.readouterr().out
    assert "not available: one test point has no spread" in text and "nan" not in text.lower()
    elbo_row = next(line for line in text.splitlines() if line.startswith("ELBO"))
    assert "test-set SE not available: one test point has no spread" in elbo_row
    assert main(["evaluate", run, "--k", "10", "--n", "20", "--seed", "1"]) == 0
    other = json.loads((tmp_path / "r" / "eval.json").read_text())["iw k=10 n=20 seed=1 batch=100 cpu"]
    same = saved["iw k=10 n=20 seed=0 batch=100 cpu"]
    assert other["iw_log_likelihood"]["mean"] != same["iw_log_likelihood"]["mean"]  # new draws
    assert other["active_units"] == same["active_units"]  # deterministic parts agree
    for bad, message in ((["--k", "0"], "--k = 0: must be >= 1"),
                         (["--ais-steps", "1"], "--ais-steps = 1: must be >= 2"),
                         (["--n", "1001"], "--n = 1001: the test set has 1000 points"),
                         (["--n", "0"], "--n = 0: must be >= 1"),
                         (["--seed", "-1"], "--seed = -1: allowed 0..4294967295")):
        assert main(["evaluate", run, *bad]) == 2
        assert message in capsys.readouterr().err


def test_a_flow_guides_evaluation_is_reproducible_and_leaves_the_callers_stream_alone():
    # a flow's posterior means are drawn (guides.moments): inside the seeded block, so two
    # calls with one seed agree on every number, and the caller's stream is not consumed
    cfg, ds, vae = build_vae("guide.name=iaf", "guide.hidden=[8]", "guide.flows=1")
    x = ds.x_test[:30]
    torch.manual_seed(123)
    untouched = torch.rand(3)
    torch.manual_seed(123)
    first = evaluate_model(vae, x, k=20, seed=0)
    assert torch.equal(torch.rand(3), untouched)
    assert evaluate_model(vae, x, k=20, seed=0) == first  # the caller's stream has moved on


def test_one_test_point_reports_active_units_as_not_available_in_strict_json():
    cfg, ds, vae = build_vae()
    out = evaluate_model(vae, ds.x_test[:1], k=20)
    assert out["active_units"] is None and out["posterior_mean_variance"] is None
    assert "one test point" in out["active_units_note"]
    json.dumps(out, allow_nan=False)  # no NaN anywhere
    two = evaluate_model(vae, ds.x_test[:2], k=20)
    assert two["active_units_note"] is None and len(two["posterior_mean_variance"]) == vae.latent_dim


def test_the_delta_method_se_is_a_function_of_the_weights_ess_and_never_exceeds_one_nat():
    # what the docstring and README warn of: one dominating weight gives SE 1, never more
    log_w = 3.0 * torch.randn(16, 500, dtype=torch.float64)
    log_w[:, 0] = torch.tensor([50.0] + [0.0] * 15, dtype=torch.float64)
    _, se = log_mean_exp(log_w)
    w = (log_w - log_w.max(0).values).exp()
    ess = w.sum(0) ** 2 / (w**2).sum(0)
    torch.testing.assert_close(se, ((16 / ess - 1) / 15).sqrt())
    assert se.max() <= 1 + 1e-12 and se[0] == pytest.approx(1.0, abs=1e-12)


def test_bad_counts_and_empty_data_are_refused_naming_them():
    cfg, ds, vae = build_vae()
    x = ds.x_test[:4]
    with pytest.raises(ValueError, match=r"^k = 0, chunk = 0: must be >= 1$"):
        evaluate_model(vae, x, k=0, chunk=0)
    with pytest.raises(ValueError, match=r"^batch_size = 0: must be >= 1$"):
        iw_log_likelihood(vae, x, k=4, batch_size=0)
    with pytest.raises(ValueError, match=r"x has shape \[0, 784\]: no data points"):
        elbo_terms(vae, x[:0])


def test_kl_per_dimension_says_why_it_is_not_available():
    x = build_vae()[1].x_test[:3]
    for overrides, available in (((), True), (("prior.name=mixture",), False),
                                 (("guide.name=iaf",), False)):
        out = evaluate_model(build_vae(*overrides)[2], x, k=2)
        assert (out["kl_per_dimension"] is not None) == available, overrides
        note = out["kl_per_dimension_note"]
        assert note is None if available else note.startswith("not available: needs a Gaussian")


def test_psis_khat_is_not_available_where_a_weight_is_broken_and_survives_any_spread():
    torch.manual_seed(0)
    lw = torch.randn(200, 5)
    lw[5, 0], lw[7, 1] = math.inf, math.nan  # a broken log-weight
    lw[:190, 2] = -math.inf  # 10 non-zero weights: fewer than the tail of 42 needs
    lw[:, 3] = lw[:, 4] * 1000  # one weight carries all: the rest are 0 to double precision
    lw[:, 4] *= 10  # a heavy tail over tens of nats
    khat = psis_khat(lw)
    assert khat[:4].isnan().all()  # not available: never a fit that reads as reliable
    assert khat[4].isfinite() and khat[4] > 0.7
    shifted = psis_khat(lw[:, 4:].double() + 5000)  # scale-free, no overflow
    assert torch.allclose(shifted.float(), khat[4:], atol=1e-4)


def test_a_non_finite_estimate_makes_the_mean_not_available_with_the_point_named():
    from pyro_vae.evaluate import with_errors

    est = with_errors(torch.tensor([-1.0, -math.inf, -2.0]), torch.ones(3))
    assert est["mean"] is None and est["mc_se"] is None and est["test_set_se"] is None
    assert est["note"] == ("not available: 1 of 3 points have a non-finite estimate (first: "
                           "point 1, -inf)")
    json.dumps(est, allow_nan=False)  # strict JSON


def test_psis_tail_size_is_the_smaller_of_a_fifth_and_three_root_k():
    from pyro_vae.evaluate import psis_tail_size

    assert [psis_tail_size(k) for k in (1, 25, 46, 225, 5000)] == [1, 5, 10, 45, 213]
    sizes = [psis_tail_size(k) for k in range(1, 3000)]
    assert all(a <= b for a, b in zip(sizes, sizes[1:]))  # never shrinks as K grows

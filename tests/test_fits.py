"""Per-point Gaussian fits (the amortization gap's reference) on a fixed decoder."""

import pyro
import pytest
import torch

from pyro_vae.fits import fit_gaussian
from pyro_vae.settings import Setting

from conftest import build_vae


def _setting():
    torch.manual_seed(0)
    _, ds, vae = build_vae()
    vae.eval().requires_grad_(False)
    return Setting("small", vae, ds.x_test[:4], None, None, None)  # x (4, X)


def _elbo(vae, x, q, draws=2048):
    """ELBO of q per point, (N,): mean over draws of log p(x|z) + log p(z) - log q(z)."""
    z = q.sample((draws,))  # (S, N, D)
    return (vae.likelihood_dist(z).log_prob(x) + vae.prior_dist().log_prob(z)
            - q.log_prob(z)).mean(0)


def test_a_per_point_fit_raises_each_point_s_elbo_from_the_amortized_start():
    setting = _setting()
    q, seconds = fit_gaussian(setting, steps=200, particles=8)
    fitted = _elbo(setting.vae, setting.x, q)
    amortized = _elbo(setting.vae, setting.x, setting.vae.q_z(setting.x))
    assert seconds > 0 and (fitted > amortized - 0.1).all(), (fitted, amortized)
    assert fitted.mean() > amortized.mean() + 0.5


def test_a_diverging_per_point_fit_is_an_error_not_a_nan_result():
    # with Pyro's validation off (with it on, a NaN parameter fails Normal's own check first)
    with pyro.validation_enabled(False), pytest.raises(
            FloatingPointError, match=r"diagonal Gaussian fit went non-finite within 30 steps "
                                      r"\(lr = 1e\+30\)"):
        fit_gaussian(_setting(), steps=30, lr=1e30)


@pytest.mark.parametrize("full", [False, True])
def test_a_per_point_fit_reads_the_host_a_fixed_number_of_times_whatever_its_steps(
        monkeypatch, full):
    # on a GPU each host read waits for the queue to drain: none may happen per step (Pyro's
    # .item() calls, its NaN branch, the distributions' argument checks)
    reads = {"n": 0}
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(*args, _original=original, **kwargs):
            reads["n"] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    counts = []
    for steps in (3, 9):
        reads["n"] = 0
        fit_gaussian(_setting(), full=full, steps=steps, particles=4)
        counts.append(reads["n"])
    assert counts[0] == counts[1] > 0


@pytest.mark.parametrize("full", [False, True])
def test_a_fit_starts_exactly_at_the_amortized_guide_in_the_guide_s_family(full):
    setting = _setting()  # a diagonal Gaussian guide: the fit's family contains it
    q0 = setting.vae.q_z(setting.x)
    q, _ = fit_gaussian(setting, full=full, steps=0)
    assert torch.allclose(q.mean, q0.mean)
    assert torch.allclose(q.variance, q0.variance, rtol=1e-5)  # the same floor on the scale

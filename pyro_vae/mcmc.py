"""VI versus MCMC: the amortized guide against per-point Gaussians, NUTS and the truth.

For a few data points x_n and a decoder held fixed, the posterior p(z | x_n) of the *same*
Pyro model (``VAE.model``) is approximated three ways, each timed:

(a) the amortized guide q_phi(z | x) (one encoder pass),
(b) a Gaussian fitted to each point by SVI with the decoder fixed (diagonal, and full
    covariance when D is small): the best a Gaussian can do,
(c) NUTS (``pyro.infer.MCMC``), several chains, reference for everything else.

Where the posterior is known in closed form (the linear-Gaussian model, with the trained
decoder's own W, b and noise) it is the reference; otherwise NUTS is. The gaps::

    log p(x) - ELBO(b)      approximation gap (what a Gaussian family cannot capture)
    ELBO(b)  - ELBO(a)      amortization gap (what sharing one encoder costs)

log p(x) is exact where known, else the importance-weighted estimate with the best
per-point Gaussian as proposal.
"""

from __future__ import annotations

import time
from pathlib import Path
from statistics import NormalDist
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS, Trace_ELBO
from pyro.infer.autoguide.initialization import init_to_value
from torch.nn import functional as F

from . import arviz_bridge
from .config import load_config
from .data import LinearGaussian
from .evaluate import all_log_weights, iw_bound, seeded
from .model import LATENT, PLATE, VAE
from .toys import linear_gaussian_evidence, linear_gaussian_posterior
from .objectives import jit_notice_silenced
from .training import train

# Toy settings: the training overrides of the VAE whose decoder is then held fixed.
SETTINGS = {
    "linear-gaussian": ["data.name=linear-gaussian", "data.binarize=none", "data.noise=0.3",
                        "model.latent_dim=2", "model.hidden=[]", "likelihood.name=gaussian",
                        "likelihood.sigma=0.3", "train.epochs=20", "train.lr=0.01"],
    "ring": ["data.name=ring", "data.binarize=none", "model.latent_dim=2", "model.hidden=[64,64]",
             "model.activation=tanh", "likelihood.name=gaussian", "likelihood.scale=fixed",
             "likelihood.sigma=0.05", "train.epochs=30", "train.lr=0.003"],
}


class Setting(NamedTuple):
    """A fixed-decoder posterior problem: points x ``[N, X]`` under ``vae``; ``exact``
    is p(z | x) (batch [N], event [D]) and ``log_px`` ``[N]`` where known."""

    name: str
    vae: VAE
    x: torch.Tensor
    y: torch.Tensor | None
    exact: dist.Distribution | None
    log_px: torch.Tensor | None


def _freeze(vae: VAE) -> VAE:
    vae.eval()
    return vae.requires_grad_(False)


def toy_setting(name: str, points: int = 5, seed: int = 0) -> Setting:
    """Train the toy VAE of ``SETTINGS[name]`` and take ``points`` test points."""
    cfg = load_config(None, [*SETTINGS[name], f"train.seed={seed}"])
    result = train(cfg)
    vae, ds = _freeze(result.vae), result.dataset
    x = ds.x_test[:points]
    exact = log_px = None
    if name == "linear-gaussian":  # the trained decoder is linear-Gaussian: posterior exact
        layer = vae.decoder.net[0]
        params = LinearGaussian(layer.weight, layer.bias, cfg.likelihood.sigma)
        exact = linear_gaussian_posterior(params, x)
        log_px = linear_gaussian_evidence(params).log_prob(x)
    return Setting(name, vae, x, None, exact, log_px)


def run_setting(run, points: int = 3) -> Setting:
    """``points`` test points of a trained run (``runs.Run``)."""
    ds = run.dataset
    y = ds.y_test[:points] if run.vae.num_classes else None
    return Setting(str(run.path), _freeze(run.vae), ds.x_test[:points], y, None, None)


# --------------------------------------------------------------------------- approximations


def amortized(setting: Setting) -> tuple[dist.Distribution, float]:
    """(a) q_phi(z | x) for all points and the seconds per point of one encoder pass."""
    vae, x = setting.vae, setting.x
    vae.q_z(x, setting.y)  # warm-up
    t0 = time.perf_counter()
    q = vae.q_z(x, setting.y)
    return q, (time.perf_counter() - t0) / x.shape[0]


def fit_gaussian(setting: Setting, full: bool = False, steps: int = 1500, lr: float = 0.02,
                 particles: int = 16) -> tuple[dist.Distribution, float]:
    """(b) one Gaussian per point, fitted by SVI (Trace_ELBO, ``particles`` draws) with the
    decoder fixed, started from the amortized guide. Diagonal, or full covariance
    (scale_tril) with ``full``. Returns the distribution (batch [N], event [D]) and seconds
    per point."""
    vae, x = setting.vae, setting.x
    with torch.no_grad():
        q0 = vae.q_z(x, setting.y)
    loc = q0.mean.clone().requires_grad_()
    raw = (q0.stddev.expm1().log()).clone().requires_grad_()  # softplus^-1(scale)
    n, d = loc.shape
    off = loc.new_zeros(n, d, d).requires_grad_()  # (N, D, D) strictly lower part
    params = [loc, raw, off] if full else [loc, raw]

    def q():
        scale = F.softplus(raw) + 1e-5
        if not full:
            return dist.Normal(loc, scale).to_event(1)
        tril = torch.tril(off, diagonal=-1) + torch.diag_embed(scale)
        return dist.MultivariateNormal(loc, scale_tril=tril)

    def guide(x, y=None, kl_weight=1.0):
        with pyro.plate(PLATE, x.shape[0]):
            pyro.sample(LATENT, q())

    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    args = (x,) if setting.y is None else (x, setting.y)
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        elbo.differentiable_loss(vae.model, guide, *args).backward()
        opt.step()
        sched.step()
    seconds = (time.perf_counter() - t0) / n
    loc, raw, off = loc.detach(), raw.detach(), off.detach()  # q() reads the rebound names
    return q(), seconds


class NutsResult(NamedTuple):
    """NUTS draws ``samples [C, S, N, D]``, the same as ArviZ data (``arviz_bridge``, with
    sample_stats/diverging), the number of divergences and seconds per point."""

    samples: torch.Tensor
    idata: object
    divergences: int
    seconds_per_point: float


def run_nuts(setting: Setting, chains: int = 4, warmup: int = 500, draws: int = 1000,
             jit: bool = True, seed: int = 0, progress: bool = False) -> NutsResult:
    """(c) NUTS on ``VAE.model`` conditioned on the points, chains run one after another,
    each started at its own draw from the amortized guide with doubled scale (dispersed
    starts make R-hat meaningful)."""
    vae, x = setting.vae, setting.x
    args = (x,) if setting.y is None else (x, setting.y)
    with torch.no_grad():
        q = vae.q_z(x, setting.y)
    samples, diverging = [], []
    t0 = time.perf_counter()
    for c in range(chains):
        pyro.set_rng_seed(seed + c)
        with torch.no_grad():
            start = q.mean + 2 * q.stddev * torch.randn_like(q.mean)
        kernel = NUTS(vae.model, jit_compile=jit, ignore_jit_warnings=True,
                      init_strategy=init_to_value(values={LATENT: start}), max_plate_nesting=1)
        mcmc = MCMC(kernel, num_samples=draws, warmup_steps=warmup, disable_progbar=not progress)
        with jit_notice_silenced():  # Pyro's jit_compile traces with torch.jit
            mcmc.run(*args)
        samples.append(mcmc.get_samples()[LATENT])  # (S, N, D)
        flags = torch.zeros(draws, dtype=torch.bool)  # (S,)
        flags[[i for v in mcmc.diagnostics()["divergences"].values() for i in v]] = True
        diverging.append(flags)
    seconds = (time.perf_counter() - t0) / x.shape[0]
    samples, diverging = torch.stack(samples), torch.stack(diverging)  # (C, S, N, D), (C, S)
    idata = arviz_bridge.from_draws(samples, diverging)
    return NutsResult(samples, idata, int(diverging.sum()), seconds)


# --------------------------------------------------------------------------- comparisons


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Energy distance 2 E|A-B| - E|A-A'| - E|B-B'| between samples ``[n, D]``, ``[m, D]``
    (0 iff the distributions agree; V-statistic)."""
    ab = torch.cdist(a, b).mean()
    return (2 * ab - torch.cdist(a, a).mean() - torch.cdist(b, b).mean()).item()


def coverage(q: dist.Distribution, draws: torch.Tensor, level: float = 0.9) -> torch.Tensor:
    """Share of reference draws ``[S, N, D]`` inside q's central ``level`` marginal
    intervals, averaged over dims: ``[N]`` (``level`` when q is right)."""
    mean, std = q.mean, q.variance.sqrt()  # (N, D)
    half = std * NormalDist().inv_cdf((1 + level) / 2)  # (N, D)
    inside = ((draws - mean).abs() <= half).float()  # (S, N, D)
    return inside.mean((0, 2))


def _gaussian_kl_to_exact(q: dist.Distribution, exact: dist.Distribution) -> torch.Tensor:
    """KL(q || p(z|x)) ``[N]`` for a Gaussian q against the exact Gaussian posterior."""
    if isinstance(q, dist.Independent):
        q = dist.MultivariateNormal(q.mean, scale_tril=torch.diag_embed(q.stddev))
    return torch.distributions.kl_divergence(q, exact)


def compare(setting: Setting, chains: int = 4, warmup: int = 500, draws: int = 1000,
            jit: bool = True, iw_k: int = 5000, seed: int = 0, progress: bool = False,
            min_ess: float = 400, max_rhat: float = 1.01) -> dict:
    """All approximations, metrics, gaps, costs and NUTS health for ``setting``.

    Returns a JSON-ready dict plus the ``"_objects"`` entry (distributions, NUTS result) used
    by the figures and the netCDF files."""
    n_points = setting.x.shape[0]
    qs, seconds = {}, {}
    qs["amortized"], seconds["amortized"] = amortized(setting)
    qs["gaussian-diag"], seconds["gaussian-diag"] = fit_gaussian(setting)
    if setting.vae.latent_dim <= 10:
        qs["gaussian-full"], seconds["gaussian-full"] = fit_gaussian(setting, full=True)
    nuts = run_nuts(setting, chains, warmup, draws, jit, seed, progress)
    seconds["nuts"] = nuts.seconds_per_point
    draws_all = nuts.samples.flatten(0, 1)  # (C*S, N, D)

    rhat = arviz_bridge.rhat(nuts.idata)  # (N, D)
    ess = arviz_bridge.ess_bulk(nuts.idata)
    gates = {
        "max_rhat": float(rhat.max()), "min_ess_bulk": float(ess.min()),
        "divergences": nuts.divergences,
        "min_ess_bulk_per_second": float(ess.min() / (nuts.seconds_per_point * n_points)),
        "passed": bool(rhat.max() <= max_rhat and ess.min() >= min_ess and nuts.divergences == 0),
        "thresholds": {"rhat": max_rhat, "ess_bulk": min_ess},
    }

    if setting.exact is not None:
        ref_mean, ref_std = setting.exact.mean, setting.exact.variance.sqrt()
    else:
        ref_mean, ref_std = draws_all.mean(0), draws_all.std(0)
    best_name = "gaussian-full" if "gaussian-full" in qs else "gaussian-diag"
    with seeded(seed):
        if setting.log_px is not None:
            log_px = setting.log_px
        else:
            log_px = iw_bound(all_log_weights(setting.vae, setting.x, setting.y, iw_k,
                                              q=qs[best_name]))
        elbos = {k: all_log_weights(setting.vae, setting.x, setting.y, 2000, q=q).mean(0)
                 for k, q in qs.items()}
        thin = draws_all[:: max(1, draws_all.shape[0] // 1000)]  # (<=1000, N, D)
        half = nuts.samples.shape[1] // 2
        floor = [energy_distance(nuts.samples[0, :half, n], nuts.samples[min(1, chains - 1), half:, n])
                 for n in range(n_points)]
        methods = {}
        for k, q in qs.items():
            z = q.sample((thin.shape[0],))
            m = {
                "mean_error_in_ref_std": ((q.mean - ref_mean).abs() / ref_std).mean(1).tolist(),
                "std_ratio": (q.variance.sqrt() / ref_std).mean(1).tolist(),
                "energy_distance_to_nuts": [energy_distance(z[:, n], thin[:, n]) for n in range(n_points)],
                "coverage_90": coverage(q, draws_all).tolist(),
                "elbo": elbos[k].tolist(),
                "seconds_per_point": seconds[k],
            }
            if setting.exact is not None:
                m["kl_to_exact"] = _gaussian_kl_to_exact(q, setting.exact).tolist()
            methods[k] = m
    nuts_metrics = {
        "mean_error_in_ref_std": ((draws_all.mean(0) - ref_mean).abs() / ref_std).mean(1).tolist(),
        "std_ratio": (draws_all.std(0) / ref_std).mean(1).tolist(),
        "energy_distance_chain_vs_chain": floor,
        "seconds_per_point": seconds["nuts"],
    }
    gaps = {
        "log_px": log_px.tolist(),
        "log_px_source": "exact" if setting.log_px is not None else f"importance-weighted, K={iw_k}, proposal {best_name}",
        "approximation_gap": (log_px - elbos[best_name]).tolist(),
        "approximation_gap_diag": (log_px - elbos["gaussian-diag"]).tolist(),
        "amortization_gap": (elbos["gaussian-diag"] - elbos["amortized"]).tolist(),
    }
    return {
        "setting": setting.name, "points": n_points, "latent_dim": setting.vae.latent_dim,
        "reference": "exact posterior" if setting.exact is not None else "NUTS",
        "nuts": {"chains": chains, "warmup": warmup, "draws": draws, "jit": jit, **gates,
                 **nuts_metrics},
        "methods": methods, "gaps": gaps,
        "_objects": {"q": qs, "nuts": nuts, "exact": setting.exact},
    }


# --------------------------------------------------------------------------- output


def _mean(values) -> float:
    return float(sum(values) / len(values))


def report_markdown(r: dict) -> str:
    """The report: NUTS gates first, then accuracy, gaps and cost tables."""
    n = r["nuts"]
    status = "PASSED" if n["passed"] else "FAILED"
    lines = [
        f"# VI versus MCMC: {r['setting']}",
        "",
        f"**NUTS health gates {status}**: max R-hat {n['max_rhat']:.4f} (<= {n['thresholds']['rhat']}), "
        f"min bulk ESS {n['min_ess_bulk']:.0f} (>= {n['thresholds']['ess_bulk']:.0f}), "
        f"{n['divergences']} divergences; {n['chains']} chains x {n['draws']} draws "
        f"({n['warmup']} warm-up), jit={n['jit']}, min bulk ESS/s {n['min_ess_bulk_per_second']:.0f}.",
        "",
        f"{r['points']} data points, latent dimension {r['latent_dim']}, reference: {r['reference']}. "
        "Means over points; errors in units of the reference posterior std.",
        "",
        "| approximation | mean error | std ratio | energy dist. to NUTS | 90% coverage of NUTS |"
        + (" KL to exact |" if "kl_to_exact" in r["methods"]["amortized"] else "")
        + " ELBO | s / point | cost vs NUTS |",
        "| --- | --- | --- | --- | --- |" + (" --- |" if "kl_to_exact" in r["methods"]["amortized"] else "")
        + " --- | --- | --- |",
    ]
    for name, m in r["methods"].items():
        kl = f" {_mean(m['kl_to_exact']):.4f} |" if "kl_to_exact" in m else ""
        lines.append(
            f"| {name} | {_mean(m['mean_error_in_ref_std']):.3f} | {_mean(m['std_ratio']):.3f} | "
            f"{_mean(m['energy_distance_to_nuts']):.4f} | {_mean(m['coverage_90']):.3f} |{kl} "
            f"{_mean(m['elbo']):.3f} | {m['seconds_per_point']:.2e} | "
            f"{m['seconds_per_point'] / n['seconds_per_point']:.1e}x |")
    lines.append(
        f"| NUTS | {_mean(n['mean_error_in_ref_std']):.3f} | {_mean(n['std_ratio']):.3f} | "
        f"{_mean(n['energy_distance_chain_vs_chain']):.4f} (chain vs chain: noise floor) | - |"
        + (" - |" if "kl_to_exact" in r["methods"]["amortized"] else "")
        + f" - | {n['seconds_per_point']:.2e} | 1x |")
    g = r["gaps"]
    lines += [
        "",
        f"Gaps (nats per point; log p(x): {g['log_px_source']}):",
        "",
        "| quantity | mean | per point |",
        "| --- | --- | --- |",
    ]
    for key in ("log_px", "approximation_gap", "approximation_gap_diag", "amortization_gap"):
        lines.append(f"| {key} | {_mean(g[key]):.4f} | {', '.join(f'{v:.3f}' for v in g[key])} |")
    lines += ["", "approximation_gap = log p(x) - ELBO(best per-point Gaussian); "
              "approximation_gap_diag uses the diagonal one; amortization_gap = "
              "ELBO(per-point diagonal Gaussian) - ELBO(amortized guide)."]
    return "\n".join(lines) + "\n"


def write_comparison(r: dict, out: str | Path, dims: int = 3) -> list[Path]:
    """Write report.md, comparison.json, netCDF InferenceData per approximation and figures
    (marginal overlays, pair plot, NUTS trace plot) for the first point to ``out``."""
    import json

    import matplotlib.pyplot as plt

    from .inspection import marginal_overlay, pair_overlay, save_figure

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    objs = r["_objects"]
    nuts, qs, exact = objs["nuts"], objs["q"], objs["exact"]
    written = [out / "report.md", out / "comparison.json"]
    written[0].write_text(report_markdown(r))
    written[1].write_text(json.dumps({k: v for k, v in r.items() if k != "_objects"}, indent=1))
    written.append(arviz_bridge.save(nuts.idata, out / "nuts.nc"))
    s = nuts.samples.shape[1]
    for name, q in qs.items():
        draws_q = q.sample((s,)).unsqueeze(0)  # (1, S, N, D)
        written.append(arviz_bridge.save(arviz_bridge.from_draws(draws_q), out / f"{name}.nc"))

    draws = nuts.samples.flatten(0, 1)[:, 0]  # (C*S, D) of point 0
    gauss = {name: q for name, q in qs.items()}
    if exact is not None:
        gauss["exact"] = exact
    k = min(dims, draws.shape[1])
    fig, axes = plt.subplots(1, k, figsize=(4 * k, 3), squeeze=False)
    for dim in range(k):
        marg = {name: (q.mean[0, dim].item(), q.variance[0, dim].sqrt().item()) for name, q in gauss.items()}
        marginal_overlay(draws[:, dim], marg, ax=axes[0, dim], title=f"point 0, z[{dim}]")
    fig.tight_layout()
    written.append(save_figure(fig, out / "marginals.png"))
    if draws.shape[1] >= 2:
        def cov2(q):
            c = q.covariance_matrix[0] if hasattr(q, "covariance_matrix") else torch.diag(q.variance[0])
            return c[:2, :2].cpu().numpy()

        pairs = {name: (q.mean[0, :2].cpu().numpy(), cov2(q)) for name, q in gauss.items()}
        ax = pair_overlay(draws[:, :2], pairs, title="point 0: Gaussian ellipses over NUTS")
        written.append(save_figure(ax.figure, out / "pair.png"))
    written.append(save_figure(arviz_bridge.plot_trace(nuts.idata, point=0), out / "trace.png"))
    return written

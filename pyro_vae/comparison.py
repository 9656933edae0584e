"""VI versus MCMC: the amortized guide against per-point Gaussians, NUTS and the truth.

For a :class:`~pyro_vae.settings.Setting` (a decoder held fixed and a few points x_n), the
posterior p(z | x_n) of the *same* Pyro model (``VAE.model``) is approximated three ways,
each timed: (a) the amortized guide, (b) a Gaussian fitted per point (``fits.py``), (c) NUTS
(``mcmc.py``), the reference for everything else. Where the posterior is known in closed
form it is the reference instead. The gaps (Cremer, Li & Duvenaud 2018; :func:`gaps`)::

    log p(x) - ELBO(a)        inference gap
    log p(x) - ELBO(b best)   approximation gap (what a Gaussian family cannot capture;
                              ``approximation_gap_diag`` with the diagonal fit)
    ELBO(b own) - ELBO(a)     amortization gap (what sharing one encoder costs), b own
                              the per-point fit of the guide's own family

so for the diagonal guide approximation_gap_diag + amortization_gap = inference gap.

log p(x) is exact where known, else estimated by AIS (``ais.py``, the literature's reference,
Wu et al. 2017), vouched for by BDMC on data simulated from the model, by quadrature for a
2-D latent, and shown beside the importance-weighted estimate with the best per-point
Gaussian as proposal.
"""

from __future__ import annotations

import warnings
from statistics import NormalDist
from typing import NamedTuple

import pyro.distributions as dist
import torch

from . import arviz_bridge
from .ais import ais, bdmc
from .evaluate import all_log_weights, log_mean_exp, mean_se, quadrature_log_px, seeded
from .fits import amortized, fit_gaussian
from .guides import is_gaussian, moments
from .mcmc import NutsResult, run_nuts
from .settings import Setting


class Comparison(NamedTuple):
    """What :func:`compare` returns. ``summary``: JSON-ready (``comparison.json``): setting,
    NUTS health and metrics, per-approximation metrics, gaps. ``q``: each approximation
    (batch [N], event [D]); ``nuts``: the NUTS run; ``exact``: p(z | x) where known."""

    summary: dict
    q: dict[str, dist.Distribution]
    nuts: NutsResult
    exact: dist.Distribution | None


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Energy distance 2 E|A-B| - E|A-A'| - E|B-B'| between samples ``[n, D]``, ``[m, D]``
    (0 iff the distributions agree; V-statistic)."""
    ab = torch.cdist(a, b).mean()
    return (2 * ab - torch.cdist(a, a).mean() - torch.cdist(b, b).mean()).item()


def coverage(q: dist.Distribution, draws: torch.Tensor, level: float = 0.9) -> torch.Tensor:
    """Share of reference draws ``[S, N, D]`` inside q's central ``level`` marginal
    intervals, averaged over dims: ``[N]`` (``level`` when q is right)."""
    return _inside(q, draws, level).mean((0, 2))


def coverage_mcse(inside: torch.Tensor) -> torch.Tensor:
    """Monte Carlo SE ``[N]`` of a coverage from NUTS' chains, given ``inside`` ``[C, S, N, D]``
    (1.0 where a draw lies inside the interval, :func:`_inside`): ArviZ's MCSE of the mean
    of each (point, dim) indicator (autocorrelation counted), combined over the D dims as if
    independent, sqrt(sum_d mcse_d^2) / D. An indicator that never changes has none (0)."""
    moved = inside.flatten(0, 1).var(0) > 0  # (N, D): ArviZ's MCSE of a constant is undefined
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its "single value" notice for those: set to 0 below
        mcse = torch.as_tensor(arviz_bridge.mcse_mean(arviz_bridge.from_draws(inside)),
                               dtype=inside.dtype)
    mcse = torch.where(moved.cpu(), mcse.nan_to_num(0.0), 0.0)
    return (mcse.pow(2).sum(1).sqrt() / mcse.shape[1]).to(inside.device)


def _inside(q: dist.Distribution, draws: torch.Tensor, level: float) -> torch.Tensor:
    """1.0 where a reference draw ``[..., N, D]`` lies inside q's central ``level`` marginal
    interval, else 0.0. Gaussian q: the intervals in closed form; otherwise the quantiles of
    4,000 draws of q."""
    if is_gaussian(q):
        half = q.stddev * NormalDist().inv_cdf((1 + level) / 2)  # (N, D)
        lo, hi = q.mean - half, q.mean + half
    else:
        probs = draws.new_tensor([(1 - level) / 2, (1 + level) / 2])
        lo, hi = q.sample((4000,)).quantile(probs, dim=0)  # (N, D) each
    return ((draws >= lo) & (draws <= hi)).float()


def std_ratio_mcse(std: torch.Tensor, ref_std: torch.Tensor, ref_std_mcse: torch.Tensor) -> list:
    """Monte Carlo SE, per point ``[N]``, of the std ratio mean_d std_d / ref_std_d (each
    ``[N, D]``) from the reference's own error in its std, ``ref_std_mcse`` (NUTS'), by the
    delta method with dims as independent: sqrt(sum_d (ratio_d mcse_d / ref_std_d)^2) / D."""
    per_dim = std / ref_std * ref_std_mcse / ref_std  # (N, D)
    return (per_dim.pow(2).sum(1).sqrt() / per_dim.shape[1]).tolist()


def kl_to_exact(q: dist.Distribution, exact: dist.Distribution, draws: int = 4000) -> torch.Tensor:
    """KL(q || p(z|x)) ``[N]`` against the exact Gaussian posterior: in closed form for a
    Gaussian q, else E_q[log q(z) - log p(z|x)] from ``draws`` draws (a flow guide, or a
    registered non-Gaussian one such as a Student-t)."""
    if isinstance(q, dist.Independent) and isinstance(q.base_dist, torch.distributions.Normal):
        q = dist.MultivariateNormal(q.mean, scale_tril=torch.diag_embed(q.stddev))
    if is_gaussian(q):
        return torch.distributions.kl_divergence(q, exact)
    z = q.sample((draws,))  # (S, N, D)
    return (q.log_prob(z) - exact.log_prob(z)).mean(0)


def nuts_health(nuts: NutsResult, n_points: int, max_rhat: float = 1.01,
                min_ess: float = 400) -> dict:
    """NUTS' gates: max R-hat, min bulk ESS (and per second), divergences, passed or not.
    Where no chain moved at all (zero within-chain variance in some z element, a sampler
    stuck at its start), R-hat is undefined (chains at one value) or unbounded (at several):
    R-hat and ESS are then None with ``diagnostics_note`` saying why, and the gates fail.
    Where only some chains are stuck, R-hat is defined (and large): the note names them."""
    rhat = arviz_bridge.rhat(nuts.idata)  # (N, D)
    ess = arviz_bridge.ess_bulk(nuts.idata)
    still = nuts.samples.var(1) == 0  # (C, N, D): a chain that never left its start there
    frozen, stuck = int(still.all(0).sum()), int(still.any(0).sum())  # elements
    note = None if not stuck else (
        f"not available: in {frozen} of the {rhat.size} (point, latent) elements no chain "
        "moved (zero within-chain variance: R-hat undefined or unbounded)" if frozen else
        f"stuck chains: in {stuck} of the {rhat.size} (point, latent) elements chains "
        f"{sorted(set(still.nonzero()[:, 0].tolist()))} never moved (R-hat flags it)")
    return {
        "max_rhat": None if frozen else float(rhat.max()),
        "min_ess_bulk": None if frozen else float(ess.min()),
        "min_ess_bulk_per_second": (None if frozen else
                                    float(ess.min() / (nuts.seconds_per_point * n_points))),
        "diagnostics_note": note, "divergences": nuts.divergences,
        "passed": not frozen and bool(rhat.max() <= max_rhat and ess.min() >= min_ess
                                      and nuts.divergences == 0),
        "thresholds": {"rhat": max_rhat, "ess_bulk": min_ess},
    }


def _accuracy(mean: torch.Tensor, std: torch.Tensor, ref_mean, ref_std) -> dict:
    """Mean error in units of the reference std and std ratio, per point ``[N]``."""
    return {"mean_error_in_ref_std": ((mean - ref_mean).abs() / ref_std).mean(1).tolist(),
            "std_ratio": (std / ref_std).mean(1).tolist()}


def _mcse_in_ref_std(nuts: NutsResult, ref_std: torch.Tensor) -> list:
    """NUTS' Monte Carlo SE of the posterior mean in units of the reference std, averaged
    over dims, per point ``[N]``: the smallest mean error NUTS can resolve."""
    mcse = torch.as_tensor(arviz_bridge.mcse_mean(nuts.idata), dtype=ref_std.dtype)  # (N, D)
    return (mcse.to(ref_std.device) / ref_std).mean(1).tolist()


def method_metrics(q: dist.Distribution, nuts_samples: torch.Tensor, ref: tuple,
                   elbo: tuple, exact: dist.Distribution | None,
                   ref_std_mcse: torch.Tensor | None = None) -> dict:
    """Accuracy of approximation ``q`` against the reference ``ref`` = (mean, std) ``[N, D]``
    and NUTS' chains ``[C, S, N, D]``: errors, energy distance, 90% coverage with its Monte
    Carlo SE, ELBO ``[N]`` with its Monte Carlo SE (``elbo`` = (value, SE),
    :func:`elbo_and_se`), the KL to the exact posterior where known, and, given the
    reference's MCSE of its std ``[N, D]`` (NUTS as the reference), the std ratio's. Lists
    over points. The energy distance compares :func:`energy_sample_size` draws of each, as
    the NUTS noise floor does."""
    nuts_draws = nuts_samples.flatten(0, 1)  # (C*S, N, D)
    thin = _thinned(nuts_draws, energy_sample_size(nuts_draws.shape[0]))  # (n, N, D)
    z = q.sample((thin.shape[0],))
    mean, std = moments(q)
    inside = _inside(q, nuts_samples, 0.9)  # (C, S, N, D)
    m = {**_accuracy(mean, std, *ref),
         "energy_distance_to_nuts": [energy_distance(z[:, n], thin[:, n])
                                     for n in range(thin.shape[1])],
         "coverage_90": inside.mean((0, 1, 3)).tolist(),  # coverage(q, nuts_draws)
         "coverage_90_mcse": coverage_mcse(inside).tolist(),
         "elbo": elbo[0].tolist(), "elbo_se": elbo[1].tolist()}
    if ref_std_mcse is not None:
        m["std_ratio_mcse"] = std_ratio_mcse(std, ref[1], ref_std_mcse)
    if exact is not None:
        m["kl_to_exact"] = kl_to_exact(q, exact).tolist()
    return m


def energy_sample_size(total: int) -> int:
    """Draws per side of every energy distance of a comparison with ``total`` NUTS draws:
    at most 1,000, and half of them at most, so that the noise floor (two halves of the
    draws) compares samples of the same size as the methods (the V-statistic's upward bias,
    about 1/n + 1/m, then is the same for both)."""
    return max(1, min(1000, total // 2))


def _thinned(draws: torch.Tensor, n: int) -> torch.Tensor:
    """n draws ``[n, N, D]`` spread evenly over draws ``[S, N, D]`` (S >= n): every k-th,
    k = S // n, the first n of them."""
    return draws[:: max(1, draws.shape[0] // n)][:n]


def energy_noise_floor(samples: torch.Tensor) -> list:
    """Energy distance between the two halves of NUTS' draws ``[C, S, N, D]``, chains in
    order (for an even C: chains ``[:C/2]`` against ``[C/2:]``), each thinned to
    :func:`energy_sample_size` draws, per point ``[N]``: what two samples of the same
    posterior read as at the size the methods are compared at."""
    draws = samples.flatten(0, 1)  # (C*S, N, D), chain by chain
    half, n = draws.shape[0] // 2, energy_sample_size(draws.shape[0])
    a, b = _thinned(draws[:half], n), _thinned(draws[half:], n)
    return [energy_distance(a[:, p], b[:, p]) for p in range(samples.shape[2])]


def _diff(a: tuple, b: tuple) -> tuple[list, list]:
    """a - b per point and its SE (independent estimates: SEs add in quadrature)."""
    return (a[0] - b[0]).tolist(), (a[1] ** 2 + b[1] ** 2).sqrt().tolist()


FIT_OF_GUIDE = {"gaussian": "gaussian-diag", "full": "gaussian-full"}  # same family, per point
FULL_FIT_MAX_DIM = 10  # full-covariance Gaussians are fitted per point up to this latent size
ELBO_DRAWS = 2000  # draws per point of each approximation's ELBO (and its Monte Carlo SE)


def gaps(log_px: tuple, elbos: dict, source: str, guide: str = "gaussian") -> dict:
    """The gap decomposition per point ``[N]``, nats, each with its Monte Carlo SE (``*_se``;
    independent draws, so SEs add in quadrature): the inference gap log p(x) - L[q], the
    approximation gaps of the best per-point Gaussian and of the diagonal one, and the
    amortization gap L[q*] - L[q], where q* is the per-point fit of the amortized guide's
    own family (``FIT_OF_GUIDE``; absent for a family with no per-point fit here, such as a
    flow). ``log_px`` and each ELBO are (value ``[N]``, SE ``[N]``)."""
    pairs = {"inference_gap": (log_px, elbos["amortized"]),
             "approximation_gap": (log_px, elbos[_best(elbos)]),
             "approximation_gap_diag": (log_px, elbos["gaussian-diag"])}
    fit = FIT_OF_GUIDE.get(guide)
    if fit in elbos:
        pairs["amortization_gap"] = (elbos[fit], elbos["amortized"])
    note = None
    if fit is None:
        note = f"not split: guide {guide!r} has no per-point fit of its family here"
    elif fit not in elbos:
        note = f"not split: {fit} is fitted per point only for D <= {FULL_FIT_MAX_DIM}"
    out = {"log_px": log_px[0].tolist(), "log_px_se": log_px[1].tolist(), "log_px_source": source,
           "approximation_fit": _best(elbos), "amortization_fit": fit if fit in elbos else None,
           "amortization_note": note}
    for key, (a, b) in pairs.items():
        out[key], out[f"{key}_se"] = _diff(a, b)
    return out


def elbo_and_se(log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ELBO per point ``[N]`` as the mean of log weights ``[K, N]``, and its Monte Carlo SE."""
    return log_w.mean(0), mean_se(log_w)


def _best(qs: dict) -> str:
    """The best per-point Gaussian of the approximations: full covariance where fitted."""
    return "gaussian-full" if "gaussian-full" in qs else "gaussian-diag"


def _approximations(setting: Setting, fit_steps: int) -> tuple[dict, dict]:
    """(a) and (b) for every point (each fit ``fit_steps`` SVI steps): distributions and
    seconds per point, by name."""
    qs, seconds = {}, {}
    qs["amortized"], seconds["amortized"] = amortized(setting)
    qs["gaussian-diag"], seconds["gaussian-diag"] = fit_gaussian(setting, steps=fit_steps)
    if setting.vae.latent_dim <= FULL_FIT_MAX_DIM:
        qs["gaussian-full"], seconds["gaussian-full"] = fit_gaussian(setting, full=True,
                                                                     steps=fit_steps)
    return qs, seconds


def _ais_checks(setting: Setting, qs: dict, ais_run: tuple, iw_k: int,
                seed: int) -> tuple[tuple, dict]:
    """What vouches for an AIS reference: the IW estimate with the best per-point fit as
    proposal (a lower bound too), BDMC on as many points simulated from the model, and, for a
    2-D latent, numerical quadrature. Returns AIS's (log p(x), MC SE) ``[N]`` and the checks
    (per-point lists with their Monte Carlo SEs)."""
    vae, x, y = setting.vae, setting.x, setting.y
    steps, chains = ais_run
    r = ais(vae, x, y, steps, chains)
    best = _best(qs)
    iw = log_mean_exp(all_log_weights(vae, x, y, iw_k, q=qs[best]))
    checks = {"ais_acceptance": r.acceptance.mean().item(), "iw_source": f"K={iw_k}, proposal {best}",
              "iw_log_px": iw[0].tolist(), "iw_log_px_se": iw[1].tolist()}
    checks["iw_minus_ais"], checks["iw_minus_ais_se"] = _diff(iw, (r.log_px, r.mc_se))
    checks["bdmc"] = bdmc(vae, x.shape[0], steps, chains, seed=seed)  # compare's seed
    if vae.latent_dim == 2:
        quad = quadrature_log_px(vae, x, y)
        checks["quadrature_log_px"] = quad.tolist()
        checks["ais_minus_quadrature"], checks["ais_minus_quadrature_se"] = _diff(
            (r.log_px, r.mc_se), (quad, torch.zeros_like(quad)))
    return (r.log_px, r.mc_se), checks


def _log_px(setting: Setting, qs: dict, iw_k: int, ais_run: tuple,
            seed: int) -> tuple[tuple, str, dict]:
    """(log p(x), its Monte Carlo SE), each ``[N]``, its source and its checks: exact (SE 0)
    where known; else AIS from the guide with ``ais_run`` = (steps, chains), checked as
    :func:`_ais_checks` says."""
    if setting.log_px is not None:
        return (setting.log_px, torch.zeros_like(setting.log_px)), "exact", {}
    log_px, checks = _ais_checks(setting, qs, ais_run, iw_k, seed)
    steps, chains = ais_run
    return log_px, f"AIS from the guide, {steps} steps x {chains} chains (HMC)", checks


def compare(setting: Setting, chains: int = 4, warmup: int = 500, draws: int = 1000,
            jit: bool = True, iw_k: int = 5000, seed: int = 0, progress: bool = False,
            min_ess: float = 400, max_rhat: float = 1.01, ais_steps: int = 500,
            ais_chains: int = 16, fit_steps: int = 1500) -> Comparison:
    """All approximations, metrics, gaps, costs and NUTS health for ``setting``; log p(x)
    exact where known, else by AIS (``ais_steps`` x ``ais_chains``) with its checks. The
    per-point Gaussians take ``fit_steps`` SVI steps each: fewer is faster, but an
    unconverged fit understates the amortization gap (and overstates the approximation gap).
    ``ais_chains`` must be >= 2: the report's AIS and BDMC errors come from their spread."""
    if ais_chains < 2:
        raise ValueError(f"ais_chains = {ais_chains}: must be >= 2 (one chain per point has "
                         "no spread, so AIS would carry no Monte Carlo SE)")
    n_points = setting.x.shape[0]
    with seeded(seed, setting.x.device):  # the per-point fits' particles
        qs, seconds = _approximations(setting, fit_steps)
    nuts = run_nuts(setting, chains, warmup, draws, jit, seed, progress)
    nuts_draws = nuts.samples.flatten(0, 1)  # (C*S, N, D)
    if setting.exact is not None:
        ref = (setting.exact.mean, setting.exact.variance.sqrt())
    else:
        ref = (nuts_draws.mean(0), nuts_draws.std(0))
    with seeded(seed, setting.x.device):
        log_px, source, checks = _log_px(setting, qs, iw_k, (ais_steps, ais_chains), seed)
        elbos = {k: elbo_and_se(all_log_weights(setting.vae, setting.x, setting.y, ELBO_DRAWS,
                                                q=q))
                 for k, q in qs.items()}
        std_mcse = torch.as_tensor(arviz_bridge.mcse_sd(nuts.idata), dtype=ref[1].dtype,
                                   device=ref[1].device)  # (N, D): NUTS' error in its std
        methods = {k: {**method_metrics(q, nuts.samples, ref, elbos[k], setting.exact,
                                        std_mcse if setting.exact is None else None),
                       "seconds_per_point": seconds[k]} for k, q in qs.items()}
        floor = energy_noise_floor(nuts.samples)
    summary = {
        "setting": setting.name, "points": n_points, "latent_dim": setting.vae.latent_dim,
        "guide": setting.vae.guide_name, "fit_steps": fit_steps, "elbo_draws": ELBO_DRAWS,
        "reference": "exact posterior" if setting.exact is not None else "NUTS",
        "nuts": {"chains": chains, "warmup": warmup, "draws": draws, "jit": jit,
                 **nuts_health(nuts, n_points, max_rhat, min_ess),
                 **_accuracy(nuts_draws.mean(0), nuts_draws.std(0), *ref),
                 "mcse_mean_in_ref_std": _mcse_in_ref_std(nuts, ref[1]),
                 **({} if setting.exact is None else {"std_ratio_mcse": std_ratio_mcse(
                     nuts_draws.std(0), ref[1], std_mcse)}),  # NUTS against the exact std
                 "energy_distance_chain_vs_chain": floor,
                 "seconds_per_point": nuts.seconds_per_point},
        "methods": methods, "gaps": gaps(log_px, elbos, source, setting.vae.guide_name),
        "log_px_checks": checks,
    }
    return Comparison(summary, qs, nuts, setting.exact)

"""Evaluation: ELBO, importance-weighted log-likelihood, KL per dimension, active units.

Everything is built on one quantity, the log importance weights of K draws from the guide::

    z_k ~ q(z | x),  log w_k = log p(x | z_k) + log p(z_k) - log q(z_k | x)     [K, B]

    ELBO(x)    = E_q[log w]                          ~ mean_k log w_k
    log p(x)  >= log (1/K) sum_k w_k  (IWAE bound; -> log p(x) as K -> oo, and >= ELBO)

Values are nats per data point; bits per dimension = -value / (X ln 2).
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch

from .guides import is_gaussian, moments
from .model import VAE


class LogWeights(NamedTuple):
    """Terms of log w for K draws per data point, each ``[K, B]``."""

    log_lik: torch.Tensor  # log p(x | z_k)
    log_prior: torch.Tensor  # log p(z_k)
    log_q: torch.Tensor  # log q(z_k | x)

    @property
    def log_w(self) -> torch.Tensor:
        return self.log_lik + self.log_prior - self.log_q


@contextlib.contextmanager
def rng_untouched(device: torch.device | str = "cpu"):
    """Run the block on a fork of torch's RNG streams (the CPU's and, for a CUDA
    ``device``, every GPU's): the caller's streams are as they were before it."""
    cuda = torch.device(device).type == "cuda"
    devices = list(range(torch.cuda.device_count())) if cuda else []
    with torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cpu"):
        yield


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device | str = "cpu"):
    """Run the block with torch's RNG seeded, the CPU's stream and (for a CUDA ``device``)
    every GPU's, leaving the caller's streams untouched (``torch.manual_seed`` would reseed
    the GPUs also for a CPU ``device``, outside the fork)."""
    if seed is None:
        yield
        return
    with rng_untouched(device):
        torch.default_generator.manual_seed(seed)  # the CPU stream torch.manual_seed sets
        if torch.device(device).type == "cuda":
            torch.cuda.manual_seed_all(seed)
        yield


def log_terms(vae: VAE, x: torch.Tensor, z: torch.Tensor, y1h: torch.Tensor | None,
              q) -> LogWeights:
    """The terms of log w at given draws z ``[K, B, D]`` from ``q`` (batch [B], event [D]),
    each ``[K, B]``; differentiable (the compiled training loss is built on it too)."""
    log_lik = vae.likelihood_dist(z, y1h).log_prob(x)
    return LogWeights(log_lik, vae.prior_dist().log_prob(z), q.log_prob(z))


@torch.no_grad()
def log_weights(vae: VAE, x: torch.Tensor, y: torch.Tensor | None = None, k: int = 1,
                q=None) -> LogWeights:
    """K draws z_k ~ q(z|x) for x ``[B, X]``; returns the terms ``[K, B]``. ``q`` (batch
    [B], event [D]) replaces the amortized guide as the proposal when given."""
    y1h = vae.onehot(y)
    q = vae.q_z_onehot(x, y1h) if q is None else q  # batch [B], event [D]
    return log_terms(vae, x, q.rsample((k,)), y1h, q)  # z: (K, B, D)


def check_counts(x: torch.Tensor, **counts: int) -> None:
    """One ValueError naming each count below 1 (``k = 0, batch_size = 0: must be >= 1``),
    or data ``x`` without points: what every estimator here needs."""
    bad = [f"{name} = {value}" for name, value in counts.items() if value < 1]
    if bad:
        raise ValueError(f"{', '.join(bad)}: must be >= 1")
    if x.shape[0] == 0:
        raise ValueError(f"x has shape {list(x.shape)}: no data points; pass at least one")


def batches(x: torch.Tensor, y: torch.Tensor | None, batch_size: int):
    """Consecutive slices (x ``[b, X]``, y ``[b]`` or None) of at most ``batch_size`` points."""
    for i in range(0, x.shape[0], batch_size):
        yield x[i : i + batch_size], None if y is None else y[i : i + batch_size]


@torch.no_grad()
def elbo_terms(vae: VAE, x, y=None, k: int = 1, batch_size: int = 1000, seed: int | None = 0):
    """Per data point ``[N]``: (reconstruction E_q[log p(x|z)], KL estimate E_q[log q - log p]),
    Monte Carlo with K draws; ELBO = reconstruction - KL."""
    check_counts(x, k=k, batch_size=batch_size)
    recs, kls = [], []
    with seeded(seed, x.device):
        for xb, yb in batches(x, y, batch_size):
            lw = log_weights(vae, xb, yb, k)
            recs.append(lw.log_lik.mean(0))
            kls.append((lw.log_q - lw.log_prior).mean(0))
    return torch.cat(recs), torch.cat(kls)


def elbo(vae: VAE, x, y=None, k: int = 1, batch_size: int = 1000, seed: int | None = 0) -> float:
    """Mean ELBO over the data set, nats per data point (K-draw Monte Carlo, seeded)."""
    rec, kl = elbo_terms(vae, x, y, k, batch_size, seed)
    return (rec - kl).mean().item()


@torch.no_grad()
def all_log_terms(vae: VAE, x, y=None, k: int = 1000, chunk: int = 100, q=None) -> LogWeights:
    """The terms of log w for K draws per data point, each ``[K, B]``, drawn ``chunk`` at a
    time so the decoder never sees more than ``chunk * B`` latent samples at once (proposal
    ``q`` as in :func:`log_weights`)."""
    parts = [log_weights(vae, x, y, min(chunk, k - start), q) for start in range(0, k, chunk)]
    return LogWeights(*(torch.cat(terms) for terms in zip(*parts)))


def all_log_weights(vae: VAE, x, y=None, k: int = 1000, chunk: int = 100, q=None) -> torch.Tensor:
    """log w = log p(x|z) + log p(z) - log q(z|x) for K draws per data point ``[K, B]``."""
    return all_log_terms(vae, x, y, k, chunk, q).log_w


def iw_bound(log_w: torch.Tensor) -> torch.Tensor:
    """The importance-weighted bound log (1/K) sum_k w_k from log weights ``[K, B]`` -> ``[B]``."""
    return log_w.logsumexp(0) - math.log(log_w.shape[0])


def log_mean_exp(log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`iw_bound` of log weights ``[K, B]`` and its Monte Carlo standard error by the
    delta method, sd(w) / (sqrt(K) mean(w)), both ``[B]`` (overflow-free; NaN for K = 1).
    The SE of the *estimator* at this K, not its bias (it is a stochastic lower bound).
    It equals sqrt((K / ESS - 1) / (K - 1)) with ESS = (sum w)^2 / sum w^2, so it never
    exceeds 1 nat: where a few weights carry the sum it understates the error (lognormal
    log-weights of sd 2, K = 16: by 2x), and the draws cannot show it. PSIS k-hat above its
    threshold (:func:`psis_khat`, K >= 46) flags such points for IW; for AIS's few chains, BDMC
    (``ais.bdmc``) bounds the error on simulated data."""
    k = log_w.shape[0]
    w = (log_w - log_w.max(0).values).exp()  # (K, B), largest 1
    se = w.std(0) / (math.sqrt(k) * w.mean(0)) if k > 1 else torch.full_like(w[0], math.nan)
    return iw_bound(log_w), se


def with_errors(values: torch.Tensor, mc_se: torch.Tensor | None = None,
                mc_se_unavailable: str | None = None) -> dict:
    """Mean over data points of per-point estimates ``[N]``, with its two uncertainties named
    apart: ``mc_se``, the Monte Carlo SE of the estimator (per-point SEs combined,
    sqrt(sum se^2) / N), and ``test_set_se``, the spread over data points / sqrt(N).
    ``mc_se_unavailable`` (a reason) replaces ``mc_se`` by None and ``mc_se_note``; one
    data point has no ``test_set_se`` (None, and ``test_set_se_note`` says why). A
    non-finite per-point value (a NaN, or a point of zero density) leaves the mean and both
    SEs None, with ``note`` naming the points: never a NaN or inf in the results."""
    n = values.shape[0]
    bad = (~values.isfinite()).nonzero().flatten().tolist()
    if bad:
        return {"mean": None, "test_set_se": None, "mc_se": None,
                "note": f"not available: {len(bad)} of {n} points have a non-finite estimate "
                        f"(first: point {bad[0]}, {values[bad[0]].item()})"}
    out = {"mean": values.mean().item(),
           "test_set_se": (values.std() / math.sqrt(n)).item() if n > 1 else None}
    if n == 1:
        out["test_set_se_note"] = "not available: one test point has no spread"
    if mc_se_unavailable:
        out.update(mc_se=None, mc_se_note=mc_se_unavailable)
    elif mc_se is not None:
        out["mc_se"] = (mc_se.pow(2).sum().sqrt() / n).item()
    return out


def in_bits_per_dim(estimate: dict, x_dim: int) -> dict:
    """A :func:`with_errors` dict of log-densities in nats per point -> bits per dimension,
    -value / (X ln 2); its SEs scale by 1 / (X ln 2), None and notes stay."""
    c = x_dim * math.log(2)
    return {key: (-v if key == "mean" else v) / c if isinstance(v, float) else v
            for key, v in estimate.items()}


def mean_se(t: torch.Tensor) -> torch.Tensor:
    """Monte Carlo SE of the mean over K draws ``[K, B]`` -> ``[B]``: sd_k / sqrt(K) (NaN
    for K = 1, which has no spread)."""
    k = t.shape[0]
    return t.std(0) / math.sqrt(k) if k > 1 else torch.full_like(t[0], math.nan)


@torch.no_grad()
def quadrature_log_px(vae: VAE, x, y=None, half_width: float = 6.0, n: int = 801,
                      chunk: int = 2**15) -> torch.Tensor:
    """log p(x) = log int p(x|z) p(z) dz per point ``[B]`` for a 2-D latent, by the sum over
    an n x n grid on [-w, w]^2 (chunks of ``chunk`` grid points): a numerical reference for
    AIS where the posterior is not Gaussian. Exact up to the grid's resolution and the mass
    of p(z | x) outside the square."""
    if vae.latent_dim != 2:
        raise ValueError(f"quadrature needs a 2-D latent; this VAE has latent_dim = {vae.latent_dim}")
    g = torch.linspace(-half_width, half_width, n, device=x.device)
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 1, 2)  # (G, 1, 2)
    y1h = vae.onehot(y)
    parts = [vae.likelihood_dist(z, y1h).log_prob(x) + vae.prior_dist().log_prob(z)  # (g, B)
             for z in grid.split(chunk)]
    return torch.cat(parts).logsumexp(0) + 2 * math.log(g[1] - g[0])


@torch.no_grad()
def iw_log_likelihood(vae: VAE, x, y=None, k: int = 1000, chunk: int = 100,
                      batch_size: int = 100, seed: int | None = 0) -> torch.Tensor:
    """Importance-weighted estimate of log p(x) per data point ``[N]``:
    log (1/K) sum_k w_k, with memory bounded by ``chunk * batch_size`` draws for any K."""
    check_counts(x, k=k, chunk=chunk, batch_size=batch_size)
    out = []
    with seeded(seed, x.device):
        for xb, yb in batches(x, y, batch_size):
            out.append(iw_bound(all_log_weights(vae, xb, yb, k, chunk)))
    return torch.cat(out)


@torch.no_grad()
def posterior_means(vae: VAE, x, y=None, batch_size: int = 1000) -> torch.Tensor:
    """E_q[z | x] for every data point ``[N, D]`` of ``x [N, X]``, ``batch_size`` points at a
    time (estimated from draws for a flow guide: ``guides.moments``)."""
    return torch.cat([moments(vae.q_z(xb, yb))[0] for xb, yb in batches(x, y, batch_size)])


def active_units(means: torch.Tensor, threshold: float = 0.01) -> tuple[int, torch.Tensor]:
    """Burda et al. (2015): dimension d is active when Cov_x(E_q[z_d | x]) > threshold.
    ``means`` ``[N, D]``; returns (count, per-dimension variances ``[D]``)."""
    var = means.var(0)
    return int((var > threshold).sum()), var


NO_KL_PER_DIMENSION = ("not available: needs a Gaussian guide (not a flow) and a prior that "
                       "factorises over dimensions with a closed-form KL from a Normal "
                       "(normal, laplace; not a mixture, VampPrior or Student-t)")


@torch.no_grad()
def kl_per_dimension(vae: VAE, x, y=None, batch_size: int = 1000) -> torch.Tensor | None:
    """Mean over data of KL(q(z_d | x) || p(z_d)) per dimension ``[D]``, in closed form
    (a Gaussian guide's marginals q(z_d | x) are Normal); None when the prior does not
    factorise over dimensions with a known KL, or the guide is a flow. For a diagonal guide
    the bars sum to the KL; for a full or low-rank one to the KL less q's total correlation
    -1/2 log det(corr of q) >= 0 (KL(q || prod_d q_d)), which no single dimension carries."""
    prior = vae.prior_dist()
    base = getattr(prior, "base_dist", None)
    if base is None:
        return None
    total = torch.zeros(vae.latent_dim, device=x.device)
    try:
        for xb, yb in batches(x, y, batch_size):
            qb = vae.q_z(xb, yb)
            if not is_gaussian(qb):
                return None
            q = torch.distributions.Normal(qb.mean, qb.stddev)  # marginals, batch [B, D]
            total += torch.distributions.kl_divergence(q, base.expand(q.batch_shape)).sum(0)
    except NotImplementedError:
        return None
    return total / x.shape[0]


PSIS_MIN_TAIL = 10  # fewest tail draws a Pareto fit is trusted on (as Pyro's psis_diagnostic)


def psis_tail_size(k: int) -> int:
    """Draws in the Pareto tail of K importance weights: ceil(min(0.2 K, 3 sqrt(K)))
    (Vehtari et al., "Pareto Smoothed Importance Sampling", 2024)."""
    return math.ceil(min(0.2 * k, 3 * math.sqrt(k)))


def psis_khat_unavailable(k: int) -> str | None:
    """Why k-hat cannot be estimated from K draws per point, or None when it can."""
    m = psis_tail_size(k)
    if m >= PSIS_MIN_TAIL:
        return None
    least = next(n for n in range(k, 10 * PSIS_MIN_TAIL**2) if psis_tail_size(n) >= PSIS_MIN_TAIL)
    return (f"not available: K={k} draws leave a tail of {m} < {PSIS_MIN_TAIL} weights for "
            f"the Pareto fit (needs K >= {least})")


def psis_khat_threshold(k: int) -> float:
    """The k-hat above which K draws cannot give a reliable importance-sampling estimate,
    min(1 - 1/log10 K, 0.7) (Vehtari et al. 2024, "Pareto Smoothed Importance Sampling"):
    0.67 at K = 1000, 0.7 from K = 2155 on. Below it the error falls as the draws grow;
    above it, the draws needed for a given accuracy grow faster than K can."""
    if k < 2:
        raise ValueError(f"k = {k}: the k-hat threshold needs K >= 2 draws")
    return min(1 - 1 / math.log10(k), 0.7)


def psis_khat(log_w: torch.Tensor) -> torch.Tensor:
    """PSIS k-hat per data point from log importance weights ``[K, B]`` -> ``[B]``.

    The M = :func:`psis_tail_size` (K) largest weights of each point, in excess of the
    (M+1)-th, are fitted by a generalized Pareto distribution (Zhang & Stephens 2009, Pyro's
    ``fit_generalized_pareto``); k-hat is its shape xi. The weights then have about
    1/xi finite moments: k-hat above :func:`psis_khat_threshold` (K) says q(z|x) is an
    unreliable proposal for that x.
    NaN (not available) where M < ``PSIS_MIN_TAIL`` (see :func:`psis_khat_unavailable`),
    where fewer than ``PSIS_MIN_TAIL`` tail weights exceed the cutoff (ties), where fewer than
    M+1 weights are non-zero, or where a log-weight is NaN or +inf."""
    from pyro.ops.stats import fit_generalized_pareto

    k = log_w.shape[0]
    m = psis_tail_size(k)
    if psis_khat_unavailable(k):
        return log_w.new_full(log_w.shape[1:], float("nan"))
    lw = log_w.detach().double()
    top = lw.topk(m + 1, dim=0).values  # (M+1, B), descending
    # a NaN or +inf log-weight, or fewer than M+1 non-zero weights: no tail to fit
    broken = ((lw.isnan() | lw.isposinf()).any(0) | top[-1].isneginf()).tolist()  # (B,)
    # exceedances over the cutoff, divided by the largest weight (xi is scale-free): exp of
    # numbers <= 0, so nothing overflows at any spread of the log-weights
    excess = ((top[:-1] - top[0]).exp() - (top[-1] - top[0]).exp()).cpu()  # (M, B)

    def fit(tail: torch.Tensor) -> float:
        tail = tail[tail > 0]  # weights tied with the cutoff are not in the tail
        return fit_generalized_pareto(tail)[0] if len(tail) >= PSIS_MIN_TAIL else float("nan")

    return torch.tensor([float("nan") if broken[b] else fit(excess[:, b])
                         for b in range(excess.shape[1])], dtype=log_w.dtype, device=log_w.device)


def _khat_summary(khat: torch.Tensor, k: int) -> dict:
    """The share of the data points where k-hat was fitted whose k-hat exceeds
    ``khat_threshold`` (:func:`psis_khat_threshold` of K), with its count, Wilson interval
    and the mean k-hat; or None and the reason. ``khat_note`` says what is missing."""
    reason = psis_khat_unavailable(k)
    fitted = khat[khat.isfinite()]
    if reason or fitted.numel() == 0:
        reason = reason or "not available: no data point has a tail of distinct weights"
        return {"khat_threshold": None, "khat_share_above_threshold": None,
                "khat_above_threshold": None, "khat_points": None,
                "khat_share_interval_95": None, "khat_mean": None, "khat_note": reason}
    missing, n = khat.numel() - fitted.numel(), fitted.numel()
    note = (f"{missing} of {khat.numel()} points have fewer than {PSIS_MIN_TAIL} distinct "
            "non-zero tail weights, or a NaN or infinite log-weight: k-hat not available "
            "there, share over the rest") if missing else None
    threshold = psis_khat_threshold(k)
    above = int((fitted > threshold).sum())
    return {"khat_threshold": threshold, "khat_share_above_threshold": above / n,
            "khat_above_threshold": above, "khat_points": n,
            "khat_share_interval_95": wilson_interval(above, n), "khat_mean": fitted.mean().item(),
            "khat_note": note}


def wilson_interval(successes: int, n: int, z: float = 1.96) -> list[float]:
    """Wilson's score interval for a proportion from ``successes`` of ``n`` points (95% for
    z = 1.96): the test-set uncertainty of a share, honest at 0 or n successes, where the
    plug-in SE sqrt(p (1 - p) / n) would claim 0.
    centre = (p + z^2 / 2n) / (1 + z^2 / n), half-width = z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n)."""
    p, d = successes / n, 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [max(0.0, centre - half), min(1.0, centre + half)]


def _per_point(vae: VAE, x, y, k: int, batch_size: int, chunk: int) -> dict:
    """Per data point ``[N]`` from K draws of q(z|x): reconstruction, KL, ELBO and its Monte
    Carlo SE sd_k(log w)/sqrt(K), the IW estimate of log p(x) and its SE, PSIS k-hat."""
    out: dict[str, list] = {key: [] for key in ("rec", "rec_se", "kl", "kl_se", "elbo_se", "iw",
                                                "iw_se", "khat")}
    for xb, yb in batches(x, y, batch_size):
        t = all_log_terms(vae, xb, yb, k, chunk)  # each (K, B)
        lw, log_ratio = t.log_w, t.log_q - t.log_prior  # (K, B) each
        iw, iw_se = log_mean_exp(lw)
        for key, draws in (("rec", t.log_lik), ("kl", log_ratio)):
            out[key].append(draws.mean(0))
            out[f"{key}_se"].append(mean_se(draws))
        out["elbo_se"].append(mean_se(lw))
        out["iw"].append(iw)
        out["iw_se"].append(iw_se)
        out["khat"].append(psis_khat(lw))
    return {key: torch.cat(v) for key, v in out.items()}


@torch.no_grad()
def evaluate_model(vae: VAE, x, y=None, k: int = 1000, batch_size: int = 100, chunk: int = 100,
                   seed: int = 0) -> dict:
    """Every evaluation number for data ``x`` ``[N, X]``, from K draws of q(z|x) per point
    (nats per data point unless named). Each estimate is a mean over points with its Monte
    Carlo SE (of the estimator at this K) and its test-set SE (spread over points), named
    apart (:func:`with_errors`): the ELBO with its reconstruction and KL terms, the
    importance-weighted log p(x) (a stochastic lower bound; its SE says nothing of its bias),
    both also in bits per dimension (SEs scaled alike), KL per dimension, active units (None,
    with ``active_units_note``, for one point) and the
    share of points with PSIS k-hat above :func:`psis_khat_threshold` (K), with its count
    and Wilson 95% interval (None, with
    ``khat_note`` saying why, when K is too small for a Pareto fit). With K = 1 no Monte Carlo
    SE exists: each is None with ``mc_se_note`` saying so."""
    check_counts(x, k=k, batch_size=batch_size, chunk=chunk)
    with seeded(seed, x.device):  # a flow guide's posterior means are drawn too
        p = _per_point(vae, x, y, k, batch_size, chunk)
        means = posterior_means(vae, x, y, batch_size)  # (N, D)
    p["elbo"] = p["rec"] - p["kl"]
    one_draw = "n/a: one draw per point (K=1) has no spread" if k == 1 else None
    est = {name: with_errors(p[key], p[f"{key}_se"], one_draw) for name, key in (
        ("elbo", "elbo"), ("reconstruction", "rec"), ("kl", "kl"), ("iw_log_likelihood", "iw"))}
    per_dim = kl_per_dimension(vae, x, y)
    return {
        "n": x.shape[0], "k": k, "seed": seed, **est,
        "elbo_bits_per_dim": in_bits_per_dim(est["elbo"], x.shape[1]),
        "iw_bits_per_dim": in_bits_per_dim(est["iw_log_likelihood"], x.shape[1]),
        **_active_summary(means),
        "latent_dim": vae.latent_dim,
        "kl_per_dimension": None if per_dim is None else per_dim.tolist(),
        "kl_per_dimension_note": None if per_dim is not None else NO_KL_PER_DIMENSION,
        **_khat_summary(p["khat"], k),
    }


def _active_summary(means: torch.Tensor) -> dict:
    """Active units and the variances over points of E_q[z | x] ``[N, D]``, or None with
    ``active_units_note`` saying why for one point (a variance needs two)."""
    if means.shape[0] < 2:
        return {"active_units": None, "posterior_mean_variance": None,
                "active_units_note": "not available: one test point has no spread of E_q[z|x]"}
    count, variances = active_units(means)
    return {"active_units": count, "posterior_mean_variance": variances.tolist(),
            "active_units_note": None}

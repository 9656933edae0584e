"""The VI-versus-MCMC report: markdown tables, comparison.json, netCDF files and figures."""

from __future__ import annotations

import json
from pathlib import Path

from . import arviz_bridge
from .comparison import Comparison
from .guides import is_gaussian, mean_and_covariance, moments


def _mean(values) -> float:
    return float(sum(values) / len(values))


PRINTED = 5e-5  # values are printed to 4 decimals: nearer 0 than this they read 0.0000


def _negative_cause(key: str, exact_log_px: bool) -> str:
    """What a gap (which cannot be negative) more than 2 SE below 0 can come from: chance
    (about 1 cell in 40 at 2 SE) first, then the estimate the gap rests on."""
    if key == "amortization_gap":
        return "chance, or the per-point fit unconverged: more --fit-steps"
    return "chance, or an error: log p(x) is exact" if exact_log_px else \
        "chance, or the log p(x) estimate too low"


def _with_noise(value: float, se: float, is_gap: bool, key: str = "", exact: bool = False) -> str:
    """``value +- se``; a gap (or difference) within 2 SE of zero, or printed as 0, is said
    to be 0 within noise. A gap of the gap table (``key``), which cannot be negative, more
    than 2 SE below zero is flagged with what it can come from (``exact``: its log p(x) is
    exact). An SE of 0 (an exact log p(x)) reads "exact"."""
    if se == 0 and not is_gap:
        return f"{value:.4f} (exact)"
    text = f"{value:.4f} +- {se:.4f}"
    if is_gap and abs(value) < max(2 * se, PRINTED):
        return text + " (0 within noise)"
    if key and is_gap and value < 0:
        return text + f" (below 0 by over 2 SE: {_negative_cause(key, exact)})"
    return text


def _diagnostics_note(n: dict) -> str:
    """NUTS health's ``diagnostics_note`` as a sentence: why R-hat and ESS are missing (None),
    or which chains were stuck."""
    note = n.get("diagnostics_note")
    if not note:
        return ""
    return f" R-hat and bulk ESS {note}." if n["max_rhat"] is None else \
        f" {note[0].upper()}{note[1:]}."


def _mean_and_se(values: list, ses: list) -> tuple[float, float]:
    """Mean over points and its Monte Carlo SE (per-point SEs combined)."""
    return _mean(values), sum(se**2 for se in ses) ** 0.5 / len(ses)


def _gaps_markdown(g: dict) -> list[str]:
    """The gap table: each quantity's mean and per-point values with Monte Carlo SEs."""
    lines = ["", f"Gaps (nats per point; log p(x): {g['log_px_source']}):", "",
             "| quantity | mean +- Monte Carlo SE | per point +- Monte Carlo SE |",
             "| --- | --- | --- |"]
    keys = ("log_px", "inference_gap", "approximation_gap", "approximation_gap_diag",
            "amortization_gap")
    for key in (k for k in keys if k in g):
        values, ses = g[key], g[f"{key}_se"]
        mean, mean_se = _mean_and_se(values, ses)
        gap, exact = key != "log_px", g["log_px_source"] == "exact"
        lines.append(f"| {key} | {_with_noise(mean, mean_se, gap, key, exact)} | "
                     + ", ".join(_with_noise(v, se, gap, key, exact) for v, se in zip(values, ses))
                     + " |")
    return lines


def _checks_markdown(c: dict) -> list[str]:
    """What vouches for an AIS log p(x) (``comparison._ais_checks``), as report lines."""
    if not c:
        return []
    b = c["bdmc"]
    lines = ["", f"Checks of the AIS log p(x) (mean HMC acceptance {c['ais_acceptance']:.2f}):", "",
             f"- BDMC on {b['points']} points simulated from the model, same AIS settings: "
             f"lower {b['lower']['mean']:.3f} +- {b['lower']['mc_se']:.3f}, upper "
             f"{b['upper']['mean']:.3f} +- {b['upper']['mc_se']:.3f}; gap upper - lower "
             f"{_with_noise(b['gap']['mean'], b['gap']['mc_se'], True)} nats (Monte Carlo SE, "
             f"delta method over {b['chains']} chains per point: a lower estimate, as are "
             "AIS's SEs above): how far AIS can sit below log p(x) on data like the model's.",
             "- importance-weighted, " + c["iw_source"] + ": IW - AIS = "
             + _with_noise(*_mean_and_se(c["iw_minus_ais"], c["iw_minus_ais_se"]), True)
             + " (IW is a lower bound too; clearly above zero would mean AIS is too low)."]
    if "quadrature_log_px" in c:
        lines.append("- quadrature on a grid (2-D latent): AIS - quadrature = "
                     + _with_noise(*_mean_and_se(c["ais_minus_quadrature"],
                                                 c["ais_minus_quadrature_se"]), True) + ".")
    return lines


def _elbo_cell(m: dict) -> str:
    """The mean ELBO over points +- its Monte Carlo SE (absent from older comparison.json)."""
    if "elbo_se" not in m:
        return f"{_mean(m['elbo']):.3f}"
    mean, se = _mean_and_se(m["elbo"], m["elbo_se"])
    return f"{mean:.3f} +- {se:.2g}"  # 2 significant digits: a tiny SE is not 0.000


def _with_mcse(m: dict, key: str) -> str:
    """The mean over points of ``m[key]``, with its Monte Carlo SE from NUTS' draws where the
    comparison recorded one (``key_mcse``: per point, combined over points)."""
    if f"{key}_mcse" not in m:  # a Gaussian against the exact std: none; older files: absent
        return f"{_mean(m[key]):.3f}"
    mean, se = _mean_and_se(m[key], m[f"{key}_mcse"])
    return f"{mean:.3f} (MCSE {se:.2g})"


def _nuts_error_cell(r: dict) -> str:
    """NUTS' mean error: its MCSE alone when NUTS is the reference (its error against itself
    is 0 by construction), else its error against the exact posterior beside its MCSE."""
    n = r["nuts"]
    if "mcse_mean_in_ref_std" not in n:
        return f"{_mean(n['mean_error_in_ref_std']):.3f}"
    mcse = _mean(n["mcse_mean_in_ref_std"])
    if r["reference"] == "NUTS":
        return f"MCSE {mcse:.3f} (noise floor)"
    return f"{_mean(n['mean_error_in_ref_std']):.3f} (MCSE {mcse:.3f})"


def _diagnostic(n: dict, key: str, fmt: str) -> str:
    """A NUTS diagnostic, or "n/a" where it could not be estimated (the report says why)."""
    return "n/a" if n[key] is None else format(n[key], fmt)


def _nuts_markdown(r: dict) -> list[str]:
    """The title, the NUTS health gates and what the tables below measure."""
    n = r["nuts"]
    status = "PASSED" if n["passed"] else "FAILED"
    return [
        f"# VI versus MCMC: {r['setting']}",
        "",
        f"**NUTS health gates {status}**: max R-hat {_diagnostic(n, 'max_rhat', '.4f')} "
        f"(<= {n['thresholds']['rhat']}), min bulk ESS {_diagnostic(n, 'min_ess_bulk', '.0f')} "
        f"(>= {n['thresholds']['ess_bulk']:.0f}), "
        f"{n['divergences']} divergences; {n['chains']} chains x {n['draws']} draws "
        f"({n['warmup']} warm-up), jit={n['jit']}, min bulk ESS/s "
        f"{_diagnostic(n, 'min_ess_bulk_per_second', '.0f')}."
        + _diagnostics_note(n),
        "",
        f"{r['points']} data points, latent dimension {r['latent_dim']}, amortized guide "
        f"{r.get('guide', 'gaussian')!r}, reference: {r['reference']}"
        + (f", per-point Gaussians fitted in {r['fit_steps']} SVI steps" if "fit_steps" in r else "")
        + ". Means over points; errors in units of the reference posterior std; ELBO +- its "
        f"Monte Carlo SE ({r.get('elbo_draws', 2000):,} draws per point); MCSE: the Monte "
        "Carlo SE that NUTS' finite draws leave in a column.",
    ]


def _methods_markdown(r: dict) -> list[str]:
    """The accuracy and cost table: one row per approximation, then NUTS."""
    n, exact = r["nuts"], "kl_to_exact" in r["methods"]["amortized"]
    lines = [
        "",
        "| approximation | mean error | std ratio | energy dist. to NUTS | 90% coverage of NUTS |"
        + (" KL to exact |" if exact else "") + " ELBO | s / point | cost vs NUTS |",
        "| --- | --- | --- | --- | --- |" + (" --- |" if exact else "") + " --- | --- | --- |",
    ]
    for name, m in r["methods"].items():
        kl = f" {_mean(m['kl_to_exact']):.4f} |" if "kl_to_exact" in m else ""
        lines.append(
            f"| {name} | {_mean(m['mean_error_in_ref_std']):.3f} | {_with_mcse(m, 'std_ratio')} | "
            f"{_mean(m['energy_distance_to_nuts']):.4f} | {_with_mcse(m, 'coverage_90')} |{kl} "
            f"{_elbo_cell(m)} | {m['seconds_per_point']:.2e} | "
            f"{m['seconds_per_point'] / n['seconds_per_point']:.1e}x |")
    lines.append(
        f"| NUTS | {_nuts_error_cell(r)} | {_with_mcse(n, 'std_ratio')} | "
        f"{_mean(n['energy_distance_chain_vs_chain']):.4f} (chain vs chain: noise floor) | - |"
        + (" - |" if exact else "") + f" - | {n['seconds_per_point']:.2e} | 1x |")
    return lines


def report_markdown(r: dict) -> str:
    """The report: NUTS gates first, then accuracy, gaps and cost tables."""
    g = r["gaps"]
    lines = _nuts_markdown(r) + _methods_markdown(r) + _gaps_markdown(g)
    lines += _checks_markdown(r.get("log_px_checks") or {})
    fit = g.get("amortization_fit")
    amortization = (f"amortization_gap = ELBO(per-point fit of the guide's own family: {fit}) - "
                    "ELBO(amortized guide)" if fit else
                    f"amortization_gap: {g.get('amortization_note') or 'not split'}")
    lines += ["", "inference_gap = log p(x) - ELBO(amortized guide); approximation_gap = "
              "log p(x) - ELBO(best per-point Gaussian: "
              f"{g.get('approximation_fit', 'gaussian-full')}); approximation_gap_diag uses the "
              f"diagonal one; {amortization}. Gaps cannot be negative: one within 2 Monte Carlo "
              "SE of zero reads \"0 within noise\", one further below zero is flagged (by chance about "
              "1 cell in 40)."]
    return "\n".join(lines) + "\n"


def write_comparison(r: Comparison, out: str | Path, dims: int = 3) -> list[Path]:
    """Write report.md, comparison.json, netCDF ArviZ data per approximation (NUTS with its
    divergences) and the figures of :func:`write_comparison_figures` to ``out``; returns
    the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.md", out / "comparison.json"]
    written[0].write_text(report_markdown(r.summary))
    written[1].write_text(json.dumps(r.summary, indent=1, allow_nan=False))  # strict JSON
    written.append(arviz_bridge.save(r.nuts.idata, out / "nuts.nc"))
    s = r.nuts.samples.shape[1]
    for name, q in r.q.items():
        draws_q = q.sample((s,)).unsqueeze(0)  # (1, S, N, D)
        written.append(arviz_bridge.save(arviz_bridge.from_draws(draws_q), out / f"{name}.nc"))
    return written + write_comparison_figures(r, out, dims)


def _marginals(q):
    """Point 0's marginals under q, as :func:`inspection.marginal_overlay` takes them (one
    dim at a time): (mean ``[D]``, std ``[D]``) of a Gaussian, else 4,000 of q's draws
    ``[S, D]`` (a flow's own shape)."""
    if is_gaussian(q):
        mean, std = moments(q)
        return mean[0], std[0]
    return q.sample((4000,))[:, 0]


def write_comparison_figures(r: Comparison, out: Path, dims: int = 3) -> list[Path]:
    """For point 0: marginal overlays of the first ``dims`` latent dims, the pair plot of
    Gaussian ellipses over NUTS draws (D >= 2) and ArviZ's NUTS trace plot."""
    import matplotlib.pyplot as plt

    from .inspection import marginal_overlay, pair_overlay, save_figure

    draws = r.nuts.samples.flatten(0, 1)[:, 0]  # (C*S, D) of point 0
    gauss = dict(r.q) if r.exact is None else {**r.q, "exact": r.exact}
    k = min(dims, draws.shape[1])
    fig, axes = plt.subplots(1, k, figsize=(4 * k, 3), squeeze=False)
    marginals = {name: _marginals(q) for name, q in gauss.items()}
    for dim in range(k):
        marg = {name: (m[0][dim].item(), m[1][dim].item()) if isinstance(m, tuple) else m[:, dim]
                for name, m in marginals.items()}
        marginal_overlay(draws[:, dim], marg, ax=axes[0, dim], title=f"point 0, z[{dim}]")
    fig.tight_layout()
    written = [save_figure(fig, out / "marginals.png")]
    if draws.shape[1] >= 2:  # a flow's ellipse is that of its moments, and says so
        pairs = {name if is_gaussian(q) else f"{name} (moments)":
                 [m[0].cpu().numpy() for m in mean_and_covariance(q)] for name, q in gauss.items()}
        ax = pair_overlay(draws[:, :2], pairs, title="point 0: each approximation's ellipses "
                          "over NUTS draws")
        written.append(save_figure(ax.figure, out / "pair.png"))
    written.append(save_figure(arviz_bridge.plot_trace(r.nuts.idata, point=0), out / "trace.png"))
    return written

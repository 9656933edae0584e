"""The one module that talks to ArviZ: draws in, ArviZ data, diagnostics, netCDF and plots out.

ArviZ changed under us at 1.0. ArviZ 1.x (arviz-base, arviz-stats, arviz-plots; what pip
resolves on Python >= 3.12) holds draws in an xarray ``DataTree``; ArviZ 0.x (what installs on
Python 3.11) in an ``InferenceData``. Both are called "ArviZ data" here, and both carry the
same groups, names and dims, so a netCDF file written under one major version loads under
the other::

    posterior/z              (chain, draw, point, latent)   draws z ~ p(z|x) or q(z|x)
    sample_stats/diverging   (chain, draw)                  NUTS only

Files are written with the h5netcdf engine (a dependency: ArviZ 1.x no longer installs one).
Everything else in pyro_vae goes through these functions; ``import arviz`` happens only here,
inside the functions, so ``import pyro_vae`` stays light.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

DIMS = {"z": ["point", "latent"]}  # the latent draws' dims after (chain, draw)
ENGINE = "h5netcdf"


def _arviz():
    import warnings

    with warnings.catch_warnings():  # ArviZ 0.x's notice, once a day per home directory
        warnings.filterwarnings("ignore", message=r"\s*ArviZ is undergoing a major refactor",
                                category=FutureWarning)  # the message starts with a newline
        import arviz

    return arviz


def major_version() -> int:
    """ArviZ's major version (0 or 1): the one switch this module branches on."""
    return int(_arviz().__version__.split(".")[0])


def from_draws(z: torch.Tensor, diverging: torch.Tensor | None = None):
    """ArviZ data from draws ``z [C, S, N, D]`` (chains, draws per chain, data points,
    latent dims) and, for MCMC, divergence flags ``diverging [C, S]`` (bool)."""
    groups = {"posterior": {"z": z.detach().cpu().numpy()}}
    if diverging is not None:
        groups["sample_stats"] = {"diverging": diverging.detach().cpu().numpy().astype(bool)}
    if major_version() >= 1:
        return _arviz().from_dict(groups, dims=DIMS)
    return _arviz().from_dict(**groups, dims=DIMS)


def group(data, name: str = "posterior"):
    """One group of ArviZ data as an ``xarray.Dataset`` (both major versions)."""
    node = data[name]
    return node.to_dataset() if major_version() >= 1 else node


def draws(data, var: str = "z") -> np.ndarray:
    """The posterior draws of ``var`` as an array ``[C, S, ...]``."""
    return np.asarray(group(data)[var].values)


def rhat(data, var: str = "z") -> np.ndarray:
    """Rank-normalised split R-hat of ``var`` per element, ``[N, D]`` for z. R-hat compares
    chains: data of one chain (a guide's draws) is refused by name. NaN where a chain never
    moved (no within-chain variance: not estimable)."""
    chains = group(data)[var].sizes["chain"]
    if chains < 2:
        raise ValueError(f"R-hat of {var!r}: the data has {chains} chain; allowed: 2 or more "
                         "chains (R-hat compares them; independent draws need none)")
    with np.errstate(invalid="ignore", divide="ignore"):  # a stuck chain: NaN, said by callers
        return np.asarray(_arviz().rhat(group(data))[var].values)


def ess_bulk(data, var: str = "z") -> np.ndarray:
    """Bulk effective sample size of ``var`` per element, ``[N, D]`` for z (NaN where a chain
    never moved)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(_arviz().ess(group(data), method="bulk")[var].values)


def mcse_mean(data, var: str = "z") -> np.ndarray:
    """Monte Carlo standard error of the posterior mean of ``var``, ``[N, D]`` for z."""
    return np.asarray(_arviz().mcse(group(data), method="mean")[var].values)


def mcse_sd(data, var: str = "z") -> np.ndarray:
    """Monte Carlo standard error of the posterior standard deviation of ``var``, ``[N, D]``."""
    return np.asarray(_arviz().mcse(group(data), method="sd")[var].values)


TRACE_DIMS = 10  # plot_trace shows this many latent dims at most: matplotlib's 10 colours
HDI_PROB = 0.94  # the interval of summary and plot_forest, under both major versions
SUMMARY_COLUMNS = ("mean", "sd", "hdi_3%", "hdi_97%", "mcse_mean", "mcse_sd", "ess_bulk",
                   "ess_tail", "r_hat")


def summary(data, kind: str = "all"):
    """ArviZ's summary table, a pandas DataFrame with one row per element of z
    (``"z[0, 1]"``: point 0, latent 1), unrounded, with the same columns under both major
    versions: ``mean sd hdi_3% hdi_97%`` (``kind="stats"``; the 94% highest-density
    interval), ``mcse_mean mcse_sd ess_bulk ess_tail r_hat`` (``"diagnostics"``), or all.
    ``r_hat`` is NaN for one chain (see :func:`rhat`); ``ess_tail`` differs slightly
    between the versions (another estimator)."""
    az = _arviz()
    with np.errstate(invalid="ignore", divide="ignore"):  # a stuck chain: NaN, as in rhat
        table = _summary(az, data, kind)
    return table[[c for c in SUMMARY_COLUMNS if c in table.columns]]


def _summary(az, data, kind: str):
    """ArviZ's own summary with the 94% HDI, renamed to 0.x's column names under 1.x."""
    if major_version() >= 1:
        table = az.summary(data, kind=kind, ci_kind="hdi", ci_prob=HDI_PROB, round_to="none")
        percent = round(HDI_PROB * 100)
        return table.rename(columns={f"hdi{percent}_lb": "hdi_3%", f"hdi{percent}_ub": "hdi_97%"})
    return az.summary(data, kind=kind, hdi_prob=HDI_PROB, round_to="none")


def save(data, path: str | Path) -> Path:
    """Write ArviZ data to netCDF (one HDF5 group per ArviZ group)."""
    data.to_netcdf(str(path), engine=ENGINE)
    return Path(path)


def load(path: str | Path):
    """Read a netCDF file written by :func:`save` under either ArviZ major version."""
    return _arviz().from_netcdf(str(path), engine=ENGINE)


def plot_trace(data, var: str = "z", point: int = 0):
    """ArviZ's trace plot of ``var`` at data point ``point``: kernel density estimates of the
    marginals (left) and the draws (right) of the first ``TRACE_DIMS`` latent dims (the
    title says when there are more), one colour per dim, one line style per chain, with
    legends for both; returns the matplotlib Figure."""
    sizes = group(data)[var].sizes
    total, chains = sizes[DIMS[var][-1]], sizes["chain"]
    shown = min(total, TRACE_DIMS)
    az, coords = _arviz(), {"point": [point], DIMS[var][-1]: list(range(shown))}
    size = (11, max(3, 1.0 + 0.2 * (shown + chains + 4)))  # inches: both legends fit beside
    if major_version() >= 1:
        pc = az.plot_trace_dist(data, var_names=[var], coords=coords, kind="kde",
                                backend="matplotlib", figure_kwargs={"figsize": size})
        pc.add_legend(["point", "latent", "__variable__"],  # colour: all but chain and draw
                      title="point, latent", fontsize=8)
        pc.add_legend("chain", fontsize=8)  # line style, below the colours
        fig = pc.viz["figure"].item()
    else:
        axes = np.asarray(az.plot_trace(data, var_names=[var], coords=coords, compact=True,
                                        legend=True, figsize=size)).ravel()
        fig = axes[0].figure
        for ax, where in zip(axes, ("upper", "lower")):  # each panel's legend, moved beside
            ax.set_title("")  # the variable's name, which the figure's title gives
            inside = ax.get_legend()
            fig.legend(inside.legend_handles, [t.get_text() for t in inside.texts], fontsize=8,
                       title=inside.get_title().get_text(), loc=f"outside right {where}")
            inside.remove()
    which = f", latent dims 0-{shown - 1} of {total}" if shown < total else ""
    fig.suptitle(f"{var} at point {point}{which}: colour per latent dim, line style per chain")
    return fig


def plot_forest(named: dict, var: str = "z", point: int = 0):
    """ArviZ's forest plot of ``var`` at data point ``point`` for several ArviZ data side by
    side (``{"NUTS": data, "guide": data}``), with a legend naming them: per latent dim the
    median and the 94% HDI (thin line); returns the matplotlib Figure. Give every entry the
    same number of chains (chains are combined)."""
    az, coords = _arviz(), {"point": [point]}
    if major_version() >= 1:
        pc = az.plot_forest(named, var_names=[var], coords=coords, combined=True,
                            point_estimate="median", ci_kind="hdi", ci_probs=(0.5, HDI_PROB),
                            backend="matplotlib")
        pc.add_legend("model")
        fig, thick = pc.viz["figure"].item(), "50% HDI"
    else:
        axes = az.plot_forest(list(named.values()), model_names=list(named), var_names=[var],
                              coords=coords, combined=True, hdi_prob=HDI_PROB, quartiles=True)
        fig, thick = np.asarray(axes).ravel()[0].figure, "interquartile range"
    fig.suptitle(f"{var} at point {point}: median, {round(HDI_PROB * 100)}% HDI (thin), "
                 f"{thick} (thick)")
    return fig

"""The ArviZ boundary: the same names, dims, diagnostics and files under ArviZ 0.x and 1.x."""

import os
import subprocess
import sys
from pathlib import Path

import matplotlib.figure
import pytest
import torch

from pyro_vae import arviz_bridge

DATA = Path(__file__).parent / "data"


def fixture_draws():
    """The draws and divergences stored in tests/data/draws_arviz{0,1}.nc. Those files were
    written by ``arviz_bridge.save(arviz_bridge.from_draws(z, diverging), path)`` under
    ArviZ 0.23 (Python 3.11) and ArviZ 1.3 (Python 3.13)."""
    z = torch.arange(2 * 5 * 2 * 3, dtype=torch.float64).reshape(2, 5, 2, 3).sin()  # (C, S, N, D)
    diverging = torch.zeros(2, 5, dtype=torch.bool)
    diverging[1, 3] = True
    return z, diverging


def test_importing_arviz_through_the_bridge_shows_no_refactor_notice(tmp_path):
    # ArviZ 0.x prints it once a day per home directory: a fresh one always sees it
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    code = "from pyro_vae import arviz_bridge; arviz_bridge.major_version()"
    proc = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", code], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "refactor" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("written_by", [0, 1])
def test_a_file_written_under_either_major_version_loads_with_the_same_names(written_by):
    z, diverging = fixture_draws()
    data = arviz_bridge.load(DATA / f"draws_arviz{written_by}.nc")
    post = arviz_bridge.group(data)
    assert post["z"].dims == ("chain", "draw", "point", "latent")
    assert torch.equal(torch.as_tensor(arviz_bridge.draws(data)), z)
    flags = arviz_bridge.group(data, "sample_stats")["diverging"]
    assert flags.dims == ("chain", "draw")
    assert torch.equal(torch.as_tensor(flags.values), diverging)


def test_save_then_load_round_trips_under_the_installed_version(tmp_path):
    z, diverging = fixture_draws()
    path = arviz_bridge.save(arviz_bridge.from_draws(z, diverging), tmp_path / "d.nc")
    back = arviz_bridge.load(path)
    assert torch.equal(torch.as_tensor(arviz_bridge.draws(back)), z)
    assert int(arviz_bridge.group(back, "sample_stats")["diverging"].sum()) == 1


def test_rhat_ess_and_mcse_tell_mixed_chains_from_stuck_ones():
    torch.manual_seed(0)
    mixed = torch.randn(4, 1000, 2, 3)  # iid N(0, 1): every chain the same target
    stuck = mixed + torch.arange(4.0).view(4, 1, 1, 1)  # chains at different means
    good, bad = arviz_bridge.from_draws(mixed), arviz_bridge.from_draws(stuck)
    assert arviz_bridge.rhat(good).shape == (2, 3)
    assert (arviz_bridge.rhat(good) < 1.01).all() and (arviz_bridge.rhat(bad) > 1.5).all()
    ess = arviz_bridge.ess_bulk(good)
    assert ((ess > 3000) & (ess < 5000)).all()  # iid draws: ESS about the 4000 draws
    mcse = arviz_bridge.mcse_mean(good)  # sd / sqrt(4000) = 0.0158
    assert ((mcse > 0.013) & (mcse < 0.019)).all()
    assert len(arviz_bridge.summary(good, kind="stats")) == 2 * 3
    with pytest.raises(ValueError, match="the data has 1 chain; allowed: 2 or more chains"):
        arviz_bridge.rhat(arviz_bridge.from_draws(mixed[:1]))


def test_summary_has_the_same_unrounded_columns_and_94_percent_hdi_under_both_versions():
    torch.manual_seed(0)
    z = torch.randn(2, 2000, 2, 3, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5])
    table = arviz_bridge.summary(arviz_bridge.from_draws(z))
    assert tuple(table.columns) == arviz_bridge.SUMMARY_COLUMNS
    assert list(table.index[:2]) == ["z[0, 0]", "z[0, 1]"]
    flat = z.flatten(0, 1).reshape(4000, 6)  # rows in the table's order: point, then latent
    assert torch.allclose(torch.from_numpy(table["mean"].to_numpy().copy()), flat.mean(0))  # unrounded
    lo, hi = (torch.from_numpy(table[c].to_numpy().copy()) for c in ("hdi_3%", "hdi_97%"))
    inside = ((flat >= lo) & (flat <= hi)).double().mean(0)
    assert torch.allclose(inside, torch.full_like(inside, 0.94), atol=0.002)  # a 94% interval
    assert ((hi - lo) / (2 * 1.881 * torch.tensor([1.0, 2.0, 0.5]).repeat(2)) - 1).abs().max() < 0.1
    assert tuple(arviz_bridge.summary(arviz_bridge.from_draws(z), kind="stats").columns) == \
        arviz_bridge.SUMMARY_COLUMNS[:4]


def test_plots_return_a_figure_for_the_requested_point():
    torch.manual_seed(0)
    nuts = arviz_bridge.from_draws(torch.randn(2, 50, 3, 2))
    guide = arviz_bridge.from_draws(torch.randn(2, 50, 3, 2) + 1)
    trace = arviz_bridge.plot_trace(nuts, point=1)
    forest = arviz_bridge.plot_forest({"NUTS": nuts, "guide": guide}, point=0)
    for fig in (trace, forest):
        assert isinstance(fig, matplotlib.figure.Figure) and fig.axes
    # the trace plot shows one line per chain and latent dim of point 1, no other point
    lines = [line for ax in trace.axes for line in ax.get_lines() if len(line.get_xdata()) == 50]
    assert len(lines) == 2 * 2
    assert trace._suptitle.get_text() == "z at point 1: colour per latent dim, line style per chain"
    assert forest._suptitle.get_text().startswith("z at point 0: median, 94% HDI (thin), ")
    for fig, names in ((trace, {"0", "1"}), (forest, {"NUTS", "guide"})):  # chains; models
        legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
        assert any(names <= {t.get_text() for t in lg.get_texts()} for lg in legends), fig


def test_the_trace_plot_shows_at_most_ten_latent_dims_with_legends_beside_the_panels():
    torch.manual_seed(0)
    fig = arviz_bridge.plot_trace(arviz_bridge.from_draws(torch.randn(4, 30, 2, 12)), point=0)
    lines = [line for ax in fig.axes for line in ax.get_lines() if len(line.get_xdata()) == 30]
    assert len(lines) == 4 * arviz_bridge.TRACE_DIMS  # chains x the first ten dims
    assert fig._suptitle.get_text().startswith("z at point 0, latent dims 0-9 of 12: ")
    fig.canvas.draw()
    legends = [lg.get_window_extent() for lg in fig.legends]
    assert len(legends) == 2 and not any(ax.get_legend() for ax in fig.axes)
    panels = [ax.get_window_extent() for ax in fig.axes if ax.get_visible() and ax.has_data()]
    assert not any(lg.overlaps(p) for lg in legends for p in panels)  # nothing hidden
    assert not legends[0].overlaps(legends[1])
    width, height = fig.canvas.get_width_height()
    assert all(lg.x1 <= width and lg.y0 >= 0 for lg in legends)  # inside the figure

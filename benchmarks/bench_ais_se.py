"""Is AIS's Monte Carlo SE honest? Repeated AIS runs against a quadrature log p(x).

    python benchmarks/bench_ais_se.py [--points 20] [--repeats 20] [--chains 4 16 64]
                                      [--steps 200]

Trains the ring VAE of ``pyro-vae compare --setting ring`` (2-D latent, so quadrature gives
log p(x) to about 1e-6 nats), then runs AIS from the guide ``--repeats`` times with
independent seeds on the same ``--points`` test points, for each chain count C. Per point
and C it compares

    spread   the standard deviation of the estimate over the repeats (what its Monte Carlo
             SE should be),
    SE       the delta-method SE AIS reports (``ais.ais`` -> ``evaluate.log_mean_exp``),
             averaged over the repeats,
    bias     mean over repeats of (AIS - quadrature): AIS's log mean exp is a stochastic
             lower bound, so this is <= 0 up to noise,

and prints, over points, the median of spread / SE (1 is honest, above 1 the reported SE is
too small), the share of runs whose reported interval +- 2 SE contains the quadrature value
(0.95 if the SE were honest and the bias nil), and the mean bias in nats.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def runs(setting, chains: int, repeats: int, steps: int):
    """(estimates [R, N], reported SEs [R, N]) of ``repeats`` AIS runs with seeds 0..R-1."""
    from pyro_vae.ais import ais
    from pyro_vae.evaluate import seeded

    est, se = [], []
    for seed in range(repeats):
        with seeded(seed, setting.x.device):
            r = ais(setting.vae, setting.x, steps=steps, chains=chains)
        est.append(r.log_px)
        se.append(r.mc_se)
    return torch.stack(est), torch.stack(se)


def row(chains: int, est: torch.Tensor, se: torch.Tensor, exact: torch.Tensor) -> str:
    """One line of the table for C chains: estimates and SEs [R, N], quadrature [N]."""
    spread = est.std(0)  # (N,) over repeats
    ratio = statistics.median((spread / se.mean(0)).tolist())
    covered = ((est - exact).abs() <= 2 * se).float().mean().item()
    bias = (est - exact).mean().item()
    return f"{chains:7d} | {ratio:20.2f} | {covered:23.2f} | {bias:+9.4f}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--points", type=int, default=20)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--chains", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args()

    from pyro_vae.evaluate import quadrature_log_px
    from pyro_vae.settings import toy_setting

    torch.set_num_threads(2)
    setting = toy_setting("ring", points=args.points)
    with torch.no_grad():
        exact = quadrature_log_px(setting.vae, setting.x)  # (N,)
    print(f"ring VAE, {args.points} test points, AIS from the guide, {args.steps} steps, "
          f"{args.repeats} repeats per chain count; torch {torch.__version__}")
    print(" chains | spread / SE (median) | interval +- 2 SE covers | mean bias")
    for chains in args.chains:
        t0 = time.perf_counter()
        est, se = runs(setting, chains, args.repeats, args.steps)
        print(row(chains, est, se, exact), f"  ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()

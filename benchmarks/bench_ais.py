"""AIS cost: seconds per test point and peak memory as the number of points grows, and
what the pilot chains that set the step sizes add.

    python benchmarks/bench_ais.py [--run RUN] [--n 25 100] [--steps 1000] [--chains 16]
                                   [--device cpu|cuda]

Trains the default VAE first when no --run is given (about 30 s on 2 CPU cores). Each N
runs in its own process, so its peak resident memory (and peak CUDA memory on a GPU) is its
own: with points processed ``--batch-size`` at a time, the peak must not grow with N. Last,
on one batch, side by side: AIS with its pilot chains against the same AIS given the step
sizes those set (no pilot chains), and the ratio of their seconds.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def one(run: str, n: int, steps: int, chains: int, device: str, batch_size: int) -> dict:
    """AIS on the first n test points of ``run`` in this process; returns its numbers."""
    import torch

    from pyro_vae.ais import evaluate_ais
    from pyro_vae.runs import load_run

    r = load_run(run, device=device)
    x = r.dataset.x_test[:n]
    out = evaluate_ais(r.vae, x, steps=steps, chains=chains, batch_size=batch_size)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available() and device != "cpu":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def pilot_overhead(run: str, steps: int, chains: int, device: str, batch_size: int) -> str:
    """One markdown line: seconds of AIS on the first ``batch_size`` test points with its
    pilot chains, and given the step sizes they set (no pilot), alternated over 2 rounds
    after a short warm-up (the mean of each), with their ratio."""
    import statistics
    import time

    import torch

    from pyro_vae.ais import PILOT_CHAINS, ais
    from pyro_vae.runs import load_run

    r = load_run(run, device=device)
    x = r.dataset.x_test[:batch_size]
    ais(r.vae, x, steps=10, chains=chains)  # warm-up
    times, sizes = {"pilot": [], "given": []}, None
    for _ in range(2):
        for kind in times:  # the pilot's run first: the given run reuses its step sizes
            t0 = time.perf_counter()
            sizes = ais(r.vae, x, steps=steps, chains=chains,
                        step_sizes=None if kind == "pilot" else sizes).step_sizes
            if device != "cpu":
                torch.cuda.synchronize()
            times[kind].append(time.perf_counter() - t0)
    with_pilot, given = (statistics.mean(times[k]) for k in ("pilot", "given"))
    return (f"{steps} steps x {chains} chains on {batch_size} points ({device}): with "
            f"{PILOT_CHAINS} pilot chains {with_pilot:.3f} s, given the step sizes "
            f"{given:.3f} s: the pilot adds {with_pilot / given - 1:.2f}x")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--run")
    p.add_argument("--n", type=int, nargs="+", default=[25, 100])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--chains", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=25)
    p.add_argument("--device", default="cpu")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.run, args.n[0], args.steps, args.chains, args.device,
                             args.batch_size)))
        return
    run = args.run
    if run is None:
        from pyro_vae import load_config, train

        run = str(Path(tempfile.mkdtemp()) / "default")
        train(load_config(None, []), run)
    print(f"| N points | steps x chains | s / point | peak RSS (MiB) | peak GPU MiB "
          f"| log p(x) (Monte Carlo SE) | acceptance |  ({args.device}, batch {args.batch_size})")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n in args.n:
        cmd = [sys.executable, __file__, "--one", "--run", run, "--n", str(n), "--steps",
               str(args.steps), "--chains", str(args.chains), "--device", args.device,
               "--batch-size", str(args.batch_size)]
        r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        lp = r["log_px"]
        gpu = f"{r['peak_cuda_mib']:.0f}" if "peak_cuda_mib" in r else "n/a: not on a GPU"
        print(f"| {n} | {args.steps} x {args.chains} | {r['seconds_per_point']:.2f} | "
              f"{r['peak_rss_mib']:.0f} | {gpu} | {lp['mean']:.2f} ({lp['mc_se']:.3f}) | "
              f"{r['acceptance']:.2f} |", flush=True)
    print(pilot_overhead(run, args.steps, args.chains, args.device, args.batch_size))


if __name__ == "__main__":
    main()

"""Side-by-side priors on mnist-10k: same network, likelihood, epochs and seed.

    python benchmarks/compare_priors.py [--epochs 40] [--k 1000]

Prints a markdown table: test ELBO and the importance-weighted estimate of log p(x)
(K draws per image), nats per image on the 1,000 test images, and training seconds.
"""

import argparse
import time

from pyro_vae.config import load_config
from pyro_vae.evaluate import iw_log_likelihood
from pyro_vae.training import train


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--k", type=int, default=1000)
    p.add_argument("--priors", nargs="+", default=["normal", "laplace", "mixture", "vamp"])
    args = p.parse_args()
    print(f"| prior | test ELBO | test log p(x) (IW, K={args.k}) | train s |")
    print("| --- | --- | --- | --- |")
    for prior in args.priors:
        cfg = load_config(f"mnist_{'bernoulli' if prior == 'normal' else prior + '_prior'}",
                          [f"train.epochs={args.epochs}"])
        t0 = time.perf_counter()
        result = train(cfg)
        seconds = time.perf_counter() - t0
        ds = result.dataset
        ll = iw_log_likelihood(result.vae, ds.x_test, k=args.k).mean().item()
        print(f"| {prior} | {result.metrics[-1]['test_elbo']:.2f} | {ll:.2f} | {seconds:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()

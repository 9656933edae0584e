"""Training speed of pyro_vae against the plain-PyTorch floor, side by side in one process.

    python benchmarks/bench_train.py [--epochs 2] [--rounds 3] [--device cpu|cuda]

(a) the floor: the same VAE module (same init, same data order) trained by a hand-written
    loss, BCE(x, dec(z)) + closed-form Gaussian KL, and torch Adam (default update; the
    ``floor-fused`` row is the same loop with the fused Adam update pyro_vae uses);
(b) pyro_vae's training loop for each ``train.elbo``.
Both networks: 784-400-50 softplus (Pyro's example) and 784-200-200-50 tanh (Burda et al.).
Rounds run in rotated order; the table gives the median seconds per epoch, the ratio to (a)
in the same round (median and min-max over rounds) and the test ELBO after the same epochs.
"""

import argparse
import math
import statistics
import time

import pyro
import torch
from torch.nn import functional as F

from pyro_vae.config import load_config
from pyro_vae.data import epoch_inputs
from pyro_vae.evaluate import elbo
from pyro_vae.train import build, epoch_generator, resolve_device, train

NETWORKS = {"784-400-50 softplus": ["model.hidden=[400]", "model.activation=softplus"],
            "784-200-200-50 tanh": ["model.hidden=[200,200]", "model.activation=tanh"]}
VARIANTS = ["floor", "floor-fused", "trace", "meanfield", "jit"]


def plain_pytorch(cfg, fused=False):
    """The floor: returns (seconds per epoch list, test ELBO). ``fused``: the same loop
    with the fused Adam update that pyro_vae's trainer uses where torch supports it."""
    device = resolve_device(cfg.train.device)
    pyro.set_rng_seed(cfg.train.seed)
    ds, vae = build(cfg, device)
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.train.lr, fused=fused)
    n, bs = ds.x_train.shape[0], cfg.train.batch_size
    seconds = []
    for epoch in range(cfg.train.epochs):
        g = epoch_generator(cfg.train.seed, epoch, device)
        x_epoch = epoch_inputs(ds, g)
        perm = torch.randperm(n, generator=g, device=device)
        t0 = time.perf_counter()
        for i in range(math.ceil(n / bs)):
            x = x_epoch[perm[i * bs:(i + 1) * bs]]
            loc, scale = vae.encoder(x)
            z = loc + scale * torch.randn_like(loc)
            logits = vae.decoder(z)
            rec = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
            kl = 0.5 * (loc**2 + scale**2 - 1 - 2 * scale.log()).sum()
            loss = rec + kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss.item()  # the same one sync per step that pyro_vae's NaN guard costs
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    return seconds, elbo(vae, ds.x_test, seed=cfg.train.seed)


def pyro_vae(cfg):
    result = train(cfg)
    return [m["seconds"] for m in result.metrics], result.metrics[-1]["test_elbo"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args()
    rows = {}
    for net, net_args in NETWORKS.items():
        times = {v: [] for v in VARIANTS}
        ratios = {v: [] for v in VARIANTS}
        elbos = {}
        for r in range(args.rounds):
            order = VARIANTS[r % len(VARIANTS):] + VARIANTS[: r % len(VARIANTS)]
            per_round = {}
            for v in order:
                cfg = load_config(None, [*net_args, f"train.epochs={args.epochs}",
                                         f"train.batch_size={args.batch_size}",
                                         f"train.device={args.device}",
                                         f"train.elbo={'trace' if v.startswith('floor') else v}"])
                if v.startswith("floor"):
                    secs, test_elbo = plain_pytorch(cfg, fused=v == "floor-fused")
                else:
                    secs, test_elbo = pyro_vae(cfg)
                per_round[v] = statistics.median(secs[1:] if len(secs) > 1 else secs)  # skip warm-up
                elbos[v] = test_elbo
            for v in VARIANTS:
                times[v].append(per_round[v])
                ratios[v].append(per_round[v] / per_round["floor"])
        rows[net] = (times, ratios, elbos)
    print(f"device: {args.device}, batch {args.batch_size}, {args.epochs} epochs, "
          f"{args.rounds} rounds, torch threads {torch.get_num_threads()}\n")
    print("| network | variant | s / epoch (median) | ratio to floor (median, min-max) | test ELBO |")
    print("| --- | --- | --- | --- | --- |")
    for net, (times, ratios, elbos) in rows.items():
        for v in VARIANTS:
            r = ratios[v]
            print(f"| {net} | {v} | {statistics.median(times[v]):.3f} | "
                  f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f}) | {elbos[v]:.2f} |")


if __name__ == "__main__":
    main()

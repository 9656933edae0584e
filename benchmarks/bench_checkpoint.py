"""Soak: a long training run that checkpoints every epoch; checkpoint cost as a share of it.

    python benchmarks/bench_checkpoint.py [--epochs 30] [--runs-dir /tmp/pyro_vae_soak]

Trains the default model with ``train.checkpoint_every = 1`` into a run directory, timing
each atomic checkpoint write (temporary file, fsync, rename) against the epoch's training
time, then reloads the final checkpoint to show it is intact. Target: writes under 5%.
"""

import argparse
import shutil
import statistics
import time
from pathlib import Path

from pyro_vae import checkpoint as ckpt_io
from pyro_vae.config import load_config
from pyro_vae.training import train


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--runs-dir", default="/tmp/pyro_vae_soak")
    args = p.parse_args()
    run_dir = Path(args.runs_dir) / "soak"
    shutil.rmtree(run_dir, ignore_errors=True)
    writes = []
    original = ckpt_io.save_checkpoint

    def timed_save(path, payload):
        t0 = time.perf_counter()
        original(path, payload)
        writes.append(time.perf_counter() - t0)

    ckpt_io.save_checkpoint = timed_save  # the trainer calls ckpt_io.save_checkpoint: timed
    cfg = load_config(None, [f"train.epochs={args.epochs}", "train.checkpoint_every=1"])
    result = train(cfg, run_dir)
    epochs = [m["seconds"] for m in result.metrics]
    size = (run_dir / "checkpoint.pt").stat().st_size / 2**20
    ckpt = ckpt_io.load_checkpoint(run_dir / "checkpoint.pt")
    share = [w / e for w, e in zip(writes, epochs)]
    print(f"{args.epochs} epochs, {len(writes)} checkpoint writes of {size:.1f} MiB")
    print(f"epoch training time: median {statistics.median(epochs):.3f} s")
    print(f"checkpoint write:    median {statistics.median(writes) * 1000:.1f} ms, "
          f"max {max(writes) * 1000:.1f} ms")
    print(f"write / epoch time:  median {statistics.median(share):.1%}, max {max(share):.1%} "
          f"(target < 5%)")
    print(f"final checkpoint reloads: epoch {ckpt['epoch']}, step {ckpt['step']}")


if __name__ == "__main__":
    main()

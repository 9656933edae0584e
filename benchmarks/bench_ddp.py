"""Data-parallel training: 1 process against N processes (torchrun, DDP) on the same runs.

    python benchmarks/bench_ddp.py [--procs 2] [--epochs 5] [--rounds 3] [--device cpu]

Trains the default model (mnist-10k, 784-400-50, batch 128) for ``--epochs`` epochs, once
with ``pyro-vae train`` in one process and once with ``torchrun --standalone
--nproc_per_node=N -m pyro_vae train`` (gloo on the CPU, NCCL on GPUs), alternating, for
``--rounds`` rounds. Prints the median seconds per epoch (epochs after the first) of each,
their ratio, and the final test ELBO of each (equal up to float summation order: the N
processes compute the one-process gradient). On the CPU the processes share the machine's
cores: each gets cores / N threads, the one process all of them.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def _run(cmd: list[str], threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)


def _epochs(run_dir: Path) -> tuple[float, float]:
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(m["seconds"] for m in metrics[1:]), metrics[-1]["test_elbo"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    common = ["train", "--quiet", "--set", f"train.epochs={args.epochs}",
              "--set", f"train.device={args.device}"]
    one, many = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            _run([sys.executable, "-m", "pyro_vae", *common, "--runs-dir", tmp, "--name", f"one{r}"],
                 cores)
            _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                  f"--nproc_per_node={args.procs}", "-m", "pyro_vae", *common, "--runs-dir", tmp,
                  "--name", f"many{r}"], max(1, cores // args.procs))
            one.append(_epochs(Path(tmp) / f"one{r}"))
            many.append(_epochs(Path(tmp) / f"many{r}"))
    s1, sn = statistics.median(s for s, _ in one), statistics.median(s for s, _ in many)
    print(f"device {args.device}, {cores} cores, {args.rounds} rounds of {args.epochs} epochs")
    print("| processes | s / epoch (median) | speed-up | final test ELBO |")
    print("| --- | --- | --- | --- |")
    print(f"| 1 | {s1:.3f} | 1.00x | {one[-1][1]:.3f} |")
    print(f"| {args.procs} (DDP) | {sn:.3f} | {s1 / sn:.2f}x | {many[-1][1]:.3f} |")


if __name__ == "__main__":
    main()

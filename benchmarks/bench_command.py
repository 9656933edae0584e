"""The command a user runs, ``pyro-vae train`` with its defaults, timed end to end and split
into where its wall time goes; variants side by side in one run, each a fresh process.

    python benchmarks/bench_command.py [--variant "NAME[@CORES]: KEY=VALUE ..."] ...
        [--set KEY=VALUE ...] [--rounds 1]

A variant is ``pyro-vae train`` with its ``KEY=VALUE`` settings (and every ``--set``), in a
fresh Python process as a user starts it; ``@CORES`` pins that process to the first CORES
CPUs (``sched_setaffinity``, and as many torch threads), so a GPU machine can measure "2 CPU
cores" beside its GPU in the same run. Default variants: ``cpu`` alone; where CUDA is
available, ``cpu@2`` (the reference), ``cuda`` (the default eager loop) and ``cuda+graph``
(``train.cuda_graph = true``).

The command prints a line as each epoch ends; each is timestamped as it arrives. Columns:
- ``wall``: process start to exit; ``speed-up``: the first variant's wall over this one's
  (rounds rotate the order; medians over rounds);
- ``to epoch 1``: start to the first epoch's line: imports, data, model, CUDA set-up and
  the first epoch with any warm-up or compilation, its evaluation and checkpoint;
- ``epoch wall``: median gap between epoch lines (training, the test-set evaluation, the
  checkpoint and metrics writes), of which ``training``: the median of the ``seconds``
  the run itself records per epoch (metrics.jsonl; epochs after the first);
- ``after``: last epoch's line to exit (the figures, interpreter shutdown);
- ``fixed``: ``wall - epochs x training``: everything that does not shrink with a faster
  step, the bound on any speed-up of the step (Amdahl).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

EPOCH_LINE = re.compile(r"^epoch +(\d+) ")


class Variant(NamedTuple):
    name: str
    cores: int | None  # pin the process to this many CPUs (None: as started)
    sets: list[str]


class Timing(NamedTuple):
    wall: float
    to_first: float
    epoch_wall: float
    training: float
    after: float
    epochs: int
    test_elbo: float


def parse_variant(text: str) -> Variant:
    """``"NAME[@CORES]: KEY=VALUE ..."`` -> Variant; a malformed one raises ValueError naming it."""
    head, sep, rest = text.partition(":")
    m = re.fullmatch(r"\s*([\w.+-]+)(?:@(\d+))?\s*", head)
    sets = rest.split()
    if not sep or m is None or not all("=" in s for s in sets) or m.group(2) == "0":
        raise ValueError(f"--variant {text!r}: expected 'NAME[@CORES]: KEY=VALUE ...', e.g. "
                         "'cpu@2: train.device=cpu' (CORES >= 1)")
    return Variant(m.group(1), int(m.group(2)) if m.group(2) else None, sets)


def default_variants(cuda: bool) -> list[Variant]:
    if not cuda:
        return [Variant("cpu", None, ["train.device=cpu"])]
    return [Variant("cpu", 2, ["train.device=cpu"]), Variant("cuda", None, ["train.device=cuda"]),
            Variant("cuda+graph", None, ["train.device=cuda", "train.cuda_graph=true"])]


def command(variant: Variant, common: list[str], runs: Path, name: str) -> list[str]:
    sets = [arg for s in [*common, *variant.sets] for arg in ("--set", s)]
    return [sys.executable, "-m", "pyro_vae", "train", "--name", name, "--runs-dir", str(runs),
            *sets]


def run_once(variant: Variant, common: list[str], runs: Path, name: str) -> Timing:
    """One fresh ``pyro-vae train`` process of ``variant``, timed (see the module's columns)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    pin = None
    if variant.cores:
        cpus = sorted(os.sched_getaffinity(0))[:variant.cores]
        env["OMP_NUM_THREADS"] = str(len(cpus))
        pin = lambda: os.sched_setaffinity(0, cpus)  # noqa: E731  (in the child, before exec)
    with tempfile.TemporaryFile("w+") as err:
        t0, stamps = time.perf_counter(), []
        proc = subprocess.Popen(command(variant, common, runs, name), stdout=subprocess.PIPE,
                                stderr=err, text=True, env=env, preexec_fn=pin)
        for line in proc.stdout:
            if EPOCH_LINE.match(line):
                stamps.append(time.perf_counter() - t0)
        wall = time.perf_counter() - t0 if proc.wait() == 0 else None
        if wall is None or not stamps:
            err.seek(0)
            raise RuntimeError(f"variant {variant.name}: pyro-vae train exited with "
                               f"{proc.returncode}:\n{err.read()[-3000:]}")
    metrics = [json.loads(s) for s in (runs / name / "metrics.jsonl").read_text().splitlines()]
    gaps = [b - a for a, b in zip(stamps, stamps[1:])] or [stamps[0]]
    later = [m["seconds"] for m in metrics[1:]] or [metrics[0]["seconds"]]
    return Timing(wall, stamps[0], statistics.median(gaps), statistics.median(later),
                  wall - stamps[-1], len(metrics), metrics[-1]["test_elbo"])


def measure(variants: list[Variant], common: list[str], rounds: int) -> dict[str, list[Timing]]:
    """Every variant ``rounds`` times, the order rotated each round; name -> timings."""
    out = {v.name: [] for v in variants}
    with tempfile.TemporaryDirectory() as runs:
        for r in range(rounds):
            for v in variants[r % len(variants):] + variants[:r % len(variants)]:
                t = run_once(v, common, Path(runs), f"{v.name}-{r}")
                out[v.name].append(t)
                print(f"round {r + 1} {v.name}: wall {t.wall:.1f} s, to epoch 1 {t.to_first:.1f} s",
                      file=sys.stderr)
    return out


def table(results: dict[str, list[Timing]]) -> str:
    """The markdown table of the module's columns, medians over rounds."""
    med = {name: Timing(*(statistics.median(col) for col in zip(*ts))) for name, ts in results.items()}
    ref = next(iter(med.values())).wall
    lines = ["| variant | wall s | speed-up | to epoch 1 s | epoch wall s | training s / epoch "
             "| after s | fixed s | final test ELBO |", "|" + " --- |" * 9]
    for name, t in med.items():
        fixed = t.wall - t.epochs * t.training
        lines.append(f"| {name} | {t.wall:.1f} | {ref / t.wall:.2f}x | {t.to_first:.1f} | "
                     f"{t.epoch_wall:.3f} | {t.training:.3f} | {t.after:.1f} | {fixed:.1f} | "
                     f"{t.test_elbo:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", action="append", default=[], metavar="NAME[@CORES]: KEY=VALUE ...")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting for every variant, e.g. train.epochs=5")
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args(argv)
    try:
        variants = [parse_variant(v) for v in args.variant]
    except ValueError as err:
        p.error(str(err))
    if not variants:
        import torch

        variants = default_variants(torch.cuda.is_available())
    if len({v.name for v in variants}) < len(variants) or args.rounds < 1:
        p.error("each --variant needs its own NAME, and --rounds must be >= 1")
    print(table(measure(variants, args.set, args.rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

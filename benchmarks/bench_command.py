"""The command a user runs, ``pyro-vae train`` with its defaults, timed end to end and split
into where its wall time goes; variants side by side in one run, each a fresh process.

    python benchmarks/bench_command.py [--variant "NAME[@CORES]: KEY=VALUE ..."] ...
        [--set KEY=VALUE ...] [--rounds 1] [--warm-cache]

A variant is ``pyro-vae train`` with its ``KEY=VALUE`` settings (and every ``--set``), in a
fresh Python process as a user starts it; ``@CORES`` pins that process to the first CORES
CPUs (``sched_setaffinity`` in a launcher that then execs it, and as many torch threads), so
a GPU machine can measure "2 CPU cores" beside its GPU in the same run. Default variants:
``cpu`` alone; where CUDA is available, ``cpu-2-cores`` (``@2``, the reference), ``cuda``
(the default eager loop) and ``cuda+graph`` (``train.cuda_graph = true``). Each run gets an
empty Inductor cache, as a first run does (``--warm-cache``: the one cache every process
shares, as a user's later runs do); it matters for ``train.compile`` only.

The command prints a line as each epoch's metrics are recorded, before that epoch's metrics
and checkpoint are written; each line is timestamped as it arrives. Columns:
- ``wall``: process start to exit; ``speed-up``: the first variant's wall over this one's
  (rounds rotate the order; medians over rounds);
- ``to epoch 1``: start to the first epoch's line: imports, data, model, CUDA set-up and the
  first epoch with any warm-up or compilation, and its evaluation;
- ``epoch wall``: median gap between epoch lines: one epoch's metrics and checkpoint writes,
  the next one's binarization and shuffle, training and evaluation; of which ``training``:
  the median of the ``seconds`` the run itself records per epoch (metrics.jsonl; epochs
  after the first);
- ``after``: last epoch's line to exit (its metrics and checkpoint, the figures, the exit);
- ``fixed``: ``wall - epochs x training``: everything that does not shrink with a faster
  step, the bound on any speed-up of the step (Amdahl).
Each run's row is printed as it finishes; a variant that fails is named, the others go on.
"""

import argparse
import json
import os
import re
import shlex
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
                         "'cpu@2: train.device=cpu' (CORES >= 1; settings separated by "
                         "spaces, so none may hold one: model.hidden=[400,200])")
    return Variant(m.group(1), int(m.group(2)) if m.group(2) else None, sets)


def default_variants() -> list[Variant]:
    """``cpu`` alone; with CUDA (asked of a child process, so that this one, which only
    starts and times the runs, never loads torch) the GPU set."""
    probe = [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"]
    if subprocess.run(probe, capture_output=True, text=True).stdout.strip() != "True":
        return [Variant("cpu", None, ["train.device=cpu"])]
    return [Variant("cpu-2-cores", 2, ["train.device=cpu"]),
            Variant("cuda", None, ["train.device=cuda"]),
            Variant("cuda+graph", None, ["train.device=cuda", "train.cuda_graph=true"])]


def launch(args: list[str], cores: int | None) -> list[str]:
    """``python ARGS``, or with ``cores``: a launcher that pins itself to the first ``cores``
    CPUs this process may use and execs ``python ARGS`` (the affinity is inherited; the
    launcher's own interpreter start, ~20 ms, counts in the variant's wall)."""
    if cores is None:
        return [sys.executable, *args]
    cpus = sorted(os.sched_getaffinity(0))
    if cores > len(cpus):
        raise ValueError(f"@{cores}: this process may use {len(cpus)} CPUs")
    pin = ("import os, sys; os.sched_setaffinity(0, %r); "
           "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])" % cpus[:cores])
    return [sys.executable, "-c", pin, *args]


def run_once(variant: Variant, common: list[str], runs: Path, name: str, warm: bool) -> Timing:
    """One fresh ``pyro-vae train`` process of ``variant``, timed (see the module's columns)."""
    sets = [arg for s in [*common, *variant.sets] for arg in ("--set", s)]
    args = ["-m", "pyro_vae", "train", "--name", name, "--runs-dir", str(runs), *sets]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not warm:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(runs / f"{name}.inductor-cache")
    if variant.cores:
        env["OMP_NUM_THREADS"] = str(variant.cores)
    with tempfile.TemporaryFile("w+") as err:
        t0, stamps = time.perf_counter(), []
        with subprocess.Popen(launch(args, variant.cores), stdout=subprocess.PIPE, stderr=err,
                              text=True, env=env) as proc:
            for line in proc.stdout:
                if EPOCH_LINE.match(line):
                    stamps.append(time.perf_counter() - t0)
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not stamps:
            err.seek(0)
            raise RuntimeError(f"pyro-vae train exited with {proc.returncode}:\n"
                               f"{err.read()[-3000:]}")
    metrics = [json.loads(s) for s in (runs / name / "metrics.jsonl").read_text().splitlines()]
    gaps = [b - a for a, b in zip(stamps, stamps[1:])] or [stamps[0]]
    later = [m["seconds"] for m in metrics[1:]] or [metrics[0]["seconds"]]
    return Timing(wall, stamps[0], statistics.median(gaps), statistics.median(later),
                  wall - stamps[-1], len(metrics), metrics[-1]["test_elbo"])


def measure(variants: list[Variant], common: list[str], rounds: int,
            warm: bool = False) -> dict[str, list[Timing]]:
    """Every variant ``rounds`` times, the order rotated each round; name -> timings (empty
    for a variant that failed: its error is printed and the others go on)."""
    out, failed = {v.name: [] for v in variants}, set()
    with tempfile.TemporaryDirectory() as runs:
        for r in range(rounds):
            for v in variants[r % len(variants):] + variants[:r % len(variants)]:
                if v.name in failed:
                    continue
                try:
                    out[v.name].append(run_once(v, common, Path(runs), f"{v.name}-{r}", warm))
                except RuntimeError as err:
                    failed.add(v.name)
                    out[v.name] = []
                    print(f"variant {v.name} failed: {err}", file=sys.stderr)
                    continue
                print(f"round {r + 1}: " + row(v.name, out[v.name][-1], out[variants[0].name]),
                      flush=True)
    return out


def row(name: str, t: Timing, reference: list[Timing]) -> str:
    """One markdown row of the module's columns; speed-up against the reference's median wall."""
    speedup = (f"{statistics.median(r.wall for r in reference) / t.wall:.2f}x" if reference
               else "n/a: the first variant failed")
    fixed = t.wall - t.epochs * t.training
    return (f"| {name} | {t.wall:.1f} | {speedup} | {t.to_first:.1f} | "
            f"{t.epoch_wall:.3f} | {t.training:.3f} | {t.after:.1f} | {fixed:.1f} | "
            f"{t.test_elbo:.2f} |")


def table(results: dict[str, list[Timing]]) -> str:
    """The markdown table of the module's columns, medians over rounds (failed variants out)."""
    reference = next(iter(results.values()))
    lines = ["| variant | wall s | speed-up | to epoch 1 s | epoch wall s | training s / epoch "
             "| after s | fixed s | final test ELBO |", "|" + " --- |" * 9]
    for name, ts in results.items():
        if ts:
            median = Timing(*(statistics.median(col) for col in zip(*ts)))
            lines.append(row(name, median, reference))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", action="append", default=[], metavar="NAME[@CORES]: KEY=VALUE ...")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting for every variant, e.g. train.epochs=5")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--warm-cache", action="store_true",
                   help="all runs share the user's Inductor cache (default: each an empty one)")
    args = p.parse_args(argv)
    try:
        variants = [parse_variant(v) for v in args.variant] or default_variants()
    except ValueError as err:
        p.error(str(err))
    for v in variants:
        try:
            launch([], v.cores)  # more cores than this process may use: refused here
        except ValueError as err:
            p.error(f"--variant {v.name!r}: {err}")
    names = [v.name for v in variants]
    if len(set(names)) < len(names):
        p.error(f"--variant NAME {next(n for n in names if names.count(n) > 1)!r} is given "
                "twice: each variant needs its own NAME")
    if args.rounds < 1:
        p.error(f"--rounds {args.rounds}: must be >= 1")
    print("$ " + shlex.join(sys.argv if argv is None else ["bench_command.py", *argv]))
    results = measure(variants, args.set, args.rounds, args.warm_cache)
    print(table(results))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

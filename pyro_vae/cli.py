"""Command line: config -> data -> train -> evaluate -> inspect.

    pyro-vae train [--config F] [--set section.key=value ...] [--name N] [--runs-dir D]
                   [--quiet] [--resume RUN [--force]]
    pyro-vae sample RUN [--n 64] [--label L] [--out FILE]
    pyro-vae evaluate RUN [--k 1000] [--batch-size 100] [--n N] [--seed S] [--device D]
                      [--ais-steps T [--ais-chains C]]
    pyro-vae inspect RUN [--out DIR]
    pyro-vae compare --setting linear-gaussian|ring|run [--run RUN] [--points N] [--out DIR]
                     [--chains --warmup --draws --no-jit --iw-k --ais-steps --ais-chains
                      --fit-steps --seed --set ...]

(``pyro-vae CMD --help`` says what each option does.)

The only place that prints. Bad input exits with status 2 and one line naming the field,
the value and what is allowed; SIGINT/SIGTERM during training write a checkpoint and
exit with 130/143.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")  # the CLI only writes files: never a window

from . import checkpoint as ckpt_io  # noqa: E402
from . import distributed
from .config import SEED_MAX, ConfigError, from_dict, load_config, with_overrides
from .data import DataError
from .evaluate import NO_KL_PER_DIMENSION, evaluate_model
from .runs import RunError, check_run_dir, load_run
from .training import Interrupted, NonFiniteError, resolve_device, train

BAD_INPUT = (ConfigError, DataError, ckpt_io.CheckpointError, RunError)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyro-vae", description="VAEs as variational inference in Pyro")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a VAE by SVI and write a run directory")
    t.add_argument("--config", help="TOML file with [data] [model] [prior] [likelihood] "
                   "[guide] [train], or a bundled config's name (ring_2d, mnist_vamp_prior, ...)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=5 (repeatable)")
    t.add_argument("--name", help="run name (default: a timestamp)")
    t.add_argument("--runs-dir", help="parent folder of run directories (default: runs)")
    t.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    t.add_argument("--resume", metavar="RUN", help="continue the run in this directory")
    t.add_argument("--force", action="store_true", help="with --resume: accept a changed config")

    s = sub.add_parser("sample", help="decode prior samples of a trained run into a grid")
    s.add_argument("run")
    s.add_argument("--n", type=int, default=64)
    s.add_argument("--label", type=int, help="class to generate (conditional runs)")
    s.add_argument("--out", help="output PNG (default RUN/prior_samples[_label<L>].png; "
                   "train's RUN/samples.png is kept)")

    e = sub.add_parser("evaluate", help="ELBO, importance-weighted log p(x), active units, PSIS k-hat")
    e.add_argument("run")
    e.add_argument("--k", type=int, default=1000, help="importance samples per test point")
    e.add_argument("--batch-size", type=int, default=100, help="test points per batch")
    e.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    e.add_argument("--n", type=int, help="evaluate the first N test points (default: all)")
    e.add_argument("--seed", type=int, help="seed of the draws (default: the run's train.seed)")
    e.add_argument("--ais-steps", type=int, help="also estimate log p(x) by AIS with this many steps")
    e.add_argument("--ais-chains", type=int, help="AIS chains per point (default 16; with "
                   "--ais-steps)")

    i = sub.add_parser("inspect", help="write every figure of a run to RUN/figures/")
    i.add_argument("run")
    i.add_argument("--out", help="output folder (default RUN/figures)")

    _compare_parser(sub)
    return p


def _compare_parser(sub) -> None:
    """The ``compare`` subcommand's arguments."""
    c = sub.add_parser("compare", help="amortized guide vs per-point Gaussians vs NUTS (vs exact)")
    c.add_argument("--setting", required=True, choices=["linear-gaussian", "ring", "run"])
    c.add_argument("--run", help="run directory (with --setting run)")
    c.add_argument("--points", type=int, default=5, help="data points to compare on")
    c.add_argument("--out", help="output folder (default: compare-<setting>, or RUN/compare)")
    c.add_argument("--chains", type=int, default=4)
    c.add_argument("--warmup", type=int, default=500)
    c.add_argument("--draws", type=int, default=1000)
    c.add_argument("--no-jit", action="store_true", help="NUTS without jit_compile")
    c.add_argument("--iw-k", type=int, default=5000, help="draws for the IW log p(x) estimate")
    c.add_argument("--ais-steps", type=int, default=500,
                   help="AIS steps for the log p(x) reference (ring and run)")
    c.add_argument("--ais-chains", type=int, default=16, help="AIS chains per point")
    c.add_argument("--fit-steps", type=int, default=1500,
                   help="SVI steps of each per-point Gaussian fit (fewer: faster, less converged)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override the toy setting's bundled config, e.g. guide.name=iaf")
    c.add_argument("--quiet", action="store_true")


class _StopFlag:
    """Within ``with``: SIGINT/SIGTERM set the flag (training polls it after every step);
    the previous handlers come back on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None

    def __enter__(self):
        self._previous = [signal.signal(sig, self._handle) for sig in self.SIGNALS]
        return self

    def __exit__(self, *exc):
        for sig, handler in zip(self.SIGNALS, self._previous):
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.signum = signum

    def __call__(self) -> bool:
        return self.signum is not None


def _at_least(*checks: tuple[str, int, int]) -> None:
    """Refuse the first ``(flag, value, low)`` with ``value < low``, naming flag and value."""
    for flag, value, low in checks:
        if value < low:
            raise ConfigError(f"{flag} = {value}: must be >= {low}")


def _seed_in_range(seed: int) -> None:
    """Refuse a ``--seed`` that numpy cannot take, by name."""
    if not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"--seed = {seed}: allowed 0..{SEED_MAX}")


def _out_folder(path: str | Path, flag: str) -> Path:
    """An output folder (created when written to); refused, by name, when it is a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} = {str(path)!r} is a file; allowed: a folder (new or existing)")
    return path


def _writable_folder(path: str | Path, flag: str) -> Path:
    """:func:`_out_folder`, created now and written to once (a temporary file), so that a
    folder this user cannot write fails before the computation, not after it."""
    path = _out_folder(path, flag)
    path.mkdir(parents=True, exist_ok=True)
    tempfile.TemporaryFile(dir=path).close()  # PermissionError -> one line in _run
    return path


def _out_figure(path: str | Path, flag: str) -> Path:
    """An output figure file: ``.png`` added when it has no extension; a format matplotlib
    cannot write, or a folder that does not exist, refused by name."""
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} = {str(path)!r} is a folder; allowed: a figure file, e.g. "
                          f"{str(path / 'samples.png')!r}")
    path = path if path.suffix else path.with_suffix(".png")
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        raise ConfigError(f"{flag} = {str(path)!r}: unknown figure format {path.suffix!r}; "
                          f"allowed: {', '.join('.' + f for f in sorted(formats))}")
    if not path.parent.is_dir():
        raise ConfigError(f"{flag} = {str(path)!r}: folder {str(path.parent)!r} does not exist")
    return path


def _run_dir(args) -> Path:
    if args.name is not None and (args.name in ("", ".", "..") or Path(args.name).name != args.name):
        raise ConfigError(f"--name = {args.name!r}: allowed: a plain folder name (no path "
                          "separators; the folder goes in --runs-dir)")
    runs = _out_folder(args.runs_dir or "runs", "--runs-dir")
    if args.name is None:
        return _new_timestamped(runs)
    path = runs / args.name
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--name = {args.name!r}: {str(path)!r} is a file; allowed: a new name")
    ckpt_io.check_new_run_dir(path, empty=True)  # figures are written beside the run
    return path


def _names_the_run() -> bool:
    """Whether this process names (and creates) a new run's folder: alone, or rank 0."""
    return not distributed.launched() or os.environ.get("RANK", "0") == "0"


def _new_timestamped(runs: Path) -> Path:
    """A folder ``runs/<YYYYmmdd-HHMMSS>`` created now, ``-2``, ``-3``, ... appended where
    that name is taken, so runs started in the same second (a shell loop) each get their
    own. Under torchrun only rank 0 creates it; the others receive its name."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if not _names_the_run():
        return runs / stamp  # replaced by rank 0's folder (distributed.broadcast)
    runs.mkdir(parents=True, exist_ok=True)
    for i in itertools.count(1):
        path = runs / (stamp if i == 1 else f"{stamp}-{i}")
        try:
            path.mkdir()  # atomic: of two processes, one creates it
            return path
        except FileExistsError:
            continue


def cmd_train(args) -> int:
    if args.force and not args.resume:
        raise ConfigError("--force without --resume: it accepts a changed config when continuing "
                          "a run; allowed: --resume RUN --force, or no --force for a new run")
    made = None  # the folders _new_timestamped makes, removed again if nothing is written
    if args.resume:
        _resume_not_moved(args)
        run_dir = check_run_dir(args.resume, needs=("checkpoint.pt",))
        cfg = _resumed_config(args, run_dir)
    else:
        cfg = load_config(args.config, args.set)
        fresh = _first_missing(Path(args.runs_dir or "runs"))
        run_dir = _run_dir(args)
        if args.name is None and _names_the_run():
            made = fresh or run_dir
    with _no_empty_folder_left(made):
        return _launch_and_train(args, cfg, run_dir)


def _first_missing(path: Path) -> Path | None:
    """The outermost of ``path`` and its parents that does not exist yet (None if it does):
    what creating ``path`` makes."""
    missing = None
    for p in (path, *path.parents):
        if p.exists():
            return missing
        missing = p
    return missing


@contextlib.contextmanager
def _no_empty_folder_left(path: Path | None):
    """Within: an exception removes ``path`` (a folder this command made, with the folders
    it made inside) where no file was written there: a command that fails before writing
    leaves nothing behind."""
    try:
        yield
    except BaseException:
        if path is not None and path.is_dir() and not any(
                p.is_file() or p.is_symlink() for p in path.rglob("*")):
            shutil.rmtree(path)
        raise


def _resume_not_moved(args) -> None:
    """Refuse a --name or --runs-dir other than the run's own with --resume: a resumed run
    stays in its folder, so either would be ignored (its own are accepted: a script may
    pass them every time)."""
    stays = f"with --resume: a resumed run stays in its folder, {args.resume!r}; allowed:"
    if args.name is not None and args.name != Path(args.resume).resolve().name:
        raise ConfigError(f"--name = {args.name!r} {stays} no --name, or the run's own name, "
                          f"{Path(args.resume).resolve().name!r}")
    if args.runs_dir is not None and \
            Path(args.resume).resolve().parent != Path(args.runs_dir).resolve():
        raise ConfigError(f"--runs-dir = {args.runs_dir!r} {stays} no --runs-dir, or the "
                          f"run's own parent folder, {str(Path(args.resume).parent)!r}")


def _launch_and_train(args, cfg, run_dir: Path) -> int:
    """Train alone, or under torchrun in its group (rank 0 names the run)."""
    if distributed.launched():
        group = distributed.init_from_env(resolve_device(cfg.train.device))
        run_dir = distributed.broadcast(run_dir, group)
        try:
            return _train_and_report(args, cfg, run_dir, group)
        finally:
            distributed.dist.destroy_process_group()
    return _train_and_report(args, cfg, run_dir, distributed.Group())


def _resumed_config(args, run_dir: Path):
    """The config to continue ``run_dir`` with: ``--config``, else the run's config.toml, else
    (that file lost) the config in its checkpoint; then ``--set``."""
    if args.config or (run_dir / "config.toml").is_file():
        return load_config(args.config or run_dir / "config.toml", args.set)
    ckpt = ckpt_io.load_checkpoint(run_dir / "checkpoint.pt", map_location="cpu")
    return with_overrides(from_dict(ckpt["config"]), args.set)


def _train_and_report(args, cfg, run_dir: Path, group) -> int:
    """Train (resuming with ``--resume``); rank 0 prints progress and writes the figures."""

    def report(m: dict) -> None:
        if not args.quiet and group.is_main:
            se = m.get("test_elbo_se")  # None for one test point: nothing to spread
            error = " (SE n/a: one test point)" if se is None else f" (SE {se:.2f}, test points)"
            print(f"epoch {m['epoch']:3d}  train objective {m['train_elbo']:9.2f}  "
                  f"test ELBO {m['test_elbo']:9.2f}{error}  ({m['seconds']:.1f} s)", flush=True)

    try:
        with _StopFlag() as stop:
            result = train(cfg, run_dir, progress=not args.quiet and group.is_main,
                           resume=run_dir if args.resume else None, force=args.force,
                           should_stop=stop, on_epoch=report)
    except Interrupted as err:
        if group.is_main:
            print(f"pyro-vae: interrupted: {err} in {run_dir}; continue with "
                  f"`pyro-vae train --resume {run_dir}`", file=sys.stderr)
        return 128 + (stop.signum or signal.SIGTERM)
    if not group.is_main:
        return 0
    from .inspection import write_basic_figures  # pyplot: loaded only where a command draws

    write_basic_figures(result.vae, result.dataset, run_dir)
    last = result.metrics[-1]
    se = last.get("test_elbo_se")  # absent from runs begun before it was recorded
    n = last.get("test_points", "the")  # recorded since 2026-12-03: the epoch's own test set
    error = "" if se is None else f" (SE {se:.2g} over {n} test points, one draw each)"
    print(f"final test ELBO {last['test_elbo']:.2f} nats per data point after "
          f"{last['epoch']} epochs{error}; wrote {run_dir}/ (config.toml, metrics.jsonl, "
          "checkpoint.pt, reconstructions.png, samples.png)")
    return 0


def cmd_sample(args) -> int:
    _at_least(("--n", args.n, 1))
    run = load_run(args.run)
    labels = run.prior_labels(args.n, args.label, "--label")  # (n,) or None; checked first
    suffix = "" if args.label is None else f"_label{args.label}"
    out = _out_figure(args.out or run.path / f"prior_samples{suffix}.png", "--out")
    from .inspection import prior_samples_figure, save_figure

    figure = prior_samples_figure(run.vae, run.dataset, args.n, labels,
                                  "" if args.label is None else f", class {args.label}")
    save_figure(figure, out)
    print(f"wrote {out}")
    return 0


def _estimate(e: dict, digits: int = 2) -> str:
    """``mean (Monte Carlo SE a, test-set SE b)`` for a :func:`evaluate.with_errors` dict; an
    SE that does not exist is named with its reason, never printed as a number."""
    if e["mean"] is None:
        return e["note"]  # "not available: ..."
    parts = []
    if e.get("mc_se") is not None:  # with a caveat, where one is attached
        note = f" ({e['mc_se_note']})" if e.get("mc_se_note") else ""
        parts.append(f"Monte Carlo SE {e['mc_se']:.2g}{note}")
    elif e.get("mc_se_note"):
        parts.append(f"Monte Carlo SE {e['mc_se_note']}")
    if e.get("test_set_se") is not None:
        parts.append(f"test-set SE {e['test_set_se']:.2g}")
    elif e.get("test_set_se_note"):
        parts.append(f"test-set SE {e['test_set_se_note']}")
    return f"{e['mean']:.{digits}f}" + (f"  ({', '.join(parts)})" if parts else "")


def _khat_row(r: dict) -> str:
    """The k-hat share with its count and Wilson interval, or why it is not available."""
    if r["khat_mean"] is None:
        return r["khat_note"]
    lo, hi = r["khat_share_interval_95"]
    notes = [f"{r['khat_above_threshold']} of {r['khat_points']} points, test-set 95% "
             f"interval {lo:.3f}-{hi:.3f}"]
    if r["khat_note"]:
        notes.append(r["khat_note"])
    return f"{r['khat_share_above_threshold']:.3f}  ({'; '.join(notes)})"


def _khat_caveat(r: dict) -> str:
    """What the k-hat share says of the IW estimate's Monte Carlo SE (``evaluate.log_mean_exp``:
    a delta-method SE cannot show the weights' missing tail), or nothing."""
    above = r["khat_above_threshold"]
    if not above or r["iw_log_likelihood"].get("mc_se") is None:
        return ""
    return (f"; its Monte Carlo SE is optimistic: k-hat > {r['khat_threshold']:.2f} on {above} "
            f"of {r['khat_points']} points")


def _khat_label(r: dict) -> str:
    """The k-hat row's name, with the threshold K draws set (``evaluate.psis_khat_threshold``)."""
    if r["khat_threshold"] is None:
        return "PSIS k-hat (share above threshold)"
    return f"PSIS k-hat > {r['khat_threshold']:.2f} (share; threshold for K={r['k']})"


def _evaluation_rows(r: dict) -> list[tuple[str, str]]:
    return [
        ("test points", f"{r['n']}"),
        (f"ELBO, K={r['k']} draws (nats)", _estimate(r["elbo"])),
        ("  reconstruction E_q[log p(x|z)]", _estimate(r["reconstruction"])),
        ("  KL(q(z|x) || p(z))", _estimate(r["kl"])),
        ("-ELBO (bits/dim)", _estimate(r["elbo_bits_per_dim"], 4)),
        (f"log p(x), IW K={r['k']} (nats)", _estimate(r["iw_log_likelihood"]) + _khat_caveat(r)),
        ("-log p(x) (bits/dim)", _estimate(r["iw_bits_per_dim"], 4)),
        ("active units (Cov > 0.01)", r.get("active_units_note") or
         f"{r['active_units']} / {r['latent_dim']}"),
        (_khat_label(r), _khat_row(r)),
    ]


def _not_strict_json(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _saved_results(out: Path, run: str) -> dict:
    """What ``eval.json`` holds already, every entry kept (earlier settings' results, a
    user's own keys): {} when absent; refused by name when it is not a JSON object, which
    evaluate could not add to without losing it."""
    allowed = "allowed: a run whose eval.json is a JSON object, as evaluate writes it, or absent"
    if out.exists() and not out.is_file():
        raise ConfigError(f"RUN = {run!r}: {str(out)!r} is not a file; {allowed}")
    if not out.is_file():
        return {}
    try:  # NaN and Infinity refused too: the file is written back as strict JSON
        saved = json.loads(out.read_text(errors="replace"), parse_constant=_not_strict_json)
    except ValueError as err:
        raise ConfigError(f"RUN = {run!r}: {str(out)!r} is not valid JSON ({err}); {allowed} "
                          "(move the file away to start a new one)") from None
    if not isinstance(saved, dict):
        kind = {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
            type(saved), "number")
        raise ConfigError(f"RUN = {run!r}: {str(out)!r} holds a JSON {kind}, "
                          f"not an object; {allowed} (move the file away to start a new one)")
    return saved


def cmd_evaluate(args) -> int:
    _at_least(("--k", args.k, 1), ("--batch-size", args.batch_size, 1))
    if args.n is not None:
        _at_least(("--n", args.n, 1))
    if args.seed is not None:
        _seed_in_range(args.seed)
    if args.ais_steps is None and args.ais_chains is not None:
        raise ConfigError(f"--ais-chains = {args.ais_chains} without --ais-steps: AIS runs only "
                          "with --ais-steps T; allowed: --ais-steps T --ais-chains C")
    chains = 16 if args.ais_chains is None else args.ais_chains
    if args.ais_steps is not None:
        _at_least(("--ais-steps", args.ais_steps, 2), ("--ais-chains", chains, 2))
    resolve_device(args.device, "--device")  # refused by its flag's name before any work
    run = load_run(args.run, device=args.device)
    out = _writable_folder(run.path, "RUN") / "eval.json"  # checked before the work
    saved = _saved_results(out, args.run)  # checked before the work, kept whole after it
    ds = run.dataset
    n = ds.x_test.shape[0] if args.n is None else args.n
    if n > ds.x_test.shape[0]:
        raise ConfigError(f"--n = {n}: the test set has {ds.x_test.shape[0]} points; "
                          f"allowed 1..{ds.x_test.shape[0]}")
    x, y = ds.x_test[:n], ds.y_test[:n] if run.vae.num_classes else None
    seed = run.config.train.seed if args.seed is None else args.seed
    draws = f"seed={seed} batch={args.batch_size} {run.device.type}"  # what the draws depend on
    results = {f"iw k={args.k} n={n} {draws}": evaluate_model(
        run.vae, x, y, k=args.k, batch_size=args.batch_size, seed=seed)}
    rows = _evaluation_rows(next(iter(results.values())))
    if args.ais_steps is not None:
        from .ais import evaluate_ais

        key = f"ais steps={args.ais_steps} chains={chains} n={n} {draws}"
        results[key] = evaluate_ais(run.vae, x, y, args.ais_steps, chains,
                                    batch_size=args.batch_size, seed=seed)
        a = results[key]
        rows.append((f"log p(x), AIS {args.ais_steps} steps x {chains} chains (nats)",
                     _estimate(a["log_px"])))
        rows.append(("  HMC acceptance, weighted chains",  # a whole-run mean, not an estimate
                     f"{a['acceptance']:.2f} (mean over moves, chains and points; "
                     f"{a['seconds_per_point']:.2g} s per point)"))
    width = max(len(r[0]) for r in rows)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))  # before the write
    payload = json.dumps({**saved, **results}, indent=1,  # other settings' numbers stay
                         allow_nan=False).encode()  # strict JSON: a NaN here is a bug
    ckpt_io.atomic_write(out, lambda f: f.write(payload))
    print(f"wrote {', '.join(results)} to {out}")
    return 0


def cmd_inspect(args) -> int:
    run = load_run(args.run)
    out = _writable_folder(args.out or run.path / "figures", "--out")
    from .inspection import skipped_figures, write_figures

    written = [p.name for p in write_figures(run, out)]
    print(f"wrote {len(written)} figures to {out}/: {', '.join(written)}")
    for name, reason in skipped_figures(run).items():
        print(f"{name} {reason}")  # "not available: needs ..."
    if "kl_per_dimension.png" not in written:
        print(f"kl_per_dimension.png {NO_KL_PER_DIMENSION}")  # "not available: needs ..."
    return 0


def cmd_compare(args) -> int:
    from .comparison import compare
    from .report import write_comparison
    from .settings import run_setting, toy_setting

    _seed_in_range(args.seed)
    _at_least(("--points", args.points, 1), ("--chains", args.chains, 2),
              ("--warmup", args.warmup, 1), ("--draws", args.draws, 10), ("--iw-k", args.iw_k, 2),
              ("--ais-steps", args.ais_steps, 2), ("--ais-chains", args.ais_chains, 2),
              ("--fit-steps", args.fit_steps, 1))
    if args.setting == "run":
        if not args.run:
            raise ConfigError("--setting run needs --run RUN (a trained run directory)")
        if args.set:
            raise ConfigError("--set applies to the toy settings; a run keeps its own config")
        run = load_run(args.run)
        if args.points > run.dataset.x_test.shape[0]:
            raise ConfigError(f"--points = {args.points}: the run's test set has "
                              f"{run.dataset.x_test.shape[0]} points; allowed 1.."
                              f"{run.dataset.x_test.shape[0]}")
        setting = run_setting(run, args.points)
        target = Path(args.out or run.path / "compare")
    else:
        if args.run:
            raise ConfigError(f"--run is only used with --setting run, not {args.setting!r}")
        target = Path(args.out or f"compare-{args.setting}")
    made = _first_missing(target)
    out = _writable_folder(target, "--out")
    with _no_empty_folder_left(made):  # a bad --set, say, leaves no empty --out behind
        if args.setting != "run":
            if any((out / "run" / f).exists() for f in ckpt_io.RUN_FILES):
                raise ConfigError(f"--out = {str(out)!r} holds an earlier comparison, whose toy "
                                  f"VAE ({str(out / 'run')!r}) this one would overwrite; allowed: "
                                  "a new folder, or that one removed")
            setting = toy_setting(args.setting, args.points, args.seed, run_dir=out / "run",
                                  overrides=args.set)
        result = compare(setting, args.chains, args.warmup, args.draws, jit=not args.no_jit,
                         iw_k=args.iw_k, seed=args.seed, progress=not args.quiet,
                         ais_steps=args.ais_steps, ais_chains=args.ais_chains,
                         fit_steps=args.fit_steps)
        written = write_comparison(result, out)
    print((out / "report.md").read_text())
    print(f"wrote {', '.join(p.name for p in written)} to {out}/")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    previous, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        return _run(args)
    finally:
        warnings.formatwarning = previous


def _run(args) -> int:
    """The command, with bad input answered in one line (exit status 2)."""
    try:
        return {"train": cmd_train, "sample": cmd_sample, "evaluate": cmd_evaluate,
                "inspect": cmd_inspect, "compare": cmd_compare}[args.command](args)
    except BAD_INPUT as err:  # under torchrun: once per node, unless only some ranks see it
        if not (distributed.reports_errors() or isinstance(err, distributed.RankError)):
            time.sleep(distributed.REPORTER_GRACE_S)  # ended by torchrun once the reporter exits
        print(f"pyro-vae: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteError as err:
        print(f"pyro-vae: training failed: {err}", file=sys.stderr)
        return 1
    except (RuntimeError, MemoryError) as err:  # an allocator's failure: latent_dim = 10**8
        if not _out_of_memory(err):
            raise
        print(f"pyro-vae: error: {_out_of_memory(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # a folder or file the command cannot create, write or read
        if err.filename is None:
            raise
        print(f"pyro-vae: error: {str(err.filename)!r}: {err.strerror or err}; allowed: paths "
              "this user can read and write (folders that are folders)", file=sys.stderr)
        return 2


def _out_of_memory(err: RuntimeError | MemoryError) -> str:
    """One line for torch's CPU or CUDA out-of-memory error, or Python's (numpy, PIL), ''
    for any other error: how much one allocation asked for, and the sizes that set it."""
    text = str(err)
    if isinstance(err, MemoryError):
        asked = "CPU"
    elif isinstance(err, torch.cuda.OutOfMemoryError):  # "... Tried to allocate 2.00 GiB. ..."
        found = re.search(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", text)
        asked = f"CUDA: tried to allocate {found[1]}" if found else "CUDA"
    elif "can't allocate memory" in text:
        found = re.search(r"allocate (\d+) bytes", text)
        asked = f"tried to allocate {int(found[1]) / 2**30:.1f} GiB" if found else "CPU"
    else:
        return ""
    return (f"out of memory ({asked} at once); allowed: sizes that fit this machine: the "
            "config's model.latent_dim, model.hidden, train.batch_size, train.eval_batch_size "
            "and data sizes (data.image_size), and the command's --n, --k, --batch-size, "
            "--points, --chains")


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """``pyro-vae: warning: Category: message`` (not Python's file, line and source)."""
    return f"pyro-vae: warning: {category.__name__}: {message}\n"


def entry() -> None:
    """The ``pyro-vae`` and ``python -m pyro_vae`` process: run :func:`main` and exit with its
    status (under torchrun through :func:`distributed.exit_process`)."""
    distributed.exit_process(main())


if __name__ == "__main__":
    entry()

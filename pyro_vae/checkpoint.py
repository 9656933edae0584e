"""Checkpoints: atomic writes, RNG states, and loading that explains what is wrong.

A checkpoint is one ``torch.save`` dict::

    format, config (nested dict), config_hash, model (state_dict), optimizer (state_dict),
    rng (torch / cuda / numpy / python states, training_cuda on a GPU), epoch (completed epochs),
    step (optimizer steps so far), step_in_epoch (> 0 when interrupted mid-epoch),
    epoch_loss, epoch_seconds (of an interrupted epoch so far), lr_factor (train.lr is
    multiplied by it after rollbacks), rollbacks (so far in the run), metrics (list of
    dicts), x_dim, num_classes, data (train and test point counts and the sha256 of the
    loaded data: :func:`data_record`)

It is written by ``training.TrainState.state_dict`` and read back by its
``load_state_dict``; :func:`resume_checkpoint` is the resume policy (a changed config is
refused unless forced). Writes go to a temporary file in the same folder, are flushed and
fsync'ed, then renamed over the old file, so a crash mid-write leaves the previous
checkpoint intact. :class:`Saver` writes a run's files on training's schedule and rolls
back to the last checkpoint after a non-finite step (``train.on_nan = "rollback"``).
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import json
import os
import random
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from .config import Config, ConfigError, diff, dumps, from_dict, to_dict

FORMAT = 1
REQUIRED = ("format", "config", "model", "optimizer", "rng", "epoch", "step", "metrics", "x_dim")
FIELDS = {"config": dict, "model": dict, "optimizer": dict, "rng": dict, "epoch": int,
          "step": int, "metrics": list, "x_dim": int}  # the type each field must have
INNER = {"optimizer": ("state", "param_groups"), "rng": ("torch", "cuda", "numpy", "python")}


RUN_FILES = ("config.toml", "metrics.jsonl", "checkpoint.pt")  # what Saver writes


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupted or does not fit the model."""


class RunError(ValueError):
    """A run directory is missing or incomplete, or not free for a new run."""


def check_new_run_dir(run_dir: Path, empty: bool = False) -> None:
    """Refuse ``run_dir`` for a new run, by name, when it is a file, when it holds a run
    (its ``checkpoint.pt``, which the new run would overwrite), or, with ``empty`` (the CLI
    and ``fit``, which write more files beside the run's), when it is not empty."""
    allowed = "allowed: a new or empty folder, or continuing the run (--resume RUN, resume=RUN)"
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"run directory {str(run_dir)!r} is a file; allowed: a new or empty folder")
    if (run_dir / "checkpoint.pt").exists():
        raise RunError(f"run directory {str(run_dir)!r} already holds a run (checkpoint.pt), "
                       f"which a new run would overwrite; {allowed}")
    if empty and run_dir.exists() and any(run_dir.iterdir()):
        raise RunError(f"run directory {str(run_dir)!r} already exists and is not empty; "
                       "allowed: a new or empty folder")


def rng_state(device: torch.device | None = None) -> dict:
    """Every RNG in use: torch CPU, all CUDA devices, numpy, python; training on a GPU
    ``device``, also its stream as ``training_cuda``: the one training draws from."""
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if device is not None and device.type == "cuda":
        state["training_cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only where CUDA exists), and
    the saved training stream into GPU ``device``: data-parallel ranks each draw on their
    own GPU, alike, and only rank 0's process saves; its ``cuda`` list holds its own GPU's
    stream, while its copies of the other ranks' GPUs were never drawn from."""
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    if "training_cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["training_cuda"].cpu(), device)
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _umask() -> int:
    """The process's umask (read by setting it, then set back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write, replace: bool = True) -> None:
    """Call ``write(file)`` on a temp file next to ``path``; fsync; rename over ``path``.
    With ``replace = False`` the temp file is linked to ``path`` instead, which fails with
    FileExistsError where ``path`` exists: two processes cannot both create it.
    Every file is closed here, not left to the exit: ``distributed.exit_process`` freezes
    the heap, so an object kept alive by a reference cycle is not finalised there."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make the run private
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
            Path(tmp).unlink(missing_ok=True)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK}


def _link_new(tmp: str, path: Path) -> None:
    """Link ``tmp`` to ``path``: atomic, and never over an existing file (FileExistsError).
    On a file system without hard links, the nearest thing: a check, then a rename."""
    try:
        os.link(tmp, path)
    except OSError as err:
        if err.errno not in NO_HARD_LINKS:  # FileExistsError, or a real failure
            raise
        if path.exists():
            raise FileExistsError(errno.EEXIST, "exists", str(path)) from None
        os.replace(tmp, path)


def save_checkpoint(path: str | Path, payload: dict, replace: bool = True) -> None:
    """Atomically ``torch.save`` ``payload`` (with ``format`` added) to ``path`` (a new
    file only, with ``replace = False``: :func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **payload}, f), replace)


def load_checkpoint(path: str | Path, map_location: torch.device | str = "cpu") -> dict:
    """Read a checkpoint onto ``map_location`` (a CUDA-saved one loads on a CPU machine)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # a damaged file's bytes pick the type: the zip reader's
        # OSError, the legacy tar reader's KeyError, the unpickler's anything; one fault to the user
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated or corrupted and cannot "
                              f"be read ({type(err).__name__}: {err})") from None
    missing = [k for k in REQUIRED if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a pyro_vae checkpoint (missing: {', '.join(missing)})"
        )
    if ckpt["format"] != FORMAT:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format {ckpt['format']}; this version reads {FORMAT}"
        )
    _check_fields(ckpt, path)
    return ckpt


def _check_fields(ckpt: dict, path: Path) -> None:
    """Refuse, naming the field, a checkpoint whose fields have the wrong type or lack
    their parts (:data:`FIELDS`, :data:`INNER`): a damaged or hand-edited file."""
    for key, kind in FIELDS.items():
        if not isinstance(ckpt[key], kind) or isinstance(ckpt[key], bool):
            raise CheckpointError(
                f"checkpoint {str(path)!r} is damaged: its {key!r} is a "
                f"{type(ckpt[key]).__name__}; allowed: {kind.__name__}")
    for key, parts in INNER.items():
        missing = [p for p in parts if p not in ckpt[key]]
        if missing:
            raise CheckpointError(f"checkpoint {str(path)!r} is damaged: its {key!r} lacks "
                                  f"{', '.join(missing)}")


def resume_checkpoint(run_dir: str | Path, cfg: Config, force: bool = False) -> dict:
    """The checkpoint of the run at ``run_dir``, to continue with config ``cfg``: the resume
    policy. A ``cfg`` that differs from the run's own config is refused, naming the keys that
    differ with both values, unless ``force`` (then ``cfg`` applies from the next step on)."""
    ckpt = load_checkpoint(Path(run_dir) / "checkpoint.pt")
    old = from_dict(ckpt["config"])
    changed = diff(old, cfg)
    if changed and not force:
        was, now = to_dict(old), to_dict(cfg)
        values = [f"{key} = {now[s][k]!r}, the run has {was[s][k]!r}"
                  for key in changed for s, k in [key.split(".", 1)]]
        edited = str(Path(run_dir) / "config.toml")
        raise ConfigError(
            f"resuming {str(run_dir)!r} with a changed config ({'; '.join(values)}); undo the "
            f"change (a --set, --config, or an edit of {edited!r}), or pass --force "
            "(force=True) to accept it")
    return ckpt


def data_record(ds) -> dict:
    """What a run records of its data set (a ``data.Dataset``): point counts and fingerprint."""
    return {"train": ds.x_train.shape[0], "test": ds.x_test.shape[0], "sha256": ds.fingerprint}


def check_same_data(ckpt: dict, ds, run: str, data_cfg=None) -> None:
    """Refuse data of another width than the run's networks take, and a data set other than
    the one the run was trained on (its ``data`` record):
    a data file grown or reshuffled since gives another train/test split, whose test points
    may have been trained on. Not checked: a checkpoint from before the record or without
    a fingerprint (generated data), and a forced new ``data_cfg`` that changes more than
    ``data.binarize`` (new data, asked for)."""
    saved = ckpt.get("data")
    old_cfg = from_dict(ckpt["config"]).data
    if ds.x_dim != ckpt["x_dim"]:  # new data or not, the run's networks cannot take it
        now = data_cfg or old_cfg
        source = f"data.path = {now.path!r}" if now.path else f"data.name = {now.name!r}"
        raise CheckpointError(
            f"run {run!r} was trained on data with {ckpt['x_dim']} values per point; {source} "
            f"now gives {ds.x_dim}; allowed: data of {ckpt['x_dim']} values per point")
    if data_cfg is not None and data_cfg != dataclasses.replace(old_cfg,
                                                                binarize=data_cfg.binarize):
        return
    if saved is None or (isinstance(saved, dict) and saved.get("sha256") is None):
        return
    if not isinstance(saved, dict) or not {"train", "test", "sha256"} <= set(saved):
        raise CheckpointError(f"checkpoint of run {run!r} is damaged: its 'data' record is "
                              f"{saved!r}; allowed: a dict of train, test and sha256")
    now = data_record(ds)
    if saved["sha256"] != now["sha256"]:
        source = (f"data.path = {old_cfg.path!r}" if old_cfg.path
                  else f"data.name = {old_cfg.name!r}")
        raise CheckpointError(
            f"run {run!r} was trained on {saved['train']} training and {saved['test']} test "
            f"points of {source} (sha256 {saved['sha256'][:12]}); it now loads {now['train']} "
            f"and {now['test']} (sha256 {now['sha256'][:12]}): the data changed, so the "
            "train/test split is another and test points may have been trained on; restore "
            "the data the run was trained on, or train a new run")


def check_mid_epoch_batch_size(ckpt: dict, cfg: Config) -> None:
    """Refuse a forced new ``train.batch_size`` for a run stopped mid-epoch: its position
    counts steps of the old size, so the rest of the epoch would be skipped or repeated."""
    old, new = from_dict(ckpt["config"]).train.batch_size, cfg.train.batch_size
    step = ckpt.get("step_in_epoch", 0)
    if step and old != new:
        raise ConfigError(
            f"train.batch_size = {new}: the run stopped in epoch {ckpt['epoch'] + 1} after "
            f"{step} steps of batch size {old}; allowed: train.batch_size = {old} until that "
            "epoch ends (a new batch size applies from an epoch's start: resume with epochs "
            "set to finish this one, then change it)")


def load_state(module: torch.nn.Module, state: dict, source: str) -> None:
    """``module.load_state_dict(state)`` with an error that lists every tensor that does
    not fit (missing, unexpected, or of another shape). Buffers the module builds from its
    config (``persistent=False``), which checkpoints of earlier versions hold, are ignored."""
    own = module.state_dict()
    built = {name for name, _ in module.named_buffers()} - set(own)
    state = {k: v for k, v in state.items() if k not in built}
    problems = [f"missing {k}" for k in own if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in own]
    problems += [
        f"{k}: checkpoint {list(state[k].shape)} vs model {list(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if problems:
        raise CheckpointError(
            f"{source} was saved from a different architecture: " + "; ".join(problems[:8])
            + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        )
    module.load_state_dict(state)


class RollbackWarning(UserWarning):
    """Training went non-finite and was rolled back to the last checkpoint (train.on_nan)."""


def write_metrics(run_dir: Path, metrics: list[dict]) -> None:
    """``metrics.jsonl``: one JSON object per completed epoch, written atomically."""
    text = "".join(json.dumps(m) + "\n" for m in metrics)
    atomic_write(run_dir / "metrics.jsonl", lambda f: f.write(text.encode()))


def _remove_stale_temp_files(run_dir: Path) -> None:
    """Delete the temporary files of :func:`atomic_write` that a process killed mid-write
    (SIGKILL, a power cut) left in ``run_dir``: the run's files themselves are intact."""
    for name in RUN_FILES:
        for stale in run_dir.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)


class Saver:
    """Writes a run's files (``config.toml``, ``metrics.jsonl``, ``checkpoint.pt``) for a
    ``training.TrainState`` and keeps the last checkpoint payload, what a rollback returns to.
    A ``new`` run gets its step-0 checkpoint at once, so a run that fails or is killed in its
    first epoch can be resumed (``--resume``) like any other."""

    def __init__(self, state, run_dir: Path | None, new: bool = True):
        self.state, self.run_dir = state, run_dir
        self.last_good = copy.deepcopy(state.state_dict())
        if run_dir is None:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if new:  # claimed before any other write (or removal: a racing run's temp files)
            self._claim()
        else:
            _remove_stale_temp_files(run_dir)
            if not (run_dir / "checkpoint.pt").is_file():  # resumed from a payload
                save_checkpoint(run_dir / "checkpoint.pt", self.last_good)
        write_metrics(run_dir, state.metrics)
        if new or not (run_dir / "config.toml").is_file():  # lost from a run being resumed
            self._write_config()

    def _claim(self) -> None:
        """Write the step-0 checkpoint as a new file: where another process created one
        since the directory was checked (two runs started at once with one name), refuse
        by name rather than mix the two runs' files."""
        try:
            save_checkpoint(self.run_dir / "checkpoint.pt", self.last_good, replace=False)
        except FileExistsError:
            raise RunError(f"run directory {str(self.run_dir)!r}: another process started a run "
                           "there at the same time (its checkpoint.pt appeared); allowed: one "
                           "run per folder (another --name, or run_dir)") from None

    def _write_config(self) -> None:
        text = dumps(self.state.cfg)
        atomic_write(self.run_dir / "config.toml", lambda f: f.write(text.encode()))

    def save(self) -> None:
        """Write config.toml, then checkpoint.pt (so they agree). A stop between the two
        leaves the new config beside the old checkpoint: resuming names the difference, and
        ``--force`` continues with the config that was being saved."""
        payload = self.state.state_dict()
        if self.run_dir is not None:
            self._write_config()
            save_checkpoint(self.run_dir / "checkpoint.pt", payload)
        self.last_good = copy.deepcopy(payload)

    def end_epoch(self) -> None:
        """Write metrics.jsonl; checkpoint every train.checkpoint_every epochs and at the end."""
        tc, epoch = self.state.cfg.train, self.state.epoch
        if self.run_dir is not None:
            write_metrics(self.run_dir, self.state.metrics)
        if epoch % tc.checkpoint_every == 0 or epoch == tc.epochs:
            self.save()

    def roll_back(self, err: Exception) -> None:
        """Return to the last checkpoint with train.lr halved (``train.on_nan = "rollback"``,
        at most ``train.max_rollbacks`` times), else raise ``err``."""
        tc, state = self.state.cfg.train, self.state
        if tc.on_nan != "rollback" or state.rollbacks >= tc.max_rollbacks:
            raise err
        count, factor = state.rollbacks + 1, state.lr_factor / 2  # halved again at each rollback
        state.load_state_dict(copy.deepcopy(self.last_good))  # Adam's state is not shared
        state.rollbacks = count
        state.set_lr_factor(factor)
        self.save()  # the count and the halved lr survive a stop before the next checkpoint
        warnings.warn(
            f"rollback {count}/{tc.max_rollbacks} to epoch {state.epoch}, step {state.step} "
            f"with train.lr halved to {tc.lr * state.lr_factor:g} after: {err}",
            RollbackWarning, stacklevel=3)

"""Run directories: what ``pyro-vae train`` leaves, and :func:`load_run` to read it back.

``RUN/config.toml`` (resolved config), ``RUN/metrics.jsonl`` (one JSON object per epoch),
``RUN/checkpoint.pt`` (see ``checkpoint.py``), ``RUN/reconstructions.png``,
``RUN/samples.png``; a run made by :func:`fit` also holds its data, ``RUN/data.npy`` (or
``RUN/data.npz`` with labels).

Which config counts: the one stored in ``checkpoint.pt``, the config the parameters were
trained with. :func:`load_run` (and so ``evaluate``, ``sample``, ``inspect``, ``compare``)
uses it and warns (:class:`ConfigFileWarning`) when ``config.toml`` was edited since;
``pyro-vae train --resume RUN`` reads ``config.toml`` as the config to continue with, and
refuses a changed one unless ``--force``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from . import arviz_bridge
from . import checkpoint as ckpt_io
from .arrays import as_labels, as_points
from .config import Config, ConfigError, diff, from_dict, load_config, to_dict
from .data import DataError, Dataset, load_dataset
from .evaluate import evaluate_model, posterior_means
from .model import VAE
from .training import resolve_device, train

RUN_FILES = ckpt_io.RUN_FILES
RunError = ckpt_io.RunError  # defined beside the files it is about


class ConfigFileWarning(UserWarning):
    """A run's ``config.toml`` is not the config stored in its checkpoint (which is used)."""


class StaleCheckpointWarning(UserWarning):
    """A run's ``metrics.jsonl`` runs ahead of its ``checkpoint.pt`` (whose parameters count)."""


def check_run_dir(path: str | Path, needs: tuple[str, ...] = RUN_FILES) -> Path:
    """``path`` as a Path, after checking that it holds the files ``needs`` (every file of a
    run; ``--resume`` needs only checkpoint.pt, which holds the config and the metrics)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunError(f"run directory {str(path)!r} is a file; allowed: a run's folder (the "
                       "one holding checkpoint.pt)")
    if not path.is_dir():
        raise RunError(f"run directory {str(path)!r} does not exist")
    missing = [f for f in needs if not (path / f).is_file()]
    if missing:
        repair = (f"; `pyro-vae train --resume {path}` writes them again from checkpoint.pt"
                  if (path / "checkpoint.pt").is_file() else "")
        raise RunError(f"run directory {str(path)!r} is incomplete: missing {', '.join(missing)} "
                       f"(a run holds {', '.join(RUN_FILES)}){repair}")
    return path


@dataclass
class Run:
    """A trained run: config, model (with guide), data splits, metrics, raw checkpoint."""

    path: Path
    config: Config
    vae: VAE
    dataset: Dataset
    metrics: list[dict]
    checkpoint: dict

    def q_z(self, x: torch.Tensor, y: torch.Tensor | None = None):
        """The guide's q(z | x) as a torch distribution on the run's device: batch_shape
        [B], event_shape [D]. ``x`` ``[B, X]`` or images, any array or tensor on any device
        (checked by :meth:`points`, so no gradient reaches x: for gradients in x call
        ``run.vae.q_z(x)`` with float32 ``[B, X]`` on the run's device), and labels ``y``
        ``[B]`` for a conditional run."""
        return self.vae.q_z(*self.points(x, y))

    def sample(self, n: int, label: int | None = None, mean: bool = True) -> torch.Tensor:
        """x for n prior draws z ~ p(z), ``[n, X]`` (all of class ``label`` if conditional):
        the mean of p(x | z), or (``mean=False``) a draw x ~ p(x | z)."""
        return self.vae.sample(n, self.prior_labels(n, label), mean=mean)

    def prior_labels(self, n: int, label: int | None = None,
                     field: str = "label") -> torch.Tensor | None:
        """Labels ``[n]`` of n prior draws of a conditional run: all ``label``, or the
        classes in turn; None for an unconditional run. A ``label`` on an unconditional run
        or out of range is refused (ConfigError) naming ``field`` (the CLI's ``--label``)."""
        classes = self.vae.num_classes
        if label is not None and not classes:
            raise ConfigError(f"{field} = {label}: run {str(self.path)!r} is not conditional "
                              f"(model.conditional = false); drop {field}")
        if label is not None and not 0 <= label < classes:
            raise ConfigError(f"{field} = {label}: out of range; allowed 0..{classes - 1}")
        if not classes:
            return None
        if label is None:
            return torch.arange(n, device=self.device) % classes
        return torch.full((n,), int(label), device=self.device)

    def points(self, x, y=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x as the run takes it: float points ``[N, X]`` on the run's device, from any array
        or tensor of vectors or images (checked as :func:`pyro_vae.arrays.as_points` does), and
        labels ``[N]`` for a conditional run (refused for an unconditional one)."""
        points, _ = as_points(x, "x")  # (N, X)
        if points.shape[1] != self.vae.x_dim:
            raise DataError(f"x: {points.shape[1]} values per point; this run was trained on "
                            f"{self.vae.x_dim}")
        if y is not None and not self.vae.num_classes:
            raise DataError("y: this run is not conditional (model.conditional = false); "
                            "allowed: y = None")
        if self.vae.num_classes and y is None:
            raise DataError("y: this run is conditional (model.conditional = true); pass labels")
        labels = (None if y is None else
                  as_labels(y, points.shape[0], classes=self.vae.num_classes).to(self.device))
        return points.to(self.device), labels

    def latent_means(self, x, y=None, batch_size: int = 1000) -> torch.Tensor:
        """E_q[z | x], the mean of the guide's q(z | x), for every point of x: ``[N, D]`` (as
        scvi-tools' ``get_latent_representation``). x ``[N, X]`` or images, any array or
        tensor; labels y ``[N]`` for a conditional run."""
        return posterior_means(self.vae, *self.points(x, y), batch_size=batch_size)

    def evaluate(self, x=None, y=None, k: int = 1000, batch_size: int = 100,
                 seed: int | None = None) -> dict:
        """The numbers of ``pyro-vae evaluate`` (:func:`pyro_vae.evaluate.evaluate_model`:
        ELBO, importance-weighted log p(x) with K draws, active units, PSIS k-hat) on x, by
        default the run's test split; seed defaults to the run's ``train.seed``."""
        if x is None:
            x, y = self.dataset.x_test, self.dataset.y_test if self.vae.num_classes else None
        else:
            x, y = self.points(x, y)
        seed = self.config.train.seed if seed is None else seed
        return evaluate_model(self.vae, x, y, k=k, batch_size=batch_size, seed=seed)

    @torch.no_grad()
    def to_inference_data(self, x: torch.Tensor, num_samples: int = 500, y=None):
        """Draws z ~ q(z | x) for x ``[N, X]`` as ArviZ data (``arviz_bridge``: DataTree
        under ArviZ 1.x, InferenceData under 0.x): one chain of ``num_samples`` draws,
        variable ``z`` with dims (point, latent), as NUTS' data."""
        z = self.q_z(x, y).sample((num_samples,))  # (S, N, D)
        return arviz_bridge.from_draws(z.unsqueeze(0))

    @property
    def device(self) -> torch.device:
        return self.vae.device


def check_config_file(path: Path, cfg: Config) -> None:
    """Warn (:class:`ConfigFileWarning`) when the run's ``config.toml`` at ``path`` is not
    valid TOML, not a valid config, or differs from ``cfg``, the config stored in the run's
    checkpoint: the one the run was trained with, which is used."""
    try:
        edited = from_dict(tomllib.loads(path.read_text()))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        problem = f"is not valid TOML ({err})"
    except ConfigError as err:
        problem = f"is not a valid config ({err})"
    else:
        changed = diff(cfg, edited)
        if not changed:
            return
        old, new, values = to_dict(cfg), to_dict(edited), []
        for key in changed:
            section, name = key.split(".", 1)
            values.append(f"{key} = {new[section][name]!r} there, {old[section][name]!r} in "
                          "the checkpoint")
        problem = f"differs from the checkpoint's config: {'; '.join(values)}"
    warnings.warn(
        f"{path} {problem}. It is ignored: a run is loaded with the config stored in its "
        f"checkpoint.pt, the one it was trained with. To train with the edited file, start a "
        f"new run (pyro-vae train --config {path}) or continue this one with "
        f"pyro-vae train --resume {path.parent} --force", ConfigFileWarning, stacklevel=3)


def load_run(path: str | Path, device: str = "cpu") -> Run:
    """Rebuild model, guide and data of the run at ``path`` on ``device`` (``auto``, ``cpu``
    or ``cuda``); a checkpoint saved on CUDA loads on a CPU-only machine. The config is the
    one stored in the checkpoint; an edited ``config.toml`` is ignored with a
    :class:`ConfigFileWarning`."""
    path = check_run_dir(path)
    dev = resolve_device(device)
    ckpt = ckpt_io.load_checkpoint(path / "checkpoint.pt", map_location=dev)
    cfg = from_dict(ckpt["config"])
    check_config_file(path / "config.toml", cfg)
    ds = load_dataset(cfg.data, dev)
    ckpt_io.check_same_data(ckpt, ds, str(path))
    vae = VAE(cfg, ds.x_dim, ds.num_classes, ds.image_shape).to(dev)
    ckpt_io.load_state(vae, ckpt["model"], f"checkpoint {str(path / 'checkpoint.pt')!r}")
    vae.eval()
    return Run(path, cfg, vae, ds, read_metrics(path, ckpt), ckpt)


def read_metrics(path: Path, ckpt: dict) -> list[dict]:
    """The run's ``metrics.jsonl`` (one JSON object per epoch); a damaged line is refused,
    naming the file and line, with what repairs it."""
    lines = (path / "metrics.jsonl").read_text(errors="replace").splitlines()
    metrics = []
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            metrics.append(json.loads(line))
        except ValueError as err:
            raise RunError(
                f"{str(path / 'metrics.jsonl')!r}, line {number}, is not valid JSON ({err}); "
                f"the checkpoint holds the metrics of {len(ckpt['metrics'])} epochs: "
                f"`pyro-vae train --resume {path}` writes the file again from them") from None
    return _checkpoints_metrics(path, ckpt, metrics)


def _checkpoints_metrics(path: Path, ckpt: dict, metrics: list[dict]) -> list[dict]:
    """``metrics`` (of metrics.jsonl) where they describe the checkpoint's parameters; else,
    with a :class:`StaleCheckpointWarning`, the checkpoint's own. metrics.jsonl is written
    every epoch, checkpoint.pt every ``train.checkpoint_every``: a run killed in between has
    metrics of epochs whose parameters were never saved."""
    saved = ckpt["metrics"]
    if len(metrics) == len(saved):
        return metrics
    every = ckpt["config"].get("train", {}).get("checkpoint_every", "?")
    warnings.warn(
        f"run {str(path)!r}: metrics.jsonl records {len(metrics)} epochs but checkpoint.pt holds "
        f"the parameters after epoch {ckpt['epoch']} (the run stopped before its next checkpoint; "
        f"train.checkpoint_every = {every}): using those and their {len(saved)} epochs of "
        f"metrics; `pyro-vae train --resume {path}` continues from epoch {ckpt['epoch']}",
        StaleCheckpointWarning, stacklevel=3)
    return list(saved)


def fit(x, y=None, run_dir: str | Path = "runs/fit", config: str | Path | None = "own_data",
        overrides: Iterable[str] = (), progress: bool = False) -> Run:
    """Train a VAE on the points x (and labels y) and return the trained :class:`Run`::

        run = pyro_vae.fit(x, run_dir="runs/mine")   # x: [N, X] or images, array or tensor
        z = run.latent_means(x)                      # E_q[z | x]  [N, D]
        q = run.q_z(torch.as_tensor(x))              # q(z | x); run.sample(16), run.evaluate()

    x: vectors ``[N, X]`` or images ``[N, H, W]`` / ``[N, C, H, W]``; y: ``[N]`` whole-number
    labels or None. Every value is checked as for ``data.name = "file"`` (a
    :class:`~pyro_vae.data.DataError` names the first problem). ``config``: a TOML file or a
    bundled config's name (default ``own_data``: Gaussian likelihood, no binarization), then
    ``overrides`` (``"section.key=value"``). The points are saved to ``RUN/data.npy`` (with
    labels ``RUN/data.npz``) and trained on with ``data.name = "file"`` and that file's
    absolute path, so :func:`load_run` and ``pyro-vae evaluate RUN`` read the run like any
    other. ``run_dir`` must be new or empty; if training fails (or is interrupted) before it
    completes an epoch, the folder is removed again."""
    cfg = load_config(config, overrides)
    if cfg.data.path:
        raise ConfigError(f"data.path = {cfg.data.path!r}: fit takes the data as x; "
                          "allowed: no data.path")
    if cfg.model.conditional and y is None:
        raise ConfigError("model.conditional = true needs labels; allowed: fit(x, y) with one "
                          "whole-number label per point")
    points, shape = as_points(x, "x")  # (N, X)
    labels = None if y is None else as_labels(y, points.shape[0], "y")
    run_dir = Path(run_dir)
    ckpt_io.check_new_run_dir(run_dir, empty=True)  # data.npy is written beside the run
    created = not run_dir.exists()
    file = _save_points(run_dir, points, shape, labels)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, name="file", path=str(file)))
    try:
        train(cfg, run_dir, progress=progress)
    except RunError:  # another process claimed the folder: its files are not ours to undo
        raise
    except BaseException:
        metrics = run_dir / "metrics.jsonl"  # one line per completed epoch
        if not (metrics.is_file() and metrics.read_text().strip()):  # nothing to keep: undo
            for item in run_dir.iterdir():
                if item.is_dir():
                    shutil.rmtree(item)
                else:
                    item.unlink()
            if created:
                run_dir.rmdir()
        raise
    return load_run(run_dir, device=cfg.train.device)


def _save_points(run_dir: Path, points: torch.Tensor, shape, labels) -> Path:
    """Write checked points ``[N, X]`` (as images ``[N, C, H, W]`` when ``shape``) to
    ``run_dir/data.npy``, or with labels ``[N]`` to ``run_dir/data.npz``; its absolute path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    data = (points.reshape(-1, *shape) if shape else points).cpu().numpy()
    file = (run_dir / ("data.npy" if labels is None else "data.npz")).resolve()
    write = (lambda f: np.save(f, data)) if labels is None else \
        (lambda f: np.savez(f, x=data, y=labels.cpu().numpy()))
    try:  # a new file only: a second fit into this folder at once must not replace it
        ckpt_io.atomic_write(file, write, replace=False)
    except FileExistsError:
        raise RunError(f"run directory {str(run_dir)!r}: another process wrote {file.name} there "
                       "at the same time; allowed: one run per folder (another run_dir)") from None
    return file

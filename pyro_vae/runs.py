"""Run directories: what ``pyro-vae train`` leaves, and :func:`load_run` to read it back.

``RUN/config.toml`` (resolved config), ``RUN/metrics.jsonl`` (one JSON object per epoch),
``RUN/checkpoint.pt`` (see ``checkpoint.py``), ``RUN/reconstructions.png``,
``RUN/samples.png``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import arviz_bridge
from . import checkpoint as ckpt_io
from .config import Config, from_dict
from .data import Dataset, load_dataset
from .model import VAE
from .training import resolve_device

RUN_FILES = ("config.toml", "metrics.jsonl", "checkpoint.pt")


class RunError(ValueError):
    """A run directory is missing or incomplete."""


def check_run_dir(path: str | Path) -> Path:
    """``path`` as a Path, after checking that it holds every file of a run."""
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"run directory {str(path)!r} does not exist")
    missing = [f for f in RUN_FILES if not (path / f).is_file()]
    if missing:
        raise RunError(
            f"run directory {str(path)!r} is incomplete: missing {', '.join(missing)} "
            f"(a run holds {', '.join(RUN_FILES)})"
        )
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
        [B], event_shape [D]. ``x`` ``[B, X]`` (and labels ``y`` ``[B]``) may be on any device."""
        return self.vae.q_z(x.to(self.device), y)

    def sample(self, n: int, label: int | None = None) -> torch.Tensor:
        """n decoded prior samples ``[n, X]`` (all of class ``label`` if conditional)."""
        y = None
        if self.vae.num_classes:
            if label is None:
                y = torch.arange(n, device=self.device) % self.vae.num_classes
            else:
                y = torch.full((n,), int(label), device=self.device)
        elif label is not None:
            raise ValueError(f"label = {label}: this run is not conditional (model.conditional = false)")
        return self.vae.sample(n, y)

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


def load_run(path: str | Path, device: str = "cpu") -> Run:
    """Rebuild model, guide and data of the run at ``path`` on ``device`` (``auto``, ``cpu``
    or ``cuda``); a checkpoint saved on CUDA loads on a CPU-only machine."""
    path = check_run_dir(path)
    dev = resolve_device(device)
    ckpt = ckpt_io.load_checkpoint(path / "checkpoint.pt", map_location=dev)
    cfg = from_dict(ckpt["config"])
    ds = load_dataset(cfg.data, dev)
    if ds.x_dim != ckpt["x_dim"]:
        raise ckpt_io.CheckpointError(
            f"run {str(path)!r} was trained on data with {ckpt['x_dim']} values per point; "
            f"data set {cfg.data.name!r} now gives {ds.x_dim}"
        )
    vae = VAE(cfg, ds.x_dim, ds.num_classes).to(dev)
    ckpt_io.load_state(vae, ckpt["model"], f"checkpoint {str(path / 'checkpoint.pt')!r}")
    vae.eval()
    metrics = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line]
    return Run(path, cfg, vae, ds, metrics, ckpt)

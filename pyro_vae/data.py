"""Data sets as tensors, placed once on the training device.

Every loader returns a :class:`Dataset` whose images are flattened to ``[N, X]`` float
tensors. Minibatches are later sliced from these tensors by index; nothing here is
per-sample Python work.

Registry ``DATASETS``: name -> loader ``(cfg: DataConfig) -> Dataset`` (on the CPU;
:func:`load_dataset` moves it to the device and applies the binarization).

- ``mnist-10k``: the official MNIST *test* set (10,000 images) shipped in the package,
  split 9,000 train / 1,000 test by a seeded permutation. A demo-sized subset of MNIST.
- ``mnist``, ``fashion-mnist``, ``kmnist``: full sets through torchvision under
  ``data.root`` (downloaded only when ``data.download = true``).
- ``ring``: z ~ N(0, I_2), x = z / alpha + z / ||z|| + noise * eps  (a Gaussian pushed
  through a non-linearity onto a ring).
- ``linear-gaussian``: z ~ N(0, I_d), x = W z + b + s * eps  (probabilistic PCA), with
  W, b fixed by ``data.seed``; :func:`linear_gaussian_params` returns them.
- ``file``: your own data at ``data.path`` (``arrays.file_data``: a ``.npy``, ``.npz`` or
  ``.pt`` file, or a folder of images). ``DataError`` and ``Dataset`` live in ``arrays.py``
  and are named here too.
"""

from __future__ import annotations

import gzip
import hashlib
import math
from importlib import resources
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

from .arrays import DataError, Dataset, file_data, train_test_split
from .config import DataConfig, register_choices

BUNDLED_MNIST = {
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}


# --------------------------------------------------------------------------- IDX files


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw) as used by MNIST: ubyte tensors with a magic header."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(dims):
        raise DataError(f"{path}: header says {dims} but holds {body.size} bytes (truncated?)")
    return body.reshape(dims)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _images(array: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W]`` -> float ``[N, H*W]`` in [0, 1]."""
    return torch.from_numpy(array.reshape(array.shape[0], -1).astype(np.float32) / 255.0)


# --------------------------------------------------------------------------- loaders


def mnist_10k(cfg: DataConfig) -> Dataset:
    """The bundled MNIST test set (md5-checked), split 9,000 / 1,000 by ``cfg.seed``."""
    folder = resources.files("pyro_vae") / "bundled"
    paths = {}
    for name, md5 in BUNDLED_MNIST.items():
        path = Path(str(folder / name))
        if not path.is_file() or _md5(path) != md5:
            raise DataError(
                f"bundled MNIST file {path} is missing or corrupted (md5 should be {md5}); "
                "reinstall pyro_vae"
            )
        paths[name] = path
    x = _images(read_idx(paths["t10k-images-idx3-ubyte.gz"]))
    y = torch.from_numpy(read_idx(paths["t10k-labels-idx1-ubyte.gz"]).astype(np.int64))
    return Dataset("mnist-10k", *train_test_split(x, y, 1000, cfg.seed), (1, 28, 28), 10,
                   "unit-interval")


def _torchvision(cls_name: str, name: str) -> Callable[[DataConfig], Dataset]:
    def load(cfg: DataConfig) -> Dataset:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        root = Path(cfg.root).expanduser()
        try:
            train = cls(str(root), train=True, download=cfg.download)
            test = cls(str(root), train=False, download=cfg.download)
        except RuntimeError as err:
            raise DataError(
                f"data set {name!r} not found under {root / cls_name / 'raw'} ({err}). "
                f"Set data.download=true to fetch it, or place the four IDX files "
                f"(train-images-idx3-ubyte, ...) in that folder."
            ) from None
        return Dataset(
            name,
            _images(train.data.numpy()),
            train.targets.long(),
            _images(test.data.numpy()),
            test.targets.long(),
            (1, 28, 28),
            10,
            "unit-interval",
        )

    load.__doc__ = f"torchvision's {cls_name} (60,000 train / 10,000 test) from data.root."
    return load


def ring(cfg: DataConfig) -> Dataset:
    """z ~ N(0, I_2); x = z / alpha + z / ||z|| + noise * eps  ``[N, 2]``.

    Labels: the angle of z in 8 sectors (for colouring plots). 10% held out for test.
    """
    g = torch.Generator().manual_seed(cfg.seed)
    z = torch.randn(cfg.size, 2, generator=g)  # (N, 2)
    x = z / cfg.alpha + z / z.norm(dim=1, keepdim=True) + cfg.noise * torch.randn(
        cfg.size, 2, generator=g
    )
    angle = torch.atan2(z[:, 1], z[:, 0])  # (N,) in (-pi, pi]
    y = ((angle + math.pi) / (2 * math.pi) * 8).long().clamp(max=7)
    return Dataset("ring", *train_test_split(x, y, cfg.size // 10, cfg.seed), None, 8, "real")


class LinearGaussian(NamedTuple):
    """x = W z + b + s * eps, z ~ N(0, I).  W: ``[X, D]``, b: ``[X]``, s: a float or 0-d tensor."""

    W: torch.Tensor
    b: torch.Tensor
    s: float | torch.Tensor


def linear_gaussian_params(cfg: DataConfig) -> LinearGaussian:
    """W, b drawn from N(0, 1) with generator seed ``cfg.seed + 1``; s = ``cfg.noise``."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    W = torch.randn(cfg.obs_dim, cfg.true_latent_dim, generator=g)
    b = torch.randn(cfg.obs_dim, generator=g)
    return LinearGaussian(W, b, cfg.noise)


def linear_gaussian(cfg: DataConfig) -> Dataset:
    """N draws of x = W z + b + s eps ``[N, X]`` (no labels); 10% held out for test."""
    W, b, s = linear_gaussian_params(cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    z = torch.randn(cfg.size, W.shape[1], generator=g)
    x = z @ W.T + b + s * torch.randn(cfg.size, W.shape[0], generator=g)
    return Dataset("linear-gaussian", *train_test_split(x, None, cfg.size // 10, cfg.seed),
                   None, 0, "real")


DATASETS: dict[str, Callable[[DataConfig], Dataset]] = {
    "mnist-10k": mnist_10k,
    "mnist": _torchvision("MNIST", "mnist"),
    "fashion-mnist": _torchvision("FashionMNIST", "fashion-mnist"),
    "kmnist": _torchvision("KMNIST", "kmnist"),
    "ring": ring,
    "linear-gaussian": linear_gaussian,
    "file": file_data,
}
register_choices("data.name", DATASETS)
BUILT_IN_WITHOUT_PATH = frozenset(DATASETS) - {"file"}  # data sets that never read data.path
# drawn from their config (seed, size), not read: no fingerprint, whose float bits could
# differ by an ulp between hosts while the split is the same
GENERATED = frozenset({"ring", "linear-gaussian"})


# --------------------------------------------------------------------------- binarization


def binarize(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One Bernoulli draw per pixel: x_b ~ Bernoulli(x), x in [0, 1]  ``[N, X]``."""
    return torch.bernoulli(x, generator=generator)


def epoch_inputs(ds: Dataset, generator: torch.Generator) -> torch.Tensor:
    """The training inputs for one epoch: resampled binary images under ``dynamic``."""
    return binarize(ds.x_train, generator) if ds.binarize == "dynamic" else ds.x_train


def fingerprint(ds: Dataset) -> str:
    """sha256 (hex) of a data set's train and test tensors, shapes and labels (before any
    binarization): a run records it, so that a data file changed since (grown, reshuffled:
    another train/test split) is refused instead of evaluated or resumed silently.
    ~25 ms per 30 MB. Not taken for :data:`GENERATED` sets."""
    h = hashlib.sha256()
    for t in (ds.x_train, ds.y_train, ds.x_test, ds.y_test):
        if t is not None:
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype} {list(t.shape)};".encode())
            h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


def load_dataset(cfg: DataConfig, device: torch.device | str = "cpu") -> Dataset:
    """Load ``cfg.name``, apply ``cfg.subset`` and ``cfg.binarize``, move to ``device``.

    ``static``: train and test binarized once (seed ``cfg.seed + 12345``). ``dynamic``: test
    binarized once (deterministic evaluation), train kept grey for per-epoch draws.
    """
    if cfg.name not in DATASETS:
        raise DataError(f"data.name = {cfg.name!r}: unknown; allowed: {', '.join(DATASETS)}")
    if cfg.path and cfg.name in BUILT_IN_WITHOUT_PATH:
        raise DataError(f"data.path = {cfg.path!r} is read only with data.name = 'file', not "
                        f"with data.name = {cfg.name!r}; allowed: --set data.name=file "
                        "(your own data), or no data.path")
    ds = DATASETS[cfg.name](cfg)
    for split in ("x_train", "x_test"):
        x = getattr(ds, split)
        if not torch.isfinite(x).all():
            raise DataError(f"data set {ds.name!r}: {split} contains NaN or infinite values")
    if cfg.subset:
        ds = ds._replace(
            x_train=ds.x_train[: cfg.subset],
            y_train=None if ds.y_train is None else ds.y_train[: cfg.subset],
        )
    if cfg.name not in GENERATED:  # of the split, before any random draw
        ds = ds._replace(fingerprint=fingerprint(ds))
    if cfg.binarize != "none":
        if ds.support == "real":
            raise DataError(
                f"data.binarize = {cfg.binarize!r} needs values in [0, 1], but data set "
                f"{ds.name!r} is real-valued; use data.binarize = 'none' (and a likelihood "
                "for real values, e.g. likelihood.name = 'gaussian')"
            )
        g = torch.Generator().manual_seed(cfg.seed + 12345)
        x_test = binarize(ds.x_test, g)
        x_train = binarize(ds.x_train, g) if cfg.binarize == "static" else ds.x_train
        ds = ds._replace(x_train=x_train, x_test=x_test, support="binary", binarize=cfg.binarize)
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return ds._replace(
        x_train=move(ds.x_train),
        y_train=move(ds.y_train),
        x_test=move(ds.x_test),
        y_test=move(ds.y_test),
    )

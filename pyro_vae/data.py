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
- ``file``: your own data at ``data.path``: a ``.npy`` file (memory-mapped), a ``.npz`` file
  (array ``x``, optional labels ``y``), a ``.pt`` file (a tensor, or a dict with ``x`` and
  optional ``y``) or a folder of images (torchvision's ``ImageFolder``: one subfolder per
  class). ``[N, X]`` arrays are vectors; ``[N, H, W]`` and ``[N, C, H, W]`` are images.
  Split by ``data.test_fraction`` with seed ``data.seed``. :func:`from_arrays` holds the
  checks, shared with ``pyro_vae.fit`` (arrays passed from Python).
"""

from __future__ import annotations

import gzip
import hashlib
import math
import pickle
import zipfile
from importlib import resources
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

from .config import DataConfig, register_choices

BUNDLED_MNIST = {
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}


class DataError(ValueError):
    """A data set cannot be found, read or used as asked."""


class Dataset(NamedTuple):
    """Train/test tensors. ``x_*``: ``[N, X]`` float; ``y_*``: ``[N]`` long or None.

    ``support`` says what values x takes: ``"binary"`` ({0, 1}), ``"unit-interval"``
    ([0, 1], grey images) or ``"real"``. ``binarize == "dynamic"`` means ``x_train`` holds
    grey values to be resampled as Bernoulli draws every epoch (see :func:`epoch_inputs`).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor | None
    x_test: torch.Tensor
    y_test: torch.Tensor | None
    image_shape: tuple[int, ...] | None  # (C, H, W) for images, None for vectors
    num_classes: int  # 0 when there are no labels
    support: str
    binarize: str = "none"

    @property
    def x_dim(self) -> int:
        return self.x_train.shape[1]


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


def _split(x: torch.Tensor, y: torch.Tensor | None, n_test: int, seed: int):
    """Seeded permutation split into (x_train, y_train, x_test, y_test)."""
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    tr, te = perm[n_test:], perm[:n_test]
    return x[tr], None if y is None else y[tr], x[te], None if y is None else y[te]


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
    return Dataset("mnist-10k", *_split(x, y, 1000, cfg.seed), (1, 28, 28), 10, "unit-interval")


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
    return Dataset("ring", *_split(x, y, cfg.size // 10, cfg.seed), None, 8, "real")


class LinearGaussian(NamedTuple):
    """x = W z + b + s * eps, z ~ N(0, I).  W: ``[X, D]``, b: ``[X]``, s: float."""

    W: torch.Tensor
    b: torch.Tensor
    s: float


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
    return Dataset("linear-gaussian", *_split(x, None, cfg.size // 10, cfg.seed), None, 0, "real")


# --------------------------------------------------------------------------- your own data

ALLOWED_SHAPES = "[N, X] vectors, [N, H, W] or [N, C, H, W] images"


def _float_points(x) -> torch.Tensor:
    """x ``[N, ...]`` -> float32 ``[N, X]``; uint8 values are 8-bit pixels, divided by 255.
    A tensor stays on its device; a numpy array (a memory-mapped one too) is copied once,
    straight into a new CPU tensor, without a whole-array temporary of another dtype."""
    n, is_uint8 = x.shape[0], str(x.dtype) in ("uint8", "torch.uint8")
    if isinstance(x, torch.Tensor):
        out = x.detach().reshape(n, -1).to(torch.float32)  # (N, X)
        return out / 255 if is_uint8 else out
    out = torch.empty(n, math.prod(x.shape[1:]))  # (N, X)
    np.copyto(out.numpy(), x.reshape(n, -1), casting="unsafe")
    return out.div_(255) if is_uint8 else out


def as_points(x, where: str = "x") -> tuple[torch.Tensor, tuple[int, ...] | None]:
    """Any numeric array or tensor of vectors ``[N, X]`` or images ``[N, H, W]``,
    ``[N, C, H, W]`` -> float32 points ``[N, X]`` and the image shape ``(C, H, W)`` (None for
    vectors). Every value is checked: a non-numeric type, a wrong rank, an empty set and NaN
    or infinite values raise :class:`DataError` naming ``where``."""
    if not isinstance(x, torch.Tensor):
        try:
            x = np.asarray(x)
        except (ValueError, TypeError) as err:  # ragged nested lists, say
            raise DataError(f"{where}: cannot be read as one array ({err}); allowed: a numpy "
                            f"array or torch tensor of {ALLOWED_SHAPES}") from None
    numeric = not x.is_complex() if isinstance(x, torch.Tensor) else x.dtype.kind in "biuf"
    if not numeric:
        raise DataError(f"{where}: values of type {x.dtype}; allowed: numbers (bool, int, float)")
    if x.ndim not in (2, 3, 4):
        hint = " (one value per point? reshape it to [N, 1])" if x.ndim == 1 else ""
        raise DataError(f"{where}: an array of shape {list(x.shape)} (rank {x.ndim}); "
                        f"allowed: {ALLOWED_SHAPES}{hint}")
    if x.shape[0] == 0 or math.prod(x.shape[1:]) == 0:
        raise DataError(f"{where}: empty (shape {list(x.shape)}); needs at least 2 points "
                        "of at least 1 value each")
    # (C, H, W) of images, C = 1 when [N, H, W] has no channel axis
    shape = None if x.ndim == 2 else tuple(int(d) for d in (1, *x.shape[1:])[-3:])
    points = _float_points(x)  # (N, X)
    bad = ~torch.isfinite(points)  # (N, X)
    if bad.any():
        first = int(bad.any(1).nonzero()[0, 0])
        raise DataError(f"{where}: {int(bad.sum())} NaN or infinite values (the first in point "
                        f"{first}); allowed: finite numbers only (drop or impute those points)")
    return points, shape


def as_labels(y, n: int, where: str = "y") -> torch.Tensor:
    """Labels -> long ``[N]``: one whole number >= 0 per point of x (``n`` points), every
    value checked; anything else raises :class:`DataError` naming ``where``."""
    if not isinstance(y, torch.Tensor):
        y = np.array(y)  # a copy: torch never sees a read-only (memory-mapped) buffer
        if y.dtype.kind not in "biuf":
            raise DataError(f"{where}: labels of type {y.dtype}; allowed: integers >= 0 "
                            "(class names? map them to 0, 1, ..., C - 1)")
        y = torch.from_numpy(y)
    if y.ndim != 1 or y.shape[0] != n:
        raise DataError(f"{where}: labels of shape {list(y.shape)} for {n} points of x; "
                        f"allowed: one label per point, shape [{n}]")
    whole = not y.is_complex() and (
        not y.is_floating_point() or bool((torch.isfinite(y) & (y == y.round())).all()))
    if not whole or bool((y < 0).any()):
        seen = "" if y.is_complex() else f", values in [{y.min().item()}, {y.max().item()}]"
        kind = str(y.dtype).removeprefix("torch.")
        raise DataError(f"{where}: labels of type {kind}{seen}; allowed: whole numbers "
                        ">= 0 (class indices 0, 1, ..., C - 1)")
    return y.long()


def support_of(x: torch.Tensor) -> str:
    """``"binary"`` when every value of x is 0 or 1, ``"unit-interval"`` when all lie in
    [0, 1], else ``"real"`` (the :class:`Dataset` ``support`` field)."""
    lo, hi = x.aminmax()
    if lo < 0 or hi > 1:
        return "real"
    return "binary" if ((x == 0) | (x == 1)).all() else "unit-interval"


def from_arrays(name: str, x, y, cfg: DataConfig, where: str = "x",
                where_y: str = "y") -> Dataset:
    """Checked points x (and labels y, see :func:`as_points`, :func:`as_labels`) split into
    train and test: ``round(N * cfg.test_fraction)`` test points (at least 1, and at least 1
    left to train on), by a permutation seeded with ``cfg.seed``."""
    points, shape = as_points(x, where)  # (N, X)
    n = points.shape[0]
    labels = None if y is None else as_labels(y, n, where_y).to(points.device)  # (N,)
    if n < 2:
        raise DataError(f"{where}: 1 point; needs at least 2 (one to train on, one to test)")
    n_test = min(max(1, round(n * cfg.test_fraction)), n - 1)
    classes = 0 if labels is None else int(labels.max()) + 1
    return Dataset(name, *_split(points, labels, n_test, cfg.seed), shape, classes,
                   support_of(points))


def _read_npy(path: Path, where: str):
    """A ``.npy`` array, memory-mapped: read from disk as it is converted."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False), None
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"{where}: not a readable .npy array ({err})") from None


def _read_npz(path: Path, where: str):
    """Array ``x`` and optional labels ``y`` of a ``.npz`` file."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files if k in ("x", "y")}
            keys = list(f.files)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"{where}: not a readable .npz file ({err})") from None
    if "x" not in arrays:
        raise DataError(f"{where}: no array 'x' (it holds: {', '.join(keys) or 'nothing'}); "
                        "allowed: the data under x, labels under y: np.savez(path, x=x, y=y)")
    return arrays["x"], arrays.get("y")


def _read_pt(path: Path, where: str):
    """A tensor, or a dict with tensor ``x`` and optional labels ``y``, from ``torch.save``
    (read with ``weights_only=True``: no code in the file is run)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError,
            zipfile.BadZipFile) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{where}: not a readable .pt file of tensors ({first})") from None
    if isinstance(obj, torch.Tensor):
        return obj, None
    if isinstance(obj, dict) and "x" in obj:
        return obj["x"], obj.get("y")
    held = (f"a dict with keys {', '.join(map(str, obj)) or '(none)'}" if isinstance(obj, dict)
            else f"a {type(obj).__name__}")
    raise DataError(f"{where}: holds {held}; allowed: a tensor, or a dict with the data "
                    "under 'x' (and labels under 'y')")


def _read_image_folder(path: Path, cfg: DataConfig, where: str):
    """Images ``[N, C, H, W]`` in [0, 1] (C = 1 for ``data.channels = grayscale``, 3 for
    ``rgb``; resized to ``data.image_size`` squared when it is > 0) and labels ``[N]`` from
    the class subfolders, by torchvision's ``ImageFolder``."""
    import torchvision.datasets as tvd
    import torchvision.transforms as T

    steps = [T.Grayscale(1)] if cfg.channels == "grayscale" else []
    steps += [T.Resize((cfg.image_size, cfg.image_size))] if cfg.image_size else []
    try:
        folder = tvd.ImageFolder(str(path), transform=T.Compose([*steps, T.ToTensor()]))
    except FileNotFoundError as err:
        raise DataError(f"{where}: {err}; allowed: a folder with one subfolder of images per "
                        "class (root/cat/1.png, root/dog/2.png)") from None
    images = []
    for i, (file, _) in enumerate(folder.samples):
        try:
            images.append(folder[i][0])  # (C, H, W)
        except OSError as err:  # PIL's UnidentifiedImageError included
            raise DataError(f"{where}: image {file!r} cannot be read ({err})") from None
    sizes = sorted({f"{t.shape[1]}x{t.shape[2]}" for t in images})
    if len(sizes) > 1:
        raise DataError(f"{where}: images of different sizes ({', '.join(sizes[:4])}"
                        f"{', ...' if len(sizes) > 4 else ''}); set data.image_size = S to "
                        "resize them all to SxS")
    return torch.stack(images), torch.tensor(folder.targets)


READERS = {".npy": _read_npy, ".npz": _read_npz, ".pt": _read_pt}


def file_data(cfg: DataConfig) -> Dataset:
    """Your own data from ``cfg.path``: a ``.npy``, ``.npz`` or ``.pt`` file, or a folder
    of images; checked and split by :func:`from_arrays`."""
    allowed = f"allowed: a {', '.join(READERS)} file, or a folder of images"
    where = f"data.path = {cfg.path!r}"
    if not cfg.path:
        raise DataError(f"{where}: data.name = 'file' needs a path; {allowed}")
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise DataError(f"{where}: no such file or folder ({path.resolve()}); {allowed}")
    if path.is_dir():
        x, y = _read_image_folder(path, cfg, where)
    elif cfg.image_size:
        raise DataError(f"data.image_size = {cfg.image_size}: resizes folders of images only, "
                        f"and {where} is a file; allowed here: data.image_size = 0")
    elif path.suffix.lower() not in READERS:
        raise DataError(f"{where}: unknown extension {path.suffix!r}; {allowed}")
    else:
        x, y = READERS[path.suffix.lower()](path, where)
    return from_arrays(path.name, x, y, cfg, where, f"{where}, labels y")


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


# --------------------------------------------------------------------------- binarization


def binarize(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One Bernoulli draw per pixel: x_b ~ Bernoulli(x), x in [0, 1]  ``[N, X]``."""
    return torch.bernoulli(x, generator=generator)


def epoch_inputs(ds: Dataset, generator: torch.Generator) -> torch.Tensor:
    """The training inputs for one epoch: resampled binary images under ``dynamic``."""
    return binarize(ds.x_train, generator) if ds.binarize == "dynamic" else ds.x_train


def load_dataset(cfg: DataConfig, device: torch.device | str = "cpu") -> Dataset:
    """Load ``cfg.name``, apply ``cfg.subset`` and ``cfg.binarize``, move to ``device``.

    ``static``: train and test binarized once (seed ``cfg.seed``). ``dynamic``: test
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

"""Data as arrays: the :class:`Dataset` type, and your own data, checked and read.

A :class:`Dataset` holds train/test tensors, images flattened to ``[N, X]``. Your own data
reach it through :func:`from_arrays` (the checks, shared with ``pyro_vae.fit``, which takes
arrays from Python) and :func:`file_data` (``data.name = "file"``): a ``.npy`` file
(memory-mapped), a ``.npz`` file (array ``x``, optional labels ``y``), a ``.pt`` file (a
tensor, or a dict with ``x`` and optional ``y``) or a folder of images (torchvision's
``ImageFolder``: one subfolder per class). ``[N, X]`` arrays are vectors; ``[N, H, W]`` and
``[N, C, H, W]`` are images. Split by ``data.test_fraction`` with seed ``data.seed``.
``data.py`` holds the built-in data sets and the registry that names this one ``file``.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .config import DataConfig


class DataError(ValueError):
    """A data set cannot be found, read or used as asked."""


class Dataset(NamedTuple):
    """Train/test tensors. ``x_*``: ``[N, X]`` float; ``y_*``: ``[N]`` long or None.

    ``support`` says what values x takes: ``"binary"`` ({0, 1}), ``"unit-interval"``
    ([0, 1], grey images) or ``"real"``. ``binarize == "dynamic"`` means ``x_train`` holds
    grey values to be resampled as Bernoulli draws every epoch (see :func:`pyro_vae.data.epoch_inputs`).
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
    fingerprint: str | None = None  # sha256 of the loaded tensors (data.fingerprint)

    @property
    def x_dim(self) -> int:
        return self.x_train.shape[1]


def split_order(n: int, seed: int) -> torch.Tensor:
    """The seeded permutation ``[n]`` of the train/test split: its first ``n_test`` points
    are the test set, the rest the training set."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def split_rows(x: torch.Tensor, y: torch.Tensor | None, n_test: int):
    """(x_train, y_train, x_test, y_test) of x ``[N, X]`` and y ``[N]`` already in the order
    of :func:`split_order`: views of x's rows, no copy."""
    return (x[n_test:], None if y is None else y[n_test:],
            x[:n_test], None if y is None else y[:n_test])


def train_test_split(x: torch.Tensor, y: torch.Tensor | None, n_test: int, seed: int):
    """Seeded permutation split into (x_train, y_train, x_test, y_test): x copied once, in
    the order of :func:`split_order`, and cut in two (:func:`split_rows`)."""
    order = split_order(x.shape[0], seed)
    return split_rows(x[order], None if y is None else y[order], n_test)


ALLOWED_SHAPES = "[N, X] vectors, [N, H, W] or [N, C, H, W] images"
_WIDE_UNSIGNED = tuple(getattr(torch, f"uint{bits}") for bits in (16, 32, 64)
                       if hasattr(torch, f"uint{bits}"))  # labels torch cannot compare
MIN_CLASS_LIMIT = 1000  # class indices below max(N, this) are accepted


COPY_CHUNK_BYTES = 64 * 2**20  # rows of a shuffled copy from numpy are gathered this many at a time


def _is_uint8(x) -> bool:
    """Whether x holds 8-bit pixels (numpy or torch ``uint8``), read as value / 255."""
    return x.dtype == (torch.uint8 if isinstance(x, torch.Tensor) else np.uint8)


def _float_points(x, order: torch.Tensor | None = None) -> torch.Tensor:
    """x ``[N, ...]`` -> float32 ``[N, X]``, its rows in ``order`` ``[N]`` when given; uint8
    values are 8-bit pixels, divided by 255. A tensor stays on its device; a numpy array (a
    memory-mapped one too, in any memory layout) is copied once, straight into a new CPU
    tensor, with temporaries of at most :data:`COPY_CHUNK_BYTES` when reordered."""
    n = x.shape[0]
    if isinstance(x, torch.Tensor):
        out = x.detach().reshape(n, -1)  # (N, X)
        out = (out if order is None else out[order.to(out.device)]).to(torch.float32)
        return out / 255 if _is_uint8(x) else out
    out = torch.empty(n, math.prod(x.shape[1:]), dtype=torch.float32)  # (N, X)
    rows = out.numpy().reshape(x.shape)  # a C-ordered view of out, whatever x's layout
    with np.errstate(over="ignore", invalid="ignore"):  # as_points names what overflowed
        if order is None:
            np.copyto(rows, x, casting="unsafe")
        else:
            idx, step = order.numpy(), max(1, COPY_CHUNK_BYTES // max(1, x[0].nbytes))
            for start in range(0, n, step):
                np.copyto(rows[start:start + step], x[idx[start:start + step]], casting="unsafe")
    return out.div_(255) if _is_uint8(x) else out


def as_points(x, where: str = "x", split_seed: int | None = None
              ) -> tuple[torch.Tensor, tuple[int, ...] | None]:
    """Any numeric array or tensor of vectors ``[N, X]`` or images ``[N, H, W]``,
    ``[N, C, H, W]`` -> float32 points ``[N, X]`` and the image shape ``(C, H, W)`` (None for
    vectors); with ``split_seed``, the points in the order of ``split_order(N, split_seed)``
    (ready for :func:`split_rows`, with no second copy). Every value is checked: a
    non-numeric type, a wrong rank, an empty set, NaN or infinite values and 8-bit pixels all
    0 or 1 raise :class:`DataError` naming ``where``."""
    x = _checked_array(x, where)
    # (C, H, W) of images, C = 1 when [N, H, W] has no channel axis
    shape = None if x.ndim == 2 else tuple(int(d) for d in (1, *x.shape[1:])[-3:])
    order = None if split_seed is None else split_order(x.shape[0], split_seed)
    points = _float_points(x, order)  # (N, X)
    bad = ~torch.isfinite(points)  # (N, X)
    if bad.any():
        rows = bad.any(1).nonzero()[:, 0].cpu()  # in points' order
        first = int((rows if order is None else order[rows]).min())
        raise DataError(f"{where}: {int(bad.sum())} values that are NaN, infinite or beyond "
                        f"float32's range of +-3.4e38 (the first in point {first}); allowed: "
                        "finite float32 numbers only (drop, impute or rescale those points)")
    if _is_uint8(x) and 0 < points.max() < 1.5 / 255:  # the largest value is 1
        raise DataError(f"{where}: uint8 values all 0 or 1: 8-bit values are pixels, divided "
                        "by 255, so these would read as 0 and 1/255; allowed: for 0/1 data "
                        "(masks, binary images) bool or float values (x.astype(bool))")
    return points, shape


def _checked_array(x, where: str):
    """x as a numpy array (unless a tensor), after refusing by name what :func:`as_points`
    cannot read: a non-numeric type, a rank other than 2, 3 or 4, channels-last images and
    an empty set."""
    if not isinstance(x, torch.Tensor):
        try:
            x = np.asarray(x)
        except (ValueError, TypeError) as err:  # ragged nested lists, say
            raise DataError(f"{where}: cannot be read as one array ({err}); allowed: a numpy "
                            f"array or torch tensor of {ALLOWED_SHAPES}") from None
    _dense(x, where)
    numeric = not x.is_complex() if isinstance(x, torch.Tensor) else x.dtype.kind in "biuf"
    if not numeric:
        raise DataError(f"{where}: values of type {x.dtype}; allowed: numbers (bool, int, float)")
    if x.ndim not in (2, 3, 4):
        hint = " (one value per point? reshape it to [N, 1])" if x.ndim == 1 else ""
        raise DataError(f"{where}: an array of shape {list(x.shape)} (rank {x.ndim}); "
                        f"allowed: {ALLOWED_SHAPES}{hint}")
    if x.ndim == 4 and x.shape[3] in (1, 2, 3, 4) and min(x.shape[1:3]) > 4:  # (N, H, W, C)
        raise DataError(f"{where}: images of shape {list(x.shape)} look channels-last, "
                        "[N, H, W, C]; allowed: channels first, [N, C, H, W] (numpy: "
                        "x.transpose(0, 3, 1, 2); torch: x.permute(0, 3, 1, 2))")
    if x.shape[0] == 0 or math.prod(x.shape[1:]) == 0:
        raise DataError(f"{where}: empty (shape {list(x.shape)}); needs at least 2 points "
                        "of at least 1 value each")
    return x


def _dense(x, where: str) -> None:
    """Refuse a sparse (or other non-strided) tensor by name."""
    if isinstance(x, torch.Tensor) and x.layout != torch.strided:
        raise DataError(f"{where}: a tensor of layout {x.layout}; allowed: a dense tensor "
                        "(x.to_dense())")


def as_labels(y, n: int, where: str = "y", classes: int | None = None) -> torch.Tensor:
    """Labels -> long ``[N]``: one whole number >= 0 per point of x (``n`` points), every
    value checked; anything else raises :class:`DataError` naming ``where``. Labels for a
    trained model of ``classes`` classes lie below it; new data's class count C = max + 1
    (a conditional model's one-hot width) is at most max(N, :data:`MIN_CLASS_LIMIT`)."""
    _dense(y, where)
    if isinstance(y, torch.Tensor) and y.dtype in _WIDE_UNSIGNED:
        y = y.cpu().numpy()  # torch cannot compare these: checked as numpy's below
    if not isinstance(y, torch.Tensor):
        y = np.array(y)  # a copy: torch never sees a read-only (memory-mapped) buffer
        if y.dtype.kind not in "biuf":
            raise DataError(f"{where}: labels of type {y.dtype}; allowed: integers >= 0 "
                            "(class names? map them to 0, 1, ..., C - 1)")
        if y.dtype.kind == "u" and y.size and y.max() > np.iinfo(np.int64).max:
            raise DataError(f"{where}: label {y.max()}; allowed: class indices 0, 1, ..., C - 1")
        y = torch.from_numpy(y.astype(np.int64) if y.dtype.kind == "u" else y)
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
    top = int(y.max()) if y.numel() else 0
    if classes is not None and top >= classes:
        raise DataError(f"{where}: label {top}; allowed: 0..{classes - 1} (the run's classes)")
    if classes is None and top >= max(n, MIN_CLASS_LIMIT):
        raise DataError(f"{where}: label {top} for {n} points (C = {top + 1} classes); allowed: "
                        f"class indices below max(N, {MIN_CLASS_LIMIT}): renumber them "
                        "0..C-1, e.g. np.unique(y, return_inverse=True)[1]")
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
    left to train on), by the permutation :func:`split_order` seeded with ``cfg.seed``; the
    points are copied once, in that order, and the two sets are views of that copy."""
    points, shape = as_points(x, where, split_seed=cfg.seed)  # (N, X), in split order
    n = points.shape[0]
    labels = None if y is None else as_labels(y, n, where_y)  # (N,)
    if labels is not None:
        labels = labels[split_order(n, cfg.seed)].to(points.device)  # as the points
    if n < 2:
        raise DataError(f"{where}: 1 point; needs at least 2 (one to train on, one to test)")
    n_test = min(max(1, round(n * cfg.test_fraction)), n - 1)
    classes = 0 if labels is None else int(labels.max()) + 1
    return Dataset(name, *split_rows(points, labels, n_test), shape, classes,
                   support_of(points))


NPY_MAGIC, ZIP_MAGIC, PICKLE = b"\x93NUMPY", b"PK\x03\x04", b"\x80"  # first bytes
WRITERS = {".npy": "np.save", ".npz": "np.savez", ".pt": "torch.save"}


def _saved_as(path: Path) -> str | None:
    """The extension of what wrote the file, from its first bytes: ``.npy`` (np.save),
    ``.npz`` (np.savez: a zip of .npy files), ``.pt`` (torch.save: a zip holding a
    ``data.pkl``, or a pickle in torch's legacy format), or None (anything else)."""
    with open(path, "rb") as f:
        head = f.read(6)
    if head == NPY_MAGIC:
        return ".npy"
    if head[:4] == ZIP_MAGIC:
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile:
            return None
        return ".pt" if any(n.endswith("data.pkl") for n in names) else ".npz"
    return ".pt" if head[:1] == PICKLE else None


def _check_extension(path: Path, where: str) -> None:
    """Refuse, by name, a file whose contents another extension's writer made (an np.save
    array named .npz, say): each reader would fail on it with a message about its insides."""
    suffix, written = path.suffix.lower(), _saved_as(path)
    if written is not None and written != suffix:
        raise DataError(f"{where}: a file written by {WRITERS[written]} under a {suffix} name; "
                        f"allowed: the file renamed {written}")


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
        with warnings.catch_warnings():  # a sparse tensor is refused below, by name
            warnings.filterwarnings("ignore", message="Validating sparse tensor invariants")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load parses any bytes; whatever fails is named
        text = str(err).strip()
        unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if unsupported:  # weights_only met an object it does not read
            raise DataError(f"{where}: holds objects other than tensors ({unsupported[1]}), "
                            "which are read only by running code from the file; allowed: "
                            "tensors, torch.save({'x': torch.as_tensor(x), 'y': "
                            "torch.as_tensor(y)}, path), or arrays in a .npz file") from None
        unpickler = re.search(r"WeightsUnpickler error:\s*(.+)", text)  # past torch's advice
        first = unpickler[1] if unpickler else text.splitlines()[0] if text else ""
        first = first if first and not first.isdigit() else f"{type(err).__name__} {first}"
        form = "" if zipfile.is_zipfile(path) else "not the zip archive torch.save writes: "
        raise DataError(f"{where}: not a readable .pt file of tensors ({form}{first}); "
                        "allowed: a file torch.save wrote") from None
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
        folder = tvd.ImageFolder(str(path), transform=T.Compose([*steps, T.ToTensor()]),
                                 loader=functools.partial(_eight_bit_image, where=where))
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


EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")


def _eight_bit_image(file: str, where: str):
    """The image in ``file`` as an RGB PIL image (``ImageFolder``'s loader). 16-bit, 32-bit
    and float images (PIL modes I;16, I, F) are refused by name: converting them to RGB
    clips them to 0..255 instead of scaling (a 16-bit image reads nearly white, a float one
    black)."""
    from PIL import Image

    with open(file, "rb") as f:
        image = Image.open(f)
        if image.mode not in EIGHT_BIT_MODES:
            deep = image.mode in ("I", "F") or image.mode.startswith("I;")
            raise DataError(f"{where}: image {file!r} has PIL mode {image.mode!r}"
                            f"{' (more than 8 bits a value)' if deep else ''}; allowed: modes "
                            f"{', '.join(EIGHT_BIT_MODES)}; save other values as an array "
                            "[N, C, H, W] in a .npy file, scaled as you choose")
        return image.convert("RGB")


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
        _check_extension(path, where)
        x, y = READERS[path.suffix.lower()](path, where)
    return from_arrays(path.name, x, y, cfg, where, f"{where}, labels y")

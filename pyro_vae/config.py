"""Configuration: frozen dataclasses, TOML loading, ``--set`` overrides, validation.

One :class:`Config` is passed down through data -> model -> training. It is built from
defaults, then a TOML file (``[data]``, ``[model]``, ``[prior]``, ``[likelihood]``,
``[guide]``, ``[train]`` tables), then ``section.key=value`` overrides, and validated once.
Every bad value raises :class:`ConfigError` naming the key, the value and what is allowed.

Names that live in registries (data sets, priors, likelihoods, guides, activations, ELBOs) are
checked against the live registry, so entries registered from user code are accepted.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import tomli_w


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


REGISTRY = "registry"  # choices=REGISTRY: the names of the registry kept for that key
_REGISTRIES: dict[str, Mapping[str, Any]] = {}


def register_choices(key: str, registry: Mapping[str, Any]) -> None:
    """Validate config key ``key`` ("section.name") against the names of ``registry``, a dict
    kept by the module that owns it (and extended by ``register_prior`` and the like). Config
    receives the names as data: it imports nothing from the floors above it."""
    _REGISTRIES[key] = registry


SEED_MAX = 2**32 - 1  # numpy's seeds (pyro.set_rng_seed seeds numpy too)


FLOAT32_TINY = 1.401298464324817e-45  # float32's smallest positive (subnormal) number
FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max


def _spec(default, *, choices=None, low=None, low_open=False, high=None, high_open=False,
          doc=""):
    """A dataclass field with validation metadata.

    ``choices`` is a tuple of names, or ``REGISTRY`` for a registry's live names.
    ``low`` / ``high`` bound numbers from below / above (``*_open`` makes a bound strict).
    Floats must be finite whatever their bounds.
    """
    meta = dict(choices=choices, low=low, low_open=low_open, high=high, high_open=high_open,
                doc=doc)
    if isinstance(default, (list, tuple)):
        return field(default=tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DataConfig:
    name: str = _spec("mnist-10k", choices=REGISTRY)
    root: str = _spec("~/.cache/pyro_vae", doc="where torchvision data sets live")
    download: bool = _spec(False, doc="allow torchvision to download missing files")
    binarize: str = _spec("dynamic", choices=("none", "dynamic", "static"))
    subset: int = _spec(0, low=0, doc="keep only the first N training images (0 = all)")
    seed: int = _spec(0, low=0, high=SEED_MAX,
                      doc="seed of the train/test split and toy generators")
    size: int = _spec(10000, low=10, doc="number of points drawn for toy data sets")
    obs_dim: int = _spec(10, low=1, doc="linear-gaussian: dimension of x")
    true_latent_dim: int = _spec(2, low=1, doc="linear-gaussian: dimension of the true z")
    noise: float = _spec(0.05, low=0.0, low_open=True, doc="toy observation noise std")
    alpha: float = _spec(10.0, low=0.0, low_open=True, doc="ring: x = z/alpha + z/|z|")
    path: str = _spec("", doc="file: a .npy, .npz (x, optional y), .pt file or image folder "
                      "(relative to the current folder; stored absolute)")
    test_fraction: float = _spec(0.1, low=0.0, low_open=True, high=1.0, high_open=True,
                                 doc="file: share of the points held out for test (seeded)")
    image_size: int = _spec(0, low=0, high=4096,
                            doc="file, image folders: resize to SxS (0 = keep)")
    channels: str = _spec("grayscale", choices=("grayscale", "rgb"),
                          doc="file, image folders: convert to 1 channel or keep 3")


@dataclass(frozen=True)
class ModelConfig:
    latent_dim: int = _spec(50, low=1)
    hidden: tuple[int, ...] = _spec((400,), low=1, doc="hidden widths of the MLPs ([] = linear)")
    activation: str = _spec("softplus", choices=REGISTRY)
    network: str = _spec("mlp", choices=("mlp", "conv"))
    conditional: bool = _spec(False, doc="condition encoder and decoder on y (the prior stays p(z))")


@dataclass(frozen=True)
class PriorConfig:
    name: str = _spec("normal", choices=REGISTRY)
    learnable: bool = _spec(False, doc="normal: learn loc and scale")
    df: float = _spec(5.0, low=0.0, low_open=True, doc="student-t degrees of freedom")
    components: int = _spec(10, low=1, doc="mixture components / VampPrior pseudo-inputs")


@dataclass(frozen=True)
class LikelihoodConfig:
    name: str = _spec("bernoulli", choices=REGISTRY)
    scale: str = _spec("fixed", choices=("fixed", "learned", "per-pixel"))
    sigma: float = _spec(0.1, low=0.0, low_open=True, doc="fixed Gaussian/Laplace scale")


@dataclass(frozen=True)
class GuideConfig:
    name: str = _spec("gaussian", choices=REGISTRY)
    rank: int = _spec(0, low=0, doc="full: low-rank plus diagonal of this rank (0 = Cholesky)")
    flows: int = _spec(2, low=1, doc="iaf: number of inverse autoregressive flows")
    hidden: tuple[int, ...] = _spec((256,), low=1,
                                    doc="iaf: hidden widths of each flow's MADE (>= latent_dim)")
    context: int = _spec(16, low=1, doc="iaf: encoder outputs the flows are conditioned on")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = _spec(40, low=1)
    batch_size: int = _spec(128, low=1)
    lr: float = _spec(1e-3, low=0.0, low_open=True)
    elbo: str = _spec("trace", choices=REGISTRY)
    num_particles: int = _spec(1, low=1)
    compile: bool = _spec(False, doc="torch.compile the loss (train.elbo trace or meanfield)")
    cuda_graph: bool = _spec(False, doc="replay each step as one CUDA graph (train.elbo trace "
                             "or meanfield, one process; uncaptured on the CPU): graphs.py")
    seed: int = _spec(0, low=0, high=SEED_MAX)
    device: str = _spec("auto", choices=("auto", "cpu", "cuda"))
    beta: float = _spec(1.0, low=0.0, doc="weight of the KL term")
    kl_warmup_epochs: int = _spec(0, low=0, doc="linear warm-up of beta from 0")
    checkpoint_every: int = _spec(1, low=1, doc="epochs between checkpoints")
    eval_batch_size: int = _spec(1000, low=1)
    on_nan: str = _spec("stop", choices=("stop", "rollback"),
                        doc="rollback: reload the last checkpoint and halve train.lr")
    max_rollbacks: int = _spec(3, low=0, doc="at most this many rollbacks per run")
    sync_every: int = _spec(0, low=0, doc="steps between host reads of the loss; 0: every "
                            "step on the CPU, every 50 on CUDA (training.TrainState.defer)")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    likelihood: LikelihoodConfig = field(default_factory=LikelihoodConfig)
    guide: GuideConfig = field(default_factory=GuideConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


_SECTION_TYPES = {
    "data": DataConfig,
    "model": ModelConfig,
    "prior": PriorConfig,
    "likelihood": LikelihoodConfig,
    "guide": GuideConfig,
    "train": TrainConfig,
}


def _closest(word: str, options: Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _allowed(key: str, choices) -> list[str]:
    if choices == REGISTRY:
        return sorted(_REGISTRIES[key])
    return list(choices)


def _bounds(fld: dataclasses.Field) -> str:
    """The field's range as text: `` > 0``, `` > 0 and < 1``, or empty."""
    meta, parts = fld.metadata, []
    if meta.get("low") is not None:
        parts.append(f"{'>' if meta['low_open'] else '>='} {meta['low']}")
    if meta.get("high") is not None:
        parts.append(f"{'<' if meta['high_open'] else '<='} {meta['high']}")
    return (" " + " and ".join(parts)) if parts else ""


def _spelling(value: Any, kind: type) -> str:
    """A hint for a number TOML does not read (``.001``, ``05``, ``1.``), or a whole float
    (``1e3``) given for an integer: how to write it."""
    try:
        number = float(value) if isinstance(value, (str, float)) else None
    except ValueError:
        return ""
    if number is None or not math.isfinite(number) or (isinstance(value, float) and kind is float):
        return ""
    if kind is int:
        return f" (write {int(number)})" if number.is_integer() else ""
    return f" (TOML spells it {number!r})"


def _check_value(key: str, fld: dataclasses.Field, value: Any) -> Any:
    """Coerce ``value`` to the field's type and check its range and choices."""
    kind = fld.type
    if kind in ("bool", bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r}: expected true or false")
    elif kind in ("int", int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} = {value!r}: expected an integer{_spelling(value, int)}")
    elif kind in ("float", float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} = {value!r}: expected a number{_spelling(value, float)}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{key} = {value!r}: expected a finite number{_bounds(fld)}")
        if value != 0 and not FLOAT32_TINY <= abs(value) <= FLOAT32_MAX:
            low, zero_ok = fld.metadata.get("low"), ""
            if low is None or low < 0 or (low == 0 and not fld.metadata["low_open"]):
                zero_ok = ", or 0"
            raise ConfigError(
                f"{key} = {value!r}: float32, which the model computes in, would make it "
                f"{'0' if abs(value) < 1 else 'infinite'}; allowed:{_bounds(fld)} with a "
                f"magnitude from {FLOAT32_TINY:.2g} to {FLOAT32_MAX:.2g}{zero_ok}")
    elif kind in ("str", str):
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {value!r}: expected a string")
    elif str(kind).startswith("tuple"):
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise ConfigError(f"{key} = {value!r}: expected a list of integers")
        value = tuple(value)
    meta = fld.metadata
    numbers = value if isinstance(value, tuple) else (value,)
    for v in numbers:
        low, high = meta.get("low"), meta.get("high")
        if not isinstance(v, (int, float)):
            continue
        if (low is not None and (v < low or (meta["low_open"] and v == low))) or (
                high is not None and (v > high or (meta["high_open"] and v == high))):
            raise ConfigError(f"{key} = {value!r}: out of range, must be{_bounds(fld)}")
    if meta.get("choices") is not None:
        allowed = _allowed(key, meta["choices"])
        if value not in allowed:
            raise ConfigError(
                f"{key} = {value!r}: unknown name{_closest(value, allowed)}; "
                f"allowed: {', '.join(allowed)}"
            )
    return value


def from_dict(tree: dict) -> Config:
    """Build and validate a :class:`Config` from nested ``{section: {key: value}}``."""
    sections = {}
    for section, values in tree.items():
        if section not in _SECTION_TYPES:
            raise ConfigError(
                f"unknown config section [{section}]{_closest(section, _SECTION_TYPES)}; "
                f"allowed: {', '.join(_SECTION_TYPES)}"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table of key = value pairs")
        sections[section] = values
    built = {}
    for section, cls in _SECTION_TYPES.items():
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, value in sections.get(section, {}).items():
            full = f"{section}.{key}"
            if key not in fields:
                raise ConfigError(
                    f"unknown config key {full}{_closest(key, fields)}; "
                    f"allowed in [{section}]: {', '.join(fields)}"
                )
            values[key] = _check_value(full, fields[key], value)
        built[section] = cls(**values)
    if built["data"].path:  # absolute, so a run's config.toml works from any folder
        path = os.path.abspath(os.path.expanduser(built["data"].path))
        built["data"] = dataclasses.replace(built["data"], path=path)
    return Config(**built)


def to_dict(cfg: Config) -> dict:
    """Nested plain dict of ``cfg`` (tuples as lists), the inverse of :func:`from_dict`."""
    return {
        name: {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(sec).items()}
        for name, sec in ((f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg))
    }


def parse_override(text: str) -> tuple[str, str, Any]:
    """Split ``section.key=value``; the value is read as TOML, else taken as a string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. train.epochs=5")
    path, raw = text.split("=", 1)
    section, key = path.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key, value


BUNDLED_CONFIGS = Path(__file__).parent / "configs"  # one TOML file per named setting


def config_file(path: str | Path) -> Path:
    """A config file: ``path`` itself, or the bundled config of that name (``ring_2d`` ->
    ``pyro_vae/configs/ring_2d.toml``)."""
    path = Path(path)
    if path.is_file():
        return path
    bundled = BUNDLED_CONFIGS / f"{path.name}.toml"
    if path.parent == Path(".") and not path.suffix and bundled.is_file():
        return bundled  # (also when a folder of that name is here)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a folder; allowed: a TOML file, or a "
                          "bundled config's name")
    stems = sorted(p.stem for p in BUNDLED_CONFIGS.glob("*.toml"))
    if path.parent == Path(".") and path.suffix == ".toml" and path.stem in stems:
        return BUNDLED_CONFIGS / path.name  # "ring_2d.toml" for the bundled ring_2d
    near = difflib.get_close_matches(path.stem.lower(), stems, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near and path.parent == Path(".") else ""
    raise ConfigError(f"config file {str(path)!r} does not exist{hint}; bundled configs, "
                      f"by name: {', '.join(stems)}")


def _check_overrides(overrides) -> None:
    """Refuse overrides that are not a list of strings (one string would be read by letter)."""
    if isinstance(overrides, (str, Mapping)) or overrides is None:
        raise ConfigError(f"overrides = {overrides!r}; allowed: a list of 'section.key=value' "
                          "strings, e.g. ['train.epochs=10']")


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Defaults <- TOML file at ``path`` (or a bundled config's name, see
    :func:`config_file`) <- ``section.key=value`` overrides; validated."""
    _check_overrides(overrides)  # before the file is read
    tree: dict = {}
    if path is not None:
        path = config_file(path)
        try:
            tree = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:  # TOML is UTF-8 text
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {err}") from None
        try:  # the file's own values first, so that an error in one names the file
            from_dict(tree)
        except ConfigError as err:
            raise ConfigError(f"config file {str(path)!r}: {err}") from None
    return _overridden(tree, overrides)


def with_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    """``cfg`` <- ``section.key=value`` overrides; validated (e.g. a checkpoint's config)."""
    return _overridden(to_dict(cfg), overrides)


def _overridden(tree: dict, overrides: Iterable[str]) -> Config:
    """:func:`from_dict` of ``tree`` (modified in place) with the overrides set."""
    _check_overrides(overrides)
    for text in overrides:
        section, key, value = parse_override(text)
        tree.setdefault(section, {})
        if not isinstance(tree[section], dict):
            raise ConfigError(f"[{section}] must be a table of key = value pairs")
        tree[section][key] = value
    return from_dict(tree)


def dumps(cfg: Config) -> str:
    """The resolved config as TOML text (``load_config`` reads it back to ``cfg``)."""
    return tomli_w.dumps(to_dict(cfg))


def config_hash(cfg: Config) -> str:
    """The first 16 hex digits of the sha256 of the canonical TOML text; equal configs have
    equal hashes."""
    return hashlib.sha256(dumps(cfg).encode()).hexdigest()[:16]


def diff(a: Config, b: Config) -> list[str]:
    """Keys (``section.key``) whose values differ between two configs."""
    da, db = to_dict(a), to_dict(b)
    return [f"{s}.{k}" for s in da for k in da[s] if da[s][k] != db[s][k]]

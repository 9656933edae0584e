"""The VAE as a Pyro model and guide.

Generative story (``model``), for each of the B data points in ``pyro.plate("data", B)``::

    z ~ p(z)                  [B, D]   prior, from PRIORS[prior.name]
    x ~ p(x | z) = f(dec(z))  [B, X]   likelihood, from LIKELIHOODS[likelihood.name]

Amortized guide (``guide``)::

    z ~ q(z | x) = family(enc(x))   [B, D]   from GUIDES[guide.name] (``guides.py``; the
                                           default: N(loc(x), diag(scale(x)^2)))

SVI maximises ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z)) <= log p(x). With
``model.conditional`` the encoder, decoder see the one-hot label y ``[B, C]`` too (CVAE).
``kl_weight`` (beta) scales the latent site in both model and guide (:func:`kl_scaled`),
so the objective becomes E_q[log p(x|z)] - beta KL.

Parameters live on this ``nn.Module`` (not in Pyro's global param store); training
optimises ``vae.parameters()`` with a torch optimizer. Code that needs Pyro's param store
(``JitTrace_ELBO``, ``pyro.infer.SVI``) wraps model and guide with :func:`registered`.
"""

from __future__ import annotations

import contextlib

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from .config import Config, ConfigError
from .guides import GUIDES, gaussian_params, moments
from .likelihoods import LIKELIHOODS
from .networks import Decoder, Encoder
from .priors import PRIORS

LATENT = "z"  # site names shared by model and guide
OBS = "x"
PLATE = "data"


def kl_scaled(weight: float):
    """Scale the latent site's log-densities by ``weight`` (beta); at 0 mask them out,
    which drops log p(z) - log q(z|x) from the ELBO (Pyro's scale must be positive); at 1
    nothing (one handler fewer on Pyro's stack: host time in every step)."""
    if weight == 1.0:
        return contextlib.nullcontext()
    return poutine.scale(scale=weight) if weight > 0 else poutine.mask(mask=False)


def check_conv_shape(image_shape: tuple[int, ...] | None, x_dim: int) -> tuple[int, ...]:
    """The image shape ``(C, H, W)`` the conv networks take: ``image_shape``, or, given none,
    ``(1, 28, 28)`` for 784 values (an MNIST image; ``VAE(cfg, 784)`` from Python). H and W
    must be divisible by 4."""
    if image_shape is None and x_dim == 28 * 28:
        image_shape = (1, 28, 28)
    if image_shape is None:
        raise ConfigError(
            f"model.network = 'conv' needs images, but the data are vectors of {x_dim} values; "
            "allowed for vectors: model.network = 'mlp'")
    c, h, w = image_shape
    if h % 4 or w % 4:
        raise ConfigError(
            f"model.network = 'conv' needs image height and width divisible by 4, data has "
            f"{h}x{w} images; allowed: data.image_size = {max(4, round(max(h, w) / 4) * 4)} "
            "(image folders) or model.network = 'mlp'")
    return tuple(image_shape)


class VAE(nn.Module):
    """Encoder, decoder, prior and likelihood modules of one VAE.

    ``x_dim``: pixels per image (X); ``num_classes``: C for a conditional model (else 0);
    ``image_shape``: ``(C, H, W)`` of image data (``Dataset.image_shape``; None for vectors),
    which ``model.network = "conv"`` needs (without it, X = 784 is read as 28x28).
    """

    def __init__(self, cfg: Config, x_dim: int, num_classes: int = 0,
                 image_shape: tuple[int, ...] | None = None):
        super().__init__()
        m = cfg.model
        if m.conditional and num_classes < 2:
            d = cfg.data
            source = f"data.path = {d.path!r}" if d.path else f"data.name = {d.name!r}"
            held = "no labels" if num_classes == 0 else "labels of one class only"
            how = (": labels y in a .npz (np.savez(path, x=x, y=y)) or .pt dict, or one image "
                   "subfolder per class" if d.path else "")
            raise ConfigError(f"model.conditional = true needs labels of at least 2 classes; "
                              f"{source} has {held}{how}")
        if m.conditional and cfg.prior.name == "vamp":
            raise ConfigError(
                "prior.name = 'vamp' with model.conditional = true is not supported: the "
                "pseudo-inputs have no label; use prior.name = 'normal' or 'mixture'"
            )
        if cfg.prior.name == "vamp" and cfg.guide.name != "gaussian":
            raise ConfigError(
                f"prior.name = 'vamp' mixes the diagonal Gaussian guide over pseudo-inputs; "
                f"guide.name = {cfg.guide.name!r} is not supported with it: use guide.name = "
                "'gaussian' or another prior")
        if m.network == "conv":
            image_shape = check_conv_shape(image_shape, x_dim)
        self.x_dim, self.latent_dim = x_dim, m.latent_dim
        self.num_classes = num_classes if m.conditional else 0
        self.likelihood = LIKELIHOODS[cfg.likelihood.name](cfg.likelihood, x_dim)
        conv = m.network == "conv"
        shape = image_shape or (1, 28, 28)  # used by the conv networks only
        self.family = _guide_family(cfg, m.latent_dim)  # encoder outputs [B, P] -> q(z|x)
        g = cfg.guide  # the family's name, a low rank named (no per-point fit of that family)
        self.guide_name = f"full (rank {g.rank})" if g.name == "full" and g.rank else g.name
        self.encoder = Encoder(x_dim, self.family.num_params, m.hidden, m.activation,
                               self.num_classes, conv, shape)
        self.family.init_encoder(self.encoder.net[-1])
        self.decoder = Decoder(x_dim, m.latent_dim, tuple(reversed(m.hidden)), m.activation,
                               self.likelihood.outputs_per_pixel, self.num_classes, conv, shape)
        self.prior = PRIORS[cfg.prior.name](cfg.prior, m.latent_dim, x_dim)

    # ---------------------------------------------------------------- distributions

    @property
    def device(self) -> torch.device:
        """The device of the parameters (where every input must live)."""
        return next(self.parameters()).device

    def onehot(self, y: torch.Tensor | None) -> torch.Tensor | None:
        """Labels ``[B]`` -> one-hot ``[B, C]`` on the model's device for a conditional
        model, else None. The range check reads y on the host, so it runs where Pyro's
        validation is on: not in a training step after the first (which validates)."""
        if not self.num_classes:
            return None
        if y is None:
            raise ValueError("this VAE is conditional (model.conditional = true): pass labels y")
        if dist.is_validation_enabled() and (y.min() < 0 or y.max() >= self.num_classes):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes - 1}], got [{y.min()}, {y.max()}]"
            )
        y = y.to(self.device)
        return y.new_zeros((y.shape[0], self.num_classes), dtype=torch.float32).scatter_(
            1, y[:, None], 1.0)  # F.one_hot, without its host-side check on the CPU

    def prior_dist(self) -> dist.Distribution:
        """p(z): batch_shape (), event_shape [D]."""
        return self.prior(self.encode_gaussian)

    def encode_gaussian(self, x: torch.Tensor, y1h: torch.Tensor | None = None):
        """(loc, scale) ``[B, D]`` each of the guide's diagonal Gaussian (for a flow: its
        base) at x ``[B, X]``; the VampPrior mixes these over its pseudo-inputs."""
        return gaussian_params(self.encoder(x, y1h), self.latent_dim)

    def likelihood_dist(self, z: torch.Tensor, y1h: torch.Tensor | None = None) -> dist.Distribution:
        """p(x | z): z ``[..., B, D]`` -> batch_shape [..., B], event_shape [X]."""
        return self.likelihood(self.decoder(z, y1h))

    def q_z(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dist.Distribution:
        """The guide's q(z | x) (``guide.name``; by default N(loc(x), diag(scale(x)^2))) for x
        ``[B, X]`` (and labels y ``[B]`` if conditional): batch_shape [B], event_shape [D].
        ("Posterior" is kept for the model's p(z | x), which q approximates.)"""
        return self.q_z_onehot(x, self.onehot(y))

    def q_z_onehot(self, x: torch.Tensor, y1h: torch.Tensor | None) -> dist.Distribution:
        """:meth:`q_z` from one-hot labels ``[B, C]`` (or None): for callers that hold them
        already, and for the compiled loss (no label check, so no host synchronisation)."""
        return self.family(self.encoder(x, y1h))

    # ---------------------------------------------------------------- Pyro programs

    def model(self, x: torch.Tensor, y: torch.Tensor | None = None, kl_weight: float = 1.0):
        """p(z) p(x | z) with x ``[B, X]`` observed; returns z ``[B, D]``."""
        y1h = self.onehot(y)
        with pyro.plate(PLATE, x.shape[0], device=x.device):
            with kl_scaled(kl_weight):
                z = pyro.sample(LATENT, self.prior_dist().expand([x.shape[0]]))
            pyro.sample(OBS, self.likelihood_dist(z, y1h), obs=x)
        return z

    def guide(self, x: torch.Tensor, y: torch.Tensor | None = None, kl_weight: float = 1.0):
        """q(z | x), amortized by the encoder; returns z ``[B, D]``."""
        y1h = self.onehot(y)
        with pyro.plate(PLATE, x.shape[0], device=x.device):
            with kl_scaled(kl_weight):
                return pyro.sample(LATENT, self.q_z_onehot(x, y1h))

    @torch.no_grad()
    def sample(self, n: int, y: torch.Tensor | None = None, mean: bool = True) -> torch.Tensor:
        """x for n prior draws z ~ p(z): the mean of p(x | z), or (``mean=False``) a draw
        x ~ p(x | z); ``[n, X]`` (labels y ``[n]`` if conditional)."""
        z = self.prior_dist().sample((n,))
        px = self.likelihood_dist(z, self.onehot(y))
        return px.mean if mean else px.sample()

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of p(x | z = E_q[z | x]): ``[B, X]``."""
        y1h = self.onehot(y)
        return self.likelihood_dist(moments(self.q_z_onehot(x, y1h))[0], y1h).mean


def _guide_family(cfg: Config, latent_dim: int):
    """``GUIDES[guide.name]``, with a MADE too narrow for the latent, or a low rank above it
    (W W^T of rank r > D is no more than a full covariance, at r - D wasted columns), refused
    by name."""
    g = cfg.guide
    if g.name == "iaf" and (not g.hidden or min(g.hidden) < latent_dim):
        raise ConfigError(
            f"guide.hidden = {list(g.hidden)}: an IAF's MADE needs at least one hidden layer, "
            f"each of width >= model.latent_dim = {latent_dim}")
    if g.name == "full" and g.rank > latent_dim:
        raise ConfigError(f"guide.rank = {g.rank}: above model.latent_dim = {latent_dim}; "
                          f"allowed: 0 (Cholesky factor) or 1..{latent_dim} (low rank)")
    return GUIDES[g.name](g, latent_dim)


def registered(fn, vae: VAE, name: str = "vae"):
    """``fn`` (vae.model or vae.guide) with a ``pyro.module`` statement first, so that
    tools that find parameters through Pyro's param store (JIT ELBOs, ``pyro.infer.SVI``)
    see the VAE's parameters (the same tensors, so a torch optimizer still updates them)."""

    def wrapped(*args, **kwargs):
        pyro.module(name, vae)
        return fn(*args, **kwargs)

    return wrapped

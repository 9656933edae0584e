"""Objectives: the ELBO estimators SVI minimises, by name, and the compiled negative ELBO.

Every estimator targets the ELBO of ``VAE.model`` / ``VAE.guide`` on a minibatch x ``[B, X]``,

    ELBO(x) = E_q[log p(x|z)] - beta KL(q(z|x) || p(z))  <=  log p(x)   (summed over B)

``ELBOS`` (``train.elbo``): name -> builder ``TrainConfig -> pyro.infer.ELBO``:
- ``trace``: ``Trace_ELBO`` (Monte Carlo KL),
- ``meanfield``: ``TraceMeanField_ELBO`` (closed-form KL where torch has one, else MC),
- ``jit``: ``JitTrace_ELBO`` (the same estimator, traced with the PyTorch JIT),
- ``iwae``: ``RenyiELBO(alpha=0)`` = the IWAE bound log (1/K) sum_k w_k, K = num_particles.

:func:`negative_elbo` is the same estimator written out as one torch function, for
``torch.compile`` (``train.compile = true``, with ``trace`` or ``meanfield``).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable

import pyro
import torch
from pyro import poutine
from pyro.infer import JitTrace_ELBO, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import kl_divergence

from .config import Config, ConfigError, TrainConfig, register_choices
from .evaluate import log_terms
from .guides import is_gaussian
from .model import VAE


def _particles(cfg: TrainConfig) -> dict:
    return dict(num_particles=cfg.num_particles, vectorize_particles=cfg.num_particles > 1,
                max_plate_nesting=1)


class OneParticleIWAEWarning(UserWarning):
    """``train.elbo = 'iwae'`` with one particle: the IWAE bound at K = 1 is the ELBO."""


def _iwae(cfg: TrainConfig) -> RenyiELBO:
    """``RenyiELBO(alpha=0)`` over ``num_particles`` vectorized particles; with one particle
    the IWAE bound is the ELBO, which is said (a tighter bound needs K >= 2)."""
    if cfg.num_particles == 1:
        warnings.warn("train.elbo = 'iwae' with train.num_particles = 1 is the ELBO (the IWAE "
                      "bound at K = 1); for a tighter bound set train.num_particles >= 2",
                      OneParticleIWAEWarning, stacklevel=3)
    return RenyiELBO(alpha=0.0, **{**_particles(cfg), "vectorize_particles": True})


ELBOS: dict[str, Callable[[TrainConfig], pyro.infer.ELBO]] = {
    "trace": lambda c: Trace_ELBO(**_particles(c)),
    "meanfield": lambda c: TraceMeanField_ELBO(**_particles(c)),
    "jit": lambda c: JitTrace_ELBO(**_particles(c), ignore_jit_warnings=True),
    "iwae": _iwae,
}
register_choices("train.elbo", ELBOS)

COMPILABLE = ("trace", "meanfield")  # train.elbo values that train.compile supports


class MonteCarloKLWarning(UserWarning):
    """The analytic-KL ELBO falls back to a Monte Carlo KL for this prior."""


@contextlib.contextmanager
def jit_notice_silenced():
    """Silence exactly torch's deprecation notice for ``torch.jit.trace`` (torch >= 2.11:
    a DeprecationWarning in 2.11, a FutureWarning by 2.14, so matched by message alone),
    which Pyro's ``JitTrace_ELBO`` and ``NUTS(jit_compile=True)`` still call when they
    trace; every other warning is raised as before."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`torch.jit.trace` is deprecated")
        yield


DEFERRABLE = ("trace", "meanfield")  # train.elbo values pyro_host_reads_deferred applies to


@contextlib.contextmanager
def pyro_host_reads_deferred():
    """Within: Pyro's ``Trace_ELBO`` and ``TraceMeanField_ELBO`` compute their loss without
    reading anything on the host. Pyro reads each sample site's log-probability sum with
    ``.item()`` (to return a float) and branches on ``isnan(loss).any()`` (to warn): about
    five host reads a step, each of which stalls a GPU until its queue drains. Here its
    ``torch_item`` keeps the value as a detached tensor and ``warn_if_nan`` passes it
    through, so ``differentiable_loss`` returns the same gradient, and the value to float32
    rounding (Pyro adds the site sums as Python floats), as a 0-d tensor
    (``training.train_step`` catches a NaN itself). Pyro's two functions are
    swapped in its modules' namespaces and restored on exit."""
    from pyro.infer import trace_elbo, trace_mean_field_elbo

    saved = [(m, m.torch_item) for m in (trace_elbo, trace_mean_field_elbo)]
    warn = trace_elbo.warn_if_nan
    try:
        for m, _ in saved:
            m.torch_item = _detached
        trace_elbo.warn_if_nan = lambda value, *args, **kwargs: value
        yield
    finally:
        for m, item in saved:
            m.torch_item = item
        trace_elbo.warn_if_nan = warn


def _detached(x):
    return x.detach() if torch.is_tensor(x) else x


def _probe_q(vae: VAE):
    """q(z|x) at one all-zero input: the guide's family, seen without data."""
    x = torch.zeros(1, vae.x_dim, device=vae.device)
    y1h = torch.zeros(1, vae.num_classes, device=x.device) if vae.num_classes else None
    return vae.q_z_onehot(x, y1h)


def has_gaussian_guide(vae: VAE) -> bool:
    """Whether the guide is a Gaussian (diagonal, full or low-rank; not a flow)."""
    return is_gaussian(_probe_q(vae))


def written_out(cfg: Config) -> bool:
    """Whether :func:`negative_elbo` computes ``cfg``'s estimator: ``train.elbo`` in
    :data:`COMPILABLE` with the diagonal Gaussian guide (it draws z = loc + scale * eps).
    Compiled and data-parallel training both need it."""
    return cfg.train.elbo in COMPILABLE and cfg.guide.name == "gaussian"


def check_written_out(cfg: Config) -> None:
    """Refuse ``train.compile = true`` or ``train.cuda_graph = true`` where the written-out
    loss (:func:`negative_elbo`, which both run) is not the estimator asked for, each with
    one error: an ELBO other than :data:`COMPILABLE`, a guide other than the diagonal
    Gaussian (it draws z = loc + scale * eps). Each mode, and the two together
    (the compiled loss captured in the graph), gives the eager parameters on the same seed,
    losses to float32 rounding (tests/test_train.py, tests/test_graphs.py; tests/test_cuda.py
    on a GPU)."""
    tc = cfg.train
    for key, on in (("compile", tc.compile), ("cuda_graph", tc.cuda_graph)):
        if not on:
            continue
        if tc.elbo not in COMPILABLE:
            raise ConfigError(f"train.{key} = true with train.elbo = {tc.elbo!r}: train.{key} "
                              f"supports train.elbo = {' or '.join(map(repr, COMPILABLE))}")
        if cfg.guide.name != "gaussian":
            raise ConfigError(f"train.{key} = true with guide.name = {cfg.guide.name!r}: its "
                              "loss draws z = loc + scale * eps, so it supports guide.name = "
                              f"'gaussian'; use train.{key} = false for this guide")


def call_compiled(compiled, *args) -> torch.Tensor:
    """``compiled(*args)``, with a compiler failure turned into one clear ConfigError."""
    try:
        return compiled(*args)
    except torch._dynamo.exc.BackendCompilerFailed as err:  # e.g. no C++ compiler
        raise ConfigError(f"train.compile = true: torch.compile failed on this machine "
                          f"({type(err.inner_exception).__name__}: "
                          f"{str(err.inner_exception).splitlines()[0]}); "
                          "allowed here: train.compile = false") from err


def uses_analytic_kl(cfg: Config, vae: VAE) -> bool:
    """Whether the loss takes KL(q(z|x) || p(z)) in closed form: ``train.elbo = meanfield``
    where torch knows that KL (else TraceMeanField_ELBO estimates it by Monte Carlo)."""
    return cfg.train.elbo == "meanfield" and has_closed_form_kl(vae)


def has_closed_form_kl(vae: VAE) -> bool:
    """Whether torch knows KL(q(z|x) || p(z)) for this guide and prior in closed form."""
    try:
        kl_divergence(_probe_q(vae), vae.prior_dist().expand([1]))
    except NotImplementedError:
        return False
    return True


def negative_elbo(vae: VAE, x: torch.Tensor, eps: torch.Tensor, y1h: torch.Tensor | None,
                  weight: torch.Tensor, analytic_kl: bool) -> torch.Tensor:
    """-ELBO of the minibatch as ``Trace_ELBO`` computes it for ``VAE.model``/``VAE.guide``
    (``analytic_kl``: as ``TraceMeanField_ELBO`` does), without Pyro's tracing::

        z_k = loc(x) + scale(x) * eps_k                         eps ``[K, B, D]`` ~ N(0, I)
        loss = -(1/K) sum_k sum_b [log p(x_b | z_kb) - w (log q(z_kb | x_b) - log p(z_kb))]

    with ``KL(q(z|x_b) || p(z))`` in closed form in place of the bracketed log-ratio when
    ``analytic_kl``. ``weight`` w (a 0-d tensor, so changing beta does not recompile) is
    the KL weight of :func:`pyro_vae.model.kl_scaled`; ``y1h``: one-hot labels ``[B, C]`` or
    None. Returns a scalar; meant for ``torch.compile`` (one graph: no data-dependent Python).
    Its noise eps is drawn by the caller, outside the compiled graph, in the order Pyro
    draws it, so a compiled step computes the eager step's loss on the same seed (tested).
    """
    q = vae.q_z_onehot(x, y1h)  # batch [B], event [D]
    z = q.base_dist.loc + q.base_dist.scale * eps  # (K, B, D), the reparameterized draw
    lw = log_terms(vae, x, z, y1h, q)  # each (K, B); unused terms are dropped when compiled
    if analytic_kl:
        kl = kl_divergence(q, vae.prior_dist().expand(q.batch_shape))  # (B,)
    else:
        kl = lw.log_q - lw.log_prior  # (K, B)
    return -(lw.log_lik - weight * kl).sum() / eps.shape[0]


def diagnose_nonfinite(vae: VAE, args: tuple, weight: float) -> str:
    """Name the sample sites whose log-probability is non-finite (model and guide traced
    at this minibatch) and the parameters whose value or gradient is non-finite."""
    parts = []
    with pyro.validation_enabled(False), torch.no_grad():
        guide_tr = poutine.trace(vae.guide).get_trace(*args, kl_weight=weight)
        model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(
            *args, kl_weight=weight)
        for label, tr in (("model", model_tr), ("guide", guide_tr)):
            for name, site in tr.nodes.items():
                if site["type"] == "sample":
                    lp = site["fn"].log_prob(site["value"])
                    if not torch.isfinite(lp).all():
                        parts.append(f"{label} site {name!r} has non-finite log_prob")
    for name, p in vae.named_parameters():
        if not torch.isfinite(p).all():
            parts.append(f"parameter {name} is non-finite")
        elif p.grad is not None and not torch.isfinite(p.grad).all():
            parts.append(f"gradient of {name} is non-finite")
    return "; ".join(parts) or "no single site or parameter identified"

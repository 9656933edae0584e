"""Training: stochastic variational inference on the VAE, with checkpoints and resume.

Each step is SVI: minimise the negative ELBO estimator of ``train.elbo`` on a minibatch,

    loss(x) = -ELBO(x) = -(E_q[log p(x|z)] - beta KL(q(z|x) || p(z)))   (summed over B)

with gradients by the reparameterization trick and Adam on ``vae.parameters()`` (one
torch optimizer whose state is checkpointed; equivalent to ``pyro.infer.SVI.step``).
Minibatches are slices of a seeded permutation of the data tensor already on the device.

The estimator is ``objectives.ELBOS[train.elbo]``; ``train.compile = true`` computes it with
``objectives.negative_elbo`` under ``torch.compile``; ``train.cuda_graph = true`` replays
every step after the first as one CUDA graph (``graphs.py``).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import pyro
import torch
from tqdm import tqdm

from . import checkpoint as ckpt_io
from . import distributed
from .config import Config, ConfigError, TrainConfig, config_hash, to_dict
from .data import Dataset, epoch_inputs, load_dataset
from .distributed import Group
from .evaluate import elbo_terms, mean_se, rng_untouched
from .graphs import NONE_BAD, StepGraphs, fold_step, loss_and_grad_norms, optimized
from .likelihoods import check_data
from .model import VAE, registered
from .objectives import (DEFERRABLE, ELBOS, MonteCarloKLWarning, call_compiled,
                         check_written_out, diagnose_nonfinite, has_gaussian_guide,
                         jit_notice_silenced, negative_elbo, pyro_host_reads_deferred,
                         uses_analytic_kl)


class NonFiniteError(RuntimeError):
    """The loss or a gradient went NaN/inf; the message names the sites and parameters."""


class Interrupted(RuntimeError):
    """Training stopped on request (SIGINT/SIGTERM) after writing a checkpoint."""


class TrainResult(NamedTuple):
    """What :func:`train` returns. ``metrics``: one dict per epoch (see ``metrics.jsonl``)."""

    vae: VAE
    dataset: Dataset
    metrics: list[dict]
    config: Config
    run_dir: Path | None


def resolve_device(name: str | torch.device, field: str = "train.device") -> torch.device:
    """``auto`` -> CUDA when available else CPU; ``cuda`` without a GPU is refused, naming
    ``field`` (a ``torch.device`` is taken as it is)."""
    if isinstance(name, torch.device):
        return name
    if name not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device = {name!r}; allowed: auto, cpu, cuda (or a torch.device)")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"{field} = 'cuda' but no CUDA device is available on this machine; "
            "allowed here: auto, cpu"
        )
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def kl_weight(cfg: TrainConfig, epoch: int) -> float:
    """beta for 0-based ``epoch``: beta * min(1, (epoch + 1) / kl_warmup_epochs)."""
    if cfg.kl_warmup_epochs == 0:
        return cfg.beta
    return cfg.beta * min(1.0, (epoch + 1) / cfg.kl_warmup_epochs)


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """The generator of an epoch's shuffle and binarization: a function of (seed, epoch)
    alone, so a resumed run replays an interrupted epoch exactly."""
    return torch.Generator(device=device).manual_seed(seed * 100_003 + epoch)


def make_optimizer(params, lr: float) -> torch.optim.Adam:
    """Adam with the fused (single-kernel) update where this torch supports it for the
    parameters' device (CPU since torch 2.4), else the default multi-tensor update."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr)


def build(cfg: Config, device: torch.device | str = "cpu") -> tuple[Dataset, VAE]:
    """Load the data on ``device`` and build the VAE for it (after checking they fit)."""
    ds = load_dataset(cfg.data, device)
    vae = VAE(cfg, ds.x_dim, ds.num_classes, ds.image_shape).to(device)
    check_data(vae.likelihood, cfg.likelihood.name, ds)
    return ds, vae


@dataclass
class TrainState:
    """Where training stands: the model, its data and optimizer, and the position.

    ``state_dict()`` is the checkpoint payload (its schema is written out in
    ``checkpoint.py``) and ``load_state_dict()`` its inverse, RNG streams included: resuming
    and rolling back are both ``load_state_dict`` of a saved payload."""

    cfg: Config
    vae: VAE
    dataset: Dataset
    optimizer: torch.optim.Optimizer
    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps so far
    step_in_epoch: int = 0  # > 0 when interrupted mid-epoch
    epoch_loss: float = 0.0  # sum of the minibatch losses of the current epoch so far
    epoch_seconds: float = 0.0  # training seconds of the current epoch before an interruption
    lr_factor: float = 1.0  # train.lr is multiplied by it after rollbacks
    rollbacks: int = 0  # so far in the run: train.max_rollbacks bounds them
    metrics: list[dict] = field(default_factory=list)  # one dict per completed epoch
    group: Group = Group()  # data-parallel processes (not checkpointed: a launch's choice)
    sync_every: int = 1  # steps between host reads of the loss (see defer)
    pending: tuple | None = None  # (loss sum, first non-finite step) on the device, unread
    graphs: StepGraphs | None = None  # train.cuda_graph: the captured step (not checkpointed)

    POSITION = ("epoch", "step_in_epoch", "step", "epoch_loss", "epoch_seconds", "lr_factor",
                "rollbacks")

    @classmethod
    def create(cls, cfg: Config, device: torch.device) -> "TrainState":
        ds, vae = build(cfg, device)
        optimizer = make_optimizer(vae.parameters(), cfg.train.lr)
        every = cfg.train.sync_every or (50 if device.type == "cuda" else 1)
        # skipping a non-finite update on the device needs the fused Adam's found_inf
        state = cls(cfg, vae, ds, optimizer, sync_every=every if optimizer.defaults["fused"] else 1)
        if cfg.train.cuda_graph:
            state.graphs = StepGraphs(state, uses_analytic_kl(cfg, vae))
        return state

    def state_dict(self) -> dict:
        return {
            "config": to_dict(self.cfg), "config_hash": config_hash(self.cfg),
            "model": self.vae.state_dict(), "optimizer": self.optimizer.state_dict(),
            "rng": ckpt_io.rng_state(self.vae.device),
            **{k: getattr(self, k) for k in self.POSITION},
            "metrics": list(self.metrics),
            "x_dim": self.dataset.x_dim, "num_classes": self.dataset.num_classes,
            "data": ckpt_io.data_record(self.dataset),
        }

    def load_state_dict(self, ckpt: dict) -> None:
        ckpt_io.load_state(self.vae, ckpt["model"], "checkpoint")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.metrics = list(ckpt["metrics"])
        for k in self.POSITION:
            setattr(self, k, ckpt.get(k, getattr(self, k)))
        self.set_lr_factor(self.lr_factor)  # a forced config change of train.lr applies
        ckpt_io.set_rng_state(ckpt["rng"], self.vae.device)
        self.pending = None

    def defer(self, loss_and_norms: torch.Tensor) -> None:
        """Record a step's (loss, gradient norms) ``[1 + P]`` without reading it on the host (a
        GPU runs ahead): a non-finite step's update is skipped inside the fused Adam
        (``found_inf``, as ``torch.amp.GradScaler`` does) and its step number kept."""
        # float64: its 29 bits beyond float32's hold the sum of an epoch's float32 losses
        # exactly (while it stays under 2^29 times a loss's last bit), so the sum does not
        # depend on where the reads fall: a resumed run reads at other steps and must add up
        # to the same epoch
        self.pending = self.pending or (loss_and_norms.new_zeros((), dtype=torch.float64),
                                        loss_and_norms.new_full((), NONE_BAD, dtype=torch.float64))
        self.optimizer.found_inf = fold_step(*self.pending, loss_and_norms, float(self.step))

    def read_pending(self) -> None:
        """Fold the deferred losses into ``epoch_loss`` (one host read); a non-finite step
        among them raises :class:`NonFiniteError`."""
        if self.pending is None:
            return
        loss_sum, first_bad = torch.stack(self.pending).tolist()
        self.pending = None
        if first_bad < NONE_BAD:  # loss_sum holds a non-finite loss: it is not added
            raise NonFiniteError(
                f"non-finite loss or gradient at epoch {self.epoch + 1}, step {int(first_bad) + 1} "
                f"(read at step {self.step}): its update, and any later non-finite one, was "
                "skipped; the last checkpoint is intact. Rerun with train.sync_every = 1 (and "
                "train.cuda_graph = false) to name the sites; try a smaller train.lr or "
                "train.on_nan = 'rollback'.")
        self.epoch_loss += loss_sum

    def set_lr_factor(self, factor: float) -> None:
        self.lr_factor = factor
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.train.lr * factor


LossFn = Callable[[torch.Tensor, "torch.Tensor | None", float, bool], torch.Tensor]


def make_loss(cfg: Config, vae: VAE, group: Group = Group()) -> LossFn:
    """``loss(x, y, weight, validate)``: the -ELBO estimate of ``train.elbo`` for minibatch
    x ``[B, X]`` (labels y ``[B]`` or None) with KL weight ``weight``, as a scalar tensor,
    gradients left in ``.grad``. ``validate``: run Pyro's program eagerly with its shape and
    support checks (the first step; the compiled loss computes the same value, unchecked).
    After the first step the ELBOs in ``objectives.DEFERRABLE`` run inside
    ``objectives.pyro_host_reads_deferred`` (no host read of their own: :func:`train_step`
    checks the loss and gradients for every ELBO, on the device or on the host).
    In a group of several processes: ``distributed.make_loss`` (x is the global batch)."""
    tc = cfg.train
    analytic_kl = _checked_kl(cfg, vae)
    if group.world > 1:
        return distributed.make_loss(vae, tc.num_particles, analytic_kl, group)
    elbo = ELBOS[tc.elbo](tc)
    model, guide = vae.model, vae.guide
    if tc.elbo in ("jit", "iwae"):  # these find parameters through Pyro's param store
        pyro.clear_param_store()
        model, guide = registered(vae.model, vae), registered(vae.guide, vae)
    compiled = torch.compile(negative_elbo, dynamic=False) if tc.compile else None
    traced = set()  # train.elbo = "jit": the KL weights Pyro has traced the ELBO for

    def loss(x, y, weight: float, validate: bool) -> torch.Tensor:
        if compiled is not None and not validate:
            # eps [K, B, D], K = train.num_particles: for K = 1 the values of Pyro's [B, D] draw
            eps = torch.randn(tc.num_particles, x.shape[0], vae.latent_dim, device=x.device)
            value = call_compiled(compiled, vae, x, eps, vae.onehot(y),
                                  x.new_full((), weight), analytic_kl)
        else:
            args = (x,) if y is None else (x, y)  # no None argument: the JIT ELBO traces args
            if tc.elbo == "jit":  # traces with torch.jit at each new KL weight
                with jit_notice_silenced():
                    trace_jit_elbo(elbo, model, guide, args, weight, traced)
            defer = not validate and tc.elbo in DEFERRABLE
            with pyro_host_reads_deferred() if defer else contextlib.nullcontext():
                if not hasattr(elbo, "differentiable_loss"):  # RenyiELBO does its own backward
                    # and returns a float: one host read a step, whatever train.sync_every
                    return torch.tensor(elbo.loss_and_grads(model, guide, *args, kl_weight=weight),
                                        device=x.device)
                value = elbo.differentiable_loss(model, guide, *args, kl_weight=weight)
        value.backward()
        return value.detach()

    return loss


def _checked_kl(cfg: Config, vae: VAE) -> bool:
    """Whether the loss takes the KL in closed form (``objectives.uses_analytic_kl``), after
    refusing ``meanfield`` without a Gaussian guide and warning where it falls back to a
    Monte Carlo KL."""
    if cfg.train.elbo == "meanfield" and not has_gaussian_guide(vae):
        raise ConfigError(
            f"train.elbo = 'meanfield' computes KL(q(z|x) || p(z)) in closed form, which needs a "
            f"Gaussian guide; guide.name = {cfg.guide.name!r} is not one: use train.elbo = "
            "'trace' (or 'iwae', 'jit')")
    analytic_kl = uses_analytic_kl(cfg, vae)
    if cfg.train.elbo == "meanfield" and not analytic_kl:
        warnings.warn(
            f"train.elbo = 'meanfield': no closed-form KL between the Gaussian guide and "
            f"prior {cfg.prior.name!r}; TraceMeanField_ELBO uses the Monte Carlo estimate "
            "for the latent site (the ELBO stays unbiased)", MonteCarloKLWarning, stacklevel=4)
    return analytic_kl


def trace_jit_elbo(elbo, model, guide, args: tuple, weight: float, traced: set) -> None:
    """Have ``JitTrace_ELBO`` trace its loss for KL weight ``weight`` on a forked random
    stream, unless ``weight`` is in ``traced`` (then added). Pyro traces at the first call
    with new keyword values by running the model three times, three draws of the noise: a
    resumed run traces at another step than an uninterrupted one, and would draw different
    noise from there on."""
    if weight in traced:
        return
    with rng_untouched(args[0].device):
        elbo.differentiable_loss(model, guide, *args, kl_weight=weight)
    traced.add(weight)


def train_step(state: TrainState, loss: LossFn, x: torch.Tensor, y, weight: float) -> None:
    """One SVI update on minibatch x ``[B, X]``, its loss added to ``state.epoch_loss``. A NaN
    or infinite loss or gradient raises :class:`NonFiniteError` before the update, naming
    what went wrong; with ``state.sync_every > 1`` or ``train.cuda_graph`` the update is
    skipped on the device and the error raised at the next host read (``TrainState.defer``).
    With ``state.graphs`` every step but the first (which validates) replays its graph."""
    if state.graphs is not None and state.step > 0:
        state.graphs.step(state, x, y, weight)
        state.step += 1
        if state.step % state.sync_every == 0:
            state.read_pending()
        return
    state.optimizer.zero_grad(set_to_none=True)
    validate = state.step == 0  # validate shapes and supports once
    with pyro.validation_enabled(validate):
        value = loss(x, y, weight, validate)
    grads = [p.grad for p in optimized(state.optimizer) if p.grad is not None]
    loss_and_norms = distributed.all_sum(loss_and_grad_norms(value, grads), state.group)
    if state.sync_every > 1:  # no host read in this step: see TrainState.defer
        state.defer(loss_and_norms)
        state.optimizer.step()
        state.step += 1
        if state.step % state.sync_every == 0:
            state.read_pending()
        return
    loss_value, *norms = loss_and_norms.tolist()  # summed over ranks: the global batch's loss
    if not all(map(math.isfinite, (loss_value, *norms))):
        raise NonFiniteError(
            f"non-finite loss or gradient at epoch {state.epoch + 1}, step {state.step + 1} "
            f"(loss = {loss_value}): {diagnose_nonfinite(state.vae, (x, y), weight)}. "
            "No update was applied; the last checkpoint is intact. Try a smaller "
            "train.lr, train.on_nan = 'rollback', or check the data.")
    state.optimizer.step()
    state.step += 1
    state.epoch_loss += loss_value


def run_epoch(state: TrainState, loss: LossFn, progress: bool = False,
              should_stop: Callable[[], bool] = lambda: False) -> bool:
    """Train the rest of epoch ``state.epoch`` (from ``state.step_in_epoch``), then evaluate
    and record its metrics. Returns False, with the state at the next step, when
    ``should_stop()`` turned true mid-epoch; True when the epoch is complete."""
    tc, ds = state.cfg.train, state.dataset
    weight = kl_weight(tc, state.epoch)
    g = epoch_generator(tc.seed, state.epoch, ds.x_train.device)
    x_epoch = epoch_inputs(ds, g)  # (N, X) on the device
    n = ds.x_train.shape[0]
    perm = torch.randperm(n, generator=g, device=ds.x_train.device)  # (N,)
    labels = ds.y_train if state.vae.num_classes else None
    steps = math.ceil(n / tc.batch_size)
    bar = tqdm(range(state.step_in_epoch, steps), initial=state.step_in_epoch, total=steps,
               desc=f"epoch {state.epoch + 1}/{tc.epochs}", disable=not progress, leave=False)
    t0 = time.perf_counter()
    for i in bar:
        idx = perm[i * tc.batch_size : (i + 1) * tc.batch_size]
        x = x_epoch[idx]  # (B, X)
        train_step(state, loss, x, None if labels is None else labels[idx], weight)
        state.step_in_epoch = i + 1
        if i % 10 == 0 and state.pending is None:  # the epoch's mean loss, where read
            bar.set_postfix(loss=f"{state.epoch_loss / min(n, (i + 1) * tc.batch_size):.2f}")
        # in a group, asking every rank is a read: made only where the losses are read
        polled = state.group.world == 1 or state.step % state.sync_every == 0
        if polled and distributed.any_rank(should_stop(), state.group, x.device):
            state.read_pending()
            state.epoch_seconds += time.perf_counter() - t0
            return False
    state.read_pending()
    record_epoch(state, weight, state.epoch_seconds + time.perf_counter() - t0)
    return True


def record_epoch(state: TrainState, weight: float, seconds: float) -> dict:
    """Evaluate the test ELBO and its terms, append the epoch's metrics, move to the next
    epoch; returns the metrics dict. ``train_elbo``: minus the epoch's mean training loss
    per data point, the objective trained, averaged while the parameters moved: the ELBO
    only at KL weight 1 (else E_q[log p(x|z)] - w KL) and for ``train.elbo`` other than
    ``iwae`` (the IWAE bound); ``test_elbo`` is the ELBO at the epoch's end, weight 1.
    ``test_elbo_se``: sd / sqrt(N) of the N test points'
    one-draw ELBOs, the error of ``test_elbo`` from the draws and the test points together
    (``pyro-vae evaluate`` names the two apart); None for one test point. Likewise
    ``test_reconstruction_se`` and ``test_kl_se`` for its two terms; ``test_points``: N.
    A non-finite test ELBO (an update that overflowed the model) raises
    :class:`NonFiniteError`."""
    tc, ds = state.cfg.train, state.dataset
    with pyro.validation_enabled(False):  # a non-finite model is named below, not by a check
        rec, kl = elbo_terms(state.vae, ds.x_test, ds.y_test if state.vae.num_classes else None,
                             batch_size=tc.eval_batch_size, seed=tc.seed)  # (N,) each
    per_point = torch.stack([rec - kl, rec, kl], 1)  # (N, 3)
    spread = mean_se(per_point)  # (3,) sd / sqrt(N) over the points; NaN for N = 1
    test_elbo, test_rec, test_kl, se, rec_se, kl_se = torch.cat(
        [per_point.mean(0), spread]).tolist()  # one host read
    if not math.isfinite(test_elbo):
        labels = ds.y_test if state.vae.num_classes else None
        raise NonFiniteError(
            f"non-finite test ELBO after epoch {state.epoch + 1}: "
            f"{diagnose_nonfinite(state.vae, (ds.x_test, labels), weight)}. The last "
            "checkpoint is intact. Try a smaller train.lr or train.on_nan = 'rollback'.")
    state.metrics.append({
        "epoch": state.epoch + 1,
        "train_elbo": -state.epoch_loss / ds.x_train.shape[0],
        "test_elbo": test_elbo,
        "test_elbo_se": None if math.isnan(se) else se,
        "test_reconstruction": test_rec,
        "test_reconstruction_se": None if math.isnan(rec_se) else rec_se,
        "test_kl": test_kl,
        "test_kl_se": None if math.isnan(kl_se) else kl_se,
        "test_points": per_point.shape[0],
        "kl_weight": weight,
        "seconds": seconds,
    })
    state.epoch, state.step_in_epoch, state.epoch_loss, state.epoch_seconds = state.epoch + 1, 0, 0.0, 0.0
    return state.metrics[-1]


def _resumed(resume, run_dir, cfg: Config, force: bool) -> tuple[dict | None, Path | None]:
    """(the checkpoint to resume from or None, the run directory or None) for :func:`train`:
    a run directory's checkpoint under the resume policy (``checkpoint.resume_checkpoint``),
    and no forced new batch size mid-epoch; a new run's directory must not hold a run."""
    if isinstance(resume, (str, Path)):
        run_dir = Path(resume) if run_dir is None else run_dir
        resume = ckpt_io.resume_checkpoint(resume, cfg, force)
    elif resume is None and run_dir is not None:  # on every rank: rank 0 writes only after
        ckpt_io.check_new_run_dir(Path(run_dir))  # DDP's first collective, past every check
    if resume is not None:
        ckpt_io.check_mid_epoch_batch_size(resume, cfg)
    return resume, None if run_dir is None else Path(run_dir)


def train(
    cfg: Config,
    run_dir: str | Path | None = None,
    *,
    progress: bool = False,
    resume: str | Path | dict | None = None,
    force: bool = False,
    should_stop: Callable[[], bool] = lambda: False,
    on_epoch: Callable[[dict], None] = lambda metrics: None,
) -> TrainResult:
    """Train ``cfg`` from scratch, or continue the run ``resume`` (a run directory, or a
    checkpoint dict): its checkpoint is refused when ``cfg`` differs from the run's config,
    unless ``force`` (:func:`pyro_vae.checkpoint.resume_checkpoint`).

    With ``run_dir`` (default: the resumed run's): writes ``config.toml``, ``metrics.jsonl``
    after every epoch, ``checkpoint.pt`` before the first step, every
    ``train.checkpoint_every`` epochs and at the end (``checkpoint.Saver``). When
    ``should_stop()`` turns true the current step finishes, a checkpoint is written and
    :class:`Interrupted` is raised. A non-finite loss or gradient raises
    :class:`NonFiniteError` before the update (``train.on_nan = "rollback"``: back to the
    last checkpoint, train.lr halved). ``on_epoch(metrics)`` gets each epoch's metrics. In
    a process group (``distributed.py``) every rank trains its shards; rank 0 writes."""
    tc = cfg.train
    device = resolve_device(tc.device)
    check_written_out(cfg)
    resume, run_dir = _resumed(resume, run_dir, cfg, force)
    pyro.set_rng_seed(tc.seed)  # the one seed: torch, numpy, python (the same on every rank)
    state, group = TrainState.create(cfg, device), distributed.current()
    state.group = distributed.check_supported(cfg, group, state.dataset.x_train.shape[0])
    loss = make_loss(cfg, state.vae, group)
    if resume is not None:
        ckpt_io.check_same_data(resume, state.dataset, str(run_dir or "the checkpoint"), cfg.data)
        state.load_state_dict(resume)
    saver = ckpt_io.Saver(state, run_dir if group.is_main else None,  # rank 0 alone writes
                          new=resume is None)
    while state.epoch < tc.epochs:
        try:
            finished = run_epoch(state, loss, progress, should_stop)
        except NonFiniteError as err:
            saver.roll_back(err)
            continue
        if not finished:
            saver.save()
            raise Interrupted(f"stopped at epoch {state.epoch + 1}, step "
                              f"{state.step_in_epoch}; checkpoint written")
        on_epoch(state.metrics[-1])
        saver.end_epoch()
        if distributed.any_rank(should_stop(), group, device) and state.epoch < tc.epochs:
            saver.save()
            raise Interrupted(f"stopped after epoch {state.epoch}; checkpoint written")
    return TrainResult(state.vae, state.dataset, state.metrics, cfg, run_dir)

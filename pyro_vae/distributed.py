"""Data-parallel SVI on PyTorch's distributed engine (``DistributedDataParallel``).

Launched by ``torchrun --nproc_per_node=R -m pyro_vae train ...``: each of the R processes
(ranks) holds the whole model and data, and takes its shard of every global minibatch of B
points. The negative ELBO is a sum over points, so the single-process gradient of a global
batch is the *sum* of the shard gradients; DDP *averages* them across ranks, so each rank's
loss is multiplied by R (:class:`ELBOModule`)::

    grad = (1/R) sum_r grad(R * loss_r) = grad sum_r loss_r = grad loss(global batch)

The Monte Carlo noise is drawn for the whole global batch on every rank (same seed, same
stream) and each rank takes its rows, so R processes compute exactly what one process
computes on the same batch (tested with gloo and 2 processes). This needs the noise drawn
outside the model, as ``objectives.negative_elbo`` does: distributed training supports
``train.elbo`` = trace or meanfield with the diagonal Gaussian guide. Gradient averaging is
DDP's own (gloo on the CPU, NCCL on GPUs); rank 0 alone writes the run directory.
"""

from __future__ import annotations

import gc
import os
import sys
from typing import NamedTuple, NoReturn

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .config import Config, ConfigError
from .evaluate import rng_untouched
from .model import VAE
from .objectives import COMPILABLE, negative_elbo, written_out


class Group(NamedTuple):
    """This process's place in the group: ``rank`` of ``world`` processes (0 of 1 alone)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class RankError(ConfigError):
    """Bad input that only some ranks see (each of them reports it, not rank 0 alone)."""


def _env_int(name: str, default: int) -> int:
    """The whole number >= 0 in environment variable ``name`` (``default`` when unset)."""
    text = os.environ.get(name, str(default))
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError(f"{name} = {text!r} (from the environment); allowed: a whole number "
                          ">= 0, as torchrun sets it: launch with torchrun --nproc_per_node=N")
    return value


def launched() -> bool:
    """Whether this process was started by torchrun (or a launcher setting its variables)
    as one of several. A ``WORLD_SIZE`` that is not a whole number is refused by name."""
    return _env_int("WORLD_SIZE", 1) > 1


REPORTER_GRACE_S = 30.0  # how long a quiet rank leaves the reporter to print (see main)


def reports_errors() -> bool:
    """Whether this process reports bad input that every process of its node sees alike
    (config, data, runs) at once: alone, or the node's first process (``LOCAL_RANK`` 0; an
    unreadable one counts as 0), so that a launch with a bad setting prints its error once
    per node. The others wait :data:`REPORTER_GRACE_S` first (``cli.main``): torchrun ends
    them when the reporter exits; one still running then reports too, so nothing is lost."""
    try:
        return not launched() or _env_int("LOCAL_RANK", 0) == 0
    except ConfigError:
        return True


def init_from_env(device: torch.device) -> Group:
    """Join the group torchrun described in the environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``): gloo on the CPU, NCCL on CUDA (each
    process on GPU ``LOCAL_RANK``). Alone (no torchrun), the group of one."""
    if not launched():
        return Group()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE = {os.environ['WORLD_SIZE']} but {', '.join(missing)} "
                          "not set: launch with torchrun --nproc_per_node=N -m pyro_vae train ...")
    _check_launch_env()
    if device.type == "cuda":
        torch.cuda.set_device(_local_gpu())
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return current()


def _check_launch_env() -> None:
    """Refuse, by name, a launch environment torch would answer with a traceback or a hang:
    ``RANK`` not below ``WORLD_SIZE`` (its rendezvous would wait for ever), a ``MASTER_PORT``
    outside 1..65535, a ``LOCAL_RANK`` that is not a whole number."""
    world, rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
    _env_int("LOCAL_RANK", 0)
    if rank >= world:  # seen by this rank alone: it reports it itself
        raise RankError(f"RANK = {rank} (from the environment) with WORLD_SIZE = {world}; "
                        f"allowed: 0..{world - 1}, one rank per process, as torchrun sets them")
    port = _env_int("MASTER_PORT", 0)
    if not 1 <= port <= 65535:
        raise ConfigError(f"MASTER_PORT = {os.environ['MASTER_PORT']!r} (from the environment); "
                          "allowed: a port number 1..65535")


def exit_process(code: int) -> NoReturn:
    """End this process with status ``code``. Alone: ``sys.exit``, after ``gc.freeze()``:
    the interpreter's finalization then skips the cycle collection of every object alive
    now, which takes about 1 s once torch, Dynamo and Pyro are loaded (on the project's
    2-core machine, a short ``pyro-vae train`` took 1.20 s from its last line to its exit
    before, 0.25 s after). The rest of the exit (atexit handlers, flushing stdout and
    stderr, module teardown) runs as usual, but an object held in a reference cycle now is
    never finalised: no ``__del__``, no flush of a buffered file. The rule this rests on:
    every writer is closed before the command returns (``checkpoint.atomic_write``,
    ``inspection.save_figure`` and xarray's ``to_netcdf`` close theirs).
    One of several under torchrun: without the interpreter's finalization (``os._exit``
    once stdout and stderr are flushed).

    Why: gloo's worker threads outlive ``destroy_process_group`` (DDP keeps the backend
    alive), and a worker that drops the last C++ reference to a finished all-reduce's tensor
    takes the GIL to release its Python object. If that falls in the interpreter's
    finalization, CPython ends the thread inside a C++ destructor and the process aborts
    ("terminate called without an active exception"), after which torchrun kills the other
    ranks, rank 0 mid-way through writing its figures (pytorch/pytorch#190489; seen here in
    about 1 run in 10 on a loaded machine). By now every file is written and closed."""
    try:
        several = launched()
    except ConfigError:  # reported by the command (train) that reads it
        several = False
    if several:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    gc.freeze()
    sys.exit(code)


def _local_gpu() -> int:
    """This process's GPU, ``LOCAL_RANK``; more processes on a node than it has GPUs is
    refused with one clear error (NCCL needs a GPU of its own for each process)."""
    local, gpus = _env_int("LOCAL_RANK", 0), torch.cuda.device_count()
    if local >= gpus:
        raise RankError(
            f"train.device = cuda with LOCAL_RANK = {local}: this node has {gpus} GPU(s), and "
            f"each process needs its own; allowed: torchrun --nproc_per_node at most {gpus}, "
            "or --set train.device=cpu (gloo)")
    return local


def current() -> Group:
    """The group of this process: the initialised process group, else the group of one."""
    if dist.is_available() and dist.is_initialized():
        return Group(dist.get_rank(), dist.get_world_size())
    return Group()


def check_supported(cfg: Config, group: Group, n_train: int) -> Group:
    """``group``, after refusing by name what data-parallel training cannot do exactly: ELBOs
    and guides that draw their own noise, and minibatches smaller than the number of
    processes (nothing to refuse alone)."""
    tc = cfg.train
    if group.world == 1:
        return group
    if not written_out(cfg):
        raise ConfigError(
            f"train.elbo = {tc.elbo!r}, guide.name = {cfg.guide.name!r} with {group.world} "
            f"processes: data-parallel training supports train.elbo = "
            f"{' or '.join(map(repr, COMPILABLE))} with guide.name = 'gaussian'")
    if tc.cuda_graph:
        raise ConfigError(f"train.cuda_graph = true with {group.world} processes: a captured "
                          "step runs in one process; use train.cuda_graph = false")
    last = n_train % tc.batch_size
    if tc.batch_size < group.world or 0 < last < group.world:
        raise ConfigError(
            f"train.batch_size = {tc.batch_size} with {group.world} processes and {n_train} "
            f"training points: every minibatch (the last has {last or tc.batch_size}) needs at "
            f"least one point per process")
    return group


def shard(b: int, group: Group) -> slice:
    """This rank's rows of a global minibatch of ``b`` points: contiguous, sizes differing
    by at most one (as ``torch.tensor_split``)."""
    size, extra = divmod(b, group.world)
    start = group.rank * size + min(group.rank, extra)
    return slice(start, start + size + (group.rank < extra))


class ELBOModule(nn.Module):
    """The negative ELBO as a module, so DDP can drive it (the pattern of Pyro's
    ``examples/svi_lightning.py``): ``forward`` returns ``world`` times this rank's loss."""

    def __init__(self, vae: VAE, analytic_kl: bool, world: int):
        super().__init__()
        self.vae, self.analytic_kl, self.world = vae, analytic_kl, world

    def forward(self, x, eps, y1h, weight):
        return self.world * negative_elbo(self.vae, x, eps, y1h, weight, self.analytic_kl)


def data_parallel(vae: VAE, analytic_kl: bool, group: Group) -> DistributedDataParallel:
    """:class:`ELBOModule` of ``vae`` under DDP (parameters broadcast from rank 0)."""
    device_ids = [vae.device.index or 0] if vae.device.type == "cuda" else None
    return DistributedDataParallel(ELBOModule(vae, analytic_kl, group.world), device_ids=device_ids)


def all_sum(values: torch.Tensor, group: Group) -> torch.Tensor:
    """``values`` summed over the ranks (itself alone)."""
    if group.world > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def any_rank(flag: bool, group: Group, device: torch.device) -> bool:
    """Whether ``flag`` is true on any rank: every rank takes the same branch (a stop
    request seen by one rank between steps stops all of them at the same step)."""
    if group.world == 1:
        return flag
    return bool(all_sum(torch.tensor([float(flag)], device=device), group).item())


def broadcast(obj, group: Group):
    """Rank 0's ``obj`` on every rank (a run directory's name, say)."""
    if group.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def make_loss(vae: VAE, num_particles: int, analytic_kl: bool, group: Group):
    """``training.make_loss``'s ``loss(x, y, weight, validate)`` for this rank: x ``[B, X]`` is
    the *global* minibatch; noise ``[K, B, D]`` is drawn for all of it and this rank scores
    its shard under DDP. Returns the shard's -ELBO (unscaled); gradients are the global
    batch's. ``validate``: Pyro's shape and support checks, run on a forked RNG stream."""
    from pyro.infer import Trace_ELBO

    ddp = data_parallel(vae, analytic_kl, group)

    def loss(x, y, weight: float, validate: bool) -> torch.Tensor:
        if validate:
            with rng_untouched(x.device), torch.no_grad():
                Trace_ELBO().loss(vae.model, vae.guide, *((x,) if y is None else (x, y)))
        rows = shard(x.shape[0], group)
        eps = torch.randn(num_particles, x.shape[0], vae.latent_dim, device=x.device)[:, rows]
        y1h = vae.onehot(y)
        value = ddp(x[rows], eps, None if y1h is None else y1h[rows], x.new_full((), weight))
        value.backward()
        return value.detach() / group.world

    return loss

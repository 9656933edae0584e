"""CUDA graphs: one training step (loss, backward, Adam update) captured once, then replayed.

``train.cuda_graph = true``. On a GPU an eager step of this small network is paced by
launching its few hundred kernels from Python, not by their arithmetic (benchmarks/README.md).
Here the step's kernels are recorded once into a CUDA graph and each step replays them with
one launch. Per step the host only fills the graph's inputs and replays::

    x_buf <- minibatch [B, X];  y_buf <- labels [B];  eps_buf <- N(0, I) [K, B, D]
    replay:  grads <- 0
             loss = objectives.negative_elbo(vae, x_buf, eps_buf, onehot(y_buf), w)
             loss.backward();  bad = not finite(loss, |grad|)
             loss_sum += loss;  first_bad <- min(first_bad, step) if bad
             fused Adam step, skipped on the device when bad (its ``found_inf``)

so it needs the written-out estimators (``objectives.written_out``: trace or meanfield with
the Gaussian guide), one process, and a model whose step never synchronises with the host
(``objectives.check_written_out``; the warm-up refuses any other by name). With
``train.compile = true`` too, the graph holds the compiled loss (Inductor's fused kernels,
compiled in the warm-up: fewer kernels a replay). eps is drawn outside the graph by the call
the compiled loss uses, in Pyro's order, so a run gives the eager run's parameters on the
same seed, and its losses to float32 rounding (Pyro adds a step's terms in float64).

A graph reads and writes fixed memory: those buffers, the parameters, their gradients and
Adam's state. Loading a checkpoint (resume, rollback) replaces Adam's state and a rollback
changes the learning rate, which the graph holds as a constant: either makes the graphs
stale, and they are captured again. Capturing needs warm-up steps, whose updates are undone.

On the CPU there are no CUDA graphs: the same step runs uncaptured (with a warning), so a
config written for a GPU still trains, to the same result. tests/test_graphs.py checks the
step against eager training there, and against replays of a record of its ATen operations
(a CUDA graph's semantics on the CPU); tests/test_cuda.py the captured step on a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import pyro
import torch

from .config import ConfigError
from .objectives import call_compiled, negative_elbo


class UncapturedGraphWarning(UserWarning):
    """``train.cuda_graph = true`` on the CPU: the step runs uncaptured (no speed-up)."""


class StepGraphs:
    """The captured training step of one ``training.TrainState``: one graph per minibatch
    size (an epoch's last minibatch may be smaller), sharing one memory pool."""

    def __init__(self, state, analytic_kl: bool):
        self.vae, self.opt, self.analytic_kl = state.vae, state.optimizer, analytic_kl
        self.params = optimized(self.opt)  # listed once: the same tensors for the run's life
        self.loss = negative_elbo
        if state.cfg.train.compile:
            compiled = torch.compile(negative_elbo, dynamic=False)
            self.loss = functools.partial(call_compiled, compiled)
        self.particles = state.cfg.train.num_particles
        if not self.opt.defaults.get("fused"):  # a skipped update needs its found_inf
            raise ConfigError("train.cuda_graph = true needs torch's fused Adam, which this "
                              f"torch {torch.__version__} lacks on this device; use "
                              "train.cuda_graph = false")
        dev = state.dataset.x_train.device
        self.capture = dev.type == "cuda"
        if not self.capture:
            warnings.warn("train.cuda_graph = true on the CPU: CUDA graphs need a GPU, so each "
                          "step runs the same computation uncaptured (same result, no speed-up)",
                          UncapturedGraphWarning, stacklevel=3)
        # the deferred reads of training.TrainState.defer, kept in place for the graph
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        self.first_bad = torch.full((), NONE_BAD, dtype=torch.float64, device=dev)
        self.step_no = torch.zeros((), dtype=torch.float64, device=dev)  # step of a replay
        self.found_inf = torch.zeros((), device=dev)  # read by the fused Adam: skip if 1
        self.weight, self.weight_value = torch.ones((), device=dev), 1.0  # the KL weight
        self.inputs: dict[int, tuple] = {}  # batch size -> (x_buf, y_buf or None, eps_buf)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}  # batch size -> captured step
        self.captured_for: tuple | None = None  # ([Adam's state, *gradients], learning rates)
        self.pool = None

    def step(self, state, x: torch.Tensor, y: torch.Tensor | None, weight: float) -> None:
        """One update on minibatch x ``[B, X]`` (labels y ``[B]`` or None) with KL weight
        ``weight``, its loss deferred into ``state.pending``; no host read."""
        b = x.shape[0]
        if self._stale():
            self.graphs, self.pool = {}, None  # captured again, per batch size, on demand
        if b not in self.inputs:
            y_buf = None if y is None else y.new_zeros(b)
            self.inputs[b] = (x.new_zeros(x.shape), y_buf,
                              x.new_zeros(self.particles, b, self.vae.latent_dim))
        if self.capture and b not in self.graphs:
            self.graphs[b] = self._capture(b)
        self._adopt_pending(state)
        if self.weight_value != weight:
            self.weight.fill_(weight)
            self.weight_value = weight
        x_buf, y_buf, eps = self.inputs[b]
        x_buf.copy_(x)
        if y_buf is not None:
            y_buf.copy_(y)
        torch.randn(eps.shape, out=eps)  # eps as the compiled loss draws it (Pyro's order)
        if self.capture:
            self.graphs[b].replay()
        else:
            self._body(b)

    def _adopt_pending(self, state) -> None:
        """Make ``state.pending`` these buffers: fresh after a host read, or carrying what the
        eager first step deferred; the step counter set to ``state.step``."""
        if state.pending is not None and state.pending[0] is self.loss_sum:
            return
        if state.pending is None:
            self.loss_sum.zero_()
            self.first_bad.fill_(NONE_BAD)
        else:
            self.loss_sum.copy_(state.pending[0])
            self.first_bad.copy_(state.pending[1])
        self.step_no.fill_(float(state.step))
        state.pending = (self.loss_sum, self.first_bad)

    def _stale(self) -> bool:
        """Whether the graphs hold memory or constants that are no longer the training
        state's: Adam's state and the gradients (by address), the learning rates (constants).
        Allocates missing gradients first (the graph writes them in place)."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        held = [self.opt.state, *(p.grad for p in self.params)]
        lrs = [g["lr"] for g in self.opt.param_groups]
        if self.captured_for is not None and lrs == self.captured_for[1] \
                and all(a is b for a, b in zip(held, self.captured_for[0], strict=True)):
            return False
        self.captured_for = (held, lrs)
        return True

    def _body(self, b: int) -> None:
        """The step the graph holds, on the buffers of batch size b: x ``[B, X]``, y ``[B]``
        or None, eps ``[K, B, D]`` (see the module docstring)."""
        x, y, eps = self.inputs[b]
        grads = [p.grad for p in self.params]
        torch._foreach_zero_(grads)
        with pyro.validation_enabled(False):  # validation reads values on the host
            y1h = self.vae.onehot(y)
            loss = self.loss(self.vae, x, eps, y1h, self.weight, self.analytic_kl)
        loss.backward()
        loss_and_norms = loss_and_grad_norms(loss, grads)  # (1 + P,)
        bad = fold_step(self.loss_sum, self.first_bad, loss_and_norms, self.step_no)
        self.found_inf.copy_(bad)
        self.step_no.add_(1.0)
        self.opt.found_inf = self.found_inf  # read by step() (captured: by address) ...
        self.opt.step()
        del self.opt.found_inf  # ... and by no later eager step (a rollback's first)

    def _capture(self, b: int) -> "torch.cuda.CUDAGraph":
        """Warm up on a side stream (lazy initialisation happens outside the graph), then
        record one :meth:`_body` into a graph (recording runs nothing)."""
        for group in self.opt.param_groups:
            group["capturable"] = True  # torch refuses to capture step() otherwise
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._warm_up(b)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._body(b)
        self.pool = graph.pool()
        return graph

    def _warm_up(self, b: int, steps: int = 2) -> None:
        """Run the step ``steps`` times (cuBLAS workspaces, autograd's buffers and a compiled
        loss are made on first use) and put back everything those steps changed: training
        is not advanced. On a GPU the last runs with host synchronisation an error, as it
        would be in the capture, and is refused here with the reason."""
        kept = [(t, t.clone()) for t in self._mutable()]
        try:
            for i in range(steps):
                with _synchronisation_refused(self.capture and i == steps - 1):
                    self._body(b)
        finally:
            with torch.no_grad():
                for t, saved in kept:
                    t.copy_(saved)

    def _mutable(self) -> list[torch.Tensor]:
        """What a step changes besides gradients: parameters, Adam's state, the sums."""
        state = [v for s in self.opt.state.values() for v in s.values()
                 if isinstance(v, torch.Tensor)]
        return [*self.params, *state, self.loss_sum, self.first_bad, self.step_no,
                self.found_inf]


def optimized(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters ``opt`` updates, in its order: what both steps read the gradients of.
    The same tensors for a run's life (a checkpoint load copies into them); read from the
    optimizer because ``vae.parameters()`` walks the modules (~45 us a step on the CPU, most
    of a graph replay's host time)."""
    return [p for g in opt.param_groups for p in g["params"]]


def loss_and_grad_norms(loss: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    """``[1 + P]``: the step's loss, then the norms of its P gradients (one fused
    reduction); an entry is non-finite where the loss or that gradient has one."""
    return torch.stack([loss.detach().to(grads[0].dtype), *torch._foreach_norm(grads)])


NONE_BAD = 2.0**52  # first_bad while no step was non-finite: above every step number


def fold_step(loss_sum: torch.Tensor, first_bad: torch.Tensor, loss_and_norms: torch.Tensor,
              step) -> torch.Tensor:
    """Fold a step's ``loss_and_norms`` (:func:`loss_and_grad_norms`) into the unread sums,
    in place and on the device (nine operations, which a GPU step launches one by one): its
    loss added to ``loss_sum``, and where the step is non-finite its number ``step`` (a float or
    0-d tensor) into ``first_bad = min(first_bad, step)`` (both 0-d float64; ``first_bad``
    starts at :data:`NONE_BAD`; a non-finite ``loss_sum`` is never read as a loss: the read
    raises). Returns Adam's ``found_inf``, 0-d: 1 for a non-finite step, else 0
    (``v * 0`` is NaN exactly where v is infinite or NaN)."""
    found = loss_and_norms.mul(0.0).sum().nan_to_num(nan=1.0)
    loss_sum.add_(loss_and_norms[0])
    # found = 1: step exactly (|values| < 2^53); found = 0: step + NONE_BAD, which min ignores
    candidate = found.double().mul(-NONE_BAD).add_(step).add_(NONE_BAD)
    torch.minimum(first_bad, candidate, out=first_bad)
    return found


@contextlib.contextmanager
def _synchronisation_refused(on: bool):
    """Within: a CUDA call that synchronises with the host (a read, a copy from host memory)
    raises a ConfigError naming the cause, when ``on``."""
    if not on:
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    except RuntimeError as err:
        if "synchroniz" not in str(err):
            raise
        raise ConfigError(
            "train.cuda_graph = true: the training step synchronises with the host "
            f"({str(err).splitlines()[0]}), which a CUDA graph cannot capture; a prior, "
            "likelihood or guide that builds a tensor from a Python number does this. "
            "Use train.cuda_graph = false for this model") from err
    finally:
        torch.cuda.set_sync_debug_mode("default")

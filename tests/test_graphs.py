"""train.cuda_graph: the captured step computes eager training's losses and parameters.

On the CPU the step the graph holds runs uncaptured (with a warning). These tests check its
arithmetic against eager training on the same seed, its deferred reads, a skipped
non-finite update, resume and rollback, and when the graphs go stale.

``emulated_capture`` gives the CPU a CUDA graph's semantics (``_EmulatedGraph``): the step is
recorded once as the ATen operations it ran, on fixed tensors with fixed Python numbers, and
every replay runs that record, not the Python. A step whose result depends on anything the
record does not hold (a learning rate or KL weight as a Python number, a buffer replaced
rather than written into) then departs from the uncaptured step; a host read or a tensor
built from a Python number (on a GPU a host copy) fails the record, as it fails a capture.
The capture itself runs only on a GPU (tests/test_cuda.py)."""

import math

import pyro
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from pyro_vae.config import ConfigError
from pyro_vae.distributed import Group, check_supported
from pyro_vae.graphs import StepGraphs, UncapturedGraphWarning, optimized
from pyro_vae.likelihoods import LIKELIHOODS
from pyro_vae.priors import PRIORS
from pyro_vae.training import (Interrupted, NonFiniteError, TrainState, make_loss, run_epoch,
                               train, train_step)

from conftest import flaky_likelihood, no_host_reads, small_config

CPU = ("train.device=cpu", "train.batch_size=64")  # 500 images: 7 batches of 64, one of 52
uncaptured = pytest.mark.filterwarnings("ignore::pyro_vae.graphs.UncapturedGraphWarning")


class _EmulatedGraph(TorchDispatchMode):
    """A CUDA graph on the CPU: :meth:`StepGraphs._body` of batch size b recorded once as the
    ATen operations it ran, each with its Python arguments and the tensors it read or wrote
    (those made before the record by identity, with the address of their memory; those
    made within it by their place in the record), then undone, as a capture runs nothing.
    :meth:`replay` runs the record, and fails if a tensor it holds has moved to other memory
    (a real graph would go on using the old). The record fails on what a capture refuses:
    a host read (``.item()``, ``.tolist()``, ``.cpu()``, ``bool()``, data-dependent shapes)
    and a copy of host data (``torch.tensor``); and on random draws, which the step leaves
    to the host (eps is drawn outside it). Not emulated: Adam's ``capturable`` mode, which
    torch allows on a GPU only."""

    REFUSED = ("aten._local_scalar_dense", "aten.lift_fresh", "aten.equal", "aten.nonzero",
               "aten.repeat_interleave", "aten.masked_select", "aten.normal", "aten.uniform",
               "aten.bernoulli", "aten.rand", "aten.multinomial", "aten.exponential")

    def __init__(self, graphs: StepGraphs, b: int):
        super().__init__()
        self.record = []  # (op, its arguments with _Ref for tensors the record made, outputs)
        self.place_of = {}  # id of a tensor the record made -> its place in self.kept
        self.kept = []  # the tensors the record made, held so that no id is reused
        self.held = {}  # id -> (tensor made before the record, the address of its memory)
        undo = [(t, t.clone()) for t in graphs._mutable()]
        with pytest.MonkeyPatch.context() as m, no_host_reads(m, "a captured step"), self:
            graphs._body(b)
        with torch.no_grad():
            for t, saved in undo:
                t.copy_(saved)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(self.REFUSED):
            raise AssertionError(f"{func} in a captured step")
        kwargs = kwargs or {}
        given = {id(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        outputs = []  # each output's place, or None: an input's tensor (an in-place op's)
        for t in tree_leaves(out):
            made = isinstance(t, torch.Tensor) and id(t) not in given and id(t) not in self.place_of
            if made:
                self.place_of[id(t)] = len(self.kept)
                self.kept.append(t)
            outputs.append(self.place_of[id(t)] if made else None)
        self.record.append((func, tree_map(self._ref, (args, kwargs)), outputs))
        return out

    def _ref(self, v):
        """A tensor argument as the record keeps it: _Ref(place) if the record made it."""
        if not isinstance(v, torch.Tensor):
            return v
        if id(v) in self.place_of:
            return _Ref(self.place_of[id(v)])
        self.held.setdefault(id(v), (v, v.data_ptr()))
        return v

    def replay(self) -> None:
        for t, address in self.held.values():
            assert t.data_ptr() == address, "a tensor the graph holds was given new memory"
        made = {}  # place -> the tensor this replay made there
        with torch.no_grad():  # the record holds the backward's operations already
            for func, (args, kwargs), outputs in self.record:
                args, kwargs = tree_map(lambda v: made[v.place] if isinstance(v, _Ref) else v,
                                        (args, kwargs))
                for place, t in zip(outputs, tree_leaves(func(*args, **kwargs))):
                    if place is not None:
                        made[place] = t


class _Ref:
    """In the record, a tensor the record made: its place in :attr:`_EmulatedGraph.kept`."""

    def __init__(self, place: int):
        self.place = place


@pytest.fixture
def emulated_capture(monkeypatch):
    """Within the test, StepGraphs on the CPU warm up, record and replay ``_EmulatedGraph``s
    where a GPU would capture CUDA graphs; returns the list of batch sizes recorded."""
    init, recorded = StepGraphs.__init__, []

    def init_capturing(self, *args):
        init(self, *args)
        self.capture = True

    def capture(self, b):
        self.capture = False  # the warm-up's synchronisation check needs a GPU
        self._warm_up(b)
        self.capture = True
        recorded.append(b)
        return _EmulatedGraph(self, b)

    monkeypatch.setattr(StepGraphs, "__init__", init_capturing)
    monkeypatch.setattr(StepGraphs, "_capture", capture)
    return recorded


def graph_state(*overrides, subset=300):
    """A TrainState with its StepGraphs (and the eager loss of its first step), on the CPU."""
    cfg = small_config(*CPU, "train.cuda_graph=true", *overrides, subset=subset)
    with pytest.warns(UncapturedGraphWarning, match="CUDA graphs need a GPU"):
        state = TrainState.create(cfg, torch.device("cpu"))
    assert isinstance(state.graphs, StepGraphs)
    return state, make_loss(cfg, state.vae)


def test_both_steps_read_the_models_parameters_themselves_through_a_checkpoint_load():
    """``optimized`` lists each of the model's parameters once, as the very tensors (the graph
    writes their gradients in place), and a checkpoint load keeps them."""
    state, _ = graph_state("model.conditional=true")
    listed = optimized(state.optimizer)
    assert len(listed) == len(list(state.vae.parameters()))
    assert {id(p) for p in listed} == {id(p) for p in state.vae.parameters()}
    state.load_state_dict(state.state_dict())
    assert all(a is b for a, b in zip(optimized(state.optimizer), listed, strict=True))
    assert all(a is b for a, b in zip(state.graphs.params, listed, strict=True))


SETTINGS = [("train.elbo=trace",),
            ("train.elbo=meanfield",),
            ("train.elbo=trace", "model.conditional=true"),
            ("train.elbo=trace", "train.num_particles=3", "train.kl_warmup_epochs=2"),
            ("train.elbo=trace", "train.sync_every=5")]


@uncaptured
@pytest.mark.parametrize("emulate, overrides", [
    *[pytest.param(emulate, o, id=f"{'emulated' if emulate else 'uncaptured'}:{','.join(o)}")
      for emulate in (False, True) for o in SETTINGS],
    pytest.param(False, ("train.elbo=meanfield", "train.compile=true"),  # the compiled loss
                 id="uncaptured:train.elbo=meanfield,train.compile=true"),
])
def test_graph_steps_give_the_eager_losses_and_parameters_on_the_same_seed(
        request, emulate, overrides):
    if emulate:
        request.getfixturevalue("emulated_capture")
    eager = train(small_config(*CPU, *overrides, epochs=2))
    graph = train(small_config(*CPU, *overrides, "train.cuda_graph=true", epochs=2))
    for a, b in zip(eager.metrics, graph.metrics, strict=True):
        # the same float32 arithmetic; the per-step reads of eager training add Pyro's host
        # floats (float64), the graph's sums add float32 losses: rounding apart
        assert b["train_elbo"] == pytest.approx(a["train_elbo"], rel=1e-6)
        assert b["test_elbo"] == pytest.approx(a["test_elbo"], rel=1e-6)
    for (name, pa), pb in zip(eager.vae.named_parameters(), graph.vae.parameters(), strict=True):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6, msg=name)


def test_cuda_graph_on_the_cpu_warns_that_it_runs_uncaptured():
    with pytest.warns(UncapturedGraphWarning, match="no speed-up"):
        train(small_config(*CPU, "train.cuda_graph=true"))


@uncaptured
def test_a_graph_run_interrupted_mid_epoch_resumes_to_the_uninterrupted_run(tmp_path):
    cfg = small_config(*CPU, "train.cuda_graph=true", "train.sync_every=3", epochs=2)
    full = train(cfg, tmp_path / "full")
    polls = iter(range(10**6))  # should_stop is polled after every step: stop after the 5th
    with pytest.raises(Interrupted, match="stopped at epoch 1, step 5"):
        train(cfg, tmp_path / "cut", should_stop=lambda: next(polls) >= 4)
    resumed = train(cfg, resume=tmp_path / "cut")
    for a, b in zip(full.metrics, resumed.metrics, strict=True):
        assert b["train_elbo"] == a["train_elbo"] and b["test_elbo"] == a["test_elbo"]
    for name, value in full.vae.state_dict().items():
        assert torch.equal(resumed.vae.state_dict()[name], value), name


@uncaptured
@pytest.mark.parametrize("conditional", [False, True])
def test_a_graph_step_reads_nothing_back_from_the_device(monkeypatch, conditional):
    state, loss = graph_state("train.sync_every=50", f"model.conditional={str(conditional).lower()}")
    x = state.dataset.x_train[:64]  # (64, X)
    y = state.dataset.y_train[:64] if conditional else None
    train_step(state, loss, x, y, 1.0)  # the first step is eager and validates
    with no_host_reads(monkeypatch, "a graph step"):
        for _ in range(3):
            train_step(state, loss, x, y, 0.5)
    state.read_pending()
    assert state.step == 4 and math.isfinite(state.epoch_loss) and state.epoch_loss > 0


@uncaptured
@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_a_non_finite_graph_step_is_skipped_and_named_at_the_next_read():
    state, loss = graph_state("train.sync_every=4")
    x = state.dataset.x_train[:64]
    train_step(state, loss, x, None, 1.0)  # step 1: eager, finite
    with torch.no_grad():  # a poisoned decoder bias: every later step's loss is NaN
        state.vae.decoder.net[-1].bias[0] = float("nan")
    before = {k: v.clone() for k, v in state.vae.encoder.state_dict().items()}
    train_step(state, loss, x, None, 1.0)
    train_step(state, loss, x, None, 1.0)
    with pytest.raises(NonFiniteError, match=r"step 2 \(read at step 4\).*was skipped"):
        train_step(state, loss, x, None, 1.0)
    for name, value in state.vae.encoder.state_dict().items():  # no update was applied
        assert torch.equal(value, before[name]), name
    assert getattr(state.optimizer, "found_inf", None) is None  # no later eager step skips


@uncaptured
def test_the_warm_up_before_a_capture_leaves_training_where_it_was():
    state, loss = graph_state()
    x = state.dataset.x_train[:64]
    train_step(state, loss, x, None, 1.0)
    train_step(state, loss, x, None, 1.0)  # Adam's state and the sums hold values
    kept = [t.clone() for t in state.graphs._mutable()]
    state.graphs._warm_up(64)
    after = state.graphs._mutable()
    assert len(after) == len(kept) > 2 * len(list(state.vae.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(after, kept))


@uncaptured
def test_graphs_are_captured_again_after_a_checkpoint_load_or_a_new_learning_rate(
        emulated_capture):
    state, loss = graph_state()
    x = state.dataset.x_train[:64]
    train_step(state, loss, x, None, 1.0)  # eager
    saved = state.state_dict()
    for _ in range(3):
        train_step(state, loss, x, None, 1.0)
    train_step(state, loss, x[:10], None, 1.0)  # a second batch size: a second graph
    assert emulated_capture == [64, 10]
    state.load_state_dict(saved)  # Adam's state replaced: both graphs are stale
    assert all(a is b for a, b in zip(state.graphs.params, state.vae.parameters(), strict=True))
    train_step(state, loss, x, None, 1.0)
    state.set_lr_factor(0.5)  # the learning rate is a constant inside a graph
    train_step(state, loss, x, None, 1.0)
    train_step(state, loss, x, None, 1.0)
    assert emulated_capture == [64, 10, 64, 64]
    state.vae.decoder.net[-1].bias.grad = None  # a gradient the graph does not hold
    train_step(state, loss, x, None, 1.0)
    assert emulated_capture == [64, 10, 64, 64, 64]


def _steps_through_changes(emulate: bool, *overrides) -> tuple[list, float]:
    """Graph steps across a new KL weight, a second batch size, a halved learning rate and a
    checkpoint load; the parameters after each, and the loss read at the end."""
    pyro.set_rng_seed(1)
    state, loss = graph_state("train.sync_every=4", *overrides)
    state.graphs.capture = emulate
    x, seen = state.dataset.x_train[:64].clamp(0.01, 0.99), []  # inside every support
    y = state.dataset.y_train[:64] if state.vae.num_classes else None

    def steps(n, weight, b=64):
        for _ in range(n):  # another minibatch each step: a stale input buffer would show
            xs, ys = (None if t is None else t.roll(state.step, 0)[:b] for t in (x, y))
            train_step(state, loss, xs, ys, weight)
        seen.append([p.detach().clone() for p in state.vae.parameters()])

    steps(3, 1.0)  # the first eager, then replays
    saved = state.state_dict()
    steps(2, 0.5)  # a new KL weight
    steps(2, 0.5, b=10)  # a second graph
    state.set_lr_factor(0.5)
    steps(2, 0.5)
    state.load_state_dict(saved)
    steps(2, 1.0)
    state.read_pending()
    return seen, state.epoch_loss


GRAY = "data.binarize=none"


@uncaptured
@pytest.mark.parametrize("overrides", [
    (),
    *[(f"prior.name={p}",) for p in PRIORS if p != "normal"],
    *[(GRAY, f"likelihood.name={name}") for name in LIKELIHOODS if name != "bernoulli"],
    *[(GRAY, "likelihood.name=gaussian", f"likelihood.scale={s}") for s in ("learned", "per-pixel")],
    ("model.conditional=true",),
    ("train.elbo=meanfield",),
], ids=lambda o: ",".join(o).replace(GRAY + ",", "") or "default")
def test_replays_equal_uncaptured_steps_bit_for_bit_through_every_change(
        emulated_capture, monkeypatch, overrides):
    # every prior and likelihood the mode accepts (student-t since its prior is built from
    # tensors alone: priors.StudentT); the record
    # fails on a host read or a tensor built from a Python number (a host copy on a GPU)
    monkeypatch.setattr("pyro_vae.training.check_data", lambda *args: None)  # beta: 0 < x < 1
    uncaptured_steps, uncaptured_loss = _steps_through_changes(False, *overrides)
    replayed, replayed_loss = _steps_through_changes(True, *overrides)
    assert emulated_capture == [64, 10, 64, 64]
    assert replayed_loss == uncaptured_loss
    for i, (a, b) in enumerate(zip(uncaptured_steps, replayed, strict=True)):
        assert all(torch.equal(pa, pb) for pa, pb in zip(a, b, strict=True)), f"after change {i}"


@pytest.mark.parametrize("overrides, match", [
    (("train.elbo=jit",), "train.cuda_graph = true with train.elbo = 'jit'.*'trace' or 'mean"),
    (("guide.name=full",), "train.cuda_graph = true with guide.name = 'full'.*'gaussian'"),
])
def test_what_a_captured_step_cannot_run_is_refused_by_name(overrides, match):
    with pytest.raises(ConfigError, match=match):
        train(small_config(*CPU, "train.cuda_graph=true", *overrides))


def test_a_captured_step_in_several_processes_is_refused():
    cfg = small_config(*CPU, "train.cuda_graph=true")
    with pytest.raises(ConfigError, match="train.cuda_graph = true with 2 processes"):
        check_supported(cfg, Group(rank=0, world=2), 500)


def test_without_torchs_fused_adam_a_captured_step_is_refused():
    cfg = small_config(*CPU)
    state = TrainState.create(cfg, torch.device("cpu"))
    state.optimizer.defaults["fused"] = None
    with pytest.raises(ConfigError, match="needs torch's fused Adam"):
        StepGraphs(state, False)


@uncaptured
def test_an_epoch_of_graph_steps_counts_every_image_once():
    state, loss = graph_state("train.sync_every=2")
    assert run_epoch(state, loss)
    m = state.metrics[-1]  # 300 training images: 4 batches of 64 and one of 44
    assert state.step == 5 and math.isfinite(m["train_elbo"]) and m["train_elbo"] < 0


@uncaptured
def test_a_graph_run_rolls_back_from_a_transient_nan_and_finishes(tmp_path):
    from pyro_vae.checkpoint import RollbackWarning

    with flaky_likelihood(nan_at=30):  # the 30th forward pass: epoch 4 of 8 steps each
        cfg = small_config(*CPU, "train.cuda_graph=true", "likelihood.name=flaky",
                           "train.on_nan=rollback", epochs=4)
        with pytest.warns(RollbackWarning, match=r"rollback 1/3 to epoch 3, step 24 with train.lr "
                                                 r"halved to 0.0005 after: non-finite .* epoch 4"):
            result = train(cfg, tmp_path / "run")
    assert [m["epoch"] for m in result.metrics] == [1, 2, 3, 4]
    assert all(math.isfinite(m["train_elbo"]) for m in result.metrics)

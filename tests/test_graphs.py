"""train.cuda_graph: the captured step computes eager training's losses and parameters.

On the CPU the step the graph holds runs uncaptured (with a warning), which is what these
tests check: its arithmetic against eager training on the same seed, its deferred reads, a
skipped non-finite update, resume and rollback, when the graphs go stale, and that no prior
or likelihood it accepts builds a tensor from a Python number (on a GPU, a host copy that a
capture refuses). The capture itself runs only on a GPU (tests/test_cuda.py).
"""

import math

import pyro
import pytest
import torch
from torch.overrides import TorchFunctionMode

from pyro_vae.config import ConfigError
from pyro_vae.distributed import Group, check_supported
from pyro_vae.graphs import StepGraphs, UncapturedGraphWarning
from pyro_vae.likelihoods import LIKELIHOODS
from pyro_vae.objectives import check_written_out, negative_elbo
from pyro_vae.priors import PRIORS
from pyro_vae.training import (Interrupted, NonFiniteError, TrainState, make_loss, run_epoch,
                               train, train_step)

from conftest import build_vae, flaky_likelihood, no_host_reads, small_config

CPU = ("train.device=cpu", "train.batch_size=64")  # 500 images: 7 batches of 64, one of 52
uncaptured = pytest.mark.filterwarnings("ignore::pyro_vae.graphs.UncapturedGraphWarning")


def graph_state(*overrides, subset=300):
    """A TrainState with its StepGraphs (and the eager loss of its first step), on the CPU."""
    cfg = small_config(*CPU, "train.cuda_graph=true", *overrides, subset=subset)
    with pytest.warns(UncapturedGraphWarning, match="CUDA graphs need a GPU"):
        state = TrainState.create(cfg, torch.device("cpu"))
    assert isinstance(state.graphs, StepGraphs)
    return state, make_loss(cfg, state.vae, defer_reads=state.sync_every > 1)


@uncaptured
@pytest.mark.parametrize("overrides", [
    ("train.elbo=trace",),
    ("train.elbo=meanfield",),
    ("train.elbo=trace", "model.conditional=true"),
    ("train.elbo=trace", "train.num_particles=3", "train.kl_warmup_epochs=2"),
    ("train.elbo=trace", "train.sync_every=5"),
    ("train.elbo=meanfield", "train.compile=true"),  # the compiled loss in the graph
])
def test_graph_steps_give_the_eager_losses_and_parameters_on_the_same_seed(overrides):
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
def test_graphs_are_captured_again_after_a_checkpoint_load_or_a_new_learning_rate(monkeypatch):
    state, loss = graph_state()
    captured = []
    monkeypatch.setattr(state.graphs, "capture", True)  # record captures, replay nothing
    monkeypatch.setattr(state.graphs, "_capture",
                        lambda b: captured.append(b) or _Replay(state.graphs, b))
    x = state.dataset.x_train[:64]
    train_step(state, loss, x, None, 1.0)  # eager
    saved = state.state_dict()
    for _ in range(3):
        train_step(state, loss, x, None, 1.0)
    train_step(state, loss, x[:10], None, 1.0)  # a second batch size: a second graph
    assert captured == [64, 10]
    state.load_state_dict(saved)  # Adam's state replaced: both graphs are stale
    train_step(state, loss, x, None, 1.0)
    state.set_lr_factor(0.5)  # the learning rate is a constant inside a graph
    train_step(state, loss, x, None, 1.0)
    train_step(state, loss, x, None, 1.0)
    assert captured == [64, 10, 64, 64]
    state.vae.decoder.net[-1].bias.grad = None  # a gradient the graph does not hold
    train_step(state, loss, x, None, 1.0)
    assert captured == [64, 10, 64, 64, 64]


class _Replay:
    """A stand-in for a captured graph on the CPU: replay runs the step."""

    def __init__(self, graphs, b):
        self.graphs, self.b = graphs, b

    def replay(self):
        self.graphs._body(self.b)


@pytest.mark.parametrize("overrides, match", [
    (("train.elbo=jit",), "train.cuda_graph = true with train.elbo = 'jit'.*'trace' or 'mean"),
    (("guide.name=full",), "train.cuda_graph = true with guide.name = 'full'.*'gaussian'"),
    (("prior.name=student-t",), "prior.name = 'student-t'.*StudentT copies a Python number"),
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


class _TensorsFromNumbers(TorchFunctionMode):
    """Records torch.tensor / torch.as_tensor calls: on a GPU each copies host memory to
    the device, which synchronises and which a CUDA graph cannot capture."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func in (torch.tensor, torch.as_tensor)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("overrides", [
    *[(f"prior.name={p}",) for p in PRIORS],
    *[(f"likelihood.name={name}",) for name in LIKELIHOODS],
    *[("likelihood.name=gaussian", f"likelihood.scale={s}") for s in ("learned", "per-pixel")],
    ("model.conditional=true",),
    ("train.elbo=meanfield",),
])
def test_the_captured_step_builds_no_tensor_from_a_python_number(overrides):
    cfg, ds, vae = build_vae(*overrides)
    x = ds.x_test[:8].clamp(0.01, 0.99)  # (8, X), inside every likelihood's support
    y1h = vae.onehot(ds.y_test[:8]) if vae.num_classes else None
    eps = torch.randn(1, 8, vae.latent_dim)
    try:
        check_written_out(small_config(*overrides, "train.cuda_graph=true"))
    except ConfigError:
        assert cfg.prior.name == "student-t"  # refused up front, by name
        return
    spy = _TensorsFromNumbers()
    with spy, pyro.validation_enabled(False):
        negative_elbo(vae, x, eps, y1h, x.new_ones(()), cfg.train.elbo == "meanfield").backward()
    assert spy.calls == 0


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

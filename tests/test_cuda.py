"""What only a GPU can show (marked ``cuda``: skipped, with the reason, without one).

Devices meet: a CPU tensor given to a CUDA run is moved; a CUDA-trained checkpoint scores the
same on the CPU within float32 rounding; softplus, torch's kernel on a GPU and our vectorized
node on the CPU, agree in value and gradient; compiled training on CUDA gives the eager losses
on the same seed (it diverged under torch 2.11 while our softplus node, then used on CUDA too,
returned a tensor modified in place: pytorch/pytorch#180642); captured steps
(train.cuda_graph) give the eager losses too, resume mid-epoch, and never synchronize with the
host.
"""

import contextlib
import copy
import math

import pytest
import torch

from pyro_vae.cli import main
from pyro_vae.evaluate import elbo_terms, log_terms
from pyro_vae.runs import load_run
from pyro_vae.objectives import negative_elbo
from pyro_vae.training import make_optimizer, train

from conftest import small_config

pytestmark = pytest.mark.cuda

@contextlib.contextmanager
def no_synchronization():
    """Within: any CUDA call that synchronizes with the host raises (after a drain)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


QUICK = ["--quiet", "--set", "data.subset=500", "--set", "model.hidden=[64]",
         "--set", "model.latent_dim=4", "--set", "train.epochs=2", "--set", "train.device=cuda"]


def test_softplus_on_a_gpu_is_the_cpus_in_value_and_gradient():
    from pyro_vae.networks import softplus

    x = torch.linspace(-80.0, 80.0, 100_001)  # (N,) both tails and the threshold at 20
    values, grads = [], []
    for xd in (x.clone().requires_grad_(), x.cuda().requires_grad_()):
        y = softplus(xd)
        (g,) = torch.autograd.grad(y.sum(), xd)
        values.append(y.detach().cpu())
        grads.append(g.cpu())
    # a few float32 ulps apart at most (torch's kernel returns x itself above 20, where the
    # rest, e^-x, is below half an ulp of x)
    torch.testing.assert_close(values[1], values[0], rtol=1e-6, atol=0.0)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=0.0)


def test_seeding_a_cpu_evaluation_leaves_the_gpu_streams_untouched():
    from pyro_vae.evaluate import seeded

    before = torch.cuda.get_rng_state_all()
    with seeded(3, "cpu"):
        a = torch.randn(4)
    assert all(torch.equal(b, c) for b, c in zip(before, torch.cuda.get_rng_state_all()))
    with seeded(3, "cuda"):
        b, g = torch.randn(4), torch.randn(4, device="cuda")
    assert torch.equal(a, b)  # the same CPU stream either way
    with seeded(3, "cuda"):
        assert torch.equal(torch.randn(4), b) and torch.equal(torch.randn(4, device="cuda"), g)


def test_a_cuda_trained_run_scores_the_same_on_the_cpu(tmp_path):
    assert main(["train", *QUICK, "--runs-dir", str(tmp_path), "--name", "r"]) == 0
    gpu, cpu = load_run(tmp_path / "r", device="cuda"), load_run(tmp_path / "r", device="cpu")
    x = cpu.dataset.x_test[:200]  # (N, X) on the CPU
    q_gpu, q_cpu = gpu.q_z(x), cpu.q_z(x)  # a CPU x given to the CUDA run: moved
    assert q_gpu.mean.device.type == "cuda"
    # the same float32 computation on two devices: equal up to rounding (cuBLAS vs CPU sums)
    torch.testing.assert_close(q_gpu.mean.cpu(), q_cpu.mean, rtol=1e-4, atol=1e-5)
    z = q_cpu.sample((4,))  # (K, N, D): the same draws scored on both devices
    t_cpu = log_terms(cpu.vae, x, z, None, q_cpu)
    t_gpu = log_terms(gpu.vae, x.cuda(), z.cuda(), None, q_gpu)
    torch.testing.assert_close(t_gpu.log_w.cpu(), t_cpu.log_w, rtol=1e-4, atol=1e-3)
    # each device draws its own noise (CUDA and CPU RNG streams): ELBOs agree within MC error
    rec_c, kl_c = elbo_terms(cpu.vae, x)
    rec_g, kl_g = elbo_terms(gpu.vae, x.cuda())
    e_c, e_g = rec_c - kl_c, (rec_g - kl_g).cpu()  # (N,) one-draw ELBOs
    se = math.sqrt((e_c.var() + e_g.var()).item() / x.shape[0])
    assert abs(e_c.mean().item() - e_g.mean().item()) < 4 * se


def test_a_conditional_cuda_run_samples_a_label_from_the_cli(tmp_path):
    assert main(["train", *QUICK, "--set", "model.conditional=true",
                 "--runs-dir", str(tmp_path), "--name", "c"]) == 0
    assert main(["sample", str(tmp_path / "c"), "--label", "3", "--n", "8"]) == 0
    run = load_run(tmp_path / "c", device="cuda")
    images = [run.sample(8, label) for label in (1, 8)]  # labels made on the run's device
    assert images[0].device.type == "cuda" and (images[0] - images[1]).abs().mean() > 0.01


def test_compiled_training_on_cuda_gives_the_eager_losses_and_parameters():
    runs = [train(small_config("train.device=cuda", "train.batch_size=125",
                               f"train.compile={c}", epochs=2)) for c in ("false", "true")]
    for a, b in zip(runs[0].metrics, runs[1].metrics, strict=True):
        assert b["train_elbo"] == pytest.approx(a["train_elbo"], rel=1e-4)
        assert b["test_elbo"] == pytest.approx(a["test_elbo"], rel=1e-4)
    for pa, pb in zip(runs[0].vae.parameters(), runs[1].vae.parameters(), strict=True):
        torch.testing.assert_close(pb, pa, rtol=1e-3, atol=1e-4)


def test_compiled_loss_equals_eager_on_cuda_over_200_steps():
    cfg = small_config("train.device=cuda")
    from pyro_vae.training import build

    ds, eager_vae = build(cfg, "cuda")
    compiled_vae = copy.deepcopy(eager_vae)
    compiled = torch.compile(negative_elbo, dynamic=False)
    opts = [make_optimizer(v.parameters(), 1e-3) for v in (eager_vae, compiled_vae)]
    weight = torch.tensor(1.0, device="cuda")
    losses = []
    for step in range(200):
        x = ds.x_train[(step * 64) % 448 : (step * 64) % 448 + 64]  # (64, X)
        eps = torch.randn(1, x.shape[0], eager_vae.latent_dim, device="cuda")
        pair = []
        for fn, vae, opt in ((negative_elbo, eager_vae, opts[0]), (compiled, compiled_vae, opts[1])):
            opt.zero_grad()
            loss = fn(vae, x, eps, None, weight, False)
            loss.backward()
            opt.step()
            pair.append(loss.detach())
        losses.append(torch.stack(pair))
    losses = torch.stack(losses).cpu()  # (200, 2): eager, compiled
    torch.testing.assert_close(losses[:, 1], losses[:, 0], rtol=1e-3, atol=1e-2)


def test_a_deferred_cuda_step_never_synchronizes_with_the_host():
    from pyro_vae.training import TrainState, make_loss, train_step

    cfg = small_config("train.device=cuda")  # sync_every: 50 by default on CUDA
    state = TrainState.create(cfg, torch.device("cuda"))
    loss = make_loss(cfg, state.vae)
    x = state.dataset.x_train[:64]  # (64, X) on the GPU
    train_step(state, loss, x, None, 1.0)  # the first step validates, and may read
    with no_synchronization():
        for _ in range(3):
            train_step(state, loss, x, None, 1.0)
    state.read_pending()
    assert state.step == 4 and state.epoch_loss > 0


@pytest.mark.parametrize("compiled", ["false", "true"])
def test_captured_steps_on_cuda_give_the_eager_losses_and_parameters(compiled):
    # 500 training images in batches of 128: three full batches and one of 116, two graphs
    runs = [train(small_config("train.device=cuda", "train.batch_size=128", f"train.cuda_graph={c}",
                               f"train.compile={compiled if c == 'true' else 'false'}", epochs=3))
            for c in ("false", "true")]
    for a, b in zip(runs[0].metrics, runs[1].metrics, strict=True):
        assert b["train_elbo"] == pytest.approx(a["train_elbo"], rel=1e-4)
        assert b["test_elbo"] == pytest.approx(a["test_elbo"], rel=1e-4)
    for pa, pb in zip(runs[0].vae.parameters(), runs[1].vae.parameters(), strict=True):
        torch.testing.assert_close(pb, pa, rtol=1e-3, atol=1e-4)


def test_a_captured_run_interrupted_mid_epoch_resumes_to_the_uninterrupted_run(tmp_path):
    from pyro_vae.training import Interrupted

    cfg = small_config("train.device=cuda", "train.batch_size=64", "train.cuda_graph=true",
                       "train.sync_every=3", epochs=2)
    full = train(cfg, tmp_path / "full")
    polls = iter(range(10**6))  # stop after the 5th step; the resumed run captures anew
    with pytest.raises(Interrupted, match="stopped at epoch 1, step 5"):
        train(cfg, tmp_path / "cut", should_stop=lambda: next(polls) >= 4)
    resumed = train(cfg, resume=tmp_path / "cut")
    # cuBLAS need not pick the same kernels in two captures: rounding apart (a graph left
    # holding the Adam state from before the resume would miss by about train.lr)
    for a, b in zip(full.metrics, resumed.metrics, strict=True):
        assert b["train_elbo"] == pytest.approx(a["train_elbo"], rel=1e-5)
        assert b["test_elbo"] == pytest.approx(a["test_elbo"], rel=1e-5)
    for name, value in full.vae.state_dict().items():
        torch.testing.assert_close(resumed.vae.state_dict()[name], value, rtol=1e-4, atol=1e-5,
                                   msg=name)


def test_a_captured_step_never_synchronizes_with_the_host():
    from pyro_vae.graphs import StepGraphs
    from pyro_vae.training import TrainState, make_loss, train_step

    cfg = small_config("train.device=cuda", "train.cuda_graph=true")
    state = TrainState.create(cfg, torch.device("cuda"))
    assert isinstance(state.graphs, StepGraphs)
    loss = make_loss(cfg, state.vae)
    x = state.dataset.x_train[:64]  # (64, X) on the GPU
    for _ in range(2):  # the eager first step, then the capture (which synchronizes)
        train_step(state, loss, x, None, 1.0)
    assert list(state.graphs.graphs) == [64]
    with no_synchronization():
        for _ in range(3):
            train_step(state, loss, x, None, 0.5)
    state.read_pending()
    assert state.step == 5 and state.epoch_loss > 0


@pytest.mark.parametrize("overrides", [("prior.name=vamp",), ("prior.name=mixture",),
                                       ("likelihood.name=gaussian", "data.binarize=none"),
                                       ("likelihood.name=continuous-bernoulli",),
                                       ("model.conditional=true",)])
def test_captured_steps_run_for_other_priors_and_likelihoods(overrides):
    result = train(small_config("train.device=cuda", "train.cuda_graph=true", *overrides))
    assert math.isfinite(result.metrics[-1]["test_elbo"])


def test_a_step_that_synchronizes_is_refused_by_name_before_its_capture():
    import pyro.distributions as dist

    from pyro_vae.config import ConfigError
    from pyro_vae.priors import PRIORS, Prior, register_prior

    def host_number(cfg, latent_dim, x_dim):  # scale 1.0: copied to the GPU at each call
        return Prior(lambda p, enc: dist.Normal(p["loc"], 1.0).to_event(1),
                     fixed={"loc": torch.zeros(latent_dim)})

    register_prior("host-number", host_number)
    try:
        with pytest.raises(ConfigError, match="synchronises with the host.*train.cuda_graph = false"):
            train(small_config("train.device=cuda", "train.cuda_graph=true",
                               "prior.name=host-number"))
    finally:
        PRIORS.pop("host-number")

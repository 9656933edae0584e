import math

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_vae.config import ConfigError, load_config
from pyro_vae.evaluate import elbo, elbo_terms, log_weights
from pyro_vae.objectives import ELBOS, has_closed_form_kl
from pyro_vae.training import NonFiniteError, build, kl_weight, resolve_device, train

from conftest import build_vae, no_host_reads, small_config


def _without_seconds(metrics):
    return [{k: v for k, v in m.items() if k != "seconds"} for m in metrics]


def test_a_few_hundred_svi_steps_on_mnist_improve_test_elbo_widely():
    cfg = load_config(None, ["data.subset=2000", "train.epochs=10", "train.batch_size=64"])
    pyro.set_rng_seed(cfg.train.seed)
    ds, vae = build(cfg)
    before = elbo(vae, ds.x_test, seed=0)
    result = train(cfg)  # 10 epochs x 32 steps = 320 SVI steps
    after = result.metrics[-1]["test_elbo"]
    assert before < -400 and after > before + 250
    assert after > -200
    assert [m["epoch"] for m in result.metrics] == list(range(1, 11))


def test_each_epochs_test_elbo_carries_the_se_of_its_per_point_estimates():
    cfg = small_config(epochs=2)
    result = train(cfg)
    ds, last = result.dataset, result.metrics[-1]
    rec, kl = elbo_terms(result.vae, ds.x_test, seed=cfg.train.seed)  # the same draws
    per_point = rec - kl  # (N,)
    assert last["test_elbo"] == pytest.approx(per_point.mean().item(), abs=1e-4)
    assert last["test_elbo_se"] == pytest.approx(
        (per_point.std() / math.sqrt(per_point.shape[0])).item(), rel=1e-5)
    assert 0 < last["test_elbo_se"] < abs(last["test_elbo"])
    assert last["test_points"] == ds.x_test.shape[0]  # what the SE's N was
    for key, terms in (("test_reconstruction", rec), ("test_kl", kl)):  # each term its own SE
        assert last[key] == pytest.approx(terms.mean().item(), rel=1e-5)
        assert last[f"{key}_se"] == pytest.approx(
            (terms.std() / math.sqrt(terms.shape[0])).item(), rel=1e-5)


def test_same_seed_gives_identical_metrics_on_cpu():
    cfg = small_config(epochs=2)
    a, b = train(cfg), train(cfg)
    assert _without_seconds(a.metrics) == _without_seconds(b.metrics)
    for pa, pb in zip(a.vae.parameters(), b.vae.parameters()):
        assert torch.equal(pa, pb)
    c = train(small_config("train.seed=1", epochs=2))
    assert _without_seconds(c.metrics) != _without_seconds(a.metrics)


@pytest.mark.parametrize("name", sorted(ELBOS))
def test_every_elbo_trains_to_a_finite_decreasing_loss(name):
    extra = ["train.num_particles=3"] if name == "iwae" else []
    result = train(small_config(f"train.elbo={name}", *extra, epochs=3))
    elbos = [m["train_elbo"] for m in result.metrics]
    assert all(map(torch.isfinite, map(torch.tensor, elbos)))
    assert elbos[-1] > elbos[0]


def test_beta_zero_removes_the_kl_term_from_the_loss():
    cfg, ds, vae = build_vae()
    x = ds.x_test[:16]
    pyro.set_rng_seed(1)
    loss = Trace_ELBO(max_plate_nesting=1).loss(vae.model, vae.guide, x, kl_weight=0.0)
    pyro.set_rng_seed(1)
    log_lik = log_weights(vae, x, k=1).log_lik.sum()  # the same draws of z
    assert loss == pytest.approx(-log_lik.item(), rel=1e-5)


def test_kl_warmup_follows_a_linear_schedule_and_is_logged():
    tc = small_config("train.kl_warmup_epochs=4", "train.beta=0.5").train
    assert [kl_weight(tc, e) for e in range(6)] == [0.125, 0.25, 0.375, 0.5, 0.5, 0.5]
    assert kl_weight(small_config().train, 3) == 1.0
    result = train(small_config("train.kl_warmup_epochs=2", epochs=3))
    assert [m["kl_weight"] for m in result.metrics] == [0.5, 1.0, 1.0]


def test_meanfield_warns_when_the_prior_has_no_closed_form_kl():
    assert has_closed_form_kl(build_vae()[2])
    assert not has_closed_form_kl(build_vae("prior.name=student-t")[2])
    with pytest.warns(UserWarning, match="no closed-form KL .* prior 'student-t'"):
        train(small_config("train.elbo=meanfield", "prior.name=student-t"))


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_absurd_learning_rate_stops_with_the_offending_sites_named():
    with pytest.raises(NonFiniteError) as err:
        train(small_config("train.lr=1e30", "train.sync_every=1", epochs=2))  # read every step
    msg = str(err.value)
    assert "non-finite loss or gradient" in msg and "No update was applied" in msg
    assert "site 'x'" in msg or "gradient of" in msg


def test_cuda_without_gpu_is_refused():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="no CUDA device is available.*allowed here: auto, cpu"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_readme_svi_snippet_runs_as_written(tmp_path, monkeypatch):
    from pathlib import Path

    from pyro_vae.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["train", "--quiet", "--name", "d", "--set", "data.subset=300", "--set",
                 "train.epochs=1", "--set", "model.hidden=[32]"]) == 0
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = next(b for b in readme.split("```python")[1:] if "SVI(" in b).split("```")[0]
    scope = {}
    exec(snippet, scope)
    assert 50 < scope["loss"] / 128 < 1000  # -ELBO per image (nats) of a barely trained model


def test_one_training_step_equals_pyro_infer_svi_step():
    """The trainer's update (differentiable_loss + one torch Adam) is pyro.infer.SVI's."""
    from pyro.infer import SVI
    from pyro.optim import Adam

    from pyro_vae.model import registered

    cfg, ds, vae = build_vae()
    cfg2, _, vae2 = build_vae()
    vae2.load_state_dict(vae.state_dict())
    initial = {k: v.clone() for k, v in vae.state_dict().items()}
    x = ds.x_test[:32]
    svi = SVI(registered(vae.model, vae), registered(vae.guide, vae), Adam({"lr": 1e-2}),
              Trace_ELBO(max_plate_nesting=1))
    pyro.set_rng_seed(3)
    svi_loss = svi.step(x)
    opt = torch.optim.Adam(vae2.parameters(), lr=1e-2)
    pyro.set_rng_seed(3)
    loss = Trace_ELBO(max_plate_nesting=1).differentiable_loss(vae2.model, vae2.guide, x)
    loss.backward()
    opt.step()
    assert loss.item() == pytest.approx(svi_loss, rel=1e-6)
    for a, b in zip(vae.parameters(), vae2.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert not torch.equal(vae.state_dict()["encoder.net.0.weight"], initial["encoder.net.0.weight"])


@pytest.mark.parametrize("overrides", [
    ("train.elbo=trace",),
    ("train.elbo=meanfield",),
    ("train.elbo=meanfield", "prior.name=mixture"),  # no closed form: Monte Carlo KL
    ("train.elbo=trace", "train.num_particles=3"),
    ("train.elbo=trace", "model.conditional=true"),
    ("train.elbo=meanfield", "prior.name=laplace"),  # closed form from a Normal to a Laplace
    ("train.elbo=meanfield", "train.num_particles=3"),  # the analytic KL, once per particle
    ("train.elbo=trace", "prior.name=student-t"),
    ("train.elbo=trace", "prior.name=vamp"),
])
def test_written_out_elbo_equals_pyros_estimator_on_the_same_draws(overrides):
    """negative_elbo (what train.compile compiles) is Trace_ELBO / TraceMeanField_ELBO of
    VAE.model and VAE.guide: same value and same gradients from the same random numbers."""
    from pyro_vae.objectives import negative_elbo

    cfg, ds, vae = build_vae(*overrides)
    tc = cfg.train
    x, y = ds.x_test[:32], (ds.y_test[:32] if vae.num_classes else None)
    args = (x,) if y is None else (x, y)
    unused = dict(allow_unused=True, materialize_grads=True)  # at weight 0 Pyro masks the
    for weight in (1.0, 0.3, 0.0):  # latent site: a learnable prior gets no gradient there
        torch.manual_seed(5)
        ref = ELBOS[tc.elbo](tc).differentiable_loss(vae.model, vae.guide, *args, kl_weight=weight)
        ref_grads = torch.autograd.grad(ref, list(vae.parameters()), **unused)
        torch.manual_seed(5)
        eps = torch.randn(tc.num_particles, 32, vae.latent_dim)
        analytic = tc.elbo == "meanfield" and has_closed_form_kl(vae)
        ours = negative_elbo(vae, x, eps, vae.onehot(y), torch.tensor(weight), analytic)
        grads = torch.autograd.grad(ours, list(vae.parameters()), **unused)
        assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
        for a, b in zip(grads, ref_grads):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["trace", "meanfield"])
def test_compiled_training_gives_the_eager_losses_on_the_same_seed(name):
    # 500 images in batches of 125: one batch shape, so one compilation per estimator; on
    # the CPU (tests/test_cuda.py holds compiled against eager on a GPU)
    cpu = ("train.device=cpu", f"train.elbo={name}", "train.batch_size=125")
    eager = train(small_config(*cpu, epochs=2))
    compiled = train(small_config(*cpu, "train.compile=true", epochs=2))
    assert compiled.config.train.compile and not eager.config.train.compile
    for a, b in zip(eager.metrics, compiled.metrics, strict=True):
        assert b["train_elbo"] == pytest.approx(a["train_elbo"], rel=1e-5)
        assert b["test_elbo"] == pytest.approx(a["test_elbo"], rel=1e-5)
    for pa, pb in zip(eager.vae.parameters(), compiled.vae.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-5)


def test_compile_with_an_estimator_it_does_not_support_is_refused():
    with pytest.raises(ConfigError, match="train.compile = true with train.elbo = 'jit'.*"
                                          "'trace' or 'meanfield'"):
        train(small_config("train.elbo=jit", "train.compile=true"))


def test_a_compiler_failure_is_one_clear_error(monkeypatch):
    from torch._dynamo.exc import BackendCompilerFailed

    def broken_compile(fn, **kwargs):
        def call(*args):
            raise BackendCompilerFailed(broken_compile, RuntimeError("no C++ compiler found"), None)
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.raises(ConfigError, match="train.compile = true: torch.compile failed on this "
                                          "machine .*no C\\+\\+ compiler.*train.compile = false"):
        train(small_config("train.compile=true", "train.device=cpu", epochs=1))


def test_deferred_host_reads_give_the_per_step_losses_and_parameters(tmp_path):
    """train.sync_every > 1 (CUDA's default: no host read in a step) computes exactly what
    per-step reads compute: the fused Adam's skip flag is zero on finite steps."""
    runs = {k: train(small_config("train.batch_size=64", f"train.sync_every={k}", subset=300,
                                  epochs=2)) for k in (1, 7)}
    # the loss values differ by float32 rounding: read per step, Pyro adds the sites'
    # log-densities as host floats (float64); deferred, as float32 tensors on the device
    assert [m["train_elbo"] for m in runs[1].metrics] == pytest.approx(
        [m["train_elbo"] for m in runs[7].metrics], rel=1e-6)
    assert [m["test_elbo"] for m in runs[1].metrics] == [m["test_elbo"] for m in runs[7].metrics]
    for name, value in runs[1].vae.state_dict().items():
        assert torch.equal(runs[7].vae.state_dict()[name], value), name


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_deferred_reads_skip_a_non_finite_update_and_then_stop_naming_its_step():
    from pyro_vae.training import TrainState, make_loss, run_epoch

    cfg = small_config("train.batch_size=32", "train.sync_every=4", subset=300)
    state = TrainState.create(cfg, torch.device("cpu"))
    assert state.sync_every == 4
    loss = make_loss(cfg, state.vae)
    with torch.no_grad():  # a poisoned decoder bias: every step's loss is NaN from here on
        state.vae.decoder.net[-1].bias[0] = float("nan")
    before = {k: v.clone() for k, v in state.vae.encoder.state_dict().items()}
    with pytest.raises(NonFiniteError, match=r"at epoch 1, step 1 \(read at step 4\): its "
                                             r"update, and any later non-finite one, was skipped"):
        run_epoch(state, loss)
    assert state.epoch_loss == 0.0  # the non-finite sum was not added
    for name, value in state.vae.encoder.state_dict().items():  # no update was applied
        assert torch.equal(value, before[name]), name


def test_in_a_group_the_stop_flag_is_polled_only_where_the_losses_are_read(monkeypatch):
    """Asking every rank whether to stop is a read across the group (on a GPU, a host
    read): with train.sync_every = 4 it happens at every 4th step, with the losses' read."""
    from pyro_vae import distributed
    from pyro_vae.training import TrainState, make_loss, run_epoch

    cfg = small_config("train.sync_every=4", "train.batch_size=32", "train.device=cpu", subset=300)
    state = TrainState.create(cfg, torch.device("cpu"))
    loss = make_loss(cfg, state.vae)
    state.group = distributed.Group(rank=0, world=2)  # one process standing in for two
    polls = []
    monkeypatch.setattr(distributed, "all_sum", lambda values, group: values)
    monkeypatch.setattr(distributed, "any_rank", lambda flag, group, device: polls.append(state.step))
    assert run_epoch(state, loss)
    steps = math.ceil(state.dataset.x_train.shape[0] / 32)
    assert steps > 8 and polls == list(range(4, steps + 1, 4))


@pytest.mark.parametrize("overrides", [("train.elbo=trace",), ("train.elbo=meanfield",),
                                       ("prior.name=student-t",),
                                       ("train.elbo=trace", "model.conditional=true"),
                                       ("train.compile=true", "model.conditional=true")])
def test_a_deferred_step_reads_nothing_back_from_the_device(monkeypatch, overrides):
    """With train.sync_every > 1, a step after the first reads nothing on the host (on a
    GPU each read stalls the queue), Pyro's own .item() calls and NaN branch included, and
    the label range check of a conditional model; nor builds a tensor from Python data
    (torch's StudentT did, each time the prior was built)."""
    from pyro_vae.training import TrainState, make_loss, train_step

    cfg = small_config(*overrides, "train.sync_every=50", "train.device=cpu")
    state = TrainState.create(cfg, torch.device("cpu"))
    loss = make_loss(cfg, state.vae)
    x = state.dataset.x_train[:64]  # (64, X)
    y = state.dataset.y_train[:64] if state.vae.num_classes else None
    for _ in range(2 if cfg.train.compile else 1):  # the first validates; the second compiles
        train_step(state, loss, x, y, 1.0)
    before = state.step
    with no_host_reads(monkeypatch, "a deferred step"):
        for _ in range(3):
            train_step(state, loss, x, y, 1.0)
    state.read_pending()
    assert state.step == before + 3 and math.isfinite(state.epoch_loss) and state.epoch_loss > 0


def test_fold_step_keeps_the_first_non_finite_step_and_flags_each_for_adam():
    from pyro_vae.graphs import NONE_BAD, fold_step, loss_and_grad_norms

    grads = [torch.ones(3), torch.ones(2)]
    loss_sum = torch.zeros((), dtype=torch.float64)
    first_bad = torch.full((), NONE_BAD, dtype=torch.float64)
    found = []
    for step, (loss, g) in enumerate([(1.0, 1.0), (2.0, 1.0), (3.0, float("inf")),
                                      (4.0, 1.0), (float("nan"), 1.0)], start=10**7):
        both = loss_and_grad_norms(torch.tensor(loss), [grads[0], grads[1] * g])  # (1 + 2,)
        found.append(fold_step(loss_sum, first_bad, both, float(step)).item())
        if step == 10**7 + 1:
            assert loss_sum.item() == 3.0 and first_bad.item() == NONE_BAD
    assert found == [0.0, 0.0, 1.0, 0.0, 1.0]  # the fused Adam skips exactly those updates
    assert first_bad.item() == 10**7 + 2  # the first of them, exact at any step count


def test_iwae_with_one_particle_says_it_is_the_elbo():
    from pyro_vae.objectives import OneParticleIWAEWarning

    with pytest.warns(OneParticleIWAEWarning, match="num_particles = 1 is the ELBO"):
        ELBOS["iwae"](small_config("train.elbo=iwae").train)


def test_on_the_cpu_pyros_reads_are_deferred_after_the_checked_first_step(monkeypatch):
    """At train.sync_every = 1 (the CPU default) the step reads its loss itself, so Pyro's
    own reads (torch_item, warn_if_nan) are skipped after the first step; the first still
    runs them, and Pyro's shape checks."""
    from pyro.infer import enum, trace_elbo

    from pyro_vae.training import TrainState, make_loss, train_step

    cfg = small_config("train.sync_every=1", "train.device=cpu")
    state = TrainState.create(cfg, torch.device("cpu"))
    assert state.sync_every == 1
    loss = make_loss(cfg, state.vae)
    x = state.dataset.x_train[:32]
    calls = []
    check = enum.check_site_shape
    monkeypatch.setattr(enum, "check_site_shape", lambda *a: calls.append("shape") or check(*a))
    monkeypatch.setattr(trace_elbo, "torch_item", lambda v: calls.append("item") or v.item())
    train_step(state, loss, x, None, 1.0)  # the first, checked step
    assert calls.count("shape") == 3 and "item" in calls  # z, x in the model; z in the guide
    calls.clear()
    monkeypatch.setattr(trace_elbo, "warn_if_nan", lambda v, *a, **k: calls.append("nan") or v)
    train_step(state, loss, x, None, 1.0)
    assert calls == [] and state.step == 2 and math.isfinite(state.epoch_loss)


@pytest.mark.parametrize("overrides, analytic", [
    (["train.elbo=meanfield"], True),  # Gaussian guide, N(0, I) prior: torch knows the KL
    (["train.elbo=trace"], False),  # a Monte Carlo KL however the families look
    (["train.elbo=meanfield", "prior.name=mixture"], False),  # no closed form: estimated
])
def test_uses_analytic_kl_only_for_meanfield_where_the_kl_has_a_closed_form(overrides, analytic):
    from pyro_vae.objectives import uses_analytic_kl

    cfg, _, vae = build_vae(*overrides)
    assert uses_analytic_kl(cfg, vae) is analytic

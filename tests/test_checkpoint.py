"""Faults injected for real: signals, a writer killed mid-write, corrupted files, NaNs."""

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch

from pyro_vae import checkpoint as ckpt_io
from pyro_vae.cli import main
from pyro_vae.config import ConfigError, load_config
from pyro_vae.runs import ConfigFileWarning, load_run
from pyro_vae.training import Interrupted, train

from conftest import metrics_without_seconds, small_config

ARGS = ["--set", "data.subset=1000", "--set", "train.batch_size=16", "--set", "model.hidden=[32]",
        "--set", "model.latent_dim=2", "--set", "train.epochs=8"]


def _cli(*args):
    return [sys.executable, "-m", "pyro_vae.cli", *args]


@pytest.mark.slow
def test_sigterm_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path):
    full = subprocess.run(_cli("train", "--quiet", *ARGS, "--runs-dir", str(tmp_path), "--name", "full"),
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr
    proc = subprocess.Popen(_cli("train", "--quiet", *ARGS, "--runs-dir", str(tmp_path), "--name", "cut"),
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted" in err and "--resume" in err
    saved = ckpt_io.load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert 2 <= saved["epoch"] < 8
    resumed = subprocess.run(_cli("train", "--quiet", "--resume", str(tmp_path / "cut")),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a = ckpt_io.load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = ckpt_io.load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert metrics_without_seconds(tmp_path / "full") == metrics_without_seconds(tmp_path / "cut")
    assert a["step"] == b["step"]


def test_python_api_resume_equals_an_uninterrupted_run_and_applies_the_policy(tmp_path):
    cfg = small_config("train.batch_size=64", subset=300, epochs=2)
    full = train(cfg, tmp_path / "full")
    saved = (tmp_path / "full" / "checkpoint.pt").read_bytes()
    with pytest.raises(ckpt_io.RunError, match=r"'.*full' already holds a run \(checkpoint.pt\), "
                       r"which a new run would overwrite"):
        train(cfg, tmp_path / "full")  # not resume: a new run in a used folder
    assert (tmp_path / "full" / "checkpoint.pt").read_bytes() == saved
    (tmp_path / "afile").write_text("")
    with pytest.raises(ckpt_io.RunError, match="'.*afile' is a file; allowed: a new or empty folder"):
        train(cfg, tmp_path / "afile")
    polls = iter(range(10**6))  # should_stop is polled after every step: stop after the 3rd
    with pytest.raises(Interrupted, match="stopped at epoch 1, step 3"):
        train(cfg, tmp_path / "cut", should_stop=lambda: next(polls) >= 2)
    changed = small_config("train.batch_size=64", "train.lr=0.01", subset=300, epochs=2)
    with pytest.raises(ConfigError, match=r"changed config \(train.lr = 0.01, the run has 0.001\).*force"):
        train(changed, resume=tmp_path / "cut")
    resumed = train(cfg, resume=tmp_path / "cut")
    assert resumed.run_dir == tmp_path / "cut" and metrics_without_seconds(tmp_path / "cut") == metrics_without_seconds(tmp_path / "full")
    for name, value in full.vae.state_dict().items():
        assert torch.equal(resumed.vae.state_dict()[name], value), name
    longer = small_config("train.batch_size=64", subset=300, epochs=3)
    assert train(longer, resume=tmp_path / "cut", force=True).metrics[-1]["epoch"] == 3
    assert "epochs = 3" in (tmp_path / "cut" / "config.toml").read_text()  # saved with it


def test_a_new_run_killed_before_its_first_checkpoint_leaves_a_folder_a_new_run_can_use(tmp_path,
                                                                                        monkeypatch):
    def killed(path, payload, replace=True):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_io, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        train(small_config(subset=300), tmp_path / "run")
    monkeypatch.undo()
    assert list((tmp_path / "run").iterdir()) == []  # the step-0 checkpoint is written first
    assert train(small_config(subset=300), tmp_path / "run").metrics[-1]["epoch"] == 1


def test_a_stop_between_config_and_checkpoint_keeps_the_config_being_saved(tmp_path, monkeypatch):
    train(small_config(subset=300, epochs=1), tmp_path / "run")
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()

    def killed(path, payload):
        raise KeyboardInterrupt  # the process stops after config.toml, before checkpoint.pt

    monkeypatch.setattr(ckpt_io, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        train(small_config(subset=300, epochs=2), resume=tmp_path / "run", force=True)
    monkeypatch.undo()
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before
    on_disk = load_config(tmp_path / "run" / "config.toml")
    assert on_disk.train.epochs == 2  # what --force asked for, not the run's old config
    with pytest.raises(ConfigError, match=r"train.epochs = 2, the run has 1"):
        train(on_disk, resume=tmp_path / "run")
    assert train(on_disk, resume=tmp_path / "run", force=True).metrics[-1]["epoch"] == 2


def test_resume_with_a_changed_config_is_refused_unless_forced(tmp_path, capsys):
    small = ["--quiet", "--set", "data.subset=200", "--set", "model.hidden=[16]",
             "--set", "train.epochs=1", "--runs-dir", str(tmp_path), "--name", "r"]
    assert main(["train", *small]) == 0
    run = str(tmp_path / "r")
    assert main(["train", "--quiet", "--resume", run, "--set", "train.lr=0.01"]) == 2
    assert "changed config (train.lr = 0.01, the run has 0.001); undo the change (a --set, --config" in capsys.readouterr().err
    assert main(["train", "--quiet", "--resume", run, "--set", "train.epochs=2", "--force"]) == 0
    assert len(metrics_without_seconds(tmp_path / "r")) == 2


def test_a_forced_resume_uses_the_new_prior_df_and_old_checkpoints_with_it_still_load():
    from pyro_vae.model import VAE

    def student(df):
        return VAE(load_config(None, ["prior.name=student-t", f"prior.df={df}",
                                      "model.latent_dim=2", "model.hidden=[8]"]), 4)

    five, three = student(5), student(3)
    assert not any(k.startswith("prior.") for k in five.state_dict())  # built from the config
    ckpt_io.load_state(three, five.state_dict(), "checkpoint")
    assert three.prior.df.tolist() == [3.0, 3.0]  # --force with prior.df = 3 trains with 3
    earlier = {**five.state_dict(), "prior.df": torch.full((2,), 5.0)}  # as saved before
    ckpt_io.load_state(three, earlier, "checkpoint")  # the saved value is ignored
    assert three.prior.df.tolist() == [3.0, 3.0]
    with pytest.raises(ckpt_io.CheckpointError, match="unexpected prior.nope"):
        ckpt_io.load_state(three, {**earlier, "prior.nope": torch.zeros(1)}, "checkpoint")


@pytest.fixture()
def trained_run(tmp_path):
    assert main(["train", "--quiet", "--set", "data.subset=200", "--set", "model.hidden=[16]",
                 "--set", "train.epochs=1", "--runs-dir", str(tmp_path), "--name", "r"]) == 0
    return tmp_path / "r"


def test_writer_killed_mid_write_leaves_the_previous_checkpoint_loadable(trained_run):
    path = trained_run / "checkpoint.pt"
    before = ckpt_io.load_checkpoint(path)
    script = textwrap.dedent(f"""
        import os, torch
        from pyro_vae.checkpoint import atomic_write
        payload = {{"junk": torch.randn(100000)}}
        def write(f):
            import io
            buf = io.BytesIO(); torch.save(payload, buf); data = buf.getvalue()
            f.write(data[: len(data) // 2]); f.flush()
            os._exit(9)  # die with half the bytes written
        atomic_write({str(path)!r}, write)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == 9
    after = ckpt_io.load_checkpoint(path)
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    left = list(trained_run.glob(".checkpoint.pt.*.tmp"))  # the killed writer's half file
    assert len(left) == 1
    (trained_run / "notes.tmp").write_text("the user's own")
    cfg = load_config(trained_run / "config.toml")
    train(cfg, resume=trained_run)  # the next run on the folder clears the half file only
    assert not left[0].exists() and (trained_run / "notes.tmp").exists()


def test_truncated_or_foreign_checkpoints_are_named(trained_run, tmp_path):
    data = (trained_run / "checkpoint.pt").read_bytes()
    bad = tmp_path / "half.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt_io.CheckpointError, match="half.pt' is truncated or corrupted"):
        ckpt_io.load_checkpoint(bad)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ckpt_io.CheckpointError, match="not a pyro_vae checkpoint .missing: format"):
        ckpt_io.load_checkpoint(tmp_path / "other.pt")


def test_checkpoint_from_another_architecture_lists_the_misfits(trained_run):
    ckpt = ckpt_io.load_checkpoint(trained_run / "checkpoint.pt")
    ckpt["config"]["model"]["hidden"] = [24]
    ckpt_io.save_checkpoint(trained_run / "checkpoint.pt", {k: v for k, v in ckpt.items() if k != "format"})
    with pytest.warns(ConfigFileWarning, match="model.hidden"), pytest.raises(
            ckpt_io.CheckpointError,
            match=r"different architecture: encoder.net.0.weight: checkpoint \[16, 784\] vs model \[24, 784\]"):
        load_run(trained_run)  # config.toml no longer matches the edited checkpoint: a warning


def test_run_dir_with_missing_files_is_named(trained_run, capsys):
    (trained_run / "metrics.jsonl").unlink()
    assert main(["sample", str(trained_run)]) == 2
    assert "is incomplete: missing metrics.jsonl" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_nan_stops_training_and_keeps_the_last_checkpoint(trained_run, capsys):
    before = ckpt_io.load_checkpoint(trained_run / "checkpoint.pt")
    code = main(["train", "--quiet", "--resume", str(trained_run), "--force",
                 "--set", "train.lr=1e30", "--set", "train.epochs=3"])
    assert code == 1
    err = capsys.readouterr().err
    assert "non-finite loss or gradient" in err and "site" in err
    after = ckpt_io.load_checkpoint(trained_run / "checkpoint.pt")
    assert after["epoch"] == before["epoch"] == 1
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])


def test_load_run_round_trips_the_test_elbo(trained_run):
    from pyro_vae.evaluate import elbo

    run = load_run(trained_run, device="auto")  # the device that trained it (train.device = auto)
    last = run.metrics[-1]
    value = elbo(run.vae, run.dataset.x_test, seed=run.config.train.seed,
                 batch_size=run.config.train.eval_batch_size)
    assert value == pytest.approx(last["test_elbo"], abs=1e-4)
    assert run.q_z(run.dataset.x_test[:5]).batch_shape == (5,)
    assert run.sample(3).shape == (3, 784)


def test_data_of_another_shape_than_the_run_is_refused(trained_run):
    ckpt = ckpt_io.load_checkpoint(trained_run / "checkpoint.pt")
    ckpt["config"]["data"].update(name="ring", binarize="none")
    ckpt_io.save_checkpoint(trained_run / "checkpoint.pt", {k: v for k, v in ckpt.items() if k != "format"})
    with pytest.warns(ConfigFileWarning, match="data.name"), pytest.raises(
            ckpt_io.CheckpointError, match="trained on data with 784 values per point; "
                                           "data.name = 'ring' now gives 2; allowed: data of 784"):
        load_run(trained_run)


def test_a_forced_resume_on_data_of_another_width_names_the_data(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    np.save(tmp_path / "six.npy", rng.normal(size=(60, 6)).astype("float32"))
    np.save(tmp_path / "seven.npy", rng.normal(size=(60, 7)).astype("float32"))
    own = ["model.hidden=[8]", "model.latent_dim=2", "train.epochs=1"]
    train(load_config("own_data", [f"data.path={tmp_path / 'six.npy'}", *own]), tmp_path / "run")
    wider = load_config("own_data", [f"data.path={tmp_path / 'seven.npy'}", *own])
    with pytest.raises(ckpt_io.CheckpointError, match=r"trained on data with 6 values per point; "
                       r"data.path = '.*seven.npy' now gives 7; allowed: data of 6 values per point"):
        train(wider, resume=tmp_path / "run", force=True)  # was: a list of misfit weights


def test_nan_in_data_is_refused_on_load():
    from pyro_vae.config import DataConfig
    from pyro_vae.data import DATASETS, DataError, load_dataset, ring

    def poisoned(cfg):
        ds = ring(cfg)
        ds.x_train[3, 1] = float("nan")
        return ds

    DATASETS["poisoned"] = poisoned
    try:
        with pytest.raises(DataError, match="'ring': x_train contains NaN or infinite values"):
            load_dataset(DataConfig(name="poisoned", binarize="none"))
    finally:
        DATASETS.pop("poisoned")


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_rollback_recovers_from_a_transient_nan_and_halves_the_learning_rate(tmp_path):
    from pyro_vae.checkpoint import RollbackWarning
    from pyro_vae.training import train

    from conftest import flaky_likelihood, small_config

    with flaky_likelihood(nan_at=30):  # one poisoned forward pass, then healthy again
        cfg = small_config("likelihood.name=flaky", "train.on_nan=rollback", "train.batch_size=64",
                           epochs=4)  # 8 steps per epoch: the NaN strikes in epoch 4
        with pytest.warns(RollbackWarning, match=r"rollback 1/3 to epoch 3, step 24 with train.lr halved to 0.0005"):
            result = train(cfg, tmp_path / "run")
    assert [m["epoch"] for m in result.metrics] == [1, 2, 3, 4]
    ckpt = ckpt_io.load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert (ckpt["lr_factor"], ckpt["rollbacks"], ckpt["epoch"]) == (0.5, 1, 4)


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_rollback_gives_up_after_max_rollbacks(tmp_path):
    from pyro_vae.checkpoint import RollbackWarning
    from pyro_vae.training import NonFiniteError, train

    from conftest import small_config

    cfg = small_config("train.lr=1e30", "train.on_nan=rollback", "train.max_rollbacks=2", epochs=2)
    with pytest.warns(RollbackWarning) as record, pytest.raises(NonFiniteError, match="non-finite"):
        train(cfg, tmp_path / "run")
    halved = [str(w.message).split("halved to ")[1].split()[0] for w in record
              if w.category is RollbackWarning]
    assert halved == ["5e+29", "2.5e+29"]  # halved again at each rollback
    ckpt = ckpt_io.load_checkpoint(tmp_path / "run" / "checkpoint.pt")  # the budget is the run's:
    assert (ckpt["rollbacks"], ckpt["lr_factor"]) == (2, 0.25)  # saved at each rollback
    with warnings.catch_warnings():
        warnings.simplefilter("error", RollbackWarning)  # a resume has none left to spend
        with pytest.raises(NonFiniteError, match="non-finite"):
            train(cfg, resume=tmp_path / "run")


def test_run_files_follow_the_umask_like_any_other_file(tmp_path):
    old = os.umask(0o022)
    try:
        ckpt_io.atomic_write(tmp_path / "a", lambda f: f.write(b"x"))
        os.umask(0o077)
        ckpt_io.atomic_write(tmp_path / "b", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o644  # mkstemp alone gives 0o600
    assert stat.S_IMODE((tmp_path / "b").stat().st_mode) == 0o600


def test_each_rank_resumes_the_training_stream_on_its_own_gpu(monkeypatch):
    # data-parallel ranks draw alike, each on its own GPU; only rank 0's process saves, and
    # its copies of the other GPUs' streams were never drawn from: every rank must resume
    # rank 0's training stream on its own device (simulated: no GPU here)
    gpus = {0: torch.tensor([10]), 1: torch.tensor([0])}  # rank 0 drew on cuda:0; cuda:1 untouched
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [gpus[0], gpus[1]])
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: gpus[device.index])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: gpus.update(enumerate(states)))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: gpus.__setitem__(device.index, s))
    saved = ckpt_io.rng_state(torch.device("cuda", 0))  # by rank 0
    gpus.update({0: torch.tensor([0]), 1: torch.tensor([0])})  # a fresh process on rank 1
    ckpt_io.set_rng_state(saved, torch.device("cuda", 1))
    assert gpus[1].item() == 10


@pytest.mark.parametrize("overrides", [(), ("train.kl_warmup_epochs=2",)])
def test_a_jit_elbo_run_resumes_to_the_uninterrupted_run(tmp_path, overrides):
    # Pyro's JIT traces each new KL weight by running the model three times (three noise
    # draws): traced on a forked stream, a resumed run draws what an uninterrupted one does
    cfg = small_config("train.elbo=jit", "train.batch_size=64", *overrides, subset=300, epochs=2)
    full = train(cfg, tmp_path / "full")
    polls = iter(range(10**6))
    with pytest.raises(Interrupted, match="stopped at epoch 1, step 3"):
        train(cfg, tmp_path / "cut", should_stop=lambda: next(polls) >= 2)
    resumed = train(cfg, resume=tmp_path / "cut")
    assert metrics_without_seconds(tmp_path / "cut") == metrics_without_seconds(tmp_path / "full")
    for name, value in full.vae.state_dict().items():
        assert torch.equal(resumed.vae.state_dict()[name], value), name


def _as_if_saved_on_cuda(path):
    """Rewrite a checkpoint so every storage says it lives on cuda:0 (torch's zip format with
    pickle protocol 2: the location string sits once in data.pkl, memoized after)."""
    import zipfile

    src = zipfile.ZipFile(path)
    entries = {name: src.read(name) for name in src.namelist()}
    src.close()
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as out:
        for name, data in entries.items():
            if name.endswith("data.pkl"):
                assert b"X\x03\x00\x00\x00cpu" in data
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            out.writestr(name, data)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CPU-only machine")
def test_a_cuda_saved_checkpoint_loads_on_a_cpu_only_machine(trained_run, capsys):
    from pyro_vae.evaluate import elbo

    before = load_run(trained_run)
    _as_if_saved_on_cuda(trained_run / "checkpoint.pt")
    with pytest.raises(RuntimeError, match="deserialize object on a CUDA device"):
        torch.load(trained_run / "checkpoint.pt", weights_only=False)  # it really is tagged CUDA
    run = load_run(trained_run)
    assert all(torch.equal(a, b) for a, b in zip(before.vae.parameters(), run.vae.parameters()))
    assert elbo(run.vae, run.dataset.x_test, seed=0) == elbo(before.vae, before.dataset.x_test, seed=0)
    assert main(["train", "--quiet", "--resume", str(trained_run), "--force",
                 "--set", "train.epochs=2"]) == 0
    assert len(metrics_without_seconds(trained_run)) == 2


@pytest.mark.filterwarnings("ignore:Encountered NaN")  # Pyro's notice on the first bad step
def test_a_run_that_fails_in_its_first_epoch_resumes_from_its_step_0_checkpoint(tmp_path):
    # a new run directory holds a checkpoint before the first step: a run that went
    # non-finite (or was killed) in epoch 1 is not a dead end, and resuming it with a
    # working learning rate trains exactly the fresh run of that rate
    from pyro_vae.training import NonFiniteError

    with pytest.raises(NonFiniteError, match="the last checkpoint is intact"):
        train(small_config("train.lr=1e30", epochs=2), tmp_path / "bad")
    ckpt = ckpt_io.load_checkpoint(tmp_path / "bad" / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (0, 0)
    good = small_config(epochs=2)
    train(good, resume=tmp_path / "bad", force=True)
    train(good, tmp_path / "fresh")
    assert metrics_without_seconds(tmp_path / "bad") == metrics_without_seconds(tmp_path / "fresh")


def test_a_forced_batch_size_change_mid_epoch_is_refused(tmp_path):
    # the position counts steps of the old size: the epoch's rest would be skipped
    cfg = small_config("train.batch_size=16", subset=300, epochs=2)
    polls = iter(range(10**6))
    with pytest.raises(Interrupted, match="stopped at epoch 1, step 5"):
        train(cfg, tmp_path / "cut", should_stop=lambda: next(polls) >= 4)
    bigger = small_config("train.batch_size=200", subset=300, epochs=2)
    with pytest.raises(ConfigError, match="train.batch_size = 200: the run stopped in epoch 1 "
                                          "after 5 steps of batch size 16; allowed: "
                                          "train.batch_size = 16 until that epoch ends"):
        train(bigger, resume=tmp_path / "cut", force=True)
    finish = small_config("train.batch_size=16", subset=300, epochs=1)
    train(finish, resume=tmp_path / "cut", force=True)  # the epoch finished: now it may change
    assert train(bigger, resume=tmp_path / "cut", force=True).metrics[-1]["epoch"] == 2


def test_write_metrics_writes_one_json_line_per_epoch_replacing_the_file_whole(tmp_path):
    import json

    ckpt_io.write_metrics(tmp_path, [{"epoch": e, "test_elbo": -100.0 - e} for e in (1, 2, 3)])
    ckpt_io.write_metrics(tmp_path, [{"epoch": 1, "test_elbo": -101.0}])  # a rollback's rewrite
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln) for ln in lines] == [{"epoch": 1, "test_elbo": -101.0}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temp file left


def test_a_run_killed_between_checkpoints_is_read_at_its_checkpoint_with_a_warning(tmp_path):
    """metrics.jsonl is written each epoch, checkpoint.pt every train.checkpoint_every: after a
    SIGKILL in between, evaluate/inspect must not pair later metrics with older parameters."""
    import json

    from pyro_vae.runs import StaleCheckpointWarning

    train(small_config(epochs=1, subset=200), tmp_path / "r")
    with open(tmp_path / "r" / "metrics.jsonl", "a") as f:  # an epoch never checkpointed
        f.write(json.dumps({"epoch": 2, "test_elbo": -1.0}) + "\n")
    with pytest.warns(StaleCheckpointWarning, match=r"metrics.jsonl records 2 epochs but "
                      r"checkpoint.pt holds the parameters after epoch 1 .*checkpoint_every = 1\)"):
        run = load_run(tmp_path / "r")
    assert [m["epoch"] for m in run.metrics] == [1] and run.metrics[0]["test_elbo"] < -50
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # agreeing files: no warning
        train(small_config(epochs=1, subset=200), tmp_path / "s")
        assert len(load_run(tmp_path / "s").metrics) == 1

import gc
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyro_vae.cli import entry, main
from pyro_vae.config import ConfigError
from pyro_vae.runs import load_run

from conftest import metrics_without_seconds

SMALL = ["--set", "data.subset=300", "--set", "train.epochs=2", "--set", "model.hidden=[32]",
         "--set", "model.latent_dim=2"]
RUN_FILES = ["config.toml", "metrics.jsonl", "checkpoint.pt", "reconstructions.png", "samples.png"]


def test_train_writes_every_file_and_its_config_reproduces_the_run(tmp_path, capsys):
    assert main(["train", "--quiet", *SMALL, "--runs-dir", str(tmp_path), "--name", "a"]) == 0
    run = tmp_path / "a"
    for name in RUN_FILES:
        assert (run / name).stat().st_size > 0, name
    out = capsys.readouterr().out
    assert f"wrote {run}/" in out and " test points, one draw each)" in out  # the ELBO's SE
    assert len(metrics_without_seconds(run)) == 2
    assert main(["train", "--quiet", "--config", str(run / "config.toml"),
                 "--runs-dir", str(tmp_path), "--name", "b"]) == 0
    assert metrics_without_seconds(run) == metrics_without_seconds(tmp_path / "b")
    a = torch.load(run / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_each_epoch_line_prints_the_test_elbo_with_its_se(tmp_path, capsys):
    assert main(["train", *SMALL, "--runs-dir", str(tmp_path), "--name", "a"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("epoch")]
    metrics = [json.loads(ln) for ln in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == len(metrics) == 2
    for line, m in zip(lines, metrics):
        assert f"test ELBO {m['test_elbo']:9.2f} (SE {m['test_elbo_se']:.2f}, test points)" in line, line
        assert f"train objective {m['train_elbo']:9.2f}" in line, line  # not called an ELBO


def test_one_test_point_prints_its_missing_se_as_not_available(tmp_path, capsys):
    import numpy as np

    np.save(tmp_path / "d.npy", np.random.default_rng(0).normal(size=(40, 5)).astype(np.float32))
    assert main(["train", "--config", "own_data", "--set", f"data.path={tmp_path / 'd.npy'}",
                 "--set", "data.test_fraction=0.025", "--set", "train.epochs=1",
                 "--runs-dir", str(tmp_path), "--name", "a"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("epoch"))
    assert "(SE n/a: one test point)" in line and "nan" not in line.lower(), line


def test_existing_run_name_is_refused(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("keep me")
    assert main(["train", "--quiet", *SMALL, "--runs-dir", str(tmp_path), "--name", "a"]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "a" / "x").read_text() == "keep me"


@pytest.mark.parametrize("args, expected", [
    (["--set", "data.name=cifar10"], "data.name = 'cifar10': unknown name; allowed: fashion-mnist, file, kmnist, linear-gaussian, mnist, mnist-10k, ring"),
    (["--set", "data.name=mnist", "--set", "data.root=/nonexistent/pv"],
     "data set 'mnist' not found under /nonexistent/pv/MNIST/raw"),
    (["--set", "train.epoch=3"], "unknown config key train.epoch (did you mean 'epochs'?)"),
    (["--set", "train.batch_size=big"], "train.batch_size = 'big': expected an integer"),
    (["--set", "prior.name=gauss"], "prior.name = 'gauss': unknown name"),
    (["--set", "likelihood.name=bernouli"], "(did you mean 'bernoulli'?)"),
    (["--config", "/nonexistent.toml"], "config file '/nonexistent.toml' does not exist"),
])
def test_bad_input_exits_2_with_one_clear_line(tmp_path, capsys, args, expected):
    code = main(["train", "--quiet", *args, "--runs-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu_exits_2(tmp_path, capsys):
    assert main(["train", "--quiet", "--set", "train.device=cuda", "--runs-dir", str(tmp_path)]) == 2
    assert "train.device = 'cuda' but no CUDA device" in capsys.readouterr().err


def test_console_script_reports_bad_input_in_a_subprocess(tmp_path):
    exe = Path(sys.executable).parent / "pyro-vae"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "pyro_vae.cli"]
    proc = subprocess.run(cmd + ["train", "--set", "train.elbo=tracee", "--runs-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "train.elbo = 'tracee': unknown name (did you mean 'trace'?); allowed: iwae, jit, meanfield, trace" in proc.stderr


class _Exited(Exception):
    """Raised by the stand-in for ``os._exit``."""


def _os_exit(code):
    raise _Exited(code)


class _FlushCount(io.StringIO):
    flushes = 0

    def flush(self):
        self.flushes += 1
        super().flush()


@pytest.mark.parametrize("world", [None, "2"])
def test_the_process_exits_with_mains_status_and_under_torchrun_skips_finalization(
        monkeypatch, world):
    """Alone: ``sys.exit``, with what is alive frozen out of the exit's cycle collection (~1 s).
    One of several under torchrun: ``os._exit`` after flushing both streams, so a gloo
    thread cannot abort the process in the interpreter's finalization."""
    monkeypatch.setattr(sys, "argv", ["pyro-vae", "sample", "no-such-run"])
    monkeypatch.setattr(os, "_exit", _os_exit)
    out, err = _FlushCount(), _FlushCount()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)
    gc.unfreeze()
    try:
        with pytest.raises(SystemExit if world is None else _Exited) as exited:
            entry()
        frozen = gc.get_freeze_count()
    finally:
        gc.unfreeze()  # this test process collects as before
    assert (frozen > 0) == (world is None)
    status = exited.value.code if world is None else exited.value.args[0]
    assert status == 2
    assert "pyro-vae: error: " in err.getvalue() and "no-such-run" in err.getvalue()
    if world is not None:
        assert out.flushes >= 1 and err.flushes >= 1


def test_sample_keeps_train_s_figure_and_draws_x_for_vector_data(tmp_path, capsys):
    from pyro_vae.runs import load_run

    assert main(["train", "--quiet", "--config", "ring_2d", "--set", "train.epochs=1",
                 "--set", "data.subset=400", "--runs-dir", str(tmp_path), "--name", "ring"]) == 0
    before = (tmp_path / "ring" / "samples.png").read_bytes()
    assert main(["sample", str(tmp_path / "ring"), "--n", "500"]) == 0
    assert (tmp_path / "ring" / "samples.png").read_bytes() == before
    assert "prior_samples.png" in capsys.readouterr().out
    run = load_run(tmp_path / "ring")
    torch.manual_seed(0)
    means = run.sample(20_000)  # (N, 2): E[x | z]
    torch.manual_seed(0)  # the same z
    noise = run.sample(20_000, mean=False) - means  # x ~ p(x | z) = N(E[x | z], 0.05^2 I)
    torch.testing.assert_close(noise.std(0), torch.full((2,), 0.05), atol=1e-3, rtol=0)


def test_sample_writes_grids_and_checks_labels(tmp_path, capsys):
    assert main(["train", "--quiet", *SMALL, "--set", "model.conditional=true",
                 "--runs-dir", str(tmp_path), "--name", "c"]) == 0
    assert main(["sample", str(tmp_path / "c"), "--label", "3", "--n", "16"]) == 0
    assert (tmp_path / "c" / "prior_samples_label3.png").stat().st_size > 0
    assert main(["sample", str(tmp_path / "c"), "--label", "10"]) == 2
    assert "--label = 10: out of range; allowed 0..9" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "missing")]) == 2
    assert "run directory" in capsys.readouterr().err
    assert main(["train", "--quiet", *SMALL, "--runs-dir", str(tmp_path), "--name", "u"]) == 0
    assert main(["sample", str(tmp_path / "u"), "--n", "9", "--out", str(tmp_path / "u.png")]) == 0
    assert (tmp_path / "u.png").stat().st_size > 0
    assert main(["sample", str(tmp_path / "u"), "--label", "2"]) == 2
    assert "--label = 2: run" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"label = -1: out of range; allowed 0..9"):
        load_run(tmp_path / "c").sample(4, label=-1)  # the same check from Python

"""Data-parallel training with DDP on the CPU (gloo, 2 processes launched by torchrun):
equal to one process on the same global batches, interruptible, resumable, failing together."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pyro_vae.cli import main
from pyro_vae.config import ConfigError
from pyro_vae.distributed import Group, _local_gpu, check_supported, shard

from conftest import small_config

pytestmark = pytest.mark.slow

SMALL = ["--set", "data.subset=256", "--set", "model.hidden=[32]", "--set", "model.latent_dim=4",
         "--set", "train.batch_size=64", "--set", "train.device=cpu", "--quiet"]


def _torchrun(tmp_path, *args, **popen):
    """``torchrun --standalone --nproc_per_node=2 -m pyro_vae train ...`` in tmp_path."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "pyro_vae", "train", "--runs-dir", str(tmp_path), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)


def _params(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)["model"]


def _assert_same_params(a, b, atol=1e-6):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.allclose(pa[k], pb[k], atol=atol), (k, (pa[k] - pb[k]).abs().max())


def test_shards_cover_every_row_of_a_batch_once():
    for b in (2, 7, 64):
        rows = [torch.arange(b)[shard(b, Group(r, 3 if b > 2 else 2))]
                for r in range(3 if b > 2 else 2)]
        assert torch.equal(torch.cat(rows), torch.arange(b))
        assert max(map(len, rows)) - min(map(len, rows)) <= 1


def test_what_data_parallel_training_cannot_do_exactly_is_refused_by_name():
    two = Group(0, 2)
    with pytest.raises(ConfigError, match="train.elbo = 'iwae'.*with 2 processes"):
        check_supported(small_config("train.elbo=iwae"), two, 256)
    with pytest.raises(ConfigError, match="guide.name = 'iaf'"):
        check_supported(small_config("guide.name=iaf"), two, 256)
    with pytest.raises(ConfigError, match=r"train.batch_size = 64 with 2 processes and 257.*\(the last has 1\)"):
        check_supported(small_config("train.batch_size=64"), two, 257)
    check_supported(small_config("train.batch_size=64", "train.elbo=meanfield"), two, 258)


def test_two_gloo_processes_give_the_parameters_of_one(tmp_path):
    args = [*SMALL, "--set", "train.epochs=2"]
    proc = _torchrun(tmp_path, *args, "--name", "two")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert out.count("final test ELBO") == 1  # rank 0 alone reports and writes
    assert main(["train", *args, "--runs-dir", str(tmp_path), "--name", "one"]) == 0
    _assert_same_params(tmp_path / "one", tmp_path / "two")
    one, two = ((tmp_path / n / "metrics.jsonl").read_text().splitlines() for n in ("one", "two"))
    assert len(one) == len(two) == 2


def test_sigterm_to_the_group_leaves_a_checkpoint_that_resume_continues(tmp_path):
    args = [*SMALL, "--set", "data.subset=1024", "--set", "train.epochs=12"]
    proc = _torchrun(tmp_path, *args, "--name", "cut")
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().strip()):
        time.sleep(0.2)  # the first epoch is written: training is under way
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "interrupted" in err, err[-3000:]
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    assert 0 < ckpt["epoch"] < 12
    proc = _torchrun(tmp_path, *args, "--resume", str(tmp_path / "cut"))
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert main(["train", *args, "--runs-dir", str(tmp_path), "--name", "whole"]) == 0
    _assert_same_params(tmp_path / "whole", tmp_path / "cut", atol=1e-5)


def test_a_non_finite_loss_stops_every_rank_with_the_usual_message(tmp_path):
    proc = _torchrun(tmp_path, *SMALL, "--set", "train.lr=1e12", "--set", "train.epochs=3",
                     "--name", "nan")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert err.count("pyro-vae: training failed: non-finite loss or gradient") == 2, err[-3000:]


def test_more_processes_than_gpus_on_a_node_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigError, match=r"LOCAL_RANK = 1: this node has 1 GPU.*allowed: "
                       r"torchrun --nproc_per_node at most 1"):
        _local_gpu()
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert _local_gpu() == 0


def test_a_bad_setting_under_torchrun_is_printed_once(tmp_path):
    # every rank reads the same config and refuses it: rank 0 alone reports it
    proc = _torchrun(tmp_path, *SMALL, "--set", "train.epochs=0", "--name", "none")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert err.count("pyro-vae: error: train.epochs = 0") == 1, err[-3000:]


def test_a_rank_specific_error_is_printed_at_once_and_a_shared_one_after_the_grace(
        monkeypatch, capsys):
    from pyro_vae import distributed

    for name, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1"),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29555")):
        monkeypatch.setenv(name, value)
    assert not distributed.reports_errors()
    sleeps = []
    monkeypatch.setattr("pyro_vae.cli.time.sleep", sleeps.append)
    # LOCAL_RANK 1 on a node of one GPU: only this rank sees it, so it reports at once
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["train", *SMALL, "--set", "train.device=cuda"]) == 2
    assert "LOCAL_RANK = 1: this node has 1 GPU" in capsys.readouterr().err and sleeps == []
    # every rank refuses epochs = 0: this one leaves it to LOCAL_RANK 0, and reports only
    # if torchrun has not ended it after the grace period
    assert main(["train", *SMALL, "--set", "train.epochs=0"]) == 2
    assert sleeps == [distributed.REPORTER_GRACE_S]
    assert "train.epochs = 0" in capsys.readouterr().err


def test_an_unreadable_world_size_is_one_clear_error_and_does_not_break_the_exit(monkeypatch,
                                                                                  capsys):
    from pyro_vae.distributed import exit_process

    monkeypatch.setenv("WORLD_SIZE", "abc")
    assert main(["train", *SMALL, "--set", "train.epochs=1"]) == 2
    assert "WORLD_SIZE = 'abc' (from the environment); allowed: a whole number" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        exit_process(2)
    assert exit_.value.code == 2


@pytest.mark.parametrize("env, message", [
    ({"RANK": "5"}, "RANK = 5 (from the environment) with WORLD_SIZE = 2; allowed: 0..1"),
    ({"RANK": "x"}, "RANK = 'x' (from the environment); allowed: a whole number"),
    ({"MASTER_PORT": "99999"}, "MASTER_PORT = '99999' (from the environment); allowed: a port"),
    ({"MASTER_PORT": "abc"}, "MASTER_PORT = 'abc' (from the environment); allowed: a whole"),
    ({"LOCAL_RANK": "-1"}, "LOCAL_RANK = '-1' (from the environment); allowed: a whole number"),
])
def test_a_hand_set_launch_environment_is_checked_before_the_rendezvous(monkeypatch, capsys,
                                                                        tmp_path, env, message):
    """A launcher other than torchrun may set these wrong: RANK 5 of 2 would wait for ever."""
    base = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29556"}
    for name, value in {**base, **env}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("pyro_vae.cli.time.sleep", lambda s: None)  # no grace wait here
    assert main(["train", *SMALL, "--set", "train.epochs=1", "--set", "train.device=cpu",
                 "--runs-dir", str(tmp_path / "runs")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # rank 0 made it, and removed it on the refusal

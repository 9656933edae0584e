"""Bad input, tried as a new user would: each gives one clear line (exit 2) naming the field,
the value and what is allowed, never a traceback; an edited run config.toml gives a warning.

Covered elsewhere, not repeated here: unknown data set, key, section and likelihood names,
a wrong-typed --set value and a missing config file (test_cli.py); --k 0, --n 0 and beyond
the test set, a negative --seed (test_evaluate.py); --label on an unconditional run and out
of range (test_cli.py); a run directory missing one file, and a checkpoint of another
architecture or data shape (test_checkpoint.py); bad own-data files from Python
(test_own_data.py).
"""

import shutil

import numpy as np
import pytest
import torch

from pyro_vae.cli import main
from pyro_vae.config import ConfigError, load_config
from pyro_vae.runs import ConfigFileWarning, load_run

TINY = ["--set", "model.hidden=[16]", "--set", "model.latent_dim=2", "--set", "train.epochs=1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run on a .npy file of real values (own_data config), trained once."""
    root = tmp_path_factory.mktemp("trained")
    np.save(root / "d.npy", np.random.default_rng(0).normal(size=(100, 5)).astype(np.float32))
    assert main(["train", "--quiet", "--config", "own_data", "--set", f"data.path={root / 'd.npy'}",
                 *TINY, "--runs-dir", str(root), "--name", "r"]) == 0
    return root / "r"


@pytest.fixture()
def run(trained, tmp_path):
    """A fresh copy of the trained run, free to break."""
    return shutil.copytree(trained, tmp_path / "run")


def _train(*sets):
    return lambda run, d: ["train", "--quiet", *[a for s in sets for a in ("--set", s)],
                           "--runs-dir", str(d / "runs")]


def _own(path_of, *sets):
    """``train --config own_data`` on the file that ``path_of(d)`` writes into folder d."""
    return lambda run, d: ["train", "--quiet", "--config", "own_data", "--set",
                           f"data.path={path_of(d)}", *[a for s in sets for a in ("--set", s)],
                           "--runs-dir", str(d / "runs")]


def _npy(array, name="x.npy"):
    def write(d):
        np.save(d / name, array)
        return d / name
    return write


def _pt(tensor):
    def write(d):
        torch.save(tensor, d / "x.pt")
        return d / "x.pt"
    return write


def _npz(**arrays):
    def write(d):
        np.savez(d / "x.npz", **arrays)
        return d / "x.npz"
    return write


def _config_file(text):
    def argv(run, d):
        (d / "c.toml").write_text(text)
        return ["train", "--quiet", "--config", str(d / "c.toml"), "--runs-dir", str(d / "runs")]
    return argv


def _broken_checkpoint(edit):
    def argv(run, d):
        path = run / "checkpoint.pt"
        path.write_bytes(edit(path.read_bytes()))
        return ["evaluate", str(run), "--k", "5"]
    return argv


def _foreign_checkpoint(run, d):
    torch.save({"weights": 1}, run / "checkpoint.pt")
    return ["evaluate", str(run), "--k", "5"]


def _damaged_metrics(run, d):
    (run / "metrics.jsonl").write_text('{"epoch": 1, "train_el')  # cut off mid-line
    return ["evaluate", str(run), "--k", "5"]


def _config_bytes(data: bytes):
    def argv(run, d):
        (d / "c.toml").write_bytes(data)
        return ["train", "--quiet", "--config", str(d / "c.toml"), "--runs-dir", str(d / "runs")]
    return argv


def _config_folder(run, d):
    (d / "configs").mkdir()
    return ["train", "--quiet", "--config", str(d / "configs"), "--runs-dir", str(d / "runs")]


def _a_file(d):
    (d / "afile").write_text("not a folder")
    return str(d / "afile")


def _used_compare_folder(run, d):
    (d / "c" / "run").mkdir(parents=True)
    (d / "c" / "run" / "checkpoint.pt").write_text("an earlier comparison's")
    return ["compare", "--setting", "ring", "--out", str(d / "c")]


def _empty_run(run, d):
    (d / "empty").mkdir()
    return ["evaluate", str(d / "empty")]


REAL = np.random.default_rng(1).normal(size=(20, 3)).astype(np.float32)

BAD_INPUTS = {
    # run directories and checkpoints
    "truncated checkpoint": (_broken_checkpoint(lambda b: b[: len(b) // 2]),
                             "checkpoint.pt' is truncated or corrupted and cannot be read"),
    "corrupt checkpoint": (_broken_checkpoint(lambda b: bytes(len(b))),
                           "checkpoint.pt' is truncated or corrupted and cannot be read"),
    "foreign checkpoint": (_foreign_checkpoint, "is not a pyro_vae checkpoint (missing: format"),
    "missing run directory": (lambda run, d: ["evaluate", str(d / "nope")],
                              "run directory '{d}/nope' does not exist"),
    "empty run directory": (_empty_run, "'{d}/empty' is incomplete: missing config.toml, "
                                        "metrics.jsonl, checkpoint.pt"),
    # output paths
    "sample into a missing folder": (lambda run, d: ["sample", str(run), "--out", str(d / "no" / "s.png")],
                                     "--out = '{d}/no/s.png': folder '{d}/no' does not exist"),
    "sample as text": (lambda run, d: ["sample", str(run), "--out", str(d / "s.txt")],
                       "unknown figure format '.txt'; allowed: "),
    "inspect into a file": (lambda run, d: ["inspect", str(run), "--out", _a_file(d)],
                            "--out = '{d}/afile' is a file; allowed: a folder"),
    "runs under a file": (lambda run, d: ["train", "--quiet", "--runs-dir", _a_file(d)],
                          "--runs-dir = '{d}/afile' is a file; allowed: a folder"),
    "a run named as a file": (lambda run, d: ["train", "--quiet", "--runs-dir", str(d), "--name",
                                              _a_file(d) and "afile"],
                              "--name = 'afile': '{d}/afile' is a file; allowed: a new name"),
    "sample into a folder": (lambda run, d: ["sample", str(run), "--out", str(d)],
                             "--out = '{d}' is a folder; allowed: a figure file"),
    "compare into a file": (lambda run, d: ["compare", "--setting", "ring", "--out", _a_file(d)],
                            "--out = '{d}/afile' is a file; allowed: a folder"),
    "a seed numpy cannot take": (_train("train.seed=4294967296"),
                                 "train.seed = 4294967296: out of range, must be >= 0 and <= 4294967295"),
    "an evaluate seed numpy cannot take": (lambda run, d: ["evaluate", str(run), "--seed", str(2**64)],
                                           f"--seed = {2**64}: allowed 0..4294967295"),
    "a compare seed below 0": (lambda run, d: ["compare", "--setting", "ring", "--seed", "-1"],
                               "--seed = -1: allowed 0..4294967295"),
    "a run name that leaves --runs-dir": (lambda run, d: ["train", "--runs-dir", str(d), "--name", "../x"],
                                          "--name = '../x': allowed: a plain folder name"),
    "a run directory that is a file": (lambda run, d: ["sample", str(run / "config.toml")],
                                       "config.toml' is a file; allowed: a run's folder"),
    "runs under a file's path": (lambda run, d: _a_file(d) and ["train", "--quiet", "--runs-dir",
                                                                 f"{d}/afile/sub", "--name", "x"],
                                 "'{d}/afile/sub/x': Not a directory; allowed: paths this user can "
                                 "read and write"),
    "a misspelled bundled config": (lambda run, d: ["train", "--config", "ring2d"],
                                    "config file 'ring2d' does not exist (did you mean 'ring_2d'?)"),
    "compare more points than the run has": (lambda run, d: ["compare", "--setting", "run", "--run",
                                                             str(run), "--points", "100000"],
                                             "--points = 100000: the run's test set has"),
    "force without resume": (lambda run, d: ["train", "--force", "--runs-dir", str(d)],
                             "--force without --resume: it accepts a changed config when "
                             "continuing a run"),
    "compare into an earlier comparison": (_used_compare_folder,
                                           "--out = '{d}/c' holds an earlier comparison, whose "
                                           "toy VAE ('{d}/c/run') this one would overwrite"),
    "damaged metrics.jsonl": (_damaged_metrics, "metrics.jsonl', line 1, is not valid JSON"),
    "resume of a missing run": (lambda run, d: ["train", "--resume", str(d / "nope")],
                                "run directory '{d}/nope' does not exist"),
    "an eval.json that is a folder": (lambda run, d: (run / "eval.json").mkdir() or
                                      ["evaluate", str(run)],
                                      "eval.json' is not a file; allowed: a run whose eval.json "
                                      "is a JSON object, as evaluate writes it, or absent"),
    "an eval.json that is not an object": (
        lambda run, d: (run / "eval.json").write_text("[1, 2]") and ["evaluate", str(run)],
        "eval.json' holds a JSON array, not an object; allowed: a run whose eval.json is a JSON"),
    "an eval.json with a NaN": (
        lambda run, d: (run / "eval.json").write_text('{"mine": NaN}') and ["evaluate", str(run)],
        "eval.json' is not valid JSON (NaN is not a JSON number"),
    "an eval.json that is not JSON": (
        lambda run, d: (run / "eval.json").write_text("{'a':") and ["evaluate", str(run)],
        "eval.json' is not valid JSON (Expecting property name"),
    "sample n = 0": (lambda run, d: ["sample", str(run), "--n", "0"], "--n = 0: must be >= 1"),
    "evaluate batch size 0": (lambda run, d: ["evaluate", str(run), "--batch-size", "0"],
                              "--batch-size = 0: must be >= 1"),
    # config files and values
    "invalid TOML, [model] twice": (_config_file("[model]\nlatent_dim = 2\n[model]\nhidden = []\n"),
                                    "c.toml' is not valid TOML"),
    "a section that is not a table": (_config_file("train = 3\n"), "[train] must be a table"),
    "a config file that is not UTF-8": (_config_bytes(b"\xff\xfe[train]\n"),
                                        "c.toml' is not valid TOML: 'utf-8' codec can't decode"),
    "a folder as config file": (_config_folder, "configs' is a folder; allowed: a TOML file"),
    "a bad value in a config file": (_config_file("[train]\nlr = -1.0\n"),
                                     "c.toml': train.lr = -1.0: out of range, must be > 0.0"),
    "a list for a number": (_train("model.latent_dim=[2]"), "model.latent_dim = [2]: expected an integer"),
    "a scale float32 makes 0": (_train("likelihood.sigma=1e-46"), "likelihood.sigma = 1e-46: "
                                "float32, which the model computes in, would make it 0; "
                                "allowed: > 0.0 with a magnitude from 1.4e-45 to 3.4e+38"),
    "a weight float32 makes infinite": (_train("train.beta=1e300"), "train.beta = 1e+300: "
                                        "float32, which the model computes in, would make it "
                                        "infinite; allowed: >= 0.0 with a magnitude"),
    "an image size beyond memory": (_train("data.image_size=100000"), "data.image_size = "
                                    "100000: out of range, must be >= 0 and <= 4096"),
    "a number for a list": (_train("model.hidden=64"), "model.hidden = 64: expected a list of integers"),
    "lr = nan": (_train("train.lr=nan"), "train.lr = nan: expected a finite number > 0.0"),
    "lr = inf": (_train("train.lr=inf"), "train.lr = inf: expected a finite number > 0.0"),
    "beta = -inf": (_train("train.beta=-inf"), "train.beta = -inf: expected a finite number >= 0.0"),
    "sigma = nan": (_train("likelihood.sigma=nan"), "likelihood.sigma = nan: expected a finite number > 0.0"),
    "df = inf": (_train("prior.df=inf"), "prior.df = inf: expected a finite number > 0.0"),
    "test_fraction = 1": (_train("data.test_fraction=1"),
                          "data.test_fraction = 1.0: out of range, must be > 0.0 and < 1.0"),
    "channels = color": (_train("data.channels=color"),
                         "data.channels = 'color': unknown name; allowed: grayscale, rgb"),
    # your own data from the command line
    "no data.path": (_train("data.name=file", "data.binarize=none"),
                     "data.path = '': data.name = 'file' needs a path"),
    "missing data file": (_own(lambda d: d / "nope.npy"), "data.path = '{d}/nope.npy': no such file"),
    "unknown extension": (_own(lambda d: (d / "x.csv").write_text("1") and d / "x.csv"),
                          "unknown extension '.csv'; allowed: a .npy, .npz, .pt file, or a folder"),
    "data.path without data.name": (_train("data.path=x.npy"),
                                    "x.npy' is read only with data.name = 'file'"),
    "npz without x": (_own(_npz(data=REAL)), "no array 'x' (it holds: data)"),
    "labels far beyond the points": (_own(_npz(x=REAL, y=np.array([10**9] + [0] * 19)),
                                          "model.conditional=true"),
                                     "labels y: label 1000000000 for 20 points (C = 1000000001 "
                                     "classes); allowed: class indices below max(N, 1000)"),
    "a sparse tensor": (_own(_pt(torch.tensor(REAL).to_sparse())),
                        "x.pt': a tensor of layout torch.sparse_coo; allowed: a dense tensor"),
    "NaN in the data": (_own(_npy(np.where(np.eye(20, 3) > 0, np.nan, REAL))),
                        "x.npy': 3 values that are NaN, infinite or beyond float32's range of +-3.4e38 (the first in point 0)"),
    "rank 1": (_own(_npy(REAL[:, 0])), "x.npy': an array of shape [20] (rank 1); allowed: [N, X]"),
    "empty": (_own(_npy(REAL[:0])), "x.npy': empty (shape [0, 3])"),
    "labels of another length": (_own(_npz(x=REAL, y=np.arange(19))),
                                 "labels y: labels of shape [19] for 20 points of x"),
    "labels not whole numbers": (_own(_npz(x=REAL, y=np.linspace(0, 1, 20))),
                                 "labels y: labels of type float64, values in [0.0, 1.0]; allowed"),
    "real data, default binarize": (_own(_npy(REAL), "data.binarize=dynamic"),
                                    "is real-valued; use data.binarize = 'none'"),
    "outside the likelihood's support": (_own(_npy(REAL), "likelihood.name=bernoulli"),
                                         "likelihood 'bernoulli' on data set 'x.npy' (data.binarize = "
                                         "'none'): needs x in [0, 1]"),
    "conditional without labels": (_own(_npy(REAL), "model.conditional=true"),
                                   "model.conditional = true needs labels of at least 2 classes; data.path = "),
    "conv on vectors": (_own(_npy(REAL), "model.network=conv"),
                        "model.network = 'conv' needs images, but the data are vectors of 3 values"),
    "conv on 6x6 images": (_own(_npy(np.random.default_rng(0).random((10, 6, 6))), "model.network=conv"),
                           "divisible by 4, data has 6x6 images"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_each_bad_input_gives_one_clear_line(run, tmp_path, capsys, name):
    make_argv, expected = BAD_INPUTS[name]
    argv = make_argv(run, tmp_path)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyro-vae: error: ") and err.count("\n") == 1, err  # one line
    assert expected.format(d=tmp_path) in err
    assert "Traceback" not in err
    runs = tmp_path / "runs"  # a refused new run leaves no folder of its own behind
    assert not runs.is_dir() or not list(runs.iterdir()), list(runs.iterdir())


@pytest.mark.parametrize("edit, expected", [
    (lambda text: text.replace("lr = 0.001", "lr = 0.01"),
     "differs from the checkpoint's config: train.lr = 0.01 there, 0.001 in the checkpoint"),
    (lambda text: text + "\n[model]\nlatent_dim = 3\n", "is not valid TOML"),
    (lambda text: text.replace("lr = 0.001", "lr = nan"),
     "is not a valid config (train.lr = nan: expected a finite number > 0.0)"),
])
def test_an_edited_run_config_is_ignored_with_a_warning(run, capsys, edit, expected):
    path = run / "config.toml"
    assert "lr = 0.001" in path.read_text()
    before = load_run(run).vae.state_dict()
    path.write_text(edit(path.read_text()))
    with pytest.warns(ConfigFileWarning, match="It is ignored: a run is loaded with the config "
                                               "stored in its checkpoint.pt") as record:
        assert main(["evaluate", str(run), "--k", "5"]) == 0
    assert expected in str(record[0].message) and str(path) in str(record[0].message)
    with pytest.warns(ConfigFileWarning):
        loaded = load_run(run)
    assert loaded.config.train.lr == 0.001  # the checkpoint's config, not the file's
    assert all(torch.equal(loaded.vae.state_dict()[k], v) for k, v in before.items())


def test_an_unedited_run_config_loads_without_a_warning(run):
    load_run(run)  # warnings are errors in this suite


def test_a_damaged_metrics_file_is_written_again_by_resume(run, capsys):
    good = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text('{"epoch": 1, "train_el')
    assert main(["evaluate", str(run), "--k", "5"]) == 2
    assert f"pyro-vae train --resume {run}" in capsys.readouterr().err  # what the message says
    assert main(["train", "--quiet", "--resume", str(run)]) == 0
    assert (run / "metrics.jsonl").read_text() == good
    assert main(["evaluate", str(run), "--k", "5"]) == 0


@pytest.mark.parametrize("argv", [["evaluate", "{run}", "--k", "5"], ["inspect", "{run}"],
                                  ["compare", "--setting", "run", "--run", "{run}"],
                                  ["compare", "--setting", "ring", "--out", "{run}/../c"]])
def test_a_folder_that_cannot_be_written_fails_before_the_work(run, capsys, monkeypatch, argv):
    import pyro_vae.cli
    import pyro_vae.comparison
    import pyro_vae.inspection

    def refused(dir):
        raise PermissionError(13, "Permission denied", f"{dir}/tmpfile")

    def work(*args, **kwargs):
        raise AssertionError("the work started before the folder was checked")

    monkeypatch.setattr(pyro_vae.cli.tempfile, "TemporaryFile", refused)
    for module, name in [(pyro_vae.cli, "evaluate_model"), (pyro_vae.inspection, "write_figures"),
                         (pyro_vae.comparison, "compare")]:
        monkeypatch.setattr(module, name, work)
    assert main([a.format(run=run) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyro-vae: error: ") and err.count("\n") == 1, err
    assert "tmpfile': Permission denied; allowed: paths this user can read and write" in err


def test_evaluate_prints_its_results_before_it_writes_them(run, capsys, monkeypatch):
    import pyro_vae.cli

    def full_disk(path, write):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(pyro_vae.cli.ckpt_io, "atomic_write", full_disk)
    assert main(["evaluate", str(run), "--k", "5"]) == 2
    captured = capsys.readouterr()
    assert "ELBO, K=5 draws (nats)" in captured.out  # the numbers are not lost with the file
    assert "eval.json': No space left on device" in captured.err


def test_a_run_that_lost_its_config_and_metrics_is_restored_by_resume(run, capsys):
    files = {f: (run / f).read_text() for f in ("config.toml", "metrics.jsonl")}
    for f in files:
        (run / f).unlink()
    assert main(["evaluate", str(run), "--k", "5"]) == 2
    assert (f"missing config.toml, metrics.jsonl (a run holds config.toml, metrics.jsonl, "
            f"checkpoint.pt); `pyro-vae train --resume {run}` writes them again") in capsys.readouterr().err
    assert main(["train", "--quiet", "--resume", str(run)]) == 0  # the checkpoint holds both
    assert {f: (run / f).read_text() for f in files} == files
    (run / "config.toml").unlink()
    assert main(["train", "--quiet", "--resume", str(run), "--set", "train.epochs=2"]) == 2
    assert "train.epochs = 2, the run has 1" in capsys.readouterr().err  # checkpoint's config
    (run / "checkpoint.pt").unlink()
    assert main(["train", "--quiet", "--resume", str(run)]) == 2
    assert "is incomplete: missing checkpoint.pt" in capsys.readouterr().err


@pytest.mark.parametrize("error, expected", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                  "allocate memory: you tried to allocate 800000000000 bytes. Error code 12"),
     "out of memory (tried to allocate 745.1 GiB at once); allowed: sizes that fit"),
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has"),
     "out of memory (CUDA: tried to allocate 20.00 GiB at once); allowed: sizes that fit"),
    (MemoryError(), "out of memory (CPU at once); allowed: sizes that fit"),  # numpy, PIL
])
def test_a_size_beyond_the_memory_gives_one_line(run, capsys, monkeypatch, error, expected):
    import pyro_vae.inspection

    def allocate(*args, **kwargs):
        raise error

    monkeypatch.setattr(pyro_vae.inspection, "prior_samples_figure", allocate)
    assert main(["sample", str(run), "--n", "10"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyro-vae: error: ") and err.count("\n") == 1, err
    assert expected in err and "--n" in err


def test_other_runtime_errors_are_not_taken_for_memory(run, monkeypatch):
    import pyro_vae.inspection

    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(pyro_vae.inspection, "prior_samples_figure", broken)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):  # a bug stays loud
        main(["sample", str(run), "--n", "10"])


def test_an_unknown_device_is_refused_by_name(run, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", str(run), "--device", "gpu"])
    assert exit_.value.code == 2
    assert "argument --device: invalid choice: 'gpu'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="device = 'cuda:5'; allowed: auto, cpu, cuda"):
        load_run(run, device="cuda:5")  # not blamed on the checkpoint


def test_a_figure_named_without_extension_is_written_and_reported_as_png(run, tmp_path, capsys):
    assert main(["sample", str(run), "--n", "4", "--out", str(tmp_path / "myfig")]) == 0
    assert (tmp_path / "myfig.png").stat().st_size > 0
    assert f"wrote {tmp_path / 'myfig.png'}" in capsys.readouterr().out


@pytest.mark.parametrize("key, value, expected", [
    ("rng", {}, "its 'rng' lacks torch, cuda, numpy, python"),
    ("optimizer", {}, "its 'optimizer' lacks state, param_groups"),
    ("config", None, "its 'config' is a NoneType; allowed: dict"),
    ("epoch", "x", "its 'epoch' is a str; allowed: int"),
])
def test_a_checkpoint_with_a_damaged_field_is_refused_naming_it(run, capsys, key, value, expected):
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    ckpt[key] = value
    torch.save(ckpt, run / "checkpoint.pt")
    for argv in (["evaluate", str(run), "--k", "5"], ["train", "--quiet", "--resume", str(run)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("pyro-vae: error: checkpoint ") and "is damaged: " + expected in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_evaluate_on_cuda_without_a_gpu_names_the_flag(run, capsys):
    assert main(["evaluate", str(run), "--device", "cuda"]) == 2
    assert "pyro-vae: error: --device = 'cuda' but no CUDA device" in capsys.readouterr().err


def test_python_overrides_of_the_wrong_shape_and_fit_without_labels_are_named(tmp_path):
    from pyro_vae import fit

    for wrong in ("train.epochs=1", {"train.epochs": 1}, None):
        with pytest.raises(ConfigError, match=r"overrides = .*; allowed: a list of 'section.key=value'"):
            load_config(None, wrong)
    with pytest.raises(ConfigError, match=r"model.conditional = true needs labels; allowed: fit\(x, y\)"):
        fit(np.ones((10, 3)), run_dir=tmp_path / "c", overrides=["model.conditional=true"])
    assert not (tmp_path / "c").exists()


def test_a_bundled_config_is_found_by_its_file_name_too():
    assert load_config("ring_2d.toml") == load_config("ring_2d")


def test_cli_warnings_read_as_one_line_without_python_source():
    from pyro_vae.cli import _one_line_warning

    assert _one_line_warning(UserWarning("careful"), UserWarning, "/x/training.py", 435,
                             "loss = make_loss(cfg)") == "pyro-vae: warning: UserWarning: careful\n"


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch, capsys):
    from pyro_vae import cli

    monkeypatch.setattr(cli.time, "strftime", lambda fmt: "20261203-120000")  # one second
    argv = ["train", "--quiet", "--config", "ring_2d", *TINY, "--set", "data.size=100",
            "--runs-dir", str(tmp_path)]
    assert main(argv) == 0 and main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["20261203-120000", "20261203-120000-2"]
    assert all((tmp_path / n / "checkpoint.pt").is_file() for n in ("20261203-120000",
                                                                  "20261203-120000-2"))


def test_a_run_claimed_by_another_process_after_the_check_is_refused_untouched(
        tmp_path, monkeypatch):
    """Two runs started at once with one --name both pass the folder check: the second to
    write its step-0 checkpoint is refused, and writes nothing of its own there."""
    from pyro_vae import checkpoint as ckpt_io
    from pyro_vae.training import train

    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "checkpoint.pt").write_bytes(b"the other run's")  # created meanwhile
    monkeypatch.setattr(ckpt_io, "check_new_run_dir", lambda *a, **k: None)  # checked before
    with pytest.raises(ckpt_io.RunError, match="another process started a run there at the "
                                               "same time"):
        train(load_config("ring_2d", ["model.hidden=[16]", "train.epochs=1", "data.size=100"]),
              tmp_path / "r")
    assert [p.name for p in (tmp_path / "r").iterdir()] == ["checkpoint.pt"]
    assert (tmp_path / "r" / "checkpoint.pt").read_bytes() == b"the other run's"


@pytest.mark.parametrize("argv, expected", [
    (lambda run: ["train", "--resume", str(run), "--name", "other"],
     "--name = 'other' with --resume: a resumed run stays in its folder"),
    (lambda run: ["train", "--resume", str(run), "--runs-dir", str(run / "elsewhere")],
     "with --resume: a resumed run stays in its folder"),  # its own parent is fine (torchrun)
    (lambda run: ["evaluate", str(run), "--ais-chains", "0"],
     "--ais-chains = 0 without --ais-steps: AIS runs only with --ais-steps T"),
])
def test_flags_that_would_be_ignored_are_refused(run, capsys, argv, expected):
    assert main(argv(run)) == 2
    assert expected in capsys.readouterr().err


def test_resume_accepts_the_runs_own_name_and_folder(run, capsys):
    """A script may pass --runs-dir and --name every time; with --resume they must agree."""
    assert main(["train", "--quiet", "--resume", str(run), "--runs-dir", str(run.parent),
                 "--name", run.name]) == 0


def test_a_refused_comparison_leaves_no_empty_out_folder(tmp_path, capsys):
    out = tmp_path / "nest" / "a" / "cmp"  # its parents are made with it, and removed with it
    assert main(["compare", "--setting", "ring", "--set", "train.epochs=0", "--out", str(out)]) == 2
    assert "train.epochs = 0" in capsys.readouterr().err and list(tmp_path.iterdir()) == []
    out = tmp_path / "cmp"
    out.mkdir()  # a folder the user made stays, empty or not
    assert main(["compare", "--setting", "ring", "--set", "train.epochs=0", "--out", str(out)]) == 2
    assert out.is_dir()

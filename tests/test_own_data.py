"""Your own data: files (.npy, .npz, .pt, image folders) and arrays from Python (``fit``)."""

import re
import shlex
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_vae import fit, load_run
from pyro_vae.cli import main
from pyro_vae.config import ConfigError, DataConfig, load_config
from pyro_vae.data import DataError, load_dataset
from pyro_vae.model import VAE
from pyro_vae.runs import RunError
from pyro_vae.checkpoint import CheckpointError
from pyro_vae.training import NonFiniteError, build, train

README = Path(__file__).resolve().parents[1] / "README.md"
TINY = ["model.hidden=[16]", "model.latent_dim=2", "train.epochs=1"]


def numbered(n=50, features=4, seed=0):
    """Points whose first value is their index (so rows can be followed through the split)
    and labels index % 3."""
    x = np.random.default_rng(seed).normal(size=(n, features)).astype(np.float32)
    x[:, 0] = np.arange(n)
    return x, np.arange(n) % 3


def write(path, x, y=None):
    """Save x (and y) in the format of ``path``'s extension."""
    if path.suffix == ".npy":
        np.save(path, x)
    elif path.suffix == ".npz":
        np.savez(path, **({"x": x} if y is None else {"x": x, "y": y}))
    else:
        torch.save(torch.as_tensor(x) if y is None else {"x": torch.as_tensor(x),
                                                         "y": torch.as_tensor(y)}, path)
    return path


def file_config(path, **kw):
    return DataConfig(name="file", path=str(path), binarize=kw.pop("binarize", "none"), **kw)


@pytest.mark.parametrize("name, labelled", [("d.npy", False), ("d.npz", True), ("d.npz", False),
                                            ("d.pt", False), ("d.pt", True)])
def test_each_format_keeps_every_point_once_with_its_label(tmp_path, name, labelled):
    x, y = numbered()
    ds = load_dataset(file_config(write(tmp_path / name, x, y if labelled else None)))
    assert ds.x_train.shape == (45, 4) and ds.x_test.shape == (5, 4)  # round(50 * 0.1) held out
    both = torch.cat([ds.x_train, ds.x_test])
    order = both[:, 0].long()
    assert sorted(order.tolist()) == list(range(50))  # a permutation: each point once
    assert torch.equal(both, torch.from_numpy(x)[order])
    assert ds.image_shape is None and ds.support == "real" and ds.name == name
    if labelled:
        assert ds.num_classes == 3
        assert torch.equal(torch.cat([ds.y_train, ds.y_test]), order % 3)  # labels follow x
    else:
        assert ds.y_train is None and ds.num_classes == 0


def test_split_is_seeded_and_sized_by_test_fraction(tmp_path):
    path = write(tmp_path / "d.npy", numbered(200)[0])
    a = load_dataset(file_config(path, test_fraction=0.25))
    assert a.x_test.shape[0] == 50
    assert torch.equal(a.x_test, load_dataset(file_config(path, test_fraction=0.25)).x_test)
    assert not torch.equal(a.x_test, load_dataset(file_config(path, test_fraction=0.25, seed=1)).x_test)
    tiny = load_dataset(file_config(write(tmp_path / "t.npy", numbered(2)[0]), test_fraction=0.01))
    assert (tiny.x_train.shape[0], tiny.x_test.shape[0]) == (1, 1)  # at least one of each


@pytest.mark.parametrize("values, support", [([0, 1], "binary"), ([0, 0.5, 1], "unit-interval"),
                                             ([-0.1, 0.5], "real"), ([0, 1.5], "real")])
def test_support_is_read_from_every_value(tmp_path, values, support):
    x = np.zeros((20, 3), np.float32)
    x.flat[-len(values):] = values  # the last point holds the telling values
    assert load_dataset(file_config(write(tmp_path / "d.npy", x))).support == support


@pytest.mark.parametrize("shape, image_shape", [((30, 8, 12), (1, 8, 12)),
                                                ((30, 3, 4, 8), (3, 4, 8)),
                                                ((30, 16, 4, 4), (16, 4, 4)),  # not channels-last:
                                                ((30, 2, 8, 3), (2, 8, 3))])  # H or W too small
def test_images_are_flattened_in_their_own_order_and_keep_their_shape(tmp_path, shape, image_shape):
    x = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    ds = load_dataset(file_config(write(tmp_path / "d.npy", x)))
    assert ds.image_shape == image_shape and ds.x_dim == int(np.prod(shape[1:]))
    flat = torch.from_numpy(x.reshape(30, -1).astype(np.float32) / 255)  # uint8: / 255
    both = torch.cat([ds.x_train, ds.x_test])
    assert all(any(torch.equal(row, f) for f in flat) for row in both[:5])
    assert ds.support == "unit-interval"


@pytest.mark.parametrize("order", ["C", "F"])
def test_a_file_is_copied_once_in_split_order_with_small_temporaries(tmp_path, monkeypatch, order):
    import tracemalloc

    import pyro_vae.arrays as arrays

    x, y = numbered(4000, 64)
    path = tmp_path / f"{order}.npy"
    np.save(path, np.asarray(x.reshape(4000, 8, 8), order=order))
    monkeypatch.setattr(arrays, "COPY_CHUNK_BYTES", x.nbytes // 20)
    tracemalloc.start()
    ds = load_dataset(file_config(path))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < x.nbytes / 4  # no whole-array temporary (torch's memory is not traced)
    first = torch.cat([ds.x_test, ds.x_train])[:, 0].long()  # each point's index, in order
    assert torch.equal(first, arrays.split_order(4000, 0))
    assert ds.x_train.data_ptr() == ds.x_test[-1:].data_ptr() + 64 * 4  # views of one copy
    assert torch.equal(ds.x_train, torch.from_numpy(x)[first[400:]])


def test_npy_is_memory_mapped_and_converted_once(tmp_path, monkeypatch):
    path = write(tmp_path / "d.npy", np.arange(60, dtype=np.int16).reshape(20, 3))
    calls = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda *a, **kw: calls.append(kw) or real_load(*a, **kw))
    ds = load_dataset(file_config(path))
    assert calls == [{"mmap_mode": "r", "allow_pickle": False}]
    assert ds.x_train.dtype == torch.float32 and sorted(torch.cat([ds.x_train, ds.x_test])
                                                        .flatten().long().tolist()) == list(range(60))


@pytest.mark.parametrize("make, expected", [
    (lambda d: d / "missing.npy", "data.path = '{d}/missing.npy': no such file or folder"),
    (lambda d: (d / "x.csv").write_text("1,2") and d / "x.csv",
     "unknown extension '.csv'; allowed: a .npy, .npz, .pt file, or a folder of images"),
    (lambda d: np.savez(d / "w.npz", data=np.ones((4, 2))) or d / "w.npz",
     "no array 'x' (it holds: data); allowed: the data under x"),
    (lambda d: torch.save({"data": torch.ones(4, 2)}, d / "w.pt") or d / "w.pt",
     "holds a dict with keys data; allowed: a tensor, or a dict with the data under 'x'"),
    (lambda d: torch.save([torch.ones(4, 2)], d / "l.pt") or d / "l.pt", "holds a list"),
    (lambda d: (d / "bad.pt").write_bytes(b"not a zip") and d / "bad.pt",
     "not a readable .pt file of tensors (not the zip archive torch.save writes: "),
    (lambda d: (d / "bad.npy").write_bytes(b"\x93NUMPY garbage") and d / "bad.npy",
     "not a readable .npy array"),
    (lambda d: np.save(d / "o.npy", np.array([{"a": 1}, 2], dtype=object)) or d / "o.npy",
     "not a readable .npy array"),
    (lambda d: write(d / "n.npy", np.array([[1.0, np.nan], [np.inf, 2], [3, 4]])),
     "2 values that are NaN, infinite or beyond float32's range of +-3.4e38 (the first in point 0); allowed: finite float32 numbers only"),
    (lambda d: write(d / "n7.npy", np.where(np.arange(20)[:, None] == 7, np.nan, np.ones((20, 2)))),
     "2 values that are NaN, infinite or beyond float32's range of +-3.4e38 (the first in point 7)"),
    (lambda d: write(d / "mask.npy", np.eye(6, dtype=np.uint8)[None].repeat(4, 0)),
     "uint8 values all 0 or 1: 8-bit values are pixels, divided by 255, so these would read as "
     "0 and 1/255; allowed: for 0/1 data (masks, binary images) bool or float values"),
    (lambda d: write(d / "a.npy", np.ones((4, 2))).rename(d / "a.npz"),
     "a file written by np.save under a .npz name; allowed: the file renamed .npy"),
    (lambda d: write(d / "a.npy", np.ones((4, 2))).rename(d / "a.pt"),
     "a file written by np.save under a .pt name; allowed: the file renamed .npy"),
    (lambda d: write(d / "a.npz", np.ones((4, 2))).rename(d / "a.npy"),
     "a file written by np.savez under a .npy name; allowed: the file renamed .npz"),
    (lambda d: write(d / "a.pt", np.ones((4, 2))).rename(d / "a.npy"),
     "a file written by torch.save under a .npy name; allowed: the file renamed .pt"),
    (lambda d: write(d / "a.pt", np.ones((4, 2))).rename(d / "a.npz"), "by torch.save under a .npz"),
    (lambda d: write(d / "a.npz", np.ones((4, 2))).rename(d / "a.pt"), "by np.savez under a .pt"),
    (lambda d: (torch.save(torch.ones(4, 2), d / "old.pt", _use_new_zipfile_serialization=False)
                or (d / "old.pt").rename(d / "old.npy")), "by torch.save under a .npy name"),
    (lambda d: (d / "tiny.npy").write_bytes(b"abc") and d / "tiny.npy", "not a readable .npy array"),
    (lambda d: torch.save({"x": np.ones((4, 2))}, d / "np.pt") or d / "np.pt",
     "holds objects other than tensors (numpy."),
    (lambda d: (d / "old.pt").write_bytes(b"\x80\x02junk") and d / "old.pt", "not a readable .pt file"),
    (lambda d: write(d / "r1.npy", np.ones(5)), "shape [5] (rank 1); allowed: [N, X] vectors, "
                                                "[N, H, W] or [N, C, H, W] images (one value per"),
    (lambda d: write(d / "r5.npy", np.ones((2, 1, 1, 1, 1))), "(rank 5); allowed"),
    (lambda d: write(d / "e.npy", np.ones((0, 3))), "empty (shape [0, 3])"),
    (lambda d: write(d / "e2.npy", np.ones((4, 0))), "empty (shape [4, 0])"),
    (lambda d: write(d / "one.npy", np.ones((1, 3))), "1 point; needs at least 2"),
    (lambda d: write(d / "c.npy", np.ones((3, 2), np.complex64)), "values of type complex64"),
    (lambda d: write(d / "y.npz", np.ones((4, 2)), np.arange(3)),
     "labels y: labels of shape [3] for 4 points of x; allowed: one label per point, shape [4]"),
    (lambda d: write(d / "f.npz", np.ones((4, 2)), np.array([0, 1, 0.5, 2])),
     "labels of type float64, values in [0.0, 2.0]; allowed: whole numbers >= 0"),
    (lambda d: write(d / "neg.pt", np.ones((4, 2), np.float32), np.array([0, 1, -1, 2])),
     "labels of type int64, values in [-1, 2]; allowed: whole numbers >= 0"),
    (lambda d: write(d / "s.npz", np.ones((2, 2)), np.array(["cat", "dog"])),
     "labels of type <U3; allowed: integers >= 0 (class names? map them to 0, 1, ..., C - 1)"),
])
def test_bad_files_name_the_path_the_problem_and_what_is_allowed(tmp_path, make, expected):
    path = make(tmp_path)
    with pytest.raises(DataError) as err:
        load_dataset(file_config(path))
    assert expected.format(d=tmp_path) in str(err.value)
    assert f"data.path = '{path}'" in str(err.value)


def test_path_without_file_and_image_size_with_a_file_are_refused(tmp_path):
    path = write(tmp_path / "d.npy", numbered()[0])
    with pytest.raises(DataError, match="data.path = '.*d.npy' is read only with data.name = 'file'"):
        load_dataset(DataConfig(path=str(path)))
    with pytest.raises(DataError, match="data.image_size = 8: resizes folders of images only"):
        load_dataset(file_config(path, image_size=8))
    with pytest.raises(DataError, match="data.path = '': data.name = 'file' needs a path"):
        load_dataset(DataConfig(name="file"))


def test_real_values_get_told_to_set_binarize_none_and_outside_support_reuses_the_likelihood_check(tmp_path):
    path = write(tmp_path / "d.npy", numbered()[0])
    with pytest.raises(DataError, match="is real-valued; use data.binarize = 'none' .and a likelihood"):
        load_dataset(file_config(path, binarize="dynamic"))  # the default binarization
    cfg = load_config(None, ["data.name=file", f"data.path={path}", "data.binarize=none", *TINY])
    with pytest.raises(DataError, match=r"likelihood 'bernoulli' on data set 'd.npy'.*needs x in \[0, 1\]"):
        build(cfg)


# --------------------------------------------------------------------------- image folders


def image_folder(root, sizes=((8, 8),) * 6):
    """root/cat and root/dog with random RGB PNGs of the given (H, W) sizes, alternating."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        folder = root / ("cat", "dog")[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3)).astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.mark.parametrize("channels, size, image_shape", [("grayscale", 0, (1, 8, 8)),
                                                          ("rgb", 0, (3, 8, 8)),
                                                          ("grayscale", 4, (1, 4, 4))])
def test_image_folder_gives_shape_channels_and_labels(tmp_path, channels, size, image_shape):
    root = image_folder(tmp_path / "imgs")
    ds = load_dataset(file_config(root, channels=channels, image_size=size, test_fraction=0.34))
    assert ds.image_shape == image_shape and ds.num_classes == 2 and ds.name == "imgs"
    assert (ds.x_train.shape[0], ds.x_test.shape[0]) == (4, 2)
    assert sorted(torch.cat([ds.y_train, ds.y_test]).tolist()) == [0, 0, 0, 1, 1, 1]
    assert 0 <= ds.x_train.min() and ds.x_train.max() <= 1


def test_bad_image_folders_are_named(tmp_path):
    mixed = image_folder(tmp_path / "mixed", sizes=[(8, 8), (8, 8), (6, 10)])
    with pytest.raises(DataError, match=r"images of different sizes \(6x10, 8x8\); set data.image_size"):
        load_dataset(file_config(mixed))
    assert load_dataset(file_config(mixed, image_size=8)).image_shape == (1, 8, 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="'.*empty'.*allowed: a folder with one subfolder of images per class"):
        load_dataset(file_config(tmp_path / "empty"))
    from PIL import Image

    deep = image_folder(tmp_path / "deep", sizes=[(8, 8), (8, 8)])
    Image.fromarray(np.full((8, 8), 30000, np.uint16)).save(deep / "cat" / "16.png")
    with pytest.raises(DataError, match=r"image '.*16.png' has PIL mode 'I;16' \(more than 8 "
                                        r"bits a value\); allowed: modes 1, L, LA"):
        load_dataset(file_config(deep))  # RGB conversion would clip it to white
    broken = image_folder(tmp_path / "broken", sizes=[(8, 8), (8, 8)])
    (broken / "cat" / "9.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"image '.*9.png' cannot be read"):
        load_dataset(file_config(broken))


# --------------------------------------------------------------------------- conv networks


@pytest.mark.parametrize("image_shape, likelihood", [((1, 12, 16), "bernoulli"),
                                                     ((3, 8, 8), "bernoulli"),
                                                     ((3, 8, 4), "beta")])
def test_conv_networks_take_the_image_shape_and_keep_x_s_pixel_order(image_shape, likelihood):
    cfg = load_config(None, ["model.network=conv", f"likelihood.name={likelihood}", *TINY])
    x_dim = int(np.prod(image_shape))
    vae = VAE(cfg, x_dim, image_shape=image_shape)
    x = torch.rand(5, x_dim)
    assert vae.q_z(x).batch_shape == (5,) and vae.reconstruct(x).shape == (5, x_dim)
    k, (c, h, w) = vae.likelihood.outputs_per_pixel, image_shape
    last = vae.decoder.deconv[-1]  # output channels ordered (k, c)
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
        last.bias[(k - 1) * c + c - 1] = 1.0  # the last output of the last channel only
    out = vae.decoder(torch.randn(5, 2)).unflatten(-1, (c, h * w, k))  # (B, C, HW, K)
    assert (out[:, c - 1, :, k - 1] == 1).all() and out.sum() == 5 * h * w


def test_conv_refuses_shapes_it_cannot_take():
    cfg = load_config(None, ["model.network=conv", *TINY])
    with pytest.raises(ConfigError, match="divisible by 4, data has 10x12 images; allowed: "
                                          "data.image_size = 12 .image folders. or model.network = 'mlp'"):
        VAE(cfg, 120, image_shape=(1, 10, 12))
    with pytest.raises(ConfigError, match="needs images, but the data are vectors of 20 values"):
        VAE(cfg, 20)
    assert VAE(cfg, 784).encoder.image_shape == (1, 28, 28)  # as before image shapes were passed


# --------------------------------------------------------------------------- CLI, no code


def _readme_blocks():
    """The python and bash blocks of README's "Your own data" section, in order."""
    section = README.read_text().split("## Your own data", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(python|bash)\n(.*?)```", section, re.S)


def test_readme_own_data_example_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (lang, snippet), (shell, commands) = _readme_blocks()[:2]
    assert lang == "python" and shell == "bash" and len(snippet.strip().splitlines()) == 3
    exec(snippet, {})  # writes my_data.npy
    train, evaluate = [shlex.split(line)[1:] for line in commands.strip().splitlines()]
    assert main([*train, "--quiet", "--set", "train.epochs=1"]) == 0  # one short epoch
    assert main(evaluate) == 0
    out = capsys.readouterr().out
    assert "final test ELBO" in out and "log p(x), IW K=100" in out
    run = load_run(tmp_path / "runs" / "mine")
    # stored absolute: the run is read from any folder
    assert run.config.data.path == str(tmp_path / "my_data.npy")
    monkeypatch.chdir(tmp_path / "runs")
    assert load_run("mine").dataset.x_test.shape == (200, 20)


def test_a_folder_of_rgb_images_trains_with_conv_from_the_cli(tmp_path, capsys):
    root = image_folder(tmp_path / "imgs", sizes=[(10, 10)] * 12)
    args = ["train", "--quiet", "--config", "own_data", "--set", f"data.path={root}",
            "--set", "data.channels=rgb", "--set", "data.image_size=8", "--set", "data.test_fraction=0.25",
            "--set", "model.network=conv",
            "--set", "likelihood.name=continuous-bernoulli", "--set", "model.conditional=true",
            *[a for t in TINY for a in ("--set", t)], "--runs-dir", str(tmp_path), "--name", "r"]
    assert main(args) == 0, capsys.readouterr().err
    assert (tmp_path / "r" / "samples.png").stat().st_size > 0
    run = load_run(tmp_path / "r")
    assert run.dataset.image_shape == (3, 8, 8) and run.vae.num_classes == 2
    assert main(["evaluate", str(tmp_path / "r"), "--k", "5"]) == 0


# --------------------------------------------------------------------------- Python: fit


def test_fit_returns_a_loadable_run_whose_latent_means_are_the_guide_s(tmp_path):
    x = torch.randn(120, 6) * torch.linspace(0.5, 3, 6)  # (N, X)
    run = fit(x, run_dir=tmp_path / "run", overrides=TINY)
    z = run.latent_means(x)  # (N, D)
    assert z.shape == (120, 2) and z.device == run.device
    assert torch.equal(z, run.q_z(x).mean)
    assert (z[1:] - z[:1]).abs().amax(1).min() > 0  # each point its own mean
    assert torch.equal(run.latent_means(x.numpy()), z)  # arrays as well as tensors
    again = load_run(tmp_path / "run", device=run.device)  # the same device: bit-equal
    assert torch.equal(again.latent_means(x), z)
    assert run.sample(7).shape == (7, 6)
    result = run.evaluate(k=20)
    assert result["n"] == 12 and result["iw_log_likelihood"]["mean"] >= result["elbo"]["mean"]
    assert main(["evaluate", str(tmp_path / "run"), "--k", "20"]) == 0
    assert (tmp_path / "run" / "data.npy").is_file()  # the run holds its data


def test_fit_takes_labels_and_images(tmp_path):
    images = np.random.default_rng(0).integers(0, 2, (40, 8, 8)).astype(np.uint8) * 255
    labels = np.arange(40) % 4
    run = fit(images, labels, run_dir=tmp_path / "run", config=None,
              overrides=["model.conditional=true", "model.network=conv", *TINY])
    assert run.dataset.image_shape == (1, 8, 8) and run.vae.num_classes == 4
    assert run.dataset.support == "binary"  # uint8 / 255
    assert run.latent_means(images, labels).shape == (40, 2)
    with pytest.raises(DataError, match="y: this run is conditional"):
        run.latent_means(images)
    # new points' labels are checked against the run's classes, not the new points' count
    assert run.latent_means(images[:2], [3, 3]).shape == (2, 2)
    with pytest.raises(DataError, match=r"y: label 4; allowed: 0..3 \(the run's classes\)"):
        run.latent_means(images[:2], [4, 0])
    assert (tmp_path / "run" / "data.npz").is_file()


@pytest.mark.parametrize("x, y, expected", [
    (np.full((10, 3), np.nan), None, "x: 30 values that are NaN, infinite or beyond float32's range of +-3.4e38 (the first in point 0)"),
    (np.ones(10), None, "x: an array of shape [10] (rank 1)"),
    (np.ones((10, 3)), np.arange(9), "y: labels of shape [9] for 10 points of x"),
    (np.ones((10, 3)), np.full(10, 0.5), "y: labels of type float64, values in [0.5, 0.5]"),
    (torch.ones(0, 3), None, "x: empty (shape [0, 3])"),
    ([[1.0, 2.0], [3.0]], None, "x: cannot be read as one array"),
    (np.ones((10, 8, 8, 3)), None, "x: images of shape [10, 8, 8, 3] look channels-last, [N, H, W, C]"),
    (np.full((10, 3), 1e39), None, "x: 30 values that are NaN, infinite or beyond float32's range"),
    (np.ones((10, 3)), np.full(10, 2**63 + 5, dtype=np.uint64), f"y: label {2**63 + 5}; allowed"),
])
def test_fit_checks_every_value_before_writing_anything(tmp_path, x, y, expected):
    with pytest.raises(DataError) as err:
        fit(x, y, run_dir=tmp_path / "run", overrides=TINY)
    assert expected in str(err.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32", "uint64"])
def test_unsigned_labels_of_any_width_are_read(dtype):
    from pyro_vae.arrays import as_labels

    labels = np.arange(10, dtype=dtype) % 3
    for y in (labels, torch.from_numpy(labels)):  # torch has no comparisons for uint16-64
        assert as_labels(y, 10).tolist() == [i % 3 for i in range(10)]


def test_a_data_file_changed_since_training_is_refused_by_every_command(tmp_path, capsys):
    # a grown or reshuffled file gives another train/test split: test points trained on
    x, _ = numbered(200)
    path = tmp_path / "mine.npy"
    np.save(path, x)
    run = tmp_path / "runs" / "r"
    args = ["--set", "data.name=file", "--set", f"data.path={path}", "--set", "data.binarize=none",
            "--set", "likelihood.name=gaussian", *[a for o in TINY for a in ("--set", o)]]
    assert main(["train", "--quiet", *args, "--runs-dir", str(run.parent), "--name", "r"]) == 0
    load_run(run)  # unchanged: fine
    np.save(path, np.concatenate([x, numbered(20, seed=1)[0]]))
    message = (r"was trained on 180 training and 20 test points of data.path = '.*mine.npy' "
               r"\(sha256 \w{12}\); it now loads 198 and 22 .* test points may have been trained on")
    with pytest.raises(CheckpointError, match=message):
        load_run(run)
    assert main(["evaluate", str(run), "--k", "5"]) == 2
    assert re.search(message, capsys.readouterr().err)
    with pytest.raises(CheckpointError, match=message):
        train(load_config(None, [a for a in args if a != "--set"] + ["train.epochs=2"]), resume=run, force=True)
    np.save(path, x)  # restored: the run is whole again
    assert load_run(run).dataset.x_train.shape[0] == 180
    np.save(path, x[::-1].copy())  # reshuffled: same points, another split
    with pytest.raises(CheckpointError, match="the data changed"):
        load_run(run)
    more = ["--set", "data.subset=100"]  # a forced new split is new data, asked for
    assert main(["train", "--quiet", "--resume", str(run), "--force", *more, "--set", "train.epochs=2"]) == 0


def test_generated_data_sets_carry_no_fingerprint():
    # drawn from their config, not read: float bits that may differ by an ulp between hosts
    for name in ("ring", "linear-gaussian"):
        assert load_dataset(DataConfig(name=name, binarize="none")).fingerprint is None
    assert len(load_dataset(DataConfig(subset=100)).fingerprint) == 64  # mnist-10k: a file


def test_fit_failing_in_training_leaves_no_run_and_a_used_folder_is_refused(tmp_path):
    x = np.random.default_rng(0).normal(size=(30, 3))
    with pytest.raises(DataError, match="likelihood 'bernoulli' on data set 'data.npy'"):
        fit(x, run_dir=tmp_path / "run", overrides=["likelihood.name=bernoulli", *TINY])
    assert not (tmp_path / "run").exists()
    with pytest.raises(NonFiniteError, match="non-finite test ELBO after epoch 1"), \
            warnings.catch_warnings():  # one step per epoch: the overflow shows in evaluation
        warnings.filterwarnings("ignore", message="Encountered NaN")  # Pyro's own notice
        fit(x, run_dir=tmp_path / "nan", overrides=["train.lr=1e30", *TINY])
    assert not (tmp_path / "nan").exists()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep").write_text("mine")
    with pytest.raises(RunError, match="'.*used' already exists and is not empty"):
        fit(x, run_dir=tmp_path / "used", overrides=TINY)
    (tmp_path / "afile").write_text("")
    with pytest.raises(RunError, match="'.*afile' is a file; allowed: a new or empty folder"):
        fit(x, run_dir=tmp_path / "afile", overrides=TINY)
    with pytest.raises(ConfigError, match="data.path = '.*x.npy': fit takes the data as x"):
        fit(x, run_dir=tmp_path / "p", overrides=["data.path=x.npy", *TINY])
    run = fit(x, run_dir=tmp_path / "ok", overrides=TINY)
    with pytest.raises(DataError, match="x: 4 values per point; this run was trained on 3"):
        run.latent_means(np.ones((2, 4)))
    for reads_x in (run.q_z, run.to_inference_data):  # every method that takes points checks them
        with pytest.raises(DataError, match="x: 4 values per point; this run was trained on 3"):
            reads_x(np.ones((2, 4)))
    assert torch.equal(run.q_z(x[:2]).mean, run.q_z(torch.as_tensor(x[:2], dtype=torch.float32)).mean)
    with pytest.raises(DataError, match="y: this run is not conditional"):
        run.latent_means(x, np.zeros(30))


def test_fit_refused_by_a_racing_run_leaves_that_runs_files_alone(tmp_path, monkeypatch):
    """fit removes what it wrote when its training fails, but not a folder another process
    claimed meanwhile (its checkpoint appeared between fit's check and fit's claim)."""
    from pyro_vae import checkpoint as ckpt_io
    from pyro_vae.runs import RunError

    claim = ckpt_io.Saver._claim

    def raced(saver):
        (saver.run_dir / "checkpoint.pt").write_bytes(b"the other run's")
        (saver.run_dir / "metrics.jsonl").write_text("")  # no epoch finished yet
        return claim(saver)

    monkeypatch.setattr(ckpt_io.Saver, "_claim", raced)
    x = np.random.default_rng(0).normal(size=(60, 3)).astype(np.float32)
    with pytest.raises(RunError, match="another process started a run there"):
        fit(x, run_dir=tmp_path / "r", overrides=["train.epochs=1", "model.hidden=[8]"])
    assert (tmp_path / "r" / "checkpoint.pt").read_bytes() == b"the other run's"
    monkeypatch.undo()
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "data.npy").write_bytes(b"the other run's")  # written meanwhile
    monkeypatch.setattr(ckpt_io, "check_new_run_dir", lambda *a, **k: None)  # passed before it
    with pytest.raises(RunError, match="another process wrote data.npy there"):
        fit(x, run_dir=tmp_path / "s", overrides=["train.epochs=1", "model.hidden=[8]"])
    assert (tmp_path / "s" / "data.npy").read_bytes() == b"the other run's"

import pytest

from pyro_vae.config import (Config, ConfigError, config_hash, diff, dumps, from_dict,
                             load_config, parse_override)


def test_defaults_are_the_documented_ones():
    cfg = load_config()
    assert cfg == Config()
    assert (cfg.data.name, cfg.data.binarize, cfg.model.hidden) == ("mnist-10k", "dynamic", (400,))
    assert (cfg.prior.name, cfg.likelihood.name, cfg.train.elbo) == ("normal", "bernoulli", "trace")


def test_overrides_parse_toml_values_and_bare_strings():
    cfg = load_config(None, ["train.epochs=5", "model.hidden=[200, 200]", "prior.name=laplace",
                             "train.lr=3e-4", "data.download=true"])
    assert cfg.train.epochs == 5 and cfg.model.hidden == (200, 200)
    assert cfg.prior.name == "laplace" and cfg.train.lr == 3e-4 and cfg.data.download is True
    assert parse_override("likelihood.name='gaussian'") == ("likelihood", "name", "gaussian")


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[train]\nepochs = 7\nlr = 0.01\n[model]\nlatent_dim = 2\n')
    cfg = load_config(path, ["train.epochs=3"])
    assert (cfg.train.epochs, cfg.train.lr, cfg.model.latent_dim) == (3, 0.01, 2)


def test_dump_round_trips_and_hash_tracks_content():
    cfg = load_config(None, ["model.hidden=[200,200]", "model.activation=tanh", "train.beta=0.5"])
    assert from_dict(__import__("tomllib").loads(dumps(cfg))) == cfg
    assert config_hash(cfg) == config_hash(load_config(None, ["model.hidden=[200,200]",
                                                              "model.activation=tanh",
                                                              "train.beta=0.5"]))
    other = load_config(None, ["train.beta=0.25"])
    assert config_hash(cfg) != config_hash(other)
    assert set(diff(cfg, other)) == {"model.hidden", "model.activation", "train.beta"}


@pytest.mark.parametrize("override, expected", [
    ("train.epoch=5", "unknown config key train.epoch (did you mean 'epochs'?)"),
    ("trian.epochs=5", "unknown config section [trian] (did you mean 'train'?)"),
    ("train.epochs=five", "train.epochs = 'five': expected an integer"),
    ("train.epochs=0", "train.epochs = 0: out of range, must be >= 1"),
    ("train.lr=0", "train.lr = 0.0: out of range, must be > 0"),
    ("train.lr=true", "train.lr = True: expected a number"),
    ("data.download=1", "data.download = 1: expected true or false"),
    ("model.hidden=[200, 'a']", "model.hidden = [200, 'a']: expected a list of integers"),
    ("prior.name=lapalce", "prior.name = 'lapalce': unknown name (did you mean 'laplace'?); allowed:"),
    ("likelihood.name=poisson", "likelihood.name = 'poisson': unknown name; allowed: bernoulli"),
    ("data.name=cifar", "data.name = 'cifar': unknown name"),
    ("train.elbo=renyi", "train.elbo = 'renyi': unknown name"),
    ("data.binarize=yes", "allowed: none, dynamic, static"),
    ("train.device=tpu", "allowed: auto, cpu, cuda"),
    ("epochs=5", "expected section.key=value"),
    # numbers TOML does not read arrive as strings: the error says how to write them
    ("train.lr=.001", "train.lr = '.001': expected a number (TOML spells it 0.001)"),
    ("train.lr=1.", "train.lr = '1.': expected a number (TOML spells it 1.0)"),
    ("train.epochs=05", "train.epochs = '05': expected an integer (write 5)"),
    ("train.epochs=1e3", "train.epochs = 1000.0: expected an integer (write 1000)"),
])
def test_bad_values_name_key_value_and_allowed(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert expected in str(err.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_a_bundled_config_loads_by_name_and_a_wrong_name_lists_them(tmp_path, monkeypatch):
    from pyro_vae.config import BUNDLED_CONFIGS
    from pyro_vae.settings import TOY_CONFIGS

    monkeypatch.chdir(tmp_path)  # by name from anywhere, not only from a clone
    assert load_config("ring_2d") == load_config(BUNDLED_CONFIGS / "ring_2d.toml")
    assert load_config("ring_2d").likelihood.sigma == 0.05
    with pytest.raises(ConfigError, match=r"'ring_3d' does not exist \(did you mean 'ring_2d'\?\); bundled configs, by name: .*ring_2d"):
        load_config("ring_3d")
    for name in TOY_CONFIGS.values():  # compare's toy settings are bundled configs
        assert (BUNDLED_CONFIGS / f"{name}.toml").is_file()


def test_a_folder_named_like_a_bundled_config_does_not_hide_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "own_data").mkdir()  # e.g. the user's image folder
    assert load_config("own_data").data.name == "file"
    with pytest.raises(ConfigError, match="'elsewhere' is a folder; allowed: a TOML file"):
        (tmp_path / "elsewhere").mkdir()
        load_config("elsewhere")

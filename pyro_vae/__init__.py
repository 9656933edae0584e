"""pyro_vae: the variational autoencoder as variational inference, in Pyro.

Data flow (README's picture; tests/test_package.py checks that imports follow it):
config -> data -> networks -> priors / likelihoods / guides -> model (model + guide)
-> evaluate -> ais -> objectives (ELBOs) -> checkpoint -> training (TrainState) -> runs
-> toys -> settings -> fits / mcmc -> comparison -> inspection -> report -> cli.
ArviZ is spoken to in arviz_bridge alone.
"""

from .config import Config, ConfigError, load_config
from .data import DataError
from .guides import GUIDES, Guide, register_guide
from .likelihoods import LIKELIHOODS, Likelihood, register_likelihood
from .model import VAE
from .priors import PRIORS, Prior, register_prior
from .runs import Run, fit, load_run
from .training import TrainResult, train

__all__ = [
    "Config", "ConfigError", "load_config", "DataError", "GUIDES", "Guide", "register_guide",
    "LIKELIHOODS", "Likelihood", "register_likelihood", "VAE", "PRIORS", "Prior",
    "register_prior", "Run", "fit", "load_run", "TrainResult", "train",
]

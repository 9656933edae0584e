"""pyro_vae: the variational autoencoder as variational inference, in Pyro.

Data flow: config -> data -> networks -> priors / likelihoods -> model (model + guide)
-> objectives (ELBOs) -> training (SVI) -> evaluate -> settings -> fits / mcmc -> comparison
-> report / inspection -> cli.
ArviZ is spoken to in arviz_bridge alone.
"""

from .config import Config, ConfigError, load_config
from .likelihoods import LIKELIHOODS, Likelihood, register_likelihood
from .model import VAE
from .priors import PRIORS, Prior, register_prior
from .runs import Run, load_run
from .training import TrainResult, train

__all__ = [
    "Config", "ConfigError", "load_config", "LIKELIHOODS", "Likelihood", "register_likelihood",
    "VAE", "PRIORS", "Prior", "register_prior", "Run", "load_run", "TrainResult", "train",
]

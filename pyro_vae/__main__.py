"""``python -m pyro_vae ...`` (and ``torchrun ... -m pyro_vae train ...``): the CLI."""

from .cli import entry

entry()

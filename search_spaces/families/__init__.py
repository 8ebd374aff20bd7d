"""Supernet families; importing this package registers them."""

from . import latent, pixel  # noqa: F401

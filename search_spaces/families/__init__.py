"""Supernet families; importing this package registers them."""

from . import pixel  # noqa: F401

"""Conditioning extras that encode how a particular data set is generated (not the paper's architecture).

Importing this package registers them (``search_spaces.conditioning.register_conditioning``).
"""

from . import moving_shapes  # noqa: F401

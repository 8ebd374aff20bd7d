"""Search spaces, dynamic operators and supernet families of the SNED harness."""

from . import families, priors  # noqa: F401  (register the built-in families and data-set priors)
from .conditioning import (
    ConditioningExtra,
    legacy_key_map,
    list_conditioning,
    register_conditioning,
    upgrade_state_dict,
)
from .config import COMPONENTS, ConfigError, SubnetConfig
from .plan import UNetHyper
from .registry import build_supernet, list_families, list_presets, load_supernet, register_family
from .space import RATIOS, SearchSpace
from .supernet import Supernet, load_static, make_dummy_inputs, save_static
from .unet import UNetSpec, VideoUNet

__all__ = [
    "COMPONENTS",
    "RATIOS",
    "ConditioningExtra",
    "ConfigError",
    "SearchSpace",
    "SubnetConfig",
    "Supernet",
    "UNetHyper",
    "UNetSpec",
    "VideoUNet",
    "build_supernet",
    "legacy_key_map",
    "list_conditioning",
    "list_families",
    "list_presets",
    "load_static",
    "load_supernet",
    "make_dummy_inputs",
    "register_conditioning",
    "register_family",
    "save_static",
    "upgrade_state_dict",
]

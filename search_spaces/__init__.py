"""Search spaces, dynamic operators and supernet families of the SNED harness."""

from .config import COMPONENTS, ConfigError, SubnetConfig
from .plan import UNetHyper
from .registry import build_supernet, list_families, list_presets, load_supernet, register_family
from .space import RATIOS, SearchSpace
from .supernet import Supernet, load_static, make_dummy_inputs, save_static
from .unet import UNetSpec, VideoUNet

from . import families  # noqa: E402,F401  (registers the built-in families)

__all__ = ["COMPONENTS", "ConfigError", "RATIOS", "SearchSpace", "SubnetConfig", "Supernet", "UNetHyper",
           "UNetSpec", "VideoUNet", "build_supernet", "list_families", "list_presets", "load_static",
           "load_supernet", "make_dummy_inputs", "register_family", "save_static"]

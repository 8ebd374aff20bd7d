"""Registry of supernet families and their presets (timm style): ``build_supernet(family, preset)``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from .plan import UNetHyper
from .supernet import Supernet
from .unet import load_weights

_FAMILIES: dict[str, dict[str, UNetHyper]] = {}
_BUILDERS: dict[str, Callable[[str, str, UNetHyper], Supernet]] = {}


def register_family(
    name: str, presets: dict[str, UNetHyper], builder: Callable[[str, str, UNetHyper], Supernet] = Supernet
) -> None:
    if name in _FAMILIES:
        raise ValueError(f"supernet family '{name}' is already registered")
    _FAMILIES[name] = dict(presets)
    _BUILDERS[name] = builder


def list_families() -> list[str]:
    return sorted(_FAMILIES)


def list_presets(family: str) -> list[str]:
    return sorted(_family(family))


def _family(family: str) -> dict[str, UNetHyper]:
    if family not in _FAMILIES:
        raise ValueError(f"unknown supernet family '{family}' (known: {', '.join(list_families())})")
    return _FAMILIES[family]


def preset_hyper(family: str, preset: str) -> UNetHyper:
    presets = _family(family)
    if preset not in presets:
        raise ValueError(
            f"unknown preset '{preset}' for family '{family}' (known: {', '.join(sorted(presets))})"
        )
    return presets[preset]


def build_supernet(
    family: str, preset: str = "tiny", hyper: UNetHyper | None = None, **overrides
) -> Supernet:
    """Build a registered family at a preset (``overrides`` replace preset fields, e.g. ``frames=16``)."""
    base = hyper or preset_hyper(family, preset)
    if overrides:
        base = UNetHyper.from_dict({**base.to_dict(), **overrides})
    return _BUILDERS[family](family, preset, base)


def load_supernet(directory: str | Path) -> Supernet:
    """Load a supernet saved with ``save_pretrained`` (safetensors only; nothing is unpickled)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no supernet at {directory}: config.json is missing")
    config = json.loads(path.read_text())
    if config.get("kind") != "supernet":
        raise ValueError(f"{directory} does not hold a supernet (kind={config.get('kind')!r})")
    net = build_supernet(config["family"], config["preset"], hyper=UNetHyper.from_dict(config["hyper"]))
    net.load_state_dict(load_weights(directory))
    return net

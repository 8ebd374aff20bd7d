"""``SubnetConfig``: one point of the search space, immutable, JSON round-trippable, hashable."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

COMPONENTS = ("res", "spatial", "temporal_self", "temporal_cross")
FORMAT = "sned-subnet/1"


class ConfigError(ValueError):
    """A subnet config that is malformed or outside its search space (message names the problem)."""


@dataclass(frozen=True)
class SubnetConfig:
    """A subnet: a channel ratio per searchable layer, keep flags per diffusion-block component, resolution.

    ``ratios``: sorted ``(layer, ratio)`` pairs. ``keep``: sorted ``(block, ((component, kept), ...))``
    pairs, only for components that exist in that block. Build with ``SubnetConfig.create``.
    """

    family: str
    resolution: int
    ratios: tuple[tuple[str, float], ...]
    keep: tuple[tuple[str, tuple[tuple[str, bool], ...]], ...]

    @classmethod
    def create(
        cls, family: str, resolution: int, ratios: Mapping[str, float], keep: Mapping[str, Mapping[str, bool]]
    ) -> SubnetConfig:
        return cls(
            family,
            int(resolution),
            tuple(sorted((k, float(v)) for k, v in ratios.items())),
            tuple(
                sorted(
                    (b, tuple(sorted((c, bool(f)) for c, f in comps.items()))) for b, comps in keep.items()
                )
            ),
        )

    # -- access --------------------------------------------------------------------------------------
    def ratio(self, layer: str) -> float:
        return self.ratio_map[layer]

    @property
    def ratio_map(self) -> dict[str, float]:
        return dict(self.ratios)

    @property
    def keep_map(self) -> dict[str, dict[str, bool]]:
        return {b: dict(c) for b, c in self.keep}

    def kept(self, block: str, component: str) -> bool:
        return self.keep_map.get(block, {}).get(component, False)

    def replace(
        self,
        *,
        resolution: int | None = None,
        ratios: Mapping[str, float] | None = None,
        keep: Mapping[str, Mapping[str, bool]] | None = None,
    ) -> SubnetConfig:
        return SubnetConfig.create(
            self.family,
            self.resolution if resolution is None else resolution,
            self.ratio_map if ratios is None else ratios,
            self.keep_map if keep is None else keep,
        )

    # -- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "family": self.family,
            "resolution": self.resolution,
            "ratios": dict(self.ratios),
            "keep": self.keep_map,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: object) -> SubnetConfig:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ConfigError(f'not a subnet config: expected a JSON object with "format": "{FORMAT}"')
        try:
            ratios = {str(k): float(v) for k, v in d["ratios"].items()}
            keep = {str(b): {str(c): f for c, f in comps.items()} for b, comps in d["keep"].items()}
            family, resolution = str(d["family"]), d["resolution"]
        except (KeyError, AttributeError, TypeError, ValueError) as e:
            raise ConfigError(f"malformed subnet config: missing or invalid field ({e})") from None
        if not isinstance(resolution, int) or isinstance(resolution, bool):
            raise ConfigError(f"malformed subnet config: resolution must be an integer, got {resolution!r}")
        for b, comps in keep.items():
            for c, f in comps.items():
                if not isinstance(f, bool):
                    raise ConfigError(
                        f"malformed subnet config: keep[{b}][{c}] must be true/false, got {f!r}"
                    )
        return cls.create(family, resolution, ratios, keep)

    @classmethod
    def from_json(cls, text: str) -> SubnetConfig:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"malformed subnet config JSON: {e.msg} at line {e.lineno} column {e.colno}"
            ) from None
        return cls.from_dict(d)

    @property
    def key(self) -> str:
        """Stable content hash (sha256 hex of the canonical JSON): a database key."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    # -- summary -------------------------------------------------------------------------------------
    @property
    def num_dropped(self) -> int:
        return sum(not f for _, comps in self.keep for _, f in comps)

    @property
    def mean_ratio(self) -> float:
        return sum(r for _, r in self.ratios) / max(len(self.ratios), 1)

    def describe(self, param_fraction: float | None = None) -> str:
        """Short summary, e.g. ``"62% params, 16px, 3 components dropped, mean width 71%"``."""
        parts = [f"{param_fraction:.0%} params"] if param_fraction is not None else []
        parts += [
            f"{self.resolution}px",
            f"{self.num_dropped} components dropped",
            f"mean width {self.mean_ratio:.0%}",
        ]
        return ", ".join(parts)

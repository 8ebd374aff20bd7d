"""``Candidate``: what a search evaluates — a base subnet, plus an SSR subnet when the target resolution is
above the base model's (the whole chain, measured as a user would run it)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from search_spaces import SubnetConfig, Supernet

CHAIN_FORMAT = "sned-chain/1"


@dataclass(frozen=True)
class Candidate:
    base: SubnetConfig
    ssr: SubnetConfig | None = None  # at the target resolution; its ratios are reused at every SSR stage

    @property
    def resolution(self) -> int:
        return self.ssr.resolution if self.ssr is not None else self.base.resolution

    def to_dict(self) -> dict:
        if self.ssr is None:
            return self.base.to_dict()
        return {
            "format": CHAIN_FORMAT,
            "resolution": self.resolution,
            "base": self.base.to_dict(),
            "ssr": self.ssr.to_dict(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Candidate:
        d = json.loads(text)
        if d.get("format") == CHAIN_FORMAT:
            return cls(SubnetConfig.from_dict(d["base"]), SubnetConfig.from_dict(d["ssr"]))
        return cls(SubnetConfig.from_dict(d))

    @property
    def key(self) -> str:
        return self.base.key if self.ssr is None else hashlib.sha256(self.to_json().encode()).hexdigest()

    def ssr_stages(self, base_resolution: int) -> dict[int, SubnetConfig]:
        """SSR subnet per stage output resolution (``2*base, 4*base, ...`` up to the target)."""
        out, r = {}, base_resolution * 2
        while self.ssr is not None and r <= self.resolution:
            out[r] = self.ssr.replace(resolution=r)
            r *= 2
        return out

    def params(self, base: Supernet, ssr: Supernet | None) -> int:
        n = base.count_params(self.base)
        return n + (ssr.count_params(self.ssr) if self.ssr is not None and ssr is not None else 0)

    def param_fraction(self, base: Supernet, ssr: Supernet | None) -> float:
        total = base.space.total_params + (ssr.space.total_params if self.ssr is not None and ssr else 0)
        return self.params(base, ssr) / total

    def describe(self, base: Supernet, ssr: Supernet | None) -> str:
        parts = self.base.describe(base.space.param_fraction(self.base))
        if self.ssr is None:
            return parts
        return (
            f"{self.param_fraction(base, ssr):.0%} params, {self.resolution}px chain: base "
            f"[{parts}] + SSR [{self.ssr.describe(ssr.space.param_fraction(self.ssr))}]"
        )

    def validate(self, base: Supernet, ssr: Supernet | None) -> Candidate:
        base.space.validate(self.base)
        if self.ssr is not None:
            if ssr is None:
                raise ValueError("a chain candidate needs the SSR supernet")
            for cfg in self.ssr_stages(self.base.resolution).values():
                ssr.space.validate(cfg)
        return self

"""``SearchSpace``: the SNED dynamic-cost space (§3.2) with super-position resolutions and size caps (§3.3).

Dimensions: a channel ratio in ``RATIOS`` per searchable layer, chosen independently; a keep flag per
droppable diffusion-block component (a block whose attentions are all dropped loses its feed-forward
too), at least ``MIN_KEEP`` of them kept - the floor the sampling warm-up (§3.4) trains the supernet down
to, so no searched subnet lies outside what was trained; a resolution, each with a cap on the subnet's
fraction of the supernet's parameters. In a text-conditioned space at least one cross-attention (the
``text_path`` component) stays: a subnet without one cannot see its prompt.
Randomness is always passed in (``numpy.random.Generator`` or an int seed).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from .config import ConfigError, SubnetConfig
from .plan import BlockPlan, Layer

RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)
MIN_KEEP = 0.4  # fraction of droppable components every subnet keeps (the warm-up's final floor)


def _rng(rng) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


class SearchSpace:
    """The space of one supernet family. ``param_counter(cfg)`` counts a subnet's parameters exactly."""

    def __init__(
        self,
        family: str,
        layers: Sequence[Layer],
        blocks: Sequence[BlockPlan],
        resolutions: Sequence[int],
        size_caps: Sequence[float],
        param_counter: Callable[[SubnetConfig], int],
        ratios: Sequence[float] = RATIOS,
        min_keep: float = MIN_KEEP,
        text_path: str | None = None,
    ):
        self.family = family
        self.layers = {layer.name: layer for layer in layers}
        self.blocks = {b.name: b for b in blocks}
        self.resolutions = tuple(resolutions)
        self.size_caps = dict(zip(self.resolutions, size_caps))
        self.ratios = tuple(sorted(ratios, reverse=True))
        self.min_keep = min_keep
        self.text_path = text_path
        self._text_paths = frozenset(
            bc for bc in self.droppable() if bc[1] == text_path
        )  # validate's hot path
        self._count = param_counter
        self._total: int | None = None
        self._smallest: dict[int, SubnetConfig] = {}

    # -- basic points --------------------------------------------------------------------------------
    @property
    def default_resolution(self) -> int:
        return self.resolutions[0]

    def _make(
        self,
        resolution: int | None,
        ratio: dict[str, float] | float,
        drop: set[tuple[str, str]] = frozenset(),
    ) -> SubnetConfig:
        ratios = ratio if isinstance(ratio, dict) else {name: ratio for name in self.layers}
        keep = {b.name: {c: (b.name, c) not in drop for c in b.components} for b in self.blocks.values()}
        return SubnetConfig.create(self.family, resolution or self.default_resolution, ratios, keep)

    def largest(self, resolution: int | None = None) -> SubnetConfig:
        return self._make(resolution, self.ratios[0])

    def smallest(self, resolution: int | None = None) -> SubnetConfig:
        """The lowest ratio everywhere, with as many components dropped as ``min_keep`` allows: those whose
        drop saves the most parameters, short of the last text path."""
        resolution = resolution or self.default_resolution
        if resolution not in self._smallest:
            floor = self._make(resolution, self.ratios[-1])
            base = self._count(floor)
            saving = {
                bc: base - self._count(self._make(resolution, self.ratios[-1], {bc}))
                for bc in self.droppable()
            }
            ranked = sorted(self.droppable(), key=lambda bc: -saving[bc])  # stable: ties keep space order
            text, drop = self.text_paths(), set()
            for bc in ranked:
                if len(drop) == self.max_drops:
                    break
                if not (text and text <= drop | {bc}):  # the last text path stays
                    drop.add(bc)
            self._smallest[resolution] = self._make(resolution, self.ratios[-1], drop)
        return self._smallest[resolution]

    @property
    def max_drops(self) -> int:
        """How many droppable components a subnet may drop (``min_keep`` of them stay)."""
        return self._max_drops(self.min_keep)

    def droppable(self) -> list[tuple[str, str]]:
        return [(b.name, c) for b in self.blocks.values() for c in b.droppable]

    def text_paths(self) -> frozenset[tuple[str, str]]:
        """The droppable cross-attentions of a text-conditioned space (empty otherwise): one must stay."""
        return self._text_paths

    @property
    def total_params(self) -> int:
        if self._total is None:
            self._total = self._count(self.largest())
        return self._total

    def param_fraction(self, cfg: SubnetConfig) -> float:
        return self._count(cfg) / self.total_params

    def describe(self, cfg: SubnetConfig) -> str:
        return cfg.describe(self.param_fraction(cfg))

    def cardinality(self, per_resolution: bool = False) -> int:
        """Number of configs (as OFA / HAT count: product of independent choices, caps ignored), with at most
        ``max_drops`` components dropped."""
        n_comp, n_text = len(self.droppable()), len(self.text_paths())

        def dropping_every_text_path(k: int) -> int:  # k-drop sets that contain all text paths (excluded)
            return math.comb(n_comp - n_text, k - n_text) if n_text and k >= n_text else 0

        drop_sets = sum(math.comb(n_comp, k) - dropping_every_text_path(k) for k in range(self.max_drops + 1))
        n = len(self.ratios) ** len(self.layers) * drop_sets
        return n if per_resolution else n * len(self.resolutions)

    # -- validation ----------------------------------------------------------------------------------
    def validate(self, cfg: SubnetConfig) -> SubnetConfig:
        """Return ``cfg`` if it lies in the space, else raise ``ConfigError`` naming the offence."""
        if cfg.family != self.family:
            raise ConfigError(f"config is for family '{cfg.family}' but this supernet is '{self.family}'")
        if cfg.resolution not in self.resolutions:
            raise ConfigError(
                f"resolution {cfg.resolution} is not one this supernet was trained for "
                f"(choose from {list(self.resolutions)})"
            )
        ratios = cfg.ratio_map
        for name in ratios:
            if name not in self.layers:
                raise ConfigError(f"unknown layer '{name}' in config")
        for name in self.layers:
            if name not in ratios:
                raise ConfigError(f"layer '{name}' has no ratio in config")
            if not any(math.isclose(ratios[name], r) for r in self.ratios):
                raise ConfigError(
                    f"layer '{name}' has ratio {ratios[name]}, outside the space {list(self.ratios)}"
                )
        keep = cfg.keep_map
        for name in keep:
            if name not in self.blocks:
                raise ConfigError(f"unknown block '{name}' in config")
        for block in self.blocks.values():
            flags = keep.get(block.name)
            if flags is None or set(flags) != set(block.components):
                raise ConfigError(f"block '{block.name}' must give keep flags for {list(block.components)}")
            for comp, kept in flags.items():
                if not kept and comp not in block.droppable:
                    raise ConfigError(
                        f"block '{block.name}' cannot drop its {comp}: that ResBlock changes the stream width"
                    )
        dropped = sum(not keep[b][c] for b, c in self.droppable())
        if dropped > self.max_drops:
            raise ConfigError(
                f"config drops {dropped} of {len(self.droppable())} droppable components; the "
                f"supernet is trained keeping at least {self.min_keep:.0%} of them (at most "
                f"{self.max_drops} dropped): keep more components"
            )
        if self.text_paths() and all(not keep[b][c] for b, c in self.text_paths()):
            raise ConfigError(
                f"config drops every {self.text_path} (cross-attention) block, so the subnet "
                "cannot see its prompt: keep at least one"
            )
        cap = self.size_caps[cfg.resolution]
        frac = self.param_fraction(cfg)
        if frac > cap + 1e-9:
            raise ConfigError(
                f"config has {frac:.1%} of the supernet's parameters, over the {cap:.0%} cap "
                f"at {cfg.resolution}px; shrink ratios or drop components"
            )
        return cfg

    def fits(self, cfg: SubnetConfig) -> bool:
        try:
            self.validate(cfg)
            return True
        except ConfigError:
            return False

    def from_json(self, text: str) -> SubnetConfig:
        return self.validate(SubnetConfig.from_json(text))

    # -- sampling (warm-up knobs of §3.4) ------------------------------------------------------------
    def _choices(self, min_ratio: float) -> tuple[float, ...]:
        choices = tuple(r for r in self.ratios if r >= min_ratio - 1e-9)
        if not choices:
            raise ConfigError(f"min_ratio {min_ratio} excludes every ratio in {list(self.ratios)}")
        return choices

    def _max_drops(self, min_keep: float) -> int:
        return math.floor((1.0 - min_keep) * len(self.droppable()) + 1e-9)

    def feasible_resolutions(self, min_ratio: float = 0.4, min_keep: float = 0.4) -> list[int]:
        """Resolutions whose size cap some config allowed by the warm-up knobs can meet."""
        floor_ratio = self._choices(min_ratio)[-1]
        drops = sorted(self.droppable(), key=lambda bc: bc[1] == "res")[: self._max_drops(min_keep)]
        out = []
        for res in self.resolutions:
            if self.fits(self._make(res, floor_ratio, set(drops))) or self.fits(self._make(res, floor_ratio)):
                out.append(res)
        return out

    def sample(
        self,
        rng=None,
        min_ratio: float = 0.4,
        min_keep: float = 0.4,
        resolution: int | None = None,
        max_tries: int = 500,
    ) -> SubnetConfig:
        """Uniform ratios from ``[min_ratio, 1]`` per layer; a number of dropped components drawn uniformly
        from ``0 .. floor((1 - min_keep) * droppable)`` (``min_keep`` never below the space's); a resolution drawn among those whose cap can be
        met (or the one given). Rejection-samples until the resolution's size cap holds."""
        rng = _rng(rng)
        choices = self._choices(min_ratio)
        min_keep = max(min_keep, self.min_keep)
        droppable = self.droppable()
        if resolution is None:
            feasible = self.feasible_resolutions(min_ratio, min_keep)
            if not feasible:
                raise ConfigError(
                    f"no resolution's size cap can be met with min_ratio={min_ratio}, min_keep={min_keep}"
                )
            resolution = int(rng.choice(feasible))
        for _ in range(max_tries):
            ratios = {name: float(rng.choice(choices)) for name in self.layers}
            n_drop = int(rng.integers(0, self._max_drops(min_keep) + 1))
            picked = rng.choice(len(droppable), size=n_drop, replace=False) if n_drop else []
            cfg = self._make(resolution, ratios, {droppable[i] for i in picked})
            if self.fits(cfg):
                return cfg
        raise ConfigError(
            f"no config under the {self.size_caps[resolution]:.0%} size cap at {resolution}px "
            f"found in {max_tries} draws (min_ratio={min_ratio}, min_keep={min_keep})"
        )

    # -- evolution operators -------------------------------------------------------------------------
    def mutate(self, cfg: SubnetConfig, rng=None, prob: float = 0.1, max_tries: int = 100) -> SubnetConfig:
        """Resample each ratio and flip each droppable keep flag with probability ``prob``; same resolution;
        retried until the result fits its size cap."""
        rng = _rng(rng)
        for _ in range(max_tries):
            ratios = {
                k: (float(rng.choice(self.ratios)) if rng.random() < prob else v)
                for k, v in cfg.ratio_map.items()
            }
            keep = cfg.keep_map
            for block, comp in self.droppable():
                if rng.random() < prob:
                    keep[block][comp] = not keep[block][comp]
            child = cfg.replace(ratios=ratios, keep=keep)
            if self.fits(child):
                return child
        return cfg

    def crossover(self, a: SubnetConfig, b: SubnetConfig, rng=None, max_tries: int = 100) -> SubnetConfig:
        """Uniform crossover gene by gene (ratios and keep flags); parents must share a resolution."""
        if a.resolution != b.resolution:
            raise ConfigError(
                f"crossover needs parents at one resolution, got {a.resolution} and {b.resolution}"
            )
        rng = _rng(rng)
        ra, rb, ka, kb = a.ratio_map, b.ratio_map, a.keep_map, b.keep_map
        for _ in range(max_tries):
            ratios = {k: (ra[k] if rng.random() < 0.5 else rb[k]) for k in ra}
            keep = {
                blk: {c: (ka[blk][c] if rng.random() < 0.5 else kb[blk][c]) for c in ka[blk]} for blk in ka
            }
            child = a.replace(ratios=ratios, keep=keep)
            if self.fits(child):
                return child
        return a

    # -- targets -------------------------------------------------------------------------------------
    def subnet_at_fraction(self, fraction: float, resolution: int | None = None) -> SubnetConfig:
        """A balanced subnet with about ``fraction`` of the supernet's parameters (the paper's 40/60/80/100%
        subnets): ratios are stepped down one notch layer by layer, round-robin from the largest, and the
        config whose count is closest to the target is returned. No components are dropped."""
        resolution = resolution or self.default_resolution
        ratios = {name: self.ratios[0] for name in self.layers}
        target = fraction * self.total_params
        best = self._make(resolution, dict(ratios))
        best_err = abs(self._count(best) - target)
        while True:
            moved = False
            for name in self.layers:
                idx = self.ratios.index(ratios[name])
                if idx + 1 >= len(self.ratios):
                    continue
                ratios[name] = self.ratios[idx + 1]
                moved = True
                cfg = self._make(resolution, dict(ratios))
                n = self._count(cfg)
                if abs(n - target) < best_err:
                    best, best_err = cfg, abs(n - target)
                if n <= target:
                    return best
            if not moved:
                return best

"""Encoding candidates as Optuna parameters (one categorical per layer ratio and per droppable component)."""

from __future__ import annotations

from optuna.distributions import CategoricalDistribution

from harness.candidates import Candidate
from search_spaces import SearchSpace, SubnetConfig


def _space_distributions(prefix: str, space: SearchSpace) -> dict[str, CategoricalDistribution]:
    out = {f"{prefix}:{name}": CategoricalDistribution(list(space.ratios)) for name in space.layers}
    out.update(
        {f"{prefix}:keep:{b}:{c}": CategoricalDistribution([True, False]) for b, c in space.droppable()}
    )
    return out


def _config_params(prefix: str, space: SearchSpace, cfg: SubnetConfig) -> dict:
    params = {f"{prefix}:{name}": r for name, r in cfg.ratios}
    keep = cfg.keep_map
    params.update({f"{prefix}:keep:{b}:{c}": keep[b][c] for b, c in space.droppable()})
    return params


def _config_from(prefix: str, space: SearchSpace, params: dict, resolution: int) -> SubnetConfig:
    ratios = {name: float(params[f"{prefix}:{name}"]) for name in space.layers}
    dropped = [(b, c) for b, c in space.droppable() if not params[f"{prefix}:keep:{b}:{c}"]]
    # Over the space's drop limit: the last ones (in space order) are kept again, deterministically.
    drop = set(dropped[: space.max_drops])
    text = space.text_paths()
    if text and text <= drop:  # every cross-attention dropped: the last one (in space order) stays
        drop.discard(max(text, key=space.droppable().index))
    keep = {b.name: {c: (b.name, c) not in drop for c in b.components} for b in space.blocks.values()}
    return SubnetConfig.create(space.family, resolution, ratios, keep)


def project_to_cap(space: SearchSpace, cfg: SubnetConfig) -> SubnetConfig:
    """Shrink a config that exceeds its resolution's size cap: step the widest ratios down one notch at a
    time (deterministically) until it fits. Configs that fit are returned unchanged."""
    ratios = cfg.ratio_map
    while not space.fits(cfg):
        widest = max(ratios.values())
        if widest <= space.ratios[-1]:
            break
        for name in sorted(ratios):
            if ratios[name] == widest:
                ratios[name] = space.ratios[space.ratios.index(widest) + 1]
                break
        cfg = cfg.replace(ratios=ratios)
    return space.validate(cfg)


class CandidateEncoding:
    """Maps candidates of one search (base, or base + SSR chain at ``resolution``) to Optuna params."""

    def __init__(
        self, base_space: SearchSpace, ssr_space: SearchSpace | None, resolution: int, base_resolution: int
    ):
        self.base_space, self.ssr_space = base_space, ssr_space
        self.resolution, self.base_resolution = resolution, base_resolution
        self.chain = resolution != base_resolution

    def distributions(self) -> dict[str, CategoricalDistribution]:
        out = _space_distributions("base", self.base_space)
        if self.chain:
            out.update(_space_distributions("ssr", self.ssr_space))
        return out

    def params(self, cand: Candidate) -> dict:
        out = _config_params("base", self.base_space, cand.base)
        if self.chain:
            out.update(_config_params("ssr", self.ssr_space, cand.ssr))
        return out

    def decode(self, params: dict) -> Candidate:
        base = project_to_cap(
            self.base_space, _config_from("base", self.base_space, params, self.base_resolution)
        )
        if not self.chain:
            return Candidate(base)
        ssr = _config_from("ssr", self.ssr_space, params, self.resolution)
        # The SSR subnet runs at every stage: it must fit the tightest cap among them.
        ssr = project_to_cap(self.ssr_space, ssr)
        return Candidate(base, ssr)

    def suggest(self, trial) -> Candidate:
        params = {
            name: trial.suggest_categorical(name, dist.choices) for name, dist in self.distributions().items()
        }
        return self.decode(params)

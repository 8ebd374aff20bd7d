"""Encoding candidates as Optuna parameters (one categorical per layer ratio and per droppable component,
and, for a trajectory search, the step count, the number of segments and where they split).

Trajectory candidates (issue 20) are encoded in one *fixed* set of categorical parameters, whatever the
candidate, because that is the one form every Optuna sampler models: multivariate TPE, GP and NSGA-II/III
model jointly only the parameters that every trial has (Optuna's intersection search space) and sample
the others one by one (GP and NSGA-II/III at random), so conditional parameters (``seg2:*`` only when two
segments are used) would escape the model of all of them. So:

``steps``
    categorical over the step choices (``--steps-choices``).
``segments``
    categorical ``1 .. K`` (``--segments``): how many of the segments are used.
``split:i`` (``i = 1 .. K-1``)
    categorical over *trajectory fractions* (``SPLIT_FRACTIONS``): segment ``i`` ends at step
    ``fraction * steps`` rounded half up, clipped to ``[1, steps - 1]``. Fractions, not step numbers,
    so a split means the same part of the trajectory at every step count (the step count and the split
    are modelled independently), and a split learned at 8 steps stays sensible at 16. The grid: T-Stitch's
    best switch from a small to a large DiT was at about 40 % of the steps, so the grid is dense around
    the middle (0.25 .. 0.75 in eighths); quarters are the finest that stay distinct at 4 steps (eighths
    collapse onto them there, which only makes some parameter values synonyms). The used splits are
    sorted and de-duplicated: two splits on one step collapse a segment.
``seg{i}:<layer>``, ``seg{i}:keep:<block>:<component>`` (``i = 2 .. K``)
    segment ``i``'s subnet, like ``base:*``. Segment 1 keeps the ``base:*`` names, so a search with
    ``K = 1`` and no step choices has exactly today's parameters and distributions.

Parameters a candidate does not use (``seg3:*`` of a two-segment schedule, ``split:2`` ...) are still
suggested; ``params`` fills them deterministically (segment 1's subnet, the used splits' last fraction),
so that ``decode(params(c)) == c`` for every candidate ``c`` the encoding can produce (anchors and
evolution's queued candidates come back unchanged). Decoded subnets are shrunk into their size cap
(``project_to_cap``) segment by segment, and a one-segment trajectory at the protocol's own step count is
returned as today's plain candidate (``Candidate.normalized``), so it shares cached measurements.
"""

from __future__ import annotations

import math

from optuna.distributions import CategoricalDistribution

from harness.candidates import Candidate
from search_spaces import ConfigError, SearchSpace, SubnetConfig

# Where a segment may end, as a fraction of the trajectory (see the module docstring).
SPLIT_FRACTIONS = (0.25, 0.375, 0.5, 0.625, 0.75)
MAX_SEGMENTS = 4


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


def split_step(fraction: float, steps: int) -> int:
    """The last step of a segment that ends at ``fraction`` of a ``steps``-step trajectory: rounded half
    up (monotone in ``fraction``, unlike Python's half-to-even ``round``), clipped to ``[1, steps - 1]``
    so that both sides of the split keep at least one step."""
    return min(max(math.floor(fraction * steps + 0.5), 1), steps - 1)


def _check_steps_choices(choices) -> tuple[int, ...] | None:
    if choices is None:
        return None
    choices = tuple(choices)
    if not choices or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in choices):
        raise ValueError(f"step choices must be integers >= 1, got {choices!r}")
    if len(set(choices)) != len(choices):
        raise ValueError(f"step choices list a step count twice: {choices!r}")
    return tuple(sorted(choices))


class CandidateEncoding:
    """Maps candidates of one search (base, or base + SSR chain at ``resolution``; for a trajectory search,
    schedules of up to ``segments`` base subnets over one of ``steps_choices`` step counts) to Optuna
    params (see the module docstring for the trajectory parameters and why they are fixed).

    ``steps_choices``: the base denoiser's step counts to search (``None``: the protocol's only, today's
    parameters exactly). ``segments``: the most base subnets per trajectory (``1 .. MAX_SEGMENTS``).
    ``default_steps``: the protocol's steps (``--steps``); a trajectory search needs it, since a
    one-segment trajectory at that count is today's candidate. ``split_fractions``: where a segment may
    end, as fractions of the trajectory in ``(0, 1)``.
    """

    def __init__(
        self,
        base_space: SearchSpace,
        ssr_space: SearchSpace | None,
        resolution: int,
        base_resolution: int,
        steps_choices: tuple[int, ...] | None = None,
        segments: int = 1,
        default_steps: int | None = None,
        split_fractions: tuple[float, ...] = SPLIT_FRACTIONS,
    ):
        self.base_space, self.ssr_space = base_space, ssr_space
        self.resolution, self.base_resolution = resolution, base_resolution
        self.chain = resolution != base_resolution
        self.steps_choices = _check_steps_choices(steps_choices)
        if isinstance(segments, bool) or not isinstance(segments, int) or not 1 <= segments <= MAX_SEGMENTS:
            raise ValueError(f"segments must be an integer from 1 to {MAX_SEGMENTS}, got {segments!r}")
        self.segments = segments
        self.trajectory = self.steps_choices is not None or segments > 1
        if self.trajectory and (not isinstance(default_steps, int) or default_steps < 1):
            raise ValueError(
                "a trajectory search (step choices or more than one segment) needs default_steps=, "
                f"the protocol's --steps, got {default_steps!r}"
            )
        self.default_steps = default_steps
        self.split_fractions = tuple(sorted({float(f) for f in split_fractions}))
        if not self.split_fractions or not all(0 < f < 1 for f in self.split_fractions):
            raise ValueError(f"split fractions must lie in (0, 1), got {split_fractions!r}")
        # The step counts a trajectory may take: the choices, or the protocol's own.
        self.step_counts: tuple[int, ...] = self.steps_choices or (
            (default_steps,) if self.trajectory else ()
        )

    # -- what the study records ----------------------------------------------------------------------
    def identity(self) -> dict:
        """The trajectory settings a study is created with (part of its identity: ``open_study``)."""
        out = {"steps_choices": list(self.steps_choices) if self.steps_choices else None}
        out["segments"] = self.segments
        if self.segments > 1:
            out["split_fractions"] = list(self.split_fractions)
        return out

    @property
    def study_suffix(self) -> str:
        """Appended to the default study name of a trajectory search (``-traj-s4,6,8-k2``), so that the
        single-subnet search's default study is never resumed under other settings."""
        if not self.trajectory:
            return ""
        return f"-traj-s{','.join(map(str, self.step_counts))}-k{self.segments}"

    # -- special candidates --------------------------------------------------------------------------
    def single(self, base: SubnetConfig, ssr: SubnetConfig | None = None) -> Candidate:
        """``base`` (and ``ssr``) at every step, as a candidate of this search: at the protocol's steps
        when those are among the step counts (today's candidate), else at the nearest one (the larger
        on a tie: fewer steps cost quality)."""
        if not self.trajectory or self.default_steps in self.step_counts:
            return Candidate(base, ssr)
        steps = min(self.step_counts, key=lambda s: (abs(s - self.default_steps), -s))
        return Candidate(base, ssr, steps)

    def cheapest(self) -> Candidate:
        """The space's smallest subnet(s) at the smallest step count: what no limit can undercut."""
        ssr = self.ssr_space.smallest(self.resolution) if self.chain else None
        cand = Candidate(self.base_space.smallest(), ssr)
        if not self.trajectory:
            return cand
        return Candidate(cand.base, ssr, min(self.step_counts)).normalized(self.default_steps)

    def split_steps(self, steps: int) -> tuple[int, ...]:
        """The steps a segment may end at (before the last one) in a ``steps``-step trajectory."""
        return tuple(sorted({split_step(f, steps) for f in self.split_fractions})) if steps > 1 else ()

    # -- parameters ----------------------------------------------------------------------------------
    def distributions(self) -> dict[str, CategoricalDistribution]:
        out = _space_distributions("base", self.base_space)
        if self.chain:
            out.update(_space_distributions("ssr", self.ssr_space))
        if self.trajectory:
            out["steps"] = CategoricalDistribution(list(self.step_counts))
        if self.segments > 1:
            out["segments"] = CategoricalDistribution(list(range(1, self.segments + 1)))
            for i in range(1, self.segments):
                out[f"split:{i}"] = CategoricalDistribution(list(self.split_fractions))
            for i in range(2, self.segments + 1):
                out.update(_space_distributions(f"seg{i}", self.base_space))
        return out

    def params(self, cand: Candidate) -> dict:
        """The parameters that decode to ``cand``; ``ConfigError`` for a candidate this search cannot
        represent (a step count off the choices, too many segments, a split off the grid)."""
        out = _config_params("base", self.base_space, cand.base)
        if self.chain:
            out.update(_config_params("ssr", self.ssr_space, cand.ssr))
        if not self.trajectory:
            if cand.steps is not None:
                raise ConfigError(
                    "this search has no step choices or segments: pass --steps-choices / --segments "
                    "to search trajectory candidates"
                )
            return out
        steps = cand.steps or self.default_steps
        if steps not in self.step_counts:
            raise ConfigError(
                f"{steps} sampling steps is not among this search's step counts "
                f"{','.join(map(str, self.step_counts))}"
            )
        segs = cand.trajectory(self.default_steps)
        if len(segs) > self.segments:
            raise ConfigError(f"a schedule of {len(segs)} segments in a search of at most {self.segments}")
        out["steps"] = steps
        if self.segments > 1:
            out["segments"] = len(segs)
            fractions = [self._fraction_of(seg.last, steps) for seg in segs[:-1]]
            fill = fractions[-1] if fractions else self.split_fractions[len(self.split_fractions) // 2]
            for i in range(1, self.segments):
                out[f"split:{i}"] = fractions[i - 1] if i <= len(fractions) else fill
            for i in range(2, self.segments + 1):
                cfg = segs[i - 1].subnet if i <= len(segs) else cand.base  # unused: segment 1's values
                out.update(_config_params(f"seg{i}", self.base_space, cfg))
        return out

    def _fraction_of(self, last: int, steps: int) -> float:
        """The smallest split fraction that ends a segment at step ``last`` of ``steps`` (smallest: so
        increasing split steps get increasing fractions and the sorted decode keeps their order)."""
        for f in self.split_fractions:
            if split_step(f, steps) == last:
                return f
        raise ConfigError(
            f"a segment ending at step {last} of {steps} is off this search's split grid: at {steps} "
            f"steps segments may end at steps {','.join(map(str, self.split_steps(steps)))}"
        )

    def decode(self, params: dict) -> Candidate:
        base = project_to_cap(
            self.base_space, _config_from("base", self.base_space, params, self.base_resolution)
        )
        ssr = None
        if self.chain:
            ssr = _config_from("ssr", self.ssr_space, params, self.resolution)
            # The SSR subnet runs at every stage: it must fit the tightest cap among them.
            ssr = project_to_cap(self.ssr_space, ssr)
        if not self.trajectory:
            return Candidate(base, ssr)
        steps = int(params["steps"])
        k = int(params.get("segments", 1)) if steps > 1 else 1  # one step cannot be split
        subnets = [base] + [
            project_to_cap(
                self.base_space, _config_from(f"seg{i}", self.base_space, params, self.base_resolution)
            )
            for i in range(2, k + 1)
        ]
        # Segment i ends at its split; splits on one step leave an empty segment, which is dropped.
        cuts = sorted(split_step(float(params[f"split:{i}"]), steps) for i in range(1, k))
        bounds = [0, *cuts, steps]
        pairs = [(bounds[i + 1], subnets[i]) for i in range(k) if bounds[i + 1] > bounds[i]]
        return Candidate.schedule(steps, pairs, ssr).normalized(self.default_steps)

    def suggest(self, trial) -> Candidate:
        params = {
            name: trial.suggest_categorical(name, dist.choices) for name, dist in self.distributions().items()
        }
        return self.decode(params)

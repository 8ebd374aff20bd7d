"""``Candidate``: what a search evaluates — a base subnet, plus an SSR subnet when the target resolution is
above the base model's (the whole chain, measured as a user would run it), and optionally its denoising
trajectory: its own number of sampling steps and a schedule of base subnets over those steps.

A trajectory candidate (issue 20) runs base subnet 1 for the first steps of sampling, then switches the
one supernet to subnet 2, and so on (``segments``): no second set of weights is held, the supernet is
sliced differently per step. ``steps=None`` and no segments is today's candidate, under the protocol's
step count. Steps are numbered from 1 in the order sampling runs them (step 1 is the noisiest).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from search_spaces import ConfigError, SubnetConfig, Supernet

CHAIN_FORMAT = "sned-chain/1"
TRAJECTORY_FORMAT = "sned-trajectory/1"


@dataclass(frozen=True)
class Segment:
    """Steps ``first`` .. ``last`` (1-based, inclusive, in sampling order) run ``subnet``."""

    first: int
    last: int
    subnet: SubnetConfig

    @property
    def steps(self) -> int:
        return self.last - self.first + 1


@dataclass(frozen=True)
class Candidate:
    """``base`` (and ``ssr``): as before. ``steps``: the base denoiser's sampling steps (``None``: the
    protocol's). ``segments``: the schedule of base subnets over those steps (empty: ``base`` at every
    step); when given, it covers steps 1 .. ``steps`` and its first subnet is ``base``. Build schedules
    with :meth:`schedule`; a one-segment schedule is stored as ``segments=()``."""

    base: SubnetConfig
    ssr: SubnetConfig | None = None  # at the target resolution; its ratios are reused at every SSR stage
    steps: int | None = None
    segments: tuple[Segment, ...] = ()

    def __post_init__(self) -> None:
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)):
            raise ConfigError(f"a candidate's steps must be an integer, got {self.steps!r}")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"a candidate needs at least 1 sampling step, got {self.steps}")
        if self.segments:
            if self.steps is None:
                raise ConfigError("a schedule of segments needs its step count: give steps=")
            _check_cover(self.segments, self.steps)
            if self.segments[0].subnet != self.base:
                raise ConfigError("a schedule's first segment must run the candidate's base subnet")
            if len(self.segments) == 1:  # one canonical form per trajectory: keys must not differ
                object.__setattr__(self, "segments", ())

    @classmethod
    def schedule(
        cls, steps: int, subnets: list[tuple[int, SubnetConfig]], ssr: SubnetConfig | None = None
    ) -> Candidate:
        """A trajectory of ``steps`` steps from ``(last_step, subnet)`` pairs in sampling order, e.g.
        ``[(3, small), (8, large)]``: ``small`` for steps 1-3, ``large`` for 4-8. Adjacent segments
        with the same subnet are merged (one schedule, one key)."""
        merged: list[tuple[int, SubnetConfig]] = []
        for last, cfg in subnets:
            if merged and merged[-1][1] == cfg:
                merged[-1] = (last, cfg)
            else:
                merged.append((last, cfg))
        if not merged:
            raise ConfigError("a schedule needs at least one segment")
        segments, first = [], 1
        for last, cfg in merged:
            segments.append(Segment(first, int(last), cfg))
            first = int(last) + 1
        return cls(merged[0][1], ssr, int(steps), tuple(segments))

    # -- the trajectory ------------------------------------------------------------------------------
    @property
    def is_schedule(self) -> bool:
        """More than one base subnet over the trajectory (K > 1)."""
        return bool(self.segments)

    @property
    def num_segments(self) -> int:
        return max(1, len(self.segments))

    def trajectory(self, default_steps: int) -> tuple[Segment, ...]:
        """The segments of the base denoiser under a protocol of ``default_steps`` steps (one segment
        for a single-subnet candidate)."""
        if self.segments:
            return self.segments
        steps = self.steps or default_steps
        return (Segment(1, steps, self.base),)

    def subnet_per_step(self, default_steps: int) -> list[SubnetConfig]:
        """The base subnet run at each step, in sampling order."""
        return [seg.subnet for seg in self.trajectory(default_steps) for _ in range(seg.steps)]

    def normalized(self, default_steps: int) -> Candidate:
        """The same generation in canonical form: a one-segment trajectory at the protocol's own step
        count is today's candidate (so it shares cached measurements with a single-subnet search)."""
        if not self.segments and self.steps == default_steps:
            return Candidate(self.base, self.ssr)
        return self

    @property
    def resolution(self) -> int:
        return self.ssr.resolution if self.ssr is not None else self.base.resolution

    # -- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        if self.steps is not None:
            segments = self.trajectory(self.steps)
            out = {
                "format": TRAJECTORY_FORMAT,
                "resolution": self.resolution,
                "steps": self.steps,
                "segments": [
                    {"first_step": s.first, "last_step": s.last, "subnet": s.subnet.to_dict()}
                    for s in segments
                ],
            }
            if self.ssr is not None:
                out["ssr"] = self.ssr.to_dict()
            return out
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
    def from_dict(cls, d: object) -> Candidate:
        if not isinstance(d, dict):
            raise ConfigError("not a candidate: expected a JSON object")
        if d.get("format") == CHAIN_FORMAT:
            return cls(SubnetConfig.from_dict(d["base"]), SubnetConfig.from_dict(d["ssr"]))
        if d.get("format") == TRAJECTORY_FORMAT:
            return cls._trajectory_from_dict(d)
        return cls(SubnetConfig.from_dict(d))

    @classmethod
    def _trajectory_from_dict(cls, d: dict) -> Candidate:
        steps, raw = d.get("steps"), d.get("segments")
        if not isinstance(steps, int) or isinstance(steps, bool):
            raise ConfigError(f"malformed trajectory: steps must be an integer, got {steps!r}")
        if not isinstance(raw, list) or not raw:
            raise ConfigError("malformed trajectory: segments must be a non-empty list")
        try:
            segments = tuple(
                Segment(int(s["first_step"]), int(s["last_step"]), SubnetConfig.from_dict(s["subnet"]))
                for s in raw
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(
                f"malformed trajectory segment ({e}): each needs first_step, last_step and subnet"
            ) from None
        _check_cover(segments, steps)
        ssr = SubnetConfig.from_dict(d["ssr"]) if d.get("ssr") is not None else None
        return cls(segments[0].subnet, ssr, steps, segments)

    @classmethod
    def from_json(cls, text: str) -> Candidate:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"malformed candidate JSON: {e.msg} at line {e.lineno}") from None
        return cls.from_dict(d)

    @property
    def key(self) -> str:
        plain = self.ssr is None and self.steps is None
        return self.base.key if plain else hashlib.sha256(self.to_json().encode()).hexdigest()

    # -- the chain -----------------------------------------------------------------------------------
    def ssr_stages(self, base_resolution: int) -> dict[int, SubnetConfig]:
        """SSR subnet per stage output resolution (``2*base, 4*base, ...`` up to the target)."""
        out, r = {}, base_resolution * 2
        while self.ssr is not None and r <= self.resolution:
            out[r] = self.ssr.replace(resolution=r)
            r *= 2
        return out

    def base_params(self, base: Supernet) -> int:
        """Parameters of the base supernet the trajectory uses: the union of its segments' weights
        (shared entries counted once), which is what a deployment of the schedule must hold."""
        if not self.segments:
            return base.count_params(self.base)
        used: dict = {}
        for seg in self.segments:
            for name, mask in base.active_masks(seg.subnet).items():
                used[name] = used[name] | mask if name in used else mask
        return int(sum(int(m.sum()) for m in used.values()))

    def params(self, base: Supernet, ssr: Supernet | None) -> int:
        n = self.base_params(base)
        return n + (ssr.count_params(self.ssr) if self.ssr is not None and ssr is not None else 0)

    def param_fraction(self, base: Supernet, ssr: Supernet | None) -> float:
        total = base.space.total_params + (ssr.space.total_params if self.ssr is not None and ssr else 0)
        return self.params(base, ssr) / total

    def describe(self, base: Supernet, ssr: Supernet | None) -> str:
        if self.segments:
            parts = _describe_schedule(self.steps, self.segments, base)
        elif self.steps is not None:
            parts = f"{self.steps} steps: " + self.base.describe(base.space.param_fraction(self.base))
        else:
            parts = self.base.describe(base.space.param_fraction(self.base))
        if self.ssr is None:
            return parts
        return (
            f"{self.param_fraction(base, ssr):.0%} params, {self.resolution}px chain: base "
            f"[{parts}] + SSR [{self.ssr.describe(ssr.space.param_fraction(self.ssr))}]"
        )

    def validate(
        self, base: Supernet, ssr: Supernet | None, steps_choices: tuple[int, ...] | None = None
    ) -> Candidate:
        """Every subnet in its space (and under its resolution's size cap), every segment at the base
        resolution, and the step count among ``steps_choices`` when given. Raises ``ConfigError``."""
        for seg in self.trajectory(self.steps or 1):
            if seg.subnet.resolution != self.base.resolution:
                raise ConfigError(
                    f"segment of steps {seg.first}-{seg.last} is at {seg.subnet.resolution}px, the "
                    f"trajectory at {self.base.resolution}px: every segment runs at one resolution"
                )
            base.space.validate(seg.subnet)
        if steps_choices is not None and self.steps is not None and self.steps not in steps_choices:
            raise ConfigError(
                f"{self.steps} sampling steps is not among the step choices "
                f"{','.join(map(str, steps_choices))}: pick one of them or add it to --steps-choices"
            )
        if self.ssr is not None:
            if ssr is None:
                raise ValueError("a chain candidate needs the SSR supernet")
            for cfg in self.ssr_stages(self.base.resolution).values():
                ssr.space.validate(cfg)
        return self


def _check_cover(segments: tuple[Segment, ...], steps: int) -> None:
    """Segments must cover steps 1 .. ``steps`` in order, without gaps or overlaps."""
    expected = 1
    for seg in segments:
        if seg.first != expected or seg.last < seg.first:
            what = "a gap" if seg.first > expected else "an overlap or an empty segment"
            raise ConfigError(
                f"segments do not cover the trajectory: {what} at step {expected} (segment "
                f"{seg.first}-{seg.last}); each segment must start where the previous one ended + 1"
            )
        expected = seg.last + 1
    if expected != steps + 1:
        raise ConfigError(
            f"segments do not cover the trajectory: they end at step {expected - 1} of {steps}; "
            f"the last segment must end at step {steps}"
        )


def _describe_schedule(steps: int, segments: tuple[Segment, ...], base: Supernet) -> str:
    """E.g. ``"8 steps: 35% params for steps 1-3, 80% for 4-8"``."""
    parts = []
    for i, seg in enumerate(segments):
        span = f"{seg.first}-{seg.last}" if seg.last > seg.first else f"{seg.first}"
        label = ("steps " if seg.last > seg.first else "step ") + span if i == 0 else span
        parts.append(f"{base.space.param_fraction(seg.subnet):.0%}{' params' if i == 0 else ''} for {label}")
    return f"{steps} steps: " + ", ".join(parts)

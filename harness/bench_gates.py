"""Gates of ``python -m harness.bench``: each stored beside its baseline value, used from there.

The baselines file (``results/baselines/bench.json``) maps a figure's name to its baseline::

    {"quality/largest/fvd16_proxy": {"value": 24.6, "se": 2.9,
                                     "gate": {"direction": "lower", "abs": 8.0, "why": "..."}}}

A gate has a ``direction`` -- ``lower`` (lower is better: only a rise is a regression), ``higher`` (only
a fall is), ``both`` (any change beyond the tolerance is), ``info`` (reported, never gated) -- and exactly
one allowance: ``rel`` (a fraction of the baseline), ``abs`` (in the figure's unit) or ``limit`` (a fixed
bound the figure must stay on the right side of; the baseline value is then only reported).

The code of a bench group *proposes* a gate with every figure, but a run gates against the stored one:
editing a tolerance in the code cannot silently loosen a gate. Only ``--update`` writes the proposed
gates (and the values) into the file; a run whose proposals differ from the stored gates says so.
A missing or malformed baselines file, or a figure without a stored baseline, is an error, not a pass.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DIRECTIONS = ("lower", "higher", "both", "info")
ALLOWANCES = ("rel", "abs", "limit")
# One-sided z of the quality gates: a figure worse than its baseline by more than 1.96 standard errors of
# the difference of two independent runs is a regression (false alarm 2.5 % when only the seeds' luck
# changed); a better figure never is.
QUALITY_Z = 1.96
UPDATE_HINT = "python -m harness.bench --update"


class BaselinesError(ValueError):
    """A gate, baselines entry or baselines file that cannot be used (a ``ValueError``, so ``run_cli``
    reports it in one line)."""


@dataclass(frozen=True)
class Gate:
    """When a figure is a regression against its baseline (see the module docstring)."""

    direction: str
    rel: float | None = None  # allowed change as a fraction of |baseline|
    abs: float | None = None  # allowed change in the figure's unit
    limit: float | None = None  # fixed bound: <= limit ("lower") or >= limit ("higher")
    why: str = ""  # how the allowance was sized (measured noise, a floor), stored for the reader

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise BaselinesError(f"gate direction {self.direction!r} is not one of {', '.join(DIRECTIONS)}")
        if not isinstance(self.why, str):
            raise BaselinesError(f"gate why must be text, got {self.why!r}")
        given = [name for name in ALLOWANCES if getattr(self, name) is not None]
        if self.direction == "info":
            if given:
                raise BaselinesError(f"an info gate takes no allowance, got {', '.join(given)}")
            return
        if len(given) != 1:
            raise BaselinesError(
                f"a {self.direction} gate needs exactly one of rel, abs, limit; got {given or 'none'}"
            )
        amount = getattr(self, given[0])
        if isinstance(amount, bool) or not isinstance(amount, int | float) or not math.isfinite(amount):
            raise BaselinesError(f"gate {given[0]} must be a finite number, got {amount!r}")
        if given[0] != "limit" and amount < 0:
            raise BaselinesError(f"gate {given[0]} must be >= 0, got {amount}")
        if given[0] == "limit" and self.direction == "both":
            raise BaselinesError("a limit is one-sided: use direction lower or higher")

    # -- constructors the bench groups use --------------------------------------------------------------
    @classmethod
    def exact(cls, why: str = "deterministic") -> Gate:
        return cls("both", abs=0.0, why=why)

    @classmethod
    def info(cls) -> Gate:
        return cls("info")

    @classmethod
    def at_most(cls, limit: float, why: str) -> Gate:
        return cls("lower", limit=limit, why=why)

    @classmethod
    def at_least(cls, limit: float, why: str) -> Gate:
        return cls("higher", limit=limit, why=why)

    @classmethod
    def quality(cls, se: float, direction: str = "lower") -> Gate:
        """One-sided gate of a noisy quality figure with standard error ``se``: the difference of two
        independent runs has SE sqrt(2) * se, and the allowance is ``QUALITY_Z`` of those."""
        allowance = QUALITY_Z * math.sqrt(2.0) * se
        return cls(direction, abs=float(f"{allowance:.4g}"), why=f"{QUALITY_Z} x sqrt(2) x SE {se:.4g}")

    # -- use ---------------------------------------------------------------------------------------------
    def allows(self, baseline: float, current: float) -> bool:
        """Whether ``current`` passes against ``baseline`` (NaN never passes a gated figure)."""
        if self.direction == "info":
            return True
        if self.limit is not None:
            return current <= self.limit if self.direction == "lower" else current >= self.limit
        allowance = self.rel * abs(baseline) if self.rel is not None else self.abs
        if self.direction == "lower":
            return current <= baseline + allowance
        if self.direction == "higher":
            return current >= baseline - allowance
        return abs(current - baseline) <= allowance

    def text(self) -> str:
        """Short form for the table: ``exact``, ``±2%``, ``<= +10%``, ``>= -8.03``, ``>= 0.85``, ``-``."""
        if self.direction == "info":
            return "-"
        if self.limit is not None:
            return f"{'<=' if self.direction == 'lower' else '>='} {self.limit:g}"
        if self.direction == "both" and self.abs == 0:
            return "exact"
        amount = f"{self.rel:.0%}" if self.rel is not None else f"{self.abs:.3g}"
        return {"both": f"±{amount}", "lower": f"<= +{amount}", "higher": f">= -{amount}"}[self.direction]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"direction": self.direction}
        out.update({name: getattr(self, name) for name in ALLOWANCES if getattr(self, name) is not None})
        if self.why:
            out["why"] = self.why
        return out

    @classmethod
    def from_json(cls, data: Any) -> Gate:
        if not isinstance(data, dict):
            raise BaselinesError(f"gate must be an object, got {type(data).__name__}")
        unknown = set(data) - {"direction", "why", *ALLOWANCES}
        if unknown:
            raise BaselinesError(f"gate has unknown keys {sorted(unknown)}")
        if "direction" not in data:
            raise BaselinesError("gate has no direction")
        return cls(**data)


@dataclass(frozen=True)
class Figure:
    """One figure a bench group measured, with the gate its code proposes and its SE when it has one."""

    value: float
    gate: Gate
    se: float | None = None


@dataclass(frozen=True)
class Baseline:
    """One stored baseline: the value, the gate it is judged by, and the SE it was measured with."""

    value: float
    gate: Gate
    se: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"value": self.value, "gate": self.gate.to_json()}
        if self.se is not None:
            out["se"] = self.se
        return out


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BaselinesError(f"{what} must be a number, got {value!r}")
    return float(value)


def _baseline_from_json(data: Any) -> Baseline:
    if not isinstance(data, dict):
        raise BaselinesError(f"must be an object with value and gate, got {type(data).__name__}")
    if "gate" not in data:
        raise BaselinesError("has no gate (an old-format entry?)")
    unknown = set(data) - {"value", "gate", "se"}
    if unknown:
        raise BaselinesError(f"has unknown keys {sorted(unknown)}")
    se = None if data.get("se") is None else _number(data["se"], "se")
    return Baseline(_number(data.get("value"), "value"), Gate.from_json(data["gate"]), se)


def load_baselines(path: str | Path, *, missing_ok: bool = False) -> dict[str, Baseline]:
    """The baselines stored at ``path``. A missing file is ``FileNotFoundError`` (``{}`` with
    ``missing_ok``, which ``--update`` uses to create one); an unreadable one is a BaselinesError naming the
    path, the entry and the fix -- a malformed file is never taken as "no baselines"."""
    path = Path(path)
    if not path.is_file():
        if missing_ok:
            return {}
        raise FileNotFoundError(
            f"no bench baselines at {path}: run `{UPDATE_HINT}` to create them, or pass --baselines PATH"
        )
    fix = f"fix {path}, or move it away and run `{UPDATE_HINT}` to write a new one"
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BaselinesError(f"bench baselines {path} are not valid JSON ({e}); {fix}") from None
    if not isinstance(data, dict):
        raise BaselinesError(f"bench baselines {path} must be a JSON object of figures; {fix}")
    out = {}
    for name, entry in data.items():
        try:
            out[name] = _baseline_from_json(entry)
        except (ValueError, TypeError) as e:
            raise BaselinesError(f"bench baselines {path}: entry {name!r} {e}; {fix}") from None
    return out


def write_baselines(path: str | Path, baselines: dict[str, Baseline]) -> None:
    """Write ``baselines`` atomically (temporary sibling, then rename), sorted by name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({k: v.to_json() for k, v in sorted(baselines.items())}, indent=1) + "\n")
    tmp.replace(path)


def updated(baselines: dict[str, Baseline], figures: dict[str, Figure]) -> dict[str, Baseline]:
    """``baselines`` with this run's figures and their proposed gates (``--update``); figures of groups
    that did not run keep their entries."""
    return {**baselines, **{k: Baseline(float(f.value), f.gate, f.se) for k, f in figures.items()}}


def verdict(baseline: Baseline | None, current: float) -> str:
    """``ok``, ``REGRESSION``, ``info`` or ``NO BASELINE`` (a figure with no stored gate fails: it would
    otherwise pass ungated forever)."""
    if baseline is None:
        return "NO BASELINE"
    if baseline.gate.direction == "info":
        return "info"
    return "ok" if baseline.gate.allows(baseline.value, current) else "REGRESSION"


FAILING = ("REGRESSION", "NO BASELINE")


def compare(figures: dict[str, Figure], baselines: dict[str, Baseline]) -> list[dict[str, Any]]:
    """One report row per figure, gated by its *stored* gate; ``code_gate`` is set where the code now
    proposes another one (adopted only by ``--update``)."""
    rows = []
    for name, figure in figures.items():
        stored = baselines.get(name)
        current = float(figure.value)
        row: dict[str, Any] = {
            "metric": name,
            "baseline": None if stored is None else stored.value,
            "current": current,
            "se": figure.se,
            "tolerance": "-" if stored is None else stored.gate.text(),
            "direction": None if stored is None else stored.gate.direction,
            "verdict": verdict(stored, current),
        }
        if stored is not None and _differs(stored.gate, figure.gate):
            row["code_gate"] = figure.gate.text()
        rows.append(row)
    return rows


def _differs(stored: Gate, proposed: Gate) -> bool:
    """Whether the code's gate is another gate than the stored one (ignoring ``why`` and float noise of
    an SE-sized allowance in its 4th digit)."""
    if stored.direction != proposed.direction:
        return True
    for name in ALLOWANCES:
        a, b = getattr(stored, name), getattr(proposed, name)
        if (a is None) != (b is None) or (a is not None and not math.isclose(a, b, rel_tol=1e-3)):
            return True
    return False

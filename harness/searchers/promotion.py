"""Multi-fidelity promotion for multi-objective searches: asynchronous successive halving (ASHA-style
rungs) around any searcher.

Optuna prunes single-objective trials only. Here every candidate is first measured at cheap *screening*
rungs (few generated videos for FVD/KVD; the cost figures as at full fidelity) and goes on to the next
rung, and finally to the full protocol, only when the screen does not show it to be clearly worse than
what the study has already screened at that rung. The decision is asynchronous, as in ASHA: it is taken
at once against every result of the rung so far, this worker's and other workers' (the rung's values
are user attrs of the study's trials, so workers sharing a PostgreSQL study share the pool).

Rules (``Promotion.rule``), with ``clearly dominates`` the noise-aware dominance of
``harness.analysis.uncertainty`` (no worse in every objective, better in one by more than ``z`` standard
errors of the difference), on the screen values and their standard errors:

``nondominated`` (default)
    promote unless some screened candidate clearly dominates this one.
``top-fraction``
    ASHA's rule for several objectives: promote when at most a ``1 / eta`` fraction of the rung's
    candidates clearly dominate this one (the domination count of multi-objective ASHA rankings).

Anchors (the study's SNED-S/M/L/B references) are always promoted, and once ``screen_budget``
candidates have been pruned every further candidate is promoted, so the extra screening work is bounded.
A pruned candidate ends as a PRUNED trial carrying its screen values; only promoted candidates reach the
full protocol and the reported front.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import optuna
from optuna.trial import TrialState

from harness.analysis.uncertainty import dominance_matrix
from harness.measurement.settings import MeasureSettings

RULES = ("nondominated", "top-fraction")


def rung_name(videos: int) -> str:
    return f"screen-{videos}"


def rung_attr(name: str) -> str:
    """The user attr holding a trial's values at rung ``name``."""
    return f"rung:{name}"


@dataclass(frozen=True)
class Promotion:
    """Screening rungs (generated videos per FVD estimate, ascending, below the full protocol's) and the
    promotion rule between them."""

    rungs: tuple[int, ...] = (8,)
    rule: str = "nondominated"
    eta: float = 2.0  # top-fraction: promote the best 1 / eta
    z: float = 1.96  # standard errors of a difference that make it "clear"
    screen_budget: int | None = None  # pruned candidates at most (None: as many as the study's trials)

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown promotion rule '{self.rule}'; use one of {', '.join(RULES)}")
        if list(self.rungs) != sorted(set(self.rungs)) or any(n < 2 for n in self.rungs):
            raise ValueError(
                f"--rungs takes ascending video counts of at least 2, such as 8 or 8,16, got {self.rungs}"
            )
        if self.eta <= 1 or self.z < 0:
            raise ValueError(f"--eta must be above 1 and --promotion-z at least 0 (got {self.eta}, {self.z})")

    def check_against(self, settings: MeasureSettings) -> None:
        if self.rungs and self.rungs[-1] >= settings.fvd_videos:
            raise ValueError(
                f"screening rungs ({', '.join(map(str, self.rungs))} videos) must lie below --fvd-videos "
                f"{settings.fvd_videos}; lower --rungs or pass --rungs '' for no screening"
            )

    def rung_settings(self, settings: MeasureSettings) -> dict[str, MeasureSettings]:
        """Each screening rung's measurement settings: the full ones with fewer generated videos (and
        their FVD repeats reduced to one), by rung name, cheapest first."""
        return {rung_name(n): replace(settings, fvd_videos=n, fvd_repeats=1) for n in self.rungs}


def parse_rungs(text: str, fvd_videos: int) -> tuple[int, ...]:
    """``--rungs``: comma-separated video counts, ``''`` for none, or ``auto``: one screen at a quarter
    of the full protocol's videos (none below 16 videos, where a quarter of them, under 4, no longer
    estimates anything), rounded down to a multiple of the generation batch from 32 videos on: the
    full run then generates its remaining videos in the batches a fresh run would, bit for bit
    (``harness.measurement.quality.GENERATION_BATCH``)."""
    if text.strip() == "auto":
        from harness.measurement.quality import GENERATION_BATCH

        quarter = fvd_videos // 4
        if quarter >= GENERATION_BATCH:
            quarter -= quarter % GENERATION_BATCH
        return (quarter,) if fvd_videos >= 16 else ()
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(
            f"--rungs takes comma-separated video counts such as 8 or 8,16, got '{text}'"
        ) from None


def screen_points(points: Sequence[dict], metrics: Sequence[str]) -> tuple[np.ndarray, list[np.ndarray]]:
    """``(values (N, M), per metric the (N, N) SE of each difference)`` of measurement values (SE 0
    where none is given)."""
    values = np.array([[float(p[m]) for m in metrics] for p in points]).reshape(len(points), len(metrics))
    se = np.array([[float(p.get(f"{m}_std") or 0.0) for m in metrics] for p in points])
    se = se.reshape(len(points), len(metrics))
    return values, [np.sqrt(se[:, None, j] ** 2 + se[None, :, j] ** 2) for j in range(len(metrics))]


def rung_pool(study: optuna.Study, rung: str, exclude: int | None = None) -> list[dict]:
    """Values recorded at ``rung`` by every trial of the study (any worker, any state but a failed one)."""
    attr = rung_attr(rung)
    return [
        t.user_attrs[attr]
        for t in study.get_trials(deepcopy=False)
        if attr in t.user_attrs and t.number != exclude and t.state != TrialState.FAIL
    ]


def pruned_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)))


def promote(values: dict, pool: Sequence[dict], metrics: Sequence[str], promotion: Promotion) -> bool:
    """Whether a candidate with screen ``values`` goes on, given the rung's other results ``pool``
    (all ``metrics`` minimised; noise-aware dominance of ``harness.analysis.uncertainty``)."""
    points, se_diff = screen_points([values, *pool], metrics)
    dominating = int(dominance_matrix(points, se_diff, [True] * len(metrics), promotion.z)[:, 0].sum())
    if promotion.rule == "nondominated":
        return dominating == 0
    return dominating <= (len(pool) + 1) / promotion.eta - 1

"""The measurement vocabulary, defined once: every metric's stored name, unit, direction and kind.

The store, the measurers, the searchers' objectives, the analysis and every printed table read these
definitions; nothing else spells a metric's name, unit or direction. A metric's *name* is the column it
has in the store and in :func:`harness.analysis.load_results` (``latency_ms``); its *objective name* is
what the command lines accept (``latency``); aliases map one to the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    """One measured figure of a candidate."""

    name: str  # column in the store and in the results table
    unit: str  # stored beside every value ("" for unitless scores)
    minimize: bool  # the direction in which the figure is better
    kind: str  # "count" (exact, device-independent), "time" (device-dependent) or "quality"
    label: str  # column header in printed tables
    axis: str  # axis label in plots
    scale: float = 1.0  # printed value = stored value / scale
    digits: int = 1  # decimals printed

    @property
    def device_independent(self) -> bool:
        """Counted figures hold on every device; their rows carry device :data:`ANY_DEVICE`."""
        return self.kind == "count"

    def format(self, value: float | None) -> str:
        if value is None or math.isnan(value):
            return "nan"
        return f"{value / self.scale:.{self.digits}f}"


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("params", "count", True, "count", "params (M)", "parameters", 1e6, 3),
        Metric("flops", "FLOP", True, "count", "GFLOPs", "FLOPs per video", 1e9, 2),
        Metric("latency_ms", "ms", True, "time", "latency ms", "latency per video (ms)", 1.0, 1),
        Metric("fvd", "", True, "quality", "FVD", "FVD", 1.0, 1),
        Metric("kvd", "", True, "quality", "KVD", "KVD", 1.0, 3),
        Metric("text_alignment", "fraction", False, "quality", "text align", "text alignment", 1.0, 2),
    )
}

# Command-line names of the metrics (``--objective latency``, ``--metrics latency,fvd``).
ALIASES = {"latency": "latency_ms", "alignment": "text_alignment", "clip": "text_alignment"}
OBJECTIVES = ("latency", "flops", "params", "fvd", "kvd")  # what a search may minimise
QUALITY_OBJECTIVES = ("fvd", "kvd")  # a search without one gets FVD added (a front needs a quality axis)

COUNT_METRICS = tuple(n for n, m in METRICS.items() if m.kind == "count")
QUALITY_METRICS = tuple(n for n, m in METRICS.items() if m.kind == "quality")
MINIMIZE = {n: m.minimize for n, m in METRICS.items()}
UNITS = {n: m.unit for n, m in METRICS.items()}
ANY_DEVICE = "any"  # device of the measurements that hold on every device
NOT_APPLICABLE = -1.0  # text_alignment of an unconditional model (read back as NaN)


def metric_name(name: str) -> str:
    """The stored name of a metric given by its name or alias; ``ValueError`` naming the choices."""
    resolved = ALIASES.get(name, name)
    if resolved not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose from {', '.join([*ALIASES, *METRICS])}")
    return resolved


def parse_metric_list(text: str) -> list[str]:
    """``"params,latency,fvd"`` -> stored names, in order, without repeats."""
    names = [metric_name(part.strip()) for part in text.split(",") if part.strip()]
    if not names:
        raise ValueError("no metric given; pass e.g. --metrics params,flops,latency,fvd")
    return list(dict.fromkeys(names))


def search_objectives(raw: list[str] | None) -> list[str]:
    """A search's objective names (``["latency"]`` by default), FVD added when none measures quality."""
    names = list(dict.fromkeys(raw or ["latency"]))
    for n in names:
        if n not in OBJECTIVES:
            raise ValueError(f"unknown objective '{n}' (choose from {', '.join(OBJECTIVES)})")
    if not any(n in QUALITY_OBJECTIVES for n in names):
        names.append("fvd")
    return names

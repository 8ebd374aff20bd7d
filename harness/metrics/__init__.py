"""Quality and cost metrics: Frechet / kernel distances (FVD, KVD) over feature sets."""

from harness.metrics.frechet import (
    feature_stats,
    frechet_distance,
    frechet_distance_from_stats,
    kernel_distance,
)

__all__ = [
    "feature_stats",
    "frechet_distance",
    "frechet_distance_from_stats",
    "kernel_distance",
]

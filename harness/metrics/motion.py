"""Motion alignment moved to ``harness.data.motion`` (a check the synthetic dataset provides); this name
stays importable."""

from harness.data.motion import FOREGROUND_LEVEL, motion_alignment, object_centroids

__all__ = ["FOREGROUND_LEVEL", "motion_alignment", "object_centroids"]

"""Where the repository keeps what it ships and what the commands write by default."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "results"
DEFAULT_BASE = RESULTS / "checkpoints" / "pixel-base-tiny"
DEFAULT_SSR = RESULTS / "checkpoints" / "pixel-ssr-tiny"
DEFAULT_STORAGE = f"sqlite:///{RESULTS / 'harness.db'}"

"""Finding the latency predictors of a chain's supernets (``harness.metrics.latency_predictor``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from harness.models import RESULTS, ModelBundle


def predictor_path(model: ModelBundle, resolution: int) -> Path | None:
    """A latency predictor for ``model`` at ``resolution``: beside the checkpoint, else under
    ``results/latency``."""
    net = model.supernet
    candidates = [RESULTS / "latency" / f"{net.family}-{net.preset}-{resolution}.json"]
    if model.directory is not None:
        candidates.insert(0, model.directory / f"latency-{resolution}px.json")
    return next((p for p in candidates if p.is_file()), None)


def load_predictors(base: ModelBundle, ssr: ModelBundle | None) -> dict:
    """Predictors by ``(family, resolution)`` for every resolution of the chain's supernets that has one."""
    from harness.metrics.latency_predictor import LatencyPredictor

    out = {}
    for model in (base, ssr):
        for r in model.supernet.space.resolutions if model is not None else ():
            path = predictor_path(model, r)
            if path is not None:
                out[(model.supernet.family, r)] = LatencyPredictor.load(path)
    if not out:
        raise FileNotFoundError(
            "--latency predicted needs a latency predictor (<checkpoint>/latency-<R>px.json); "
            "fit one with python -m harness.predictor"
        )
    return out


def predictor_identity(predictor) -> dict[str, str]:
    """What a latency predicted by ``predictor`` depends on, for the store's cache key: the SHA-256 of
    its content (``to_dict()``, what its JSON file holds, as canonical JSON: two files with other fits
    never share rows, a reformatted copy does) and the device it was fitted on."""
    text = json.dumps(predictor.to_dict(), sort_keys=True, separators=(",", ":"))
    prov = predictor.provenance
    return {
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "fitted_on": str(prov.get("device_name") or prov.get("device") or "unknown"),
    }

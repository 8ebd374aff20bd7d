"""The recorder: what is measured (the models' identity in the store), the cache, and the claims.

A figure is computed at most once per (candidate, metric, protocol, device): every searcher, study and
worker reads it back from the store. Before computing, a worker claims the group of figures it is about
to measure; another worker that wants the same group waits for the result instead of repeating it.
"""

from __future__ import annotations

import hashlib
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from harness.candidates import Candidate
from harness.metric_names import UNITS
from harness.models import ModelBundle, checkpoint_hash
from harness.store import Store

Computed = tuple[dict[str, float], dict]  # (values incl. "<metric>_std", provenance)


class MeasurementFailed(RuntimeError):
    """A candidate's measurement failed (recorded in the store as failed, with the error)."""


class MeasurementDeferred(MeasurementFailed):
    """The machine could not take a clean measurement now (e.g. it stayed busy through every retry of a
    latency reading): nothing is wrong with the candidate, so nothing is recorded; measure it later."""


class MetricGroup(ABC):
    """Figures measured together. Contract: ``metrics`` are names of ``harness.metric_names.METRICS``;
    ``protocol(cand)`` and ``device`` identify the values (same strings = same values, so they are cached
    under them); ``compute(cand)`` returns ``({metric: value, "<metric>_std": ...}, provenance)`` or
    raises, and records nothing (the recorder does)."""

    metrics: tuple[str, ...]
    device: str

    @abstractmethod
    def protocol(self, cand: Candidate) -> str: ...

    @abstractmethod
    def compute(self, cand: Candidate) -> Computed: ...


def register_models(store: Store, base: ModelBundle, ssr: ModelBundle | None) -> int:
    """The store's row for the models a candidate runs through (base [+ SSR] [+ autoencoder]), keyed by
    the hashes of their files, created on first use; returns its id."""
    net = base.supernet
    digest = base.checkpoint_hash
    if digest is None:
        raise ValueError(
            "measurements are recorded against checkpoint files; load the model with load_bundle"
        )
    meta = {
        "base": {
            "family": net.family,
            "preset": net.preset,
            "sha256": digest,
            "total_params": net.space.total_params,
        }
    }
    family = net.family
    if ssr is not None:
        digest = hashlib.sha256(f"chain:{digest}:{ssr.checkpoint_hash}".encode()).hexdigest()
        meta["ssr"] = {
            "family": ssr.supernet.family,
            "preset": ssr.supernet.preset,
            "sha256": ssr.checkpoint_hash,
            "total_params": ssr.supernet.space.total_params,
        }
        family = f"{net.family}+{ssr.supernet.family}"
    if base.codec is not None:
        codec_digest = checkpoint_hash(base.codec.directory)
        digest = hashlib.sha256(f"latent:{digest}:{codec_digest}".encode()).hexdigest()
        meta["autoencoder"] = {"sha256": codec_digest, "scale": base.codec.scale}
    return store.get_or_create_supernet(digest, family, net.preset, meta).id


class Recorder:
    """Measures groups of figures through the store's cache and claims, recording each result.

    ``cache_hits`` and ``measured`` count this recorder's groups read back and computed."""

    def __init__(self, store: Store, supernet_id: int, worker: str, seed: int, claim_timeout_s: float):
        self.store, self.supernet_id, self.worker = store, supernet_id, worker
        self.seed, self.claim_timeout_s = seed, claim_timeout_s
        self.cache_hits = 0
        self.measured = 0

    def candidate_id(self, cand: Candidate, params: int, description: str) -> int:
        return self.store.get_or_create_candidate(
            self.supernet_id, cand.key, cand.to_json(), cand.resolution, params, description
        ).id

    def cached(self, cid: int, metrics: list[str], protocol: str, device: str) -> dict[str, float] | None:
        out = {}
        for m in metrics:
            row = self.store.find_measurement(cid, m, protocol, device)
            if row is None or row.status != "ok":
                return None
            out[m] = row.value
            if row.std is not None:
                out[f"{m}_std"] = row.std
        return out

    def measure(
        self, cid: int, metrics: list[str], protocol: str, device: str, compute: Callable[[], Computed]
    ) -> dict[str, float]:
        """The values of ``metrics`` under ``protocol`` on ``device``: read back, or computed by
        ``compute`` under a claim and recorded. Raises ``MeasurementFailed`` (recorded as failed)."""
        cached = self.cached(cid, metrics, protocol, device)
        group = "+".join(metrics)
        while cached is None and not self.store.claim(
            cid, group, protocol, device, self.worker, stale_after_s=self.claim_timeout_s
        ):
            time.sleep(0.5)  # another worker is measuring it: wait for its result
            cached = self.cached(cid, metrics, protocol, device)
        if cached is not None:
            self.cache_hits += 1
            return cached
        start = time.perf_counter()
        try:
            values, extra = compute()
            bad = [m for m in metrics if values.get(m) is None or not math.isfinite(values[m])]
            if bad:
                raise MeasurementFailed(f"non-finite {', '.join(bad)}")
        except MeasurementDeferred:
            self.store.release_claim(cid, group, protocol, device, self.worker)
            raise
        except Exception as e:  # recorded as failed with its error, then re-raised for the searcher
            for m in metrics:
                self.store.record_failure(
                    cid,
                    m,
                    f"{type(e).__name__}: {e}",
                    protocol=protocol,
                    device=device,
                    unit=UNITS[m],
                    torch_version=torch.__version__,
                    seed=self.seed,
                    wall_s=time.perf_counter() - start,
                )
            self.store.release_claim(cid, group, protocol, device, self.worker)
            raise MeasurementFailed(f"{group}: {type(e).__name__}: {e}") from e
        wall = time.perf_counter() - start
        for m in metrics:
            self.store.record_measurement(
                cid,
                m,
                values[m],
                protocol=protocol,
                device=device,
                unit=UNITS[m],
                std=values.get(f"{m}_std"),
                extractor=extra.get("extractor"),
                torch_version=torch.__version__,
                seed=self.seed,
                extra=extra,
                wall_s=wall,
            )
        self.store.finish_claim(cid, group, protocol, device, self.worker)
        self.measured += 1
        return values

"""The recorder: what is measured (the models' identity in the store), the cache, and the claims.

A figure is computed at most once per (candidate, metric, protocol, device, cache key): every searcher,
study and worker reads it back from the store. The cache key (:func:`cache_key`) hashes what produced a
value beyond its protocol string and device: the torch version, the metric's implementation version
(``MetricGroup.versions``) and the group's own inputs (``MetricGroup.identity``: extractor weights, the
real set's content, latency predictors), so a value is reused only when all of them are the same.

Before computing, a worker claims the group of figures it is about to measure and keeps re-claiming it
while it computes (a heartbeat), so that another worker waits for the result instead of repeating it,
however long it takes; a killed worker's claim goes stale and is taken over. The group's figures and the
claim's end are written in one transaction: a kill leaves all of them or none.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from sqlalchemy.exc import SQLAlchemyError

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
    ``protocol(cand)`` and ``device`` name the setting the values are reported under (a study's
    identity); ``identity(cand)`` names everything else they depend on (JSON-able; the recorder adds the
    torch version), so same protocol, device and identity = same values, and they are cached under them;
    ``compute(cand)`` returns ``({metric: value, "<metric>_std": ...}, provenance)`` or raises, and
    records nothing (the recorder does).

    ``versions`` holds each metric's implementation version: bump a metric's number when a change of its
    code changes what its value means (a bug fix, another estimator), so that rows computed by the old
    code are never reused (they stay in the store, under their old key)."""

    metrics: tuple[str, ...]
    device: str
    versions: ClassVar[Mapping[str, int]]

    @abstractmethod
    def protocol(self, cand: Candidate) -> str: ...

    @abstractmethod
    def compute(self, cand: Candidate) -> Computed: ...

    def identity(self, cand: Candidate) -> dict[str, Any]:
        """What the values depend on beyond protocol and device; subclasses add their inputs' hashes."""
        return {"versions": {m: self.versions[m] for m in self.metrics}}


def cache_key(identity: Mapping[str, Any]) -> str:
    """SHA-256 (hex, 64 characters) of ``identity`` as canonical JSON: the store's cache key."""
    text = json.dumps(dict(identity), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def full_identity(identity: Mapping[str, Any] | None) -> dict[str, Any]:
    """``identity`` with the torch version added (every value depends on it: kernels, defaults)."""
    return {"torch": torch.__version__, **(identity or {})}


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

    ``claim_timeout_s``: seconds after which a claim not refreshed is stale (its holder is taken to be
    dead); the holder refreshes its own every ``claim_timeout_s / 3`` while it computes. ``cache_hits`` and
    ``measured`` count this recorder's groups read back and computed."""

    def __init__(self, store: Store, supernet_id: int, worker: str, seed: int, claim_timeout_s: float):
        self.store, self.supernet_id, self.worker = store, supernet_id, worker
        self.seed, self.claim_timeout_s = seed, claim_timeout_s
        self.cache_hits = 0
        self.measured = 0

    def candidate_id(self, cand: Candidate, params: int, description: str) -> int:
        return self.store.get_or_create_candidate(
            self.supernet_id, cand.key, cand.to_json(), cand.resolution, params, description
        ).id

    def cached(
        self,
        cid: int,
        metrics: list[str],
        protocol: str,
        device: str,
        identity: Mapping[str, Any] | None = None,  # as measure
    ) -> dict[str, float] | None:
        """The values of ``metrics`` stored under this key, or None unless every one is there and ok."""
        key = cache_key(full_identity(identity))
        out = {}
        for m in metrics:
            row = self.store.find_measurement(cid, m, protocol, device, cache_key=key)
            if row is None or row.status != "ok":
                return None
            out[m] = row.value
            if row.std is not None:
                out[f"{m}_std"] = row.std
        return out

    def measure_group(
        self, cid: int, group: MetricGroup, cand: Candidate, compute: Callable[[], Computed] | None = None
    ) -> dict[str, float]:
        """``measure`` of ``group``'s metrics for ``cand`` under its protocol, device and identity;
        ``compute`` (default ``group.compute(cand)``) lets the caller wrap the computation (a lock)."""
        return self.measure(
            cid, list(group.metrics), group.protocol(cand), group.device,
            compute or (lambda: group.compute(cand)), identity=group.identity(cand),
        )  # fmt: skip

    def measure(
        self,
        cid: int,
        metrics: list[str],
        protocol: str,
        device: str,
        compute: Callable[[], Computed],
        identity: Mapping[str, Any] | None = None,  # MetricGroup.identity; None: the torch version only
    ) -> dict[str, float]:
        """The values of ``metrics`` under ``protocol`` on ``device`` and ``identity``: read back, or
        computed by ``compute`` under a claim and recorded. Raises ``MeasurementFailed`` (recorded as
        failed) or ``MeasurementDeferred`` (nothing recorded)."""
        identity = full_identity(identity)
        key = cache_key(identity)
        claim = (cid, "+".join(metrics), protocol, device, self.worker)
        cached = self.cached(cid, metrics, protocol, device, identity)
        while cached is None and not self.store.claim(
            *claim, stale_after_s=self.claim_timeout_s, cache_key=key
        ):
            time.sleep(0.5)  # another worker is measuring it: wait for its result
            cached = self.cached(cid, metrics, protocol, device, identity)
        if cached is not None:
            self.cache_hits += 1
            return cached
        start = time.perf_counter()
        try:
            with self._heartbeat(claim, key):
                values, extra = compute()
            bad = [m for m in metrics if values.get(m) is None or not math.isfinite(values[m])]
            if bad:
                raise MeasurementFailed(f"non-finite {', '.join(bad)}")
        except MeasurementDeferred:
            self.store.release_claim(*claim, cache_key=key)
            raise
        except Exception as e:  # recorded as failed with its error, then re-raised for the searcher
            error = f"{type(e).__name__}: {e}"
            with self._recording(claim, key), self.store.atomic():
                for m in metrics:
                    self.store.record_failure(
                        cid, m, error, protocol=protocol, device=device, unit=UNITS[m],
                        torch_version=torch.__version__, seed=self.seed, wall_s=time.perf_counter() - start,
                        cache_key=key, identity=identity,
                    )  # fmt: skip
                self.store.release_claim(*claim, cache_key=key)
            raise MeasurementFailed(f"{claim[1]}: {error}") from e
        wall = time.perf_counter() - start
        # One transaction for the group's rows and the claim's end (see the module docstring).
        with self._recording(claim, key), self.store.atomic():
            for m in metrics:
                self.store.record_measurement(
                    cid, m, values[m], protocol=protocol, device=device, unit=UNITS[m],
                    std=values.get(f"{m}_std"), extractor=extra.get("extractor"),
                    torch_version=torch.__version__, seed=self.seed, extra=extra, wall_s=wall,
                    cache_key=key, identity=identity,
                )  # fmt: skip
            self.store.finish_claim(*claim, cache_key=key)
        self.measured += 1
        return values

    @contextmanager
    def _recording(self, claim: tuple, key: str) -> Iterator[None]:
        """Around a group's write: if it fails (the database refused it), drop the claim in a fresh
        transaction, so that another worker may measure the group, and re-raise."""
        try:
            yield
        except BaseException:
            try:
                self.store.release_claim(*claim, cache_key=key)
            except SQLAlchemyError:  # the write's own error is the one to report; the claim goes stale
                pass
            raise

    @contextmanager
    def _heartbeat(self, claim: tuple, key: str) -> Iterator[None]:
        """Re-claim every ``claim_timeout_s / 3`` while the block runs, from a daemon thread: a
        computation longer than the stale timeout (a long FVD) is then never taken over and measured a
        second time by another worker, while a killed worker's claim (no more beats) still goes stale.
        Stopped before the claim is finished or released (a late beat would claim the group again)."""
        if not 0 < self.claim_timeout_s < math.inf:
            yield  # 0: every claim is stale at once (nothing to keep alive); inf: never stale
            return
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.claim_timeout_s / 3):
                try:
                    self.store.claim(*claim, stale_after_s=self.claim_timeout_s, cache_key=key)
                except SQLAlchemyError:  # a missed beat (database busy) is retried at the next one
                    continue

        thread = threading.Thread(target=beat, name=f"claim-heartbeat-{claim[0]}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

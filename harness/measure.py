"""Measuring candidates: parameters, FLOPs, latency (measured or predicted) and FVD / KVD / text alignment,
every figure recorded in the store with its provenance and reused from there (a cache shared by every
searcher, study and worker: the same candidate under the same protocol on the same device is measured once).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass

import torch

from harness.candidates import Candidate
from harness.checkpoints import checkpoint_hash
from harness.latent import find_codec
from harness.metrics.flops import GenerationStage, generation_flops
from harness.metrics.latency import device_description, measure_latency
from harness.pipeline import Chain, generate
from harness.store import Store
from search_spaces import Supernet, make_dummy_inputs

OBJECTIVES = {"latency": "latency_ms", "flops": "flops", "params": "params", "fvd": "fvd", "kvd": "kvd"}
UNITS = {"params": "count", "flops": "FLOP", "latency_ms": "ms", "fvd": "", "kvd": "", "text_alignment": "fraction"}


class MeasurementFailed(RuntimeError):
    """A candidate's measurement failed (recorded in the store as failed, with the error)."""


@dataclass
class MeasureSettings:
    steps: int = 10              # DDIM steps per stage
    guidance: float = 3.0        # classifier-free guidance (each step = 2 forwards)
    fvd_videos: int = 32         # fake videos per FVD run
    real_videos: int = 256       # real heldout videos for the reference statistics
    fvd_repeats: int = 1         # FVD runs averaged (the paper: 10)
    fvd_weights: str | None = None  # I3D weights file; None = the offline proxy extractor
    fvd_data: str = "synthetic"  # real videos: the built-in synthetic set or a dataset folder
    fvd_split: str = "heldout"   # their split
    latency: str = "measured"    # "measured" (extracted static subnet) or "predicted" (lookup/regression)
    threads: int = 2
    device: str = "cpu"
    seed: int = 0
    min_run_time: float = 0.25   # seconds per latency measurement
    claim_timeout_s: float = 1800.0  # a claim older than this is taken over (its worker is presumed dead)


def heldout_prompts(protocol) -> list[str]:
    """Captions of the protocol's real clips: generated videos follow the same caption distribution."""
    from harness.data import build_dataset
    from harness.metrics.fvd import real_indices

    ds = build_dataset(protocol.dataset, protocol.split, protocol.frames, protocol.resolution,
                       seed=protocol.real_seed, num_videos=protocol.num_real)
    caption = ds.caption_at if hasattr(ds, "caption_at") else (lambda i: ds[i]["caption"])
    return [caption(i) for i in real_indices(protocol, len(ds))]


class Measurer:
    """Measures candidates of one (base[, SSR]) pipeline and records everything in ``store``."""

    def __init__(self, base: Supernet, ssr: Supernet | None, text_encoder, settings: MeasureSettings,
                 store: Store | None, worker: str = "main", predictors: dict | None = None, extractor=None):
        """``store=None`` gives a probe that can compute figures but records nothing. ``extractor``: the FVD
        feature extractor, when the caller resolved it already (else resolved on first use)."""
        self.base, self.ssr, self.text, self.settings, self.store = base, ssr, text_encoder, settings, store
        self.worker = worker
        self.device_name = device_description(settings.device)
        self.predictors = predictors or {}
        self.codec = find_codec(base)  # latent families: the autoencoder, decoding is part of a generation
        self._fvd = extractor
        self.supernet_id = self._supernet_row() if store is not None else None

    def _supernet_row(self) -> int:
        base, ssr = self.base, self.ssr
        digest = checkpoint_hash(base.checkpoint_dir)
        meta = {"base": {"family": base.family, "preset": base.preset, "sha256": digest,
                         "total_params": base.space.total_params}}
        if ssr is not None:
            ssr_digest = checkpoint_hash(ssr.checkpoint_dir)
            digest = hashlib.sha256(f"chain:{digest}:{ssr_digest}".encode()).hexdigest()
            meta["ssr"] = {"family": ssr.family, "preset": ssr.preset, "sha256": ssr_digest,
                           "total_params": ssr.space.total_params}
        if self.codec is not None:
            codec_digest = checkpoint_hash(self.codec.directory)
            digest = hashlib.sha256(f"latent:{digest}:{codec_digest}".encode()).hexdigest()
            meta["autoencoder"] = {"sha256": codec_digest, "scale": self.codec.scale}
        family = base.family if ssr is None else f"{base.family}+{ssr.family}"
        return self.store.get_or_create_supernet(digest, family, base.preset, meta).id

    # -- bookkeeping ---------------------------------------------------------------------------------
    def candidate_id(self, cand: Candidate) -> int:
        row = self.store.get_or_create_candidate(self.supernet_id, cand.key, cand.to_json(), cand.resolution,
                                                 cand.params(self.base, self.ssr),
                                                 cand.describe(self.base, self.ssr))
        return row.id

    def _cached(self, cid: int, metrics: list[str], protocol: str, device: str) -> dict[str, float] | None:
        out = {}
        for m in metrics:
            row = self.store.find_measurement(cid, m, protocol, device)
            if row is None or row.status != "ok":
                return None
            out[m] = row.value
            if row.std is not None:
                out[f"{m}_std"] = row.std
        return out

    def _measure_group(self, cid: int, metrics: list[str], protocol: str, device: str, compute) -> dict:
        cached = self._cached(cid, metrics, protocol, device)
        if cached is not None:
            self.cache_hits += 1
            return cached
        group = "+".join(metrics)
        while not self.store.claim(cid, group, protocol, device, self.worker,
                                   stale_after_s=self.settings.claim_timeout_s):
            time.sleep(0.5)  # another worker is measuring it: wait for its result
            cached = self._cached(cid, metrics, protocol, device)
            if cached is not None:
                self.cache_hits += 1
                return cached
        start = time.perf_counter()
        try:
            values, extra = compute()
            bad = [m for m in metrics if values.get(m) is None or not math.isfinite(values[m])]
            if bad:
                raise MeasurementFailed(f"non-finite {', '.join(bad)}")
        except Exception as e:  # recorded as failed with its error, then re-raised for the searcher
            for m in metrics:
                self.store.record_failure(cid, m, f"{type(e).__name__}: {e}", protocol=protocol, device=device,
                                          unit=UNITS[m], torch_version=torch.__version__, seed=self.settings.seed,
                                          wall_s=time.perf_counter() - start)
            self.store.release_claim(cid, group, protocol, device, self.worker)
            raise MeasurementFailed(f"{group}: {type(e).__name__}: {e}") from e
        wall = time.perf_counter() - start
        for m in metrics:
            self.store.record_measurement(cid, m, values[m], protocol=protocol, device=device, unit=UNITS[m],
                                          std=values.get(f"{m}_std"), extractor=extra.get("extractor"),
                                          torch_version=torch.__version__, seed=self.settings.seed, extra=extra,
                                          wall_s=wall)
        self.store.finish_claim(cid, group, protocol, device, self.worker)
        self.measured += 1
        return values

    cache_hits = 0
    measured = 0

    # -- the pipeline a candidate runs ---------------------------------------------------------------
    def stages(self, cand: Candidate) -> list[tuple[Supernet, object, int]]:
        """(supernet, subnet, resolution) of every stage of one generation."""
        out = [(self.base, cand.base, cand.base.resolution)]
        for r, cfg in cand.ssr_stages(cand.base.resolution).items():
            out.append((self.ssr, cfg, r))
        return out

    def _stage_inputs(self, net: Supernet, static, resolution: int, batch: int) -> dict:
        return make_dummy_inputs(static.spec, resolution, net.hyper.frames, batch, seed=0)

    def _gen_suffix(self, cand: Candidate) -> str:
        s = self.settings
        if self.codec is not None:  # latent size, then the decoded video's size
            return (f"ddim{s.steps}:nocfg:{cand.resolution}lat:{self.base.hyper.frames}f:"
                    f"+decode:{self.pixel_resolution(cand)}px:{self.pixel_frames}f")
        return f"ddim{s.steps}:{'cfg' if self.guided else 'nocfg'}:{cand.resolution}px:{self.base.hyper.frames}f"

    @property
    def guided(self) -> bool:
        """Classifier-free guidance doubles each step's forwards; unconditional models run once."""
        return self.settings.guidance != 1 and bool(self.base.spec.context_dim)

    @property
    def pixel_frames(self) -> int:
        frames = self.base.hyper.frames
        return self.codec.pixel_frames(frames) if self.codec is not None else frames

    def pixel_resolution(self, cand: Candidate) -> int:
        return self.codec.pixel_resolution(cand.resolution) if self.codec is not None else cand.resolution

    def _decoder_inputs(self, cand: Candidate) -> dict:
        z = torch.randn(1, self.codec.channels, self.base.hyper.frames, cand.resolution, cand.resolution,
                        generator=torch.Generator().manual_seed(0))
        return {"latents": z.to(self.settings.device)}

    # -- metrics -------------------------------------------------------------------------------------
    def measure(self, cand: Candidate, metrics: list[str]) -> dict[str, float]:
        """Values of ``metrics`` (names of ``UNITS``) for ``cand``; raises ``MeasurementFailed``."""
        cid = self.candidate_id(cand)
        values: dict[str, float] = {}
        values.update(self._measure_group(cid, ["params"], "exact", "any",
                                          lambda: ({"params": float(cand.params(self.base, self.ssr))}, {})))
        if "flops" in metrics:
            values.update(self._measure_group(cid, ["flops"], f"fvcore:gen:{self._gen_suffix(cand)}", "any",
                                              lambda: self.compute_flops(cand)))
        if "latency_ms" in metrics:
            s = self.settings
            kind = "measured-static" if s.latency == "measured" else "predicted"
            protocol = f"gen:{self._gen_suffix(cand)}:b1:threads{s.threads}:{kind}"
            values.update(self._measure_group(cid, ["latency_ms"], protocol, self.device_name,
                                              lambda: self.compute_latency(cand)))
        quality = [m for m in ("fvd", "kvd", "text_alignment") if m in metrics]
        if quality:
            protocol = self.quality_protocol(cand)
            values.update(self._measure_group(cid, ["fvd", "kvd", "text_alignment"], protocol, self.device_name,
                                              lambda: self.compute_quality(cand)))
        return values

    def compute_flops(self, cand: Candidate):
        """``({"flops": FLOPs of one generated video}, provenance)``, not recorded (``measure`` records)."""
        stages = []
        for net, cfg, r in self.stages(cand):
            static = net.extract(cfg)
            stages.append(GenerationStage(static, self._stage_inputs(net, static, r, 1), self.settings.steps,
                                          self.guided, name=f"{net.family}@{r}"))
        if self.codec is not None:
            stages.append(GenerationStage(self.codec.decoder_module(), self._decoder_inputs(cand), 1, False,
                                          name="decode"))
        return {"flops": float(generation_flops(stages))}, {"convention": "1 multiply-add = 1 FLOP"}

    def compute_latency(self, cand: Candidate):
        """``({"latency_ms": per generated video}, provenance)``, not recorded (``measure`` records)."""
        s = self.settings
        batch = 2 if self.guided else 1  # conditional + null text in one batch
        per_stage, total = [], 0.0
        for net, cfg, r in self.stages(cand):
            if s.latency == "predicted":
                predictor = self.predictors.get((net.family, r))
                if predictor is None:
                    raise MeasurementFailed(f"no latency predictor for {net.family} at {r}px")
                ms = float(predictor.predict(net, cfg))
                per_stage.append({"stage": f"{net.family}@{r}", "forward_ms": ms})
            else:
                static = net.extract(cfg).to(s.device)
                res = measure_latency(static, self._stage_inputs(net, static, r, batch), device=s.device,
                                      threads=s.threads, min_run_time=s.min_run_time)
                ms = res.median_ms
                per_stage.append({"stage": f"{net.family}@{r}", "forward_ms": ms, "iqr_ms": res.iqr_ms,
                                  "n_runs": res.n_runs, "device_name": res.device_name})
            total += ms * s.steps
        if self.codec is not None:  # decoding the latents, once per video (measured in both modes)
            res = measure_latency(self.codec.decoder_module().to(s.device), self._decoder_inputs(cand),
                                  device=s.device, threads=s.threads, min_run_time=s.min_run_time)
            per_stage.append({"stage": "decode", "forward_ms": res.median_ms, "iqr_ms": res.iqr_ms})
            total += res.median_ms
        extra = {"stages": per_stage, "threads": s.threads, "dtype": "float32", "batch_per_forward": batch,
                 "frames": self.pixel_frames, "resolution": self.pixel_resolution(cand), "steps": s.steps,
                 "definition": "sum over stages of steps x median forward latency (CFG pair batched)"
                               + (" + one decode" if self.codec is not None else "")}
        return {"latency_ms": total}, extra

    # -- quality -------------------------------------------------------------------------------------
    def _fvd_context(self):
        if self._fvd is None:
            from harness.metrics.fvd import resolve_extractor

            self._fvd = resolve_extractor(self.settings.fvd_weights)
        return self._fvd

    def _protocol(self, cand: Candidate):
        from harness.metrics.fvd import FVDProtocol

        s = self.settings
        extractor = self._fvd_context()
        return FVDProtocol(num_real=s.real_videos, num_fake=s.fvd_videos, frames=self.pixel_frames,
                           resolution=self.pixel_resolution(cand), extractor=extractor.name, dataset=s.fvd_data,
                           split=s.fvd_split, real_seed=0, seed=s.seed, repeats=s.fvd_repeats)

    def quality_protocol(self, cand: Candidate) -> str:
        """E.g. ``fvd32_12f_16px@proxy-v1:real256:x1:ddim10:g3:seed0`` (+ a hash of a folder's real set)."""
        from harness.metrics.fvd import real_stats_key

        s = self.settings
        p = self._protocol(cand)
        real = "" if (p.dataset, p.split) == ("synthetic", "heldout") else f":{real_stats_key(p).split('_')[-1]}"
        return f"{p.name}:real{p.num_real}{real}:x{p.repeats}:ddim{s.steps}:g{s.guidance:g}:seed{s.seed}"

    def compute_quality(self, cand: Candidate):
        """``({"fvd", "kvd", "text_alignment" and stds}, provenance)``, not recorded."""
        from harness.metrics.fvd import evaluate_fvd, text_alignment_by_attribute
        from harness.metrics.motion import motion_alignment

        s = self.settings
        extractor = self._fvd_context()
        protocol = self._protocol(cand)
        chain = Chain(self.base, self.ssr, self.text, cand.base, cand.ssr_stages(cand.base.resolution),
                      codec=self.codec)
        prompts = heldout_prompts(protocol)
        videos_seen: list[tuple[torch.Tensor, list[str]]] = []

        def generate_fn(n: int, seed: int) -> torch.Tensor:
            out = []
            for start in range(0, n, 16):
                batch_prompts = [prompts[i % len(prompts)] for i in range(start, min(n, start + 16))]
                video = generate(chain, batch_prompts, cand.resolution, steps=s.steps, guidance=s.guidance,
                                 seed=seed * 100003 + start)
                out.append(video)
                videos_seen.append((video, batch_prompts))
            return torch.cat(out)

        result = evaluate_fvd(protocol, generate_fn, extractor, progress=False)
        all_videos, all_prompts = torch.cat([v for v, _ in videos_seen]), [p for _, ps in videos_seen for p in ps]
        conditioned = self.text is not None and hasattr(extractor, "predict_attributes")
        by_attribute = text_alignment_by_attribute(all_videos, all_prompts, extractor) if conditioned else {}
        # Every parsed caption names every attribute, so the overall score is the mean of the per-attribute ones.
        align = sum(by_attribute.values()) / len(by_attribute) if by_attribute else float("nan")
        values = {"fvd": result.fvd_mean, "fvd_std": result.fvd_std, "kvd": result.kvd_mean,
                  "kvd_std": result.kvd_std, "text_alignment": align}
        extra = {"protocol": protocol.to_dict(), "extractor": extractor.name, "runs": result.to_dict(),
                 "settings": asdict(s), "text_alignment_by_attribute": by_attribute,
                 "motion_alignment": motion_alignment(all_videos, all_prompts) if self.text is not None else {}}
        if math.isnan(align):
            values["text_alignment"] = -1.0  # unconditional: recorded as not applicable
        return values, extra

"""How reproducible is a 32-video FVD, and how much of its noise is the prompt composition?

Generates, for ``--subnets`` subnets of the shipped base (evenly spaced parameter fractions) and two
seeds, ``--videos`` videos under the main job's protocol (8 DDIM steps, guidance 3, 16 px, 12 frames);
video i of seed s has its own noise, and the first 128 videos of a seed hold each of the 128 caption
combinations once. FVDs of subsets then simulate prompt designs at N videos: the subset of seed 0 is
compared with another subset of seed 1 (fresh noise, fresh prompts), over ``--draws`` pairs of design
seeds. Reported: Spearman over the subnets and the reliability, the between-subnet variance over the
total (1 - seed-to-seed variance / 2 over the spread), per design and N.

    python results/fvd-precision/measure.py --out results/fvd-precision/design.txt
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy.stats import spearmanr

from harness.candidates import Candidate
from harness.data import labels_for
from harness.data._common import quantize_to_uint8, uint8_to_unit_range
from harness.measurement import Generation, MeasureSettings
from harness.measurement.quality import FrechetQuality
from harness.metrics.frechet import frechet_distance
from harness.metrics.fvd import _extract_chunked, real_captions, real_features, resolve_extractor
from harness.metrics.prompts import generation_prompts
from harness.models import load_bundle
from harness.paths import DEFAULT_BASE
from harness.pipeline import generate, video_seeds

DESIGNS = {"rounds": None, "balanced": labels_for}


def features(subnets: int, videos: int) -> tuple[np.ndarray, dict, list[str], list[str]]:
    """Real features, ``{(subnet, seed): (videos, D)}`` generated under the rounds design, and prompts."""
    base = load_bundle(DEFAULT_BASE)
    settings = MeasureSettings()
    text = base.text_encoder.load(settings.device)
    extractor = resolve_extractor(None, settings.device)
    quality = FrechetQuality(Generation(base, None, settings.steps, settings.guidance, settings.policy),
                             text, settings, extractor)  # fmt: skip
    space = base.supernet.space
    configs = {space.subnet_at_fraction(float(f)).key: space.subnet_at_fraction(float(f))
               for f in np.linspace(0.18, 1.0, subnets)}  # fmt: skip
    cands = [Candidate(cfg) for cfg in configs.values()]  # distinct subnets only
    protocol = quality.fvd_protocol(cands[0])
    real = real_features(protocol, extractor, quality.cache_dir, False)[0].numpy()
    captions = real_captions(protocol)
    feats = {}
    for i, cand in enumerate(cands):
        for seed in (0, 1):
            start = time.perf_counter()
            # The rounds design's prompts, generated directly (the protocol's own design may differ).
            prompts = generation_prompts(captions, seed, videos)
            chain = quality.generation.chain(cand, text)
            clips = torch.cat([quantize_to_uint8(generate(chain, prompts[a:a + 8], cand.resolution,
                                                          steps=settings.steps, guidance=settings.guidance,
                                                          video_seeds=video_seeds(seed, a, a + 8)))
                               for a in range(0, videos, 8)])  # fmt: skip
            feats[(i, seed)] = _extract_chunked(extractor, uint8_to_unit_range(clips)).numpy()
            print(f"subnet {i} seed {seed}: {time.perf_counter() - start:.1f} s", flush=True)
    return real, feats, captions, [c.key for c in cands]


def evaluate(real, feats, captions, n: int, design: str, draws: int) -> tuple[float, float]:
    subnets = sorted({i for i, _ in feats})
    position = {s: {p: k for k, p in enumerate(generation_prompts(captions, s, 128))} for s in (0, 1)}
    rho, rel = [], []
    for d in range(draws):
        picks = [generation_prompts(captions, 1000 + 2 * d + s, n, strata=DESIGNS[design]) for s in (0, 1)]
        a, b = (np.array([frechet_distance(feats[(i, s)][[position[s][p] for p in picks[s]]], real)
                          for i in subnets]) for s in (0, 1))  # fmt: skip
        noise = np.var(a - b) / 2
        signal = np.var((a + b) / 2) - noise / 2
        rho.append(spearmanr(a, b)[0])
        rel.append(signal / (signal + noise))
    return float(np.mean(rho)), float(np.mean(rel))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subnets", type=int, default=12)
    parser.add_argument("--videos", type=int, default=128)
    parser.add_argument("--draws", type=int, default=30)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    real, feats, captions, keys = features(args.subnets, args.videos)
    lines = [f"{len(keys)} distinct subnets, 2 seeds, torch {torch.__version__}, CPU fp32, proxy-v1 features",
             f"{'N':>4}  {'design':<9}  {'Spearman':>8}  {'reliability':>11}"]  # fmt: skip
    for n in (16, 32, 48, 64):
        for design in DESIGNS:
            rho, rel = evaluate(real, feats, captions, n, design, args.draws)
            lines.append(f"{n:>4}  {design:<9}  {rho:>8.3f}  {rel:>11.3f}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()

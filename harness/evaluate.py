"""``python -m harness.evaluate``: measure one subnet (or base + SSR chain) and record it in the store.

    python -m harness.evaluate --subnet cfg.json --metrics flops,params,latency,fvd,kvd
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from harness.candidates import Candidate
from harness.checkpoints import DEFAULT_BASE, DEFAULT_SSR, load_model, text_encoder_name
from harness.cli import run_cli
from harness.measure import MeasureSettings, Measurer
from harness.store import Store, redact_url, validate_storage_url
from search_spaces import SubnetConfig, Supernet

METRIC_NAMES = {"params": "params", "flops": "flops", "latency": "latency_ms", "fvd": "fvd", "kvd": "kvd",
                "text_alignment": "text_alignment"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harness.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=str(DEFAULT_BASE), help="base supernet directory")
    p.add_argument("--ssr-checkpoint", default=str(DEFAULT_SSR), help="SSR supernet (for --ssr-subnet)")
    p.add_argument("--subnet", default=None, help="base subnet config JSON file (default: the largest)")
    p.add_argument("--fraction", type=float, default=None, help="instead of --subnet: the balanced subnet "
                   "nearest this fraction of the supernet's parameters (e.g. 0.4)")
    p.add_argument("--ssr-subnet", default=None, help="SSR subnet config JSON (its resolution = output)")
    p.add_argument("--metrics", default="params,flops,latency,fvd,kvd", help="comma-separated metrics")
    p.add_argument("--storage", default=None, help="store URL (default results/harness.db)")
    p.add_argument("--fvd-videos", type=int, default=32, help="generated videos per FVD run")
    p.add_argument("--fvd-repeats", type=int, default=1, help="FVD runs averaged (mean ± std)")
    p.add_argument("--fvd-weights", default=None, help="I3D weights (default: offline proxy extractor)")
    p.add_argument("--fvd-data", default="synthetic",
                   help="real videos for FVD/KVD: 'synthetic' or a dataset folder (e.g. Sky Timelapse)")
    p.add_argument("--fvd-split", default="heldout", help="split of --fvd-data holding the real videos")
    p.add_argument("--real-videos", type=int, default=256, help="real videos for the FVD/KVD reference statistics")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps per stage")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--device", default="cpu", help="device")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    return p


def _config(path: str, net: Supernet) -> SubnetConfig:
    if not Path(path).is_file():
        raise FileNotFoundError(f"subnet file {path} does not exist")
    return net.space.validate(SubnetConfig.from_json(Path(path).read_text()))


def main(argv=None) -> None:
    from harness.search import DEFAULT_STORAGE

    args = build_parser().parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)} (choose from {', '.join(METRIC_NAMES)})")
    url = validate_storage_url(args.storage or DEFAULT_STORAGE)
    torch.set_num_threads(args.threads)
    base = load_model(args.checkpoint)
    if not isinstance(base, Supernet):
        raise ValueError("--checkpoint must be a supernet (extracted subnets are measured through their supernet)")
    cfg = (_config(args.subnet, base) if args.subnet else
           base.space.subnet_at_fraction(args.fraction) if args.fraction else base.space.largest())
    ssr = None
    cand = Candidate(cfg)
    if args.ssr_subnet:
        ssr = load_model(args.ssr_checkpoint)
        cand = Candidate(cfg, _config(args.ssr_subnet, ssr)).validate(base, ssr)
    from harness.metrics.fvd import resolve_extractor
    from harness.text_encoder import load_text_encoder

    extractor = resolve_extractor(args.fvd_weights) if {"fvd", "kvd"} & set(metrics) else None
    text = load_text_encoder(text_encoder_name(base), max_length=base.spec.context_len) if base.spec.context_dim \
        else None
    settings = MeasureSettings(steps=args.steps, fvd_videos=args.fvd_videos, fvd_repeats=args.fvd_repeats,
                               fvd_weights=args.fvd_weights, fvd_data=args.fvd_data,
                               fvd_split=args.fvd_split, real_videos=args.real_videos, threads=args.threads, device=args.device,
                               seed=args.seed)
    store = Store.open(url)
    measurer = Measurer(base, ssr, text, settings, store, extractor=extractor)
    values = measurer.measure(cand, [METRIC_NAMES[m] for m in metrics])
    print(f"{cand.describe(base, ssr)}  (key {cand.key[:12]}, recorded in {redact_url(url)})")
    print(f"{'metric':<16} {'value':>14} {'std':>10}")
    for m in metrics:
        name = METRIC_NAMES[m]
        std = values.get(f"{name}_std")
        print(f"{m:<16} {values.get(name, float('nan')):>14.6g} {'' if std is None else f'{std:.4g}':>10}")
    if "text_alignment" in metrics:
        row = store.find_measurement(measurer.candidate_id(cand), "text_alignment",
                                     measurer.quality_protocol(cand), measurer.device_name)
        extra = json.loads(row.extra) if row is not None and isinstance(row.extra, str) else (row and row.extra)
        by_attribute = (extra or {}).get("text_alignment_by_attribute")
        if by_attribute:
            print("text alignment by attribute: " + ", ".join(f"{k} {v:.2f}" for k, v in by_attribute.items()))
        motion = (extra or {}).get("motion_alignment")
        if motion:
            print(f"motion alignment (object centroid, no extractor): {motion['fraction']:.2f} of {motion['videos']} "
                  f"videos move the prompted way (chance 0.25); mean travel along the prompt "
                  f"{motion['travel']:+.3f} frame widths (held-out real clips: 1.00, +0.47)")
    if extractor is not None:
        print(f"FVD/KVD extractor: {extractor.name}; latency per generated video on {measurer.device_name}")


if __name__ == "__main__":
    run_cli(main)

"""``python -m harness.evaluate``: measure one subnet (or base + SSR chain) and record it in the store.

python -m harness.evaluate --subnet cfg.json --metrics flops,params,latency,fvd,kvd
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from harness.analysis import format_estimate
from harness.analysis.loading import FLOOR_METRICS
from harness.candidates import Candidate
from harness.cli import run_cli
from harness.measurement import Measurer, add_measure_arguments, settings_from_args
from harness.measurement.predictors import load_predictors
from harness.metric_names import COUNT_METRICS, QUALITY_METRICS, parse_metric_list
from harness.models import add_model_arguments, load_bundle
from harness.paths import DEFAULT_STORAGE
from harness.store import Store, redact_url, validate_storage_url
from search_spaces import SubnetConfig, Supernet


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harness.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--subnet", default=None, help="base subnet config JSON file (default: the largest)")
    p.add_argument(
        "--fraction",
        type=float,
        default=None,
        help="instead of --subnet: the balanced subnet "
        "nearest this fraction of the supernet's parameters (e.g. 0.4)",
    )
    p.add_argument("--ssr-subnet", default=None, help="SSR subnet config JSON (its resolution = output)")
    p.add_argument(
        "--candidate",
        default=None,
        help="instead of --subnet: a candidate JSON file, e.g. a trajectory schedule "
        "(Candidate.to_json, or harness.export's candidate.json)",
    )
    p.add_argument("--metrics", default="params,flops,latency,fvd,kvd", help="comma-separated metrics")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help="store URL (default results/harness.db)")
    add_model_arguments(p)
    add_measure_arguments(p)
    return p


def _config(path: str, net: Supernet) -> SubnetConfig:
    if not Path(path).is_file():
        raise FileNotFoundError(f"subnet file {path} does not exist")
    return net.space.validate(SubnetConfig.from_json(Path(path).read_text()))


def _candidate_file(path: str, net: Supernet, ssr: Supernet | None) -> Candidate:
    """A candidate JSON file: ``Candidate.to_json()`` (subnet, chain or trajectory) or the record
    ``harness.export`` writes (its ``candidate`` field), validated in the spaces."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"candidate file {p} does not exist; write one with harness.export")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{p} is not JSON ({e.msg} at line {e.lineno}); pass a candidate JSON file"
        ) from None
    d = d.get("candidate", d) if isinstance(d, dict) else d
    return Candidate.from_dict(d).validate(net, ssr)


def _has_ssr(path: str) -> bool:
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return False  # _candidate_file says what is wrong with it
    d = d.get("candidate", d) if isinstance(d, dict) else {}
    return isinstance(d, dict) and d.get("ssr") is not None


def print_values(
    metrics: list[str], values: dict[str, float], floor: dict | None = None, modelled: tuple[str, ...] = ()
) -> None:
    """One line per metric: ``value ± standard error`` (``± n/a`` when a noisy figure has none, the
    value alone for an exact count, ``(model)`` for the ``modelled`` ones: deterministic, no sampling
    error) and, for FVD/KVD, the protocol's floor (``floor`` of the FVD measurement's extra: held-out real
    videos scored in place of generated ones)."""
    print(f"{'metric':<16} {'value ± SE':>22} {'floor ± SE':>18}")
    for name in metrics:
        shown = format_estimate(values.get(name), values.get(f"{name}_std"))
        if name in modelled and values.get(name) is not None:
            shown = f"{values[name]:.4g} (model)"
        elif name in COUNT_METRICS:
            shown = f"{values.get(name, float('nan')):.6g}"
        base = (floor or {}).get(name)
        floor_cell = "" if base is None else format_estimate(base, (floor or {}).get(f"{name}_se"))
        if floor is not None and name in FLOOR_METRICS and base is None:
            floor_cell = "n/a"
        print(f"{name:<16} {shown:>22} {floor_cell:>18}")


def print_quality_details(extra: dict) -> None:
    """The per-attribute text alignment and the dataset checks recorded with the quality figures."""
    by_attribute = extra.get("text_alignment_by_attribute")
    if by_attribute:
        print("text alignment by attribute: " + ", ".join(f"{k} {v:.2f}" for k, v in by_attribute.items()))
    for name, result in (extra.get("checks") or {}).items():
        print(
            f"{name}: "
            + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items())
        )


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    metrics = parse_metric_list(args.metrics)
    url = validate_storage_url(args.storage)
    settings = settings_from_args(args, shared_storage=not url.startswith("sqlite"))
    torch.set_num_threads(args.threads)
    settings.policy.apply()  # explicit float32 numerics, before any model runs
    base = load_bundle(args.checkpoint)
    settings.policy.place(base)
    net = base.supernet  # extracted subnets are measured through their supernet
    cfg = (
        _config(args.subnet, net)
        if args.subnet
        else net.space.subnet_at_fraction(args.fraction)
        if args.fraction
        else net.space.largest()
    )
    ssr, cand = None, Candidate(cfg)
    if args.candidate:
        if args.subnet or args.fraction or args.ssr_subnet:
            raise ValueError(
                "--candidate names the whole candidate: drop --subnet, --fraction and --ssr-subnet"
            )
        ssr = load_bundle(args.ssr_checkpoint) if _has_ssr(args.candidate) else None
        settings.policy.place(ssr)
        cand = _candidate_file(args.candidate, net, ssr.supernet if ssr else None)
    elif args.ssr_subnet:
        ssr = load_bundle(args.ssr_checkpoint)
        settings.policy.place(ssr)
        cand = Candidate(cfg, _config(args.ssr_subnet, ssr.supernet)).validate(net, ssr.supernet)
    from harness.metrics.fvd import resolve_extractor

    quality = any(m in QUALITY_METRICS for m in metrics)
    extractor = resolve_extractor(args.fvd_weights, settings.device) if quality else None
    text = base.text_encoder.load(settings.device, dtype=args.text_dtype) if base.text_encoder else None
    predictors = load_predictors(base, ssr) if args.latency == "predicted" else None
    store = Store.open(url)
    measurer = Measurer(base, ssr, text, settings, store, predictors=predictors, extractor=extractor)
    values = measurer.measure(cand, metrics)
    print(
        f"{cand.describe(net, ssr.supernet if ssr else None)}  (key {cand.key[:12]}, recorded in "
        f"{redact_url(url)})"
    )
    extra = {}
    if quality:
        row = store.find_measurement(
            measurer.candidate_id(cand), "fvd", measurer.quality.protocol(cand), measurer.quality.device
        )
        extra = (json.loads(row.extra) if isinstance(row.extra, str) else row.extra) or {}
    modelled = tuple(m for m, group in measurer.cost.items() if getattr(group, "mode", "") == "modelled")
    print_values(metrics, values, extra.get("floor", {}) if quality else None, modelled)
    if quality:
        print_quality_details(extra)
        print(f"FVD/KVD extractor: {extractor.name}; latency per generated video on {measurer.device_name}")
    policy = settings.policy
    print(f"device {policy.device} ({measurer.quality.device}), precision {policy.precision}"
          f"{', compiled' if policy.compile else ''}{', CUDA graphs' if policy.cuda_graphs else ''}")  # fmt: skip


if __name__ == "__main__":
    run_cli(main)

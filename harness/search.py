"""``python -m harness.search``: search the trained supernet for Pareto-optimal subnets.

The main job, ``python -m harness.search --objective latency``, searches the shipped tiny supernet at its
default resolution, minimising latency and FVD jointly, records every measurement in
``results/harness.db``, prints the Pareto front and writes its plot under ``results/plots/``.
Several workers (on several machines) share one study through a PostgreSQL ``--storage`` URL.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
from dataclasses import asdict, replace
from pathlib import Path

import torch
from optuna.trial import TrialState

from harness.candidates import Candidate
from harness.cli import Stopped, run_cli
from harness.measurement import (
    Generation,
    Measurer,
    MeasureSettings,
    add_measure_arguments,
    check_limits_reachable,
    settings_from_args,
)
from harness.measurement.predictors import load_predictors
from harness.measurement.quality import GeneratedVideoCache
from harness.measurement.settings import study_settings
from harness.metric_names import OBJECTIVES, search_objectives
from harness.models import add_model_arguments, load_chain
from harness.paths import DEFAULT_STORAGE
from harness.report import report_front, study_results
from harness.searchers import SEARCHERS, make_searcher, study_sampler
from harness.searchers.encoding import MAX_SEGMENTS, CandidateEncoding
from harness.searchers.optuna_searcher import worker_seed
from harness.searchers.promotion import RULES, Promotion, parse_rungs
from harness.searchers.runner import (
    MAX_BUSY_S,
    STALE_AFTER_S,
    SearchRun,
    anchor_candidates,
    default_study_name,
    open_study,
    requeue_trial,
    run_search,
)
from harness.store import Store, optuna_storage, redact_url, validate_storage_url


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harness.search", description=__doc__.splitlines()[0])
    p.add_argument(
        "--objective",
        action="append",
        default=None,
        help=f"objective to minimise, repeatable: {', '.join(OBJECTIVES)} (a quality objective, FVD "
        "by default, is added when none is given)",
    )
    p.add_argument("--searcher", default="tpe", help=f"one of {', '.join(SEARCHERS)} (default tpe)")
    p.add_argument("--trials", type=int, default=40, help="total trials of the study, over all workers")
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="output resolution; above the base model's, candidates are base + SSR chains",
    )
    p.add_argument("--max-params", type=float, default=None, help="constraint: parameters (count)")
    p.add_argument("--max-flops", type=float, default=None, help="constraint: FLOPs per generated video")
    p.add_argument("--max-latency", type=float, default=None, help="constraint: latency per video (ms)")
    p.add_argument(
        "--storage",
        default=DEFAULT_STORAGE,
        help="SQLAlchemy URL or SQLite file (default "
        "results/harness.db); postgresql://... to share one study between workers",
    )
    p.add_argument("--study", default=None, help="study name (resumed when it exists)")
    p.add_argument("--no-plot", action="store_true", help="skip writing the front's plot")
    p.add_argument(
        "--busy-timeout",
        type=float,
        default=MAX_BUSY_S,
        help="seconds the machine may stay too busy for a clean latency reading (put-offs are waited "
        f"out with a growing back-off) before the search stops (default {MAX_BUSY_S:g})",
    )
    p.add_argument(
        "--stale-after",
        type=int,
        default=STALE_AFTER_S,
        help="shared storage: seconds without a heartbeat before a worker's trial counts as dead and its "
        f"candidate is measured by another worker (default {STALE_AFTER_S})",
    )
    p.add_argument(
        "--anchors",
        default="0.4,0.6,0.8,1.0",
        help="parameter fractions whose balanced subnets a new study evaluates first (the "
        "paper's SNED-S/M/L/B points, marked in the plots); '' for none",
    )
    t = p.add_argument_group("denoising trajectory (issue 20)")
    t.add_argument(
        "--steps-choices",
        default=None,
        help="comma-separated sampling step counts of the base denoiser to search, e.g. 4,6,8,12,16 "
        "(default: the protocol's --steps only)",
    )
    t.add_argument(
        "--segments",
        type=int,
        default=1,
        help=f"most base subnets per trajectory, 1 to {MAX_SEGMENTS}: a schedule switches the supernet's "
        "subnet between sampling steps (default 1: one subnet for every step)",
    )
    g = p.add_argument_group("multi-fidelity promotion (harness.searchers.promotion)")
    g.add_argument(
        "--rungs",
        default="auto",
        help="screening rungs: generated videos per FVD estimate, ascending and below --fvd-videos; a "
        "candidate reaches the full protocol only when no screened one clearly dominates it ('' = none; "
        "auto = one rung at a quarter of --fvd-videos in whole batches of 8, none below 16)",
    )
    g.add_argument("--promotion", choices=RULES, default=Promotion.rule, help="promotion rule")
    g.add_argument("--eta", type=float, default=Promotion.eta, help="top-fraction: promote the best 1/eta")
    g.add_argument(
        "--promotion-z",
        type=float,
        default=Promotion.z,
        help="standard errors of a difference that count as clear in the promotion rule",
    )
    add_model_arguments(p)
    add_measure_arguments(p)
    return p


def parse_steps_choices(text: str | None) -> tuple[int, ...] | None:
    """``"4,6,8"`` -> ``(4, 6, 8)`` (sorted); ``None`` -> ``None`` (the protocol's steps only)."""
    if text is None:
        return None
    try:
        choices = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        choices = []
    if not choices or any(s < 1 for s in choices) or len(set(choices)) != len(choices):
        raise ValueError(
            f"--steps-choices takes distinct comma-separated step counts >= 1 such as 4,6,8, got '{text}'"
        )
    return tuple(sorted(choices))


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    objectives = search_objectives(args.objective)
    if args.searcher not in SEARCHERS:
        raise ValueError(f"unknown searcher '{args.searcher}' (choose from {', '.join(SEARCHERS)})")
    if args.trials < 1:
        raise ValueError(f"--trials must be at least 1, got {args.trials}")
    steps_choices = parse_steps_choices(args.steps_choices)
    if not 1 <= args.segments <= MAX_SEGMENTS:
        raise ValueError(f"--segments must be from 1 to {MAX_SEGMENTS}, got {args.segments}")
    if args.stale_after < 6:
        raise ValueError(
            f"--stale-after must be at least 6 seconds (heartbeats every sixth), got {args.stale_after}"
        )
    url = validate_storage_url(args.storage)
    shared = not url.startswith("sqlite")
    settings = settings_from_args(args, shared_storage=shared)
    if shared:  # a claim is refreshed while measured: one not refreshed for --stale-after is a dead worker's
        settings = replace(settings, claim_timeout_s=float(args.stale_after))
    promotion = Promotion(
        parse_rungs(args.rungs, settings.fvd_videos), args.promotion, args.eta, args.promotion_z
    )
    promotion.check_against(settings)
    torch.set_num_threads(args.threads)
    settings.policy.apply()  # explicit float32 numerics, before any model runs
    base, ssr, resolution = load_chain(args.checkpoint, args.ssr_checkpoint, args.resolution)
    settings.policy.place(base)  # once, for every consumer (generation, timing, the limit check)
    settings.policy.place(ssr)
    net = base.supernet
    text = base.text_encoder.load(settings.device, dtype=args.text_dtype) if base.text_encoder else None
    encoding = CandidateEncoding(
        net.space,
        ssr.supernet.space if ssr else None,
        resolution,
        net.space.default_resolution,
        steps_choices=steps_choices,
        segments=args.segments,
        default_steps=settings.steps,
    )
    anchors = anchor_candidates(encoding, args.anchors)
    limits = {"params": args.max_params, "flops": args.max_flops, "latency_ms": args.max_latency}
    from harness.metrics.fvd import resolve_extractor

    extractor = resolve_extractor(args.fvd_weights, settings.device)  # fails here, before anything is written
    predictors = load_predictors(base, ssr) if args.latency == "predicted" else None
    smallest = Candidate(net.space.smallest(), ssr.supernet.space.smallest(resolution) if ssr else None)
    check_limits_reachable(  # the cheapest candidate: the smallest subnet at the fewest steps
        Generation(base, ssr, settings.steps, settings.guidance, settings.policy),
        settings,
        encoding.cheapest(),
        limits,
        predictors,
    )

    # Only now is anything written: the store, then the study.
    store = Store.open(url)
    worker = f"{socket.gethostname()}:{os.getpid()}"

    videos = GeneratedVideoCache()  # a screen's videos are the full protocol's first ones: generated once

    def measurer_for(s: MeasureSettings) -> Measurer:
        return Measurer(
            base,
            ssr,
            text,
            s,
            store,
            worker=worker,
            predictors=predictors,
            extractor=extractor,
            video_cache=videos,
        )

    measurer = measurer_for(settings)
    screens = {rung: measurer_for(s) for rung, s in promotion.rung_settings(settings).items()}
    name = (
        args.study
        or default_study_name(net.family, net.preset, resolution, objectives, args.searcher, args.seed)
        + encoding.study_suffix
    )  # a trajectory search never resumes the single-subnet one's study
    with store.exclusive("optuna-schema"):  # RDBStorage creates Optuna's tables: workers must not race
        storage = optuna_storage(
            url,
            heartbeat_interval=max(1, args.stale_after // 6) if shared else None,
            grace_period=args.stale_after if shared else None,
            heartbeat_stale_trial_callback=requeue_trial if shared else None,  # a dead worker's candidate
        )
    probe = anchors[0][1] if anchors else smallest
    attrs = json.loads(  # as the study stores them (tuples become lists), so a resume compares equal
        json.dumps(
            {
                "objectives": objectives,
                "resolution": resolution,
                "checkpoint": str(Path(args.checkpoint).resolve()),
                **({"ssr_checkpoint": str(Path(args.ssr_checkpoint).resolve())} if ssr else {}),
                "settings": study_settings(settings),  # policy fields only when not the default
                "promotion": asdict(promotion),
                "limits": {m: lim for m, lim in limits.items() if lim is not None},
                "trajectory": encoding.identity(),  # step choices, segments (and split grid)
                "fidelity_protocols": {
                    "full": measurer.protocols(probe),
                    **{rung: m.protocols(probe) for rung, m in screens.items()},
                },
            }
        )
    )
    spaces = (net.space, ssr.supernet.space if ssr else None)
    constrained = any(v is not None for v in limits.values())
    study, searcher = open_study(
        store,
        storage,
        name,
        objectives,
        study_sampler(args.searcher, args.seed),
        lambda study, worker: make_searcher(
            args.searcher, study, encoding, spaces, worker_seed(args.seed, worker), objectives, constrained
        ),
        anchors,
        attrs,
    )
    print(
        f"study '{name}' in {redact_url(url)}: {', '.join(objectives)} at {resolution}px, searcher "
        f"{args.searcher}, {args.trials} trials"
    )
    run = SearchRun(
        study,
        storage,
        store,
        searcher,
        measurer,
        objectives,
        args.trials,
        limits={m: lim for m, lim in limits.items() if lim is not None},
        max_busy_s=args.busy_timeout,
        screens=screens,
        promotion=promotion,
        anchors={cand.key: fraction for fraction, cand in anchors},
    )
    run_search(run, shared)
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise Stopped(
            f"no trial of study '{name}' completed (see the messages above); nothing to report - fix the "
            "cause and rerun the same command to resume"
        )
    results = study_results(url, name, measurer.device_name, extractor.name, limits)
    report_front(results, url, name, objectives, plot=not args.no_plot)


if __name__ == "__main__":
    run_cli(main)

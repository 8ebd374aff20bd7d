"""``python -m harness.search``: search the trained supernet for Pareto-optimal subnets.

The main job, ``python -m harness.search --objective latency``, searches the shipped tiny supernet at its
default resolution, minimising latency and FVD jointly, records every measurement in
``results/harness.db``, prints the Pareto front and writes its plot under ``results/plots/``.
Several workers (on several machines) share one study through a PostgreSQL ``--storage`` URL.
"""

from __future__ import annotations

import argparse
import os
import socket
import threading
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState
from tqdm import tqdm

from harness.candidates import Candidate
from harness.checkpoints import DEFAULT_BASE, DEFAULT_SSR, RESULTS, load_model, text_encoder_name
from harness.cli import run_cli
from harness.measure import OBJECTIVES, MeasureSettings, MeasurementFailed, Measurer
from harness.searchers import SEARCHERS, make_searcher
from harness.searchers.base import optuna_sampler
from harness.searchers.encoding import CandidateEncoding
from harness.store import Store, optuna_storage, redact_url, validate_storage_url
from search_spaces import Supernet

DEFAULT_STORAGE = f"sqlite:///{RESULTS / 'harness.db'}"
QUALITY = ("fvd", "kvd")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harness.search", description=__doc__.splitlines()[0])
    p.add_argument("--objective", action="append", default=None,
                   help="objective to minimise, repeatable: latency, flops, params, fvd, kvd (a quality "
                        "objective, FVD by default, is added when none is given)")
    p.add_argument("--searcher", default="tpe", help=f"one of {', '.join(SEARCHERS)} (default tpe)")
    p.add_argument("--trials", type=int, default=40, help="total trials of the study, over all workers")
    p.add_argument("--resolution", type=int, default=None,
                   help="output resolution; above the base model's, candidates are base + SSR chains")
    p.add_argument("--max-params", type=float, default=None, help="constraint: parameters (count)")
    p.add_argument("--max-flops", type=float, default=None, help="constraint: FLOPs per generated video")
    p.add_argument("--max-latency", type=float, default=None, help="constraint: latency per video (ms)")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help="SQLAlchemy URL or SQLite file (default "
                   "results/harness.db); postgresql://... to share one study between workers")
    p.add_argument("--study", default=None, help="study name (resumed when it exists)")
    p.add_argument("--checkpoint", default=str(DEFAULT_BASE), help="base supernet directory")
    p.add_argument("--ssr-checkpoint", default=str(DEFAULT_SSR), help="super-resolution supernet directory")
    p.add_argument("--device", default="cpu", help="device for sampling and latency (cpu, cuda)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch and latency timing")
    p.add_argument("--seed", type=int, default=0, help="seed of the searcher and of FVD sampling")
    p.add_argument("--latency", choices=("measured", "predicted"), default="measured",
                   help="latency of the extracted static subnet, or the predictor's estimate")
    p.add_argument("--fvd-videos", type=int, default=32, help="generated videos per FVD estimate")
    p.add_argument("--fvd-weights", default=None, help="I3D weights file (default: offline proxy extractor)")
    p.add_argument("--fvd-data", default="synthetic",
                   help="real videos for FVD/KVD: 'synthetic' or a dataset folder (e.g. Sky Timelapse)")
    p.add_argument("--fvd-split", default="heldout", help="split of --fvd-data holding the real videos")
    p.add_argument("--real-videos", type=int, default=256, help="real videos for the FVD/KVD reference statistics")
    p.add_argument("--steps", type=int, default=8, help="DDIM steps per stage when generating")
    p.add_argument("--no-plot", action="store_true", help="skip writing the front's plot")
    p.add_argument("--anchors", default="0.4,0.6,0.8,1.0",
                   help="parameter fractions whose balanced subnets a new Optuna study evaluates first (the "
                        "paper's SNED-S/M/L/B points, marked in the plots); '' for none")
    return p


# -- validation (before anything is written) --------------------------------------------------------
def parse_objectives(raw: list[str] | None) -> list[str]:
    names = raw or ["latency"]
    for n in names:
        if n not in OBJECTIVES:
            raise ValueError(f"unknown objective '{n}' (choose from {', '.join(OBJECTIVES)})")
    names = list(dict.fromkeys(names))
    if not any(n in QUALITY for n in names):
        names.append("fvd")
    return names


def load_models(args) -> tuple[Supernet, Supernet | None, int]:
    base = load_model(args.checkpoint)
    if not isinstance(base, Supernet):
        raise ValueError(f"{args.checkpoint} holds an extracted subnet; search needs a supernet checkpoint")
    base_res = base.space.default_resolution
    resolution = args.resolution or base_res
    if resolution in base.space.resolutions and resolution == base_res:
        return base, None, resolution
    if resolution < base_res or resolution % base_res or (resolution // base_res) & (resolution // base_res - 1):
        raise ValueError(f"resolution {resolution} is not one this supernet was trained for (base "
                         f"{list(base.space.resolutions)}, chains: {base_res} x powers of 2)")
    ssr = load_model(args.ssr_checkpoint)
    if not isinstance(ssr, Supernet) or ssr.spec.cond_channels == 0:
        raise ValueError(f"{args.ssr_checkpoint} is not a super-resolution supernet")
    r = base_res * 2
    while r <= resolution:
        if r not in ssr.space.resolutions:
            raise ValueError(f"resolution {resolution} needs the SSR model at {r}px, which it was not trained "
                             f"for (SSR resolutions {list(ssr.space.resolutions)})")
        r *= 2
    return base, ssr, resolution


def constraint_values(values: dict, args) -> list[float]:
    limits = [("params", args.max_params), ("flops", args.max_flops), ("latency_ms", args.max_latency)]
    return [values[m] - limit for m, limit in limits if limit is not None]


def check_feasible(measurer: Measurer, smallest: Candidate, args) -> None:
    """Fail early when even the smallest candidate breaks a constraint (no subnet can meet it)."""
    metrics = [m for m, lim in (("flops", args.max_flops), ("latency_ms", args.max_latency)) if lim is not None]
    values = {"params": float(smallest.params(measurer.base, measurer.ssr))}
    if metrics:
        if "flops" in metrics:
            values.update(measurer.compute_flops(smallest)[0])
        if "latency_ms" in metrics:
            values.update(measurer.compute_latency(smallest)[0])
    for metric, limit, flag in (("params", args.max_params, "--max-params"), ("flops", args.max_flops, "--max-flops"),
                                ("latency_ms", args.max_latency, "--max-latency")):
        if limit is not None and values[metric] > limit:
            raise ValueError(f"{flag} {limit:g} is below the smallest subnet's {metric} ({values[metric]:.4g}): "
                             "no subnet can meet it; raise the limit")


def default_study_name(base: Supernet, resolution: int, objectives: list[str], searcher: str, seed: int) -> str:
    return f"{base.family}-{base.preset}-{resolution}px-{'+'.join(objectives)}-{searcher}-seed{seed}"


# -- trial bookkeeping -------------------------------------------------------------------------------
def used_trials(study: optuna.Study) -> int:
    """Trials that count towards the budget: finished, running, or failed by a measurement. Queued
    (WAITING) trials do not: ``study.ask`` hands them out before it creates new ones."""
    n = 0
    for t in study.get_trials(deepcopy=False):
        if t.state in (TrialState.COMPLETE, TrialState.RUNNING):
            n += 1
        elif t.state == TrialState.FAIL and t.user_attrs.get("measurement_failed"):
            n += 1
    return n


def fail_abandoned(study: optuna.Study, storage_url: str) -> None:
    """Trials left RUNNING by a killed worker: on SQLite (one process by contract) all of them; on a
    shared server those whose heartbeat went stale."""
    if storage_url.startswith("sqlite"):
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    else:
        optuna.storages.fail_stale_trials(study)


class Heartbeat:
    """Records a trial's heartbeat every few seconds while it is being measured (shared storages)."""

    def __init__(self, storage, trial_id: int | None, interval: float = 10.0):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.storage.record_heartbeat(self.trial_id)

    def __enter__(self):
        if self.trial_id is not None and self.storage.get_heartbeat_interval() is not None:
            self.storage.record_heartbeat(self.trial_id)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    objectives = parse_objectives(args.objective)
    if args.searcher not in SEARCHERS:
        raise ValueError(f"unknown searcher '{args.searcher}' (choose from {', '.join(SEARCHERS)})")
    if args.trials < 1:
        raise ValueError(f"--trials must be at least 1, got {args.trials}")
    url = validate_storage_url(args.storage)
    torch.set_num_threads(args.threads)
    base, ssr, resolution = load_models(args)
    from harness.text_encoder import load_text_encoder

    text = load_text_encoder(text_encoder_name(base), max_length=base.spec.context_len) if base.spec.context_dim \
        else None
    settings = MeasureSettings(steps=args.steps, fvd_videos=args.fvd_videos, fvd_weights=args.fvd_weights,
                               fvd_data=args.fvd_data,
                               fvd_split=args.fvd_split, real_videos=args.real_videos,
                               latency=args.latency, threads=args.threads, device=args.device, seed=args.seed,
                               # SQLite is one process by contract: a claim left there is a killed run's.
                               claim_timeout_s=0.0 if url.startswith("sqlite") else 1800.0)
    encoding = CandidateEncoding(base.space, ssr.space if ssr else None, resolution, base.space.default_resolution)
    anchors = anchor_candidates(base, ssr, encoding, args.anchors)
    smallest = Candidate(base.space.smallest(),
                         ssr.space.smallest(resolution) if ssr is not None else None)

    from harness.metrics.fvd import resolve_extractor

    extractor = resolve_extractor(args.fvd_weights)  # fails here, before anything is written

    predictors = load_predictors(base, ssr) if args.latency == "predicted" else None
    check_feasible(Measurer(base, ssr, text, settings, None, predictors=predictors), smallest, args)

    # Only now is anything written: the store, then the study.
    store = Store.open(url)
    measurer = Measurer(base, ssr, text, settings, store, worker=f"{socket.gethostname()}:{os.getpid()}",
                        predictors=predictors, extractor=extractor)
    name = args.study or default_study_name(base, resolution, objectives, args.searcher, args.seed)
    with store.exclusive("optuna-schema"):  # workers starting together must not race on Optuna's DDL
        storage = optuna_storage(url, heartbeat_interval=None if url.startswith("sqlite") else 10,
                                 grace_period=None if url.startswith("sqlite") else 60)
        sampler = optuna_sampler(args.searcher if args.searcher != "evolution" else "random", args.seed)
        study = optuna.create_study(study_name=name, storage=storage, directions=["minimize"] * len(objectives),
                                    sampler=sampler, load_if_exists=True)
        if args.searcher != "evolution" and not study.get_trials(deepcopy=False):
            for fraction, cand in anchors[: args.trials]:
                study.enqueue_trial(encoding.params(cand), user_attrs={"anchor_fraction": fraction})
    if len(study.directions) != len(objectives):
        raise ValueError(f"study '{name}' exists with {len(study.directions)} objectives; use another --study")
    study.set_user_attr("objectives", objectives)
    study.set_user_attr("resolution", resolution)
    study.set_user_attr("checkpoint", str(Path(args.checkpoint).resolve()))
    if ssr is not None:
        study.set_user_attr("ssr_checkpoint", str(Path(args.ssr_checkpoint).resolve()))
    searcher = make_searcher(args.searcher, study, encoding, (base.space, ssr.space if ssr else None),
                             args.seed, objectives, constrained=any((args.max_params, args.max_flops,
                                                                      args.max_latency)))
    metrics = sorted({OBJECTIVES[o] for o in objectives} | {"params", "flops", "latency_ms"})
    print(f"study '{name}' in {redact_url(url)}: {', '.join(objectives)} at {resolution}px, searcher "
          f"{args.searcher}, {args.trials} trials")
    run_search(study, storage, store, searcher, measurer, objectives, metrics, args, url)
    from harness.report import report_front

    report_front(url, name, objectives, base, ssr, plot=not args.no_plot)


def anchor_candidates(base: Supernet, ssr: Supernet | None, encoding: CandidateEncoding,
                      anchors: str) -> list[tuple[float, Candidate]]:
    """The balanced subnet at each fraction of ``anchors`` (base and, for a chain, SSR at that fraction,
    shrunk into the size caps) as candidates of this search."""
    try:
        fractions = [float(f) for f in anchors.split(",") if f.strip()]
    except ValueError:
        raise ValueError(f"--anchors takes comma-separated fractions such as 0.4,1.0, got '{anchors}'") from None
    if any(not 0 < f <= 1 for f in fractions):
        raise ValueError(f"--anchors fractions must lie in (0, 1], got '{anchors}'")
    out = []
    for f in fractions:
        cand = Candidate(base.space.subnet_at_fraction(f),
                         ssr.space.subnet_at_fraction(f, encoding.resolution) if encoding.chain else None)
        out.append((f, encoding.decode(encoding.params(cand))))
    return out


def run_search(study, storage, store, searcher, measurer, objectives, metrics, args, url) -> None:
    with store.exclusive(f"study:{study.study_name}"):
        fail_abandoned(study, url)
    bar = tqdm(total=args.trials, initial=min(used_trials(study), args.trials), desc="search", dynamic_ncols=True)
    try:
        while True:
            with store.exclusive(f"study:{study.study_name}"):
                if used_trials(study) >= args.trials:
                    break
                cand, handle = searcher.ask()
            trial_id = getattr(handle, "_trial_id", None)
            attrs = {"param_fraction": cand.param_fraction(measurer.base, measurer.ssr),
                     "description": cand.describe(measurer.base, measurer.ssr)}
            try:
                with Heartbeat(storage, trial_id):
                    values = measurer.measure(cand, metrics)
            except MeasurementFailed as e:
                number = searcher.tell(handle, None, error=str(e), attrs=attrs)
                tqdm.write(f"trial {number}: measurement failed ({e}); continuing")
            except KeyboardInterrupt:
                if trial_id is not None:
                    study.tell(handle, state=TrialState.FAIL)
                raise
            else:
                attrs["metrics"] = values
                number = searcher.tell(handle, [values[OBJECTIVES[o]] for o in objectives],
                                       constraint_values(values, args), attrs=attrs)
                store.link_trial(measurer.candidate_id(cand), study.study_name, searcher.name,
                                 optuna_trial_id=trial_id, trial_number=number)
            bar.update(1)
            bar.set_postfix(measured=measurer.measured, cached=measurer.cache_hits)
    finally:
        bar.close()


def predictor_path(net: Supernet, resolution: int) -> Path | None:
    """A latency predictor for ``net`` at ``resolution``: beside the checkpoint, else under results/latency."""
    for path in (Path(net.checkpoint_dir) / f"latency-{resolution}px.json",
                 RESULTS / "latency" / f"{net.family}-{net.preset}-{resolution}.json"):
        if path.is_file():
            return path
    return None


def load_predictors(base: Supernet, ssr: Supernet | None) -> dict:
    from harness.metrics.latency_predictor import LatencyPredictor

    out = {}
    for net in (base, ssr):
        for r in (net.space.resolutions if net is not None else ()):
            path = predictor_path(net, r)
            if path is not None:
                out[(net.family, r)] = LatencyPredictor.load(path)
    if not out:
        raise FileNotFoundError("--latency predicted needs a latency predictor (<checkpoint>/latency-<R>px.json); "
                                "fit one with python -m harness.predictor")
    return out


if __name__ == "__main__":
    run_cli(main)

"""The search loop: ask a searcher, measure the candidate, tell the result; trial bookkeeping and
heartbeats, through Optuna's public API (the study, and the ``RDBStorage`` the caller opened).

``open_study`` creates or resumes the study (a new one starts with the anchor subnets); ``SearchRun``
holds what one worker's search needs; ``run_search`` runs until the study's budget is used, by any
number of workers sharing the storage.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState
from tqdm import tqdm

from harness.candidates import Candidate
from harness.cli import Stopped
from harness.measurement import MeasurementDeferred, MeasurementFailed, Measurer
from harness.metric_names import metric_name
from harness.searchers import Searcher
from harness.searchers.promotion import Promotion, promote, pruned_count, rung_attr, rung_pool
from harness.store import Store

MAX_DEFERRED_IN_A_ROW = 10  # each put-off already retried a reading 4 times with back-off


def used_trials(study: optuna.Study) -> int:
    """Trials that count towards the budget: finished, running, or failed by a measurement. Queued
    (WAITING) trials do not: ``study.ask`` hands them out before it creates new ones."""
    n = 0
    for t in study.get_trials(deepcopy=False):
        if (
            t.state in (TrialState.COMPLETE, TrialState.RUNNING)
            or t.state == TrialState.FAIL
            and t.user_attrs.get("measurement_failed")
        ):
            n += 1
    return n


def fail_abandoned(study: optuna.Study, storage: optuna.storages.RDBStorage, shared: bool) -> None:
    """Trials left RUNNING by a killed worker: on SQLite (one process by contract) all of them; on a
    shared server those whose heartbeat went stale."""
    if shared:
        optuna.storages.fail_stale_trials(study)
        return
    study_id = storage.get_study_id_from_name(study.study_name)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_state_values(
            storage.get_trial_id_from_study_id_trial_number(study_id, t.number), TrialState.FAIL
        )


class Heartbeat:
    """Records a trial's heartbeat every few seconds while it is being measured (shared storages)."""

    def __init__(
        self, storage: optuna.storages.RDBStorage, study_name: str, number: int | None, interval: float = 10.0
    ):
        self.storage, self.interval = storage, interval
        self.trial_id = None
        if number is not None and storage.get_heartbeat_interval() is not None:
            study_id = storage.get_study_id_from_name(study_name)
            self.trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.storage.record_heartbeat(self.trial_id)

    def __enter__(self) -> Heartbeat:  # noqa: PYI034  (always this class)
        if self.trial_id is not None:
            self.storage.record_heartbeat(self.trial_id)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()


@dataclass
class SearchRun:
    """One worker's search: the study and its storage, the searcher, the measurer, what to minimise."""

    study: optuna.Study
    storage: optuna.storages.RDBStorage
    store: Store
    searcher: Searcher
    measurer: Measurer
    objectives: list[str]  # objective names (``latency``, ``fvd``)
    trials: int  # the study's budget of full-fidelity trials, over all workers
    constraints: Callable[[dict], list[float]] = field(default=lambda values: [])  # <= 0 is feasible
    screens: dict[str, Measurer] = field(default_factory=dict)  # screening rungs, cheapest first
    promotion: Promotion | None = None
    anchors: dict[str, float] = field(default_factory=dict)  # candidate key -> fraction; always promoted
    deferred_in_a_row: int = 0  # measurements put off because the machine was busy, since the last success

    @property
    def metrics(self) -> list[str]:
        """What each trial measures: the objectives and the cost figures every front row shows."""
        return sorted({metric_name(o) for o in self.objectives} | {"params", "flops", "latency_ms"})


def _trial_attrs(run: SearchRun, cand: Candidate) -> dict:
    base = run.measurer.base.supernet
    ssr = run.measurer.ssr.supernet if run.measurer.ssr else None
    return {"param_fraction": cand.param_fraction(base, ssr), "description": cand.describe(base, ssr)}


def _link(run: SearchRun, cand: Candidate, number: int) -> None:
    study_id = run.storage.get_study_id_from_name(run.study.study_name)
    run.store.link_trial(
        run.measurer.candidate_id(cand),
        run.study.study_name,
        run.searcher.name,
        optuna_trial_id=run.storage.get_trial_id_from_study_id_trial_number(study_id, number),
        trial_number=number,
    )


def _screen(run: SearchRun, cand: Candidate, handle) -> str | None:
    """Measure ``cand`` at each screening rung, cheapest first; the rung that stopped it, or ``None``
    when it is promoted to the full protocol (see ``harness.searchers.promotion``)."""
    objectives = [metric_name(o) for o in run.objectives]
    number = run.searcher.trial_number(handle)
    for rung, measurer in run.screens.items():
        values = measurer.measure(cand, run.metrics)
        run.searcher.annotate(handle, {rung_attr(rung): values})
        if cand.key in run.anchors:
            continue
        with run.store.exclusive(f"study:{run.study.study_name}"):
            exhausted = pruned_count(run.study) >= (run.promotion.screen_budget or run.trials)
            if not exhausted and not promote(
                values, rung_pool(run.study, rung, exclude=number), objectives, run.promotion
            ):
                return rung
    return None


def run_one(run: SearchRun) -> bool:
    """Ask, screen, measure and tell one trial; ``False`` when the budget is used."""
    with run.store.exclusive(f"study:{run.study.study_name}"):
        if used_trials(run.study) >= run.trials:
            return False
        cand, handle = run.searcher.ask()
    attrs = _trial_attrs(run, cand)
    try:
        with Heartbeat(run.storage, run.study.study_name, run.searcher.trial_number(handle)):
            stopped_at = _screen(run, cand, handle) if run.screens else None
            if stopped_at is not None:
                number = run.searcher.prune(handle, {**attrs, "fidelity": stopped_at})
                _link(run, cand, number)
                return True
            values = run.measurer.measure(cand, run.metrics)
    except MeasurementDeferred as e:
        # Not the candidate's fault: give the trial back and measure the candidate again later.
        run.searcher.abandon(handle)
        anchor = {"anchor_fraction": run.anchors[cand.key]} if cand.key in run.anchors else {}
        run.searcher.requeue(cand, anchor)
        run.deferred_in_a_row += 1
        if run.deferred_in_a_row > MAX_DEFERRED_IN_A_ROW:
            raise Stopped(
                f"{run.deferred_in_a_row} measurements in a row were put off ({e}); the machine stays too "
                "busy to time latency: rerun the same command when it is quieter (finished trials are kept)"
            ) from None
        tqdm.write(f"candidate put off ({e}); it is queued again")
        return True
    except MeasurementFailed as e:
        number = run.searcher.tell(handle, None, error=str(e), attrs=attrs)
        tqdm.write(f"trial {number}: measurement failed ({e}); continuing")
        return True
    except KeyboardInterrupt:
        run.searcher.abandon(handle)
        raise
    run.deferred_in_a_row = 0
    attrs["metrics"] = values
    attrs["fidelity"] = "full"
    number = run.searcher.tell(
        handle, [values[metric_name(o)] for o in run.objectives], run.constraints(values), attrs=attrs
    )
    _link(run, cand, number)
    return True


def run_search(run: SearchRun, shared: bool) -> None:
    """Run trials until the study's budget is used (by this and any other worker), with a progress bar."""
    with run.store.exclusive(f"study:{run.study.study_name}"):
        fail_abandoned(run.study, run.storage, shared)
    recorder = run.measurer.recorder
    bar = tqdm(
        total=run.trials, initial=min(used_trials(run.study), run.trials), desc="search", dynamic_ncols=True
    )
    try:
        while run_one(run):
            bar.n = min(used_trials(run.study), run.trials)  # pruned screens do not use the budget
            recorders = [recorder, *(m.recorder for m in run.screens.values())]
            postfix = {
                "measured": sum(r.measured for r in recorders),
                "cached": sum(r.cache_hits for r in recorders),
            }
            if run.screens:
                postfix["pruned"] = pruned_count(run.study)
            bar.set_postfix(postfix)
    finally:
        bar.close()


def default_study_name(
    base_family: str, preset: str, resolution: int, objectives: list[str], searcher: str, seed: int
) -> str:
    return f"{base_family}-{preset}-{resolution}px-{'+'.join(objectives)}-{searcher}-seed{seed}"


def open_study(
    store: Store,
    storage: optuna.storages.RDBStorage,
    name: str,
    objectives: list[str],
    sampler: optuna.samplers.BaseSampler,
    make_searcher: Callable[[optuna.Study], Searcher],
    anchors: list[tuple[float, Candidate]],
    attrs: dict,
) -> tuple[optuna.Study, Searcher]:
    """Create or resume study ``name`` and its searcher. A new study records ``attrs`` and starts with the
    ``anchors``; a resumed one keeps the attributes it was created with. Workers starting together are
    serialised, so exactly one of them sees the study new."""
    with store.exclusive("optuna-schema"):  # Optuna's DDL and the first trials must not race
        study = optuna.create_study(
            study_name=name,
            storage=storage,
            sampler=sampler,
            load_if_exists=True,
            directions=["minimize"] * len(objectives),
        )
        if len(study.directions) != len(objectives):
            raise ValueError(
                f"study '{name}' exists with {len(study.directions)} objectives, not "
                f"{len(objectives)}; pass --study NEW for a new one"
            )
        new = not study.get_trials(deepcopy=False) and not study.user_attrs
        if new:
            for key, value in attrs.items():
                study.set_user_attr(key, value)
        else:
            check_same_protocol(name, study.user_attrs, attrs)
        searcher = make_searcher(study)
        if new:
            searcher.start(anchors)
    return study, searcher


# Attributes a resumed study must share with the run that created it (what its values mean), and the
# settings that only say how workers cooperate.
IDENTITY_ATTRS = ("objectives", "resolution", "settings", "promotion")
COOPERATION_SETTINGS = ("claim_timeout_s",)


def check_same_protocol(name: str, recorded: dict, attrs: dict) -> None:
    """Refuse to resume study ``name`` under settings other than those it was created with: its values
    would silently mix protocols. One line naming the first difference and the fix."""
    for key in IDENTITY_ATTRS:
        if key not in recorded or key not in attrs:
            continue  # a study created before the attribute was recorded
        old, new = recorded[key], attrs[key]
        if isinstance(old, dict) and isinstance(new, dict):
            for field_name in sorted(set(old) | set(new)):
                if field_name in COOPERATION_SETTINGS or old.get(field_name) == new.get(field_name):
                    continue
                raise ValueError(
                    f"study '{name}' was created with {key}.{field_name}={old.get(field_name)!r}, this run "
                    f"has {new.get(field_name)!r}; rerun with the study's settings, or pass --study NEW "
                    "for a new study"
                )
        elif old != new:
            raise ValueError(
                f"study '{name}' was created with {key}={old!r}, this run has {new!r}; rerun with the "
                "study's settings, or pass --study NEW for a new study"
            )


def anchor_candidates(encoding, anchors: str) -> list[tuple[float, Candidate]]:
    """The balanced subnet at each fraction of ``anchors`` (``"0.4,0.6,0.8,1.0"``: the paper's
    SNED-S/M/L/B; base and, for a chain, SSR at that fraction, shrunk into the size caps) as candidates of
    this search, as the encoding represents them."""
    try:
        fractions = [float(f) for f in anchors.split(",") if f.strip()]
    except ValueError:
        raise ValueError(
            f"--anchors takes comma-separated fractions such as 0.4,1.0, got '{anchors}'"
        ) from None
    if any(not 0 < f <= 1 for f in fractions):
        raise ValueError(f"--anchors fractions must lie in (0, 1], got '{anchors}'")
    out = []
    for f in fractions:
        ssr = encoding.ssr_space.subnet_at_fraction(f, encoding.resolution) if encoding.chain else None
        cand = Candidate(encoding.base_space.subnet_at_fraction(f), ssr)
        out.append((f, encoding.decode(encoding.params(cand))))
    return out

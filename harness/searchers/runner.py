"""The search loop: ask a searcher, measure the candidate, tell the result; trial bookkeeping and
heartbeats, through Optuna's public API (the study, and the ``RDBStorage`` the caller opened).

``open_study`` creates or resumes the study (a new one starts with the anchor subnets); ``SearchRun``
holds what one worker's search needs; ``run_search`` runs until the study's budget is used, by any
number of workers sharing the storage.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState
from tqdm import tqdm

from harness.candidates import Candidate
from harness.cli import Stopped
from harness.measurement import MeasurementDeferred, MeasurementFailed, Measurer
from harness.metric_names import COUNT_METRICS, QUALITY_METRICS, metric_name
from harness.searchers import Searcher
from harness.searchers.promotion import Promotion, promote, pruned_count, rung_attr, rung_pool
from harness.store import Store
from harness.store.urls import sqlite_path
from search_spaces import ConfigError

# A busy spell is waited out, not given up on at once: a main job with one core kept busy for 150 s put
# off 11 candidates in 80 s and stopped. Put-offs now wait 5, 10, 20, 40, 60, 60 ... s, and the search
# stops only when the machine has been too busy to time anything for MAX_BUSY_S.
MAX_BUSY_S = 900.0
BUSY_WAIT_S = (5.0, 60.0)  # first wait after a put-off, and the longest
MAX_ANCHOR_ATTEMPTS = 3  # an anchor whose measurement failed is tried again, this many times in all
STALE_AFTER_S = 60  # shared storage: a trial without a heartbeat this long belongs to a dead worker
WAIT_FOR_OTHERS_S = 2.0  # budget used but other workers' trials still running: poll this often


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


def requeue_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Queue a failed trial's candidate again (same parameters; an anchor keeps its fraction), so a dead
    worker's candidate is measured by someone else and fronts keep their SNED-S/M/L/B references. Also
    Optuna's ``heartbeat_stale_trial_callback``: run by the one worker that failed the stale trial."""
    attrs = {k: trial.user_attrs[k] for k in ("candidate_key", "anchor_fraction") if k in trial.user_attrs}
    study.enqueue_trial(trial.params, user_attrs={**attrs, "requeued_from": trial.number})


def fail_abandoned(study: optuna.Study, storage: optuna.storages.RDBStorage, shared: bool) -> None:
    """Trials left RUNNING by a dead worker are failed and their candidates queued again. A shared server:
    those whose heartbeat went stale (any live worker, before each ask); SQLite: all of them, by the one
    process that holds the study (``hold_sqlite_study``), at its start."""
    if shared:
        with warnings.catch_warnings():  # fail_stale_trials is marked experimental since Optuna 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # calls requeue_trial for each trial it failed
        return
    study_id = storage.get_study_id_from_name(study.study_name)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        storage.set_trial_user_attr(trial_id, "error", "its worker ended without finishing it")
        if storage.set_trial_state_values(trial_id, TrialState.FAIL):
            requeue_trial(study, t)


@contextlib.contextmanager
def hold_sqlite_study(url: str, study_name: str) -> Iterator[None]:
    """One process at a time searches a study in one SQLite file (SQLite has no heartbeats a second
    process could trust): a second one stops with one line instead of failing the first one's trials."""
    path = sqlite_path(url)
    if path is None:  # in-memory: one process by construction
        yield
        return
    digest = hashlib.sha256(study_name.encode()).hexdigest()[:12]
    with open(f"{path}.search-{digest}.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Stopped(
                f"another process is searching study '{study_name}' in {path}; wait for it, or use a "
                "PostgreSQL --storage for several workers on one study"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Heartbeat:
    """Records a trial's heartbeat while it is being measured (shared storages), at the storage's
    heartbeat interval (``--stale-after`` / 6: a few late beats never make a live trial look dead)."""

    def __init__(self, storage: optuna.storages.RDBStorage, study_name: str, number: int | None):
        self.storage = storage
        self.interval = storage.get_heartbeat_interval()
        self.trial_id = None
        if number is not None and self.interval is not None:
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
    limits: dict[str, float] = field(default_factory=dict)  # metric -> upper limit; replaces constraints
    screens: dict[str, Measurer] = field(default_factory=dict)  # screening rungs, cheapest first
    promotion: Promotion | None = None
    anchors: dict[str, float] = field(default_factory=dict)  # candidate key -> fraction; always promoted
    deferred_in_a_row: int = 0  # measurements put off because the machine was busy, since the last success
    busy_since: float | None = None  # time.monotonic() of the first of those put-offs
    max_busy_s: float = MAX_BUSY_S  # how long a busy spell may last before the search stops

    def violations(self, values: dict) -> list[float]:
        """Constraint values told with a trial: ``limit_violations`` of ``limits`` when set, else
        ``constraints(values)``."""
        return limit_violations(values, self.limits) if self.limits else self.constraints(values)

    @property
    def metrics(self) -> list[str]:
        """What each trial measures: the objectives and the cost figures every front row shows."""
        return sorted({metric_name(o) for o in self.objectives} | {"params", "flops", "latency_ms"})


def limit_violations(values: dict, limits: dict[str, float]) -> list[float]:
    """``(value - limit) / limit`` for each limit, in ``limits``' order (``<= 0`` is feasible): relative,
    so that a sampler summing violations weighs 10 % too many FLOPs like 10 % too many milliseconds."""
    return [(values[m] - lim) / lim for m, lim in limits.items()]


def _tell_infeasible(run: SearchRun, cand: Candidate, handle, counts: dict, attrs: dict) -> int:
    """Tell a candidate that breaks a limit known before measurement (parameters, FLOPs) as infeasible,
    without timing it or generating a video. Its objective values are the worst seen so far (a
    placeholder: constrained samplers rank infeasible trials by their violations, and the reported
    front comes from the store's measurements, which hold none for it)."""
    complete = run.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    told = [t.values for t in complete if not t.user_attrs.get("infeasible_before_measurement")]
    worst = [max(v[i] for v in told) if told else 1e9 for i in range(len(run.objectives))]
    values = {**counts, **{m: float("inf") for m in run.limits if m not in counts}}
    violations = [v if math.isfinite(v) else 0.0 for v in limit_violations(values, run.limits)]
    attrs = {**attrs, "metrics": counts, "fidelity": "infeasible", "infeasible_before_measurement": True}
    return _tell_linked(run, cand, handle, worst, violations, attrs)


def _tell_linked(run: SearchRun, cand: Candidate, handle, values, violations, attrs: dict) -> int:
    """Tell a measured trial and link its candidate in the store. Linked before told: a COMPLETE trial
    always has its link; a kill in between leaves a link to a trial that fails stale, whose candidate is
    queued again and reads the same values back from the cache."""
    asked = run.searcher.trial_number(handle)
    if asked is not None:
        _link(run, cand, asked)
    number = run.searcher.tell(handle, values, violations, attrs=attrs)
    if asked is None:
        _link(run, cand, number)
    return number


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
        setting=link_setting(run.measurer, cand, run.metrics),
    )


def link_setting(measurer: Measurer, cand: Candidate, metrics: list[str]) -> dict:
    """The measurement setting a trial of ``cand`` is told from (``Store.link_trial``): the measurer's
    device, its FVD extractor when quality is measured, and the protocol of each measured metric."""
    protocols = measurer.protocols(cand)
    setting = {"device": measurer.device_name,
               "protocols": {m: p for m, p in protocols.items() if m in metrics}}  # fmt: skip
    if set(metrics) & set(QUALITY_METRICS):
        setting["extractor"] = measurer.quality.extractor.name
        # Modelled latency (another device's) beside quality generated here: the row joins both.
        setting["quality_device"] = measurer.quality.device
    return setting


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


def _others_running(study: optuna.Study) -> bool:
    return bool(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def run_one(run: SearchRun, shared: bool = False) -> bool:
    """Ask, screen, measure and tell one trial; ``False`` when the budget is used. On a shared server a
    worker whose budget looks used while other workers' trials still run waits for them: a dead one's
    trial goes stale, is failed (``fail_abandoned``) and its candidate comes back to be measured here."""
    with run.store.exclusive(f"study:{run.study.study_name}"):
        if shared:
            fail_abandoned(run.study, run.storage, shared)
        wait = used_trials(run.study) >= run.trials
        if wait and not (shared and _others_running(run.study)):
            return False
        if not wait:
            cand, handle = run.searcher.ask()
    if wait:
        time.sleep(WAIT_FOR_OTHERS_S)
        return True
    _check_proposal(run, cand, handle)
    attrs = _trial_attrs(run, cand)
    known = {m: lim for m, lim in run.limits.items() if m in COUNT_METRICS}  # exact before measuring
    try:
        with Heartbeat(run.storage, run.study.study_name, run.searcher.trial_number(handle)):
            if known:
                counts = run.measurer.measure(cand, sorted(known))
                counts = {m: counts[m] for m in known}
                if any(counts[m] > lim for m, lim in known.items()):
                    _tell_infeasible(run, cand, handle, counts, attrs)
                    return True
            stopped_at = _screen(run, cand, handle) if run.screens else None
            if stopped_at is not None:
                number = run.searcher.prune(handle, {**attrs, "fidelity": stopped_at})
                _link(run, cand, number)
                return True
            values = run.measurer.measure(cand, run.metrics)
    except MeasurementDeferred as e:
        # Not the candidate's fault: give the trial back and measure the candidate again later.
        run.searcher.abandon(handle)
        run.searcher.requeue(cand, _anchor_attrs(run, cand))
        run.deferred_in_a_row += 1
        now = time.monotonic()
        run.busy_since = now if run.busy_since is None else run.busy_since
        if now - run.busy_since > run.max_busy_s:
            raise Stopped(
                f"{run.deferred_in_a_row} measurements in a row were put off over {now - run.busy_since:.0f} s "
                f"({e}); the machine stays too busy to time latency: rerun the same command when it is "
                "quieter (finished trials are kept)"
            ) from None
        wait = min(BUSY_WAIT_S[1], BUSY_WAIT_S[0] * 2 ** (run.deferred_in_a_row - 1))
        tqdm.write(f"candidate put off ({e}); it is queued again, next try in {wait:.0f} s")
        time.sleep(wait)
        return True
    except MeasurementFailed as e:
        number = run.searcher.tell(handle, None, error=str(e), attrs=attrs)
        tqdm.write(f"trial {number}: measurement failed ({e}); continuing")
        _retry_anchor(run, cand)
        return True
    except KeyboardInterrupt:
        run.searcher.abandon(handle)
        raise
    except Exception as e:  # a bug, not a measurement: the trial ends FAIL with its error, then stop
        run.searcher.tell(handle, None, error=f"{type(e).__name__}: {e}", attrs=attrs)
        raise
    run.deferred_in_a_row, run.busy_since = 0, None
    attrs["metrics"] = values
    attrs["fidelity"] = "full"
    objectives = [values[metric_name(o)] for o in run.objectives]
    _tell_linked(run, cand, handle, objectives, run.violations(values), attrs)
    return True


def _check_proposal(run: SearchRun, cand: Candidate, handle) -> None:
    """A proposed candidate must lie in the space (every segment), at one of the search's step counts:
    one that does not is a searcher's bug, told as a failed trial, and the search stops."""
    ssr = run.measurer.ssr.supernet if run.measurer.ssr else None
    try:
        cand.validate(run.measurer.base.supernet, ssr, run.searcher.encoding.steps_choices)
    except ConfigError as e:
        run.searcher.tell(handle, None, error=f"invalid candidate: {e}")
        raise ValueError(f"searcher {run.searcher.name} proposed an invalid candidate ({e})") from None


def _anchor_attrs(run: SearchRun, cand: Candidate) -> dict:
    return {"anchor_fraction": run.anchors[cand.key]} if cand.key in run.anchors else {}


def _retry_anchor(run: SearchRun, cand: Candidate) -> None:
    """An anchor whose measurement failed is queued again (up to ``MAX_ANCHOR_ATTEMPTS`` in all): a front
    without its SNED-S/M/L/B references cannot be read against the paper's."""
    if cand.key not in run.anchors:
        return
    tries = sum(t.user_attrs.get("candidate_key") == cand.key and bool(t.user_attrs.get("measurement_failed"))
                for t in run.study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))  # fmt: skip
    if tries < MAX_ANCHOR_ATTEMPTS:
        run.searcher.requeue(cand, _anchor_attrs(run, cand))
        tqdm.write(
            f"anchor {run.anchors[cand.key]:g} queued again (attempt {tries + 1} of {MAX_ANCHOR_ATTEMPTS})"
        )


def run_search(run: SearchRun, shared: bool) -> None:
    """Run trials until the study's budget is used (by this and any other worker), with a progress bar.
    On SQLite the study is held by this process for the run (``hold_sqlite_study``)."""
    held = contextlib.nullcontext() if shared else hold_sqlite_study(run.store.url, run.study.study_name)
    with held:
        _run_trials(run, shared)


def _run_trials(run: SearchRun, shared: bool) -> None:
    with run.store.exclusive(f"study:{run.study.study_name}"):
        fail_abandoned(run.study, run.storage, shared)
    recorder = run.measurer.recorder
    bar = tqdm(
        total=run.trials, initial=min(used_trials(run.study), run.trials), desc="search", dynamic_ncols=True
    )
    try:
        while run_one(run, shared):
            bar.n = min(used_trials(run.study), run.trials)  # pruned screens do not use the budget
            measured, cached = _work(run)
            postfix = {"measured": measured, "cached": cached}
            if run.screens:
                postfix["pruned"] = pruned_count(run.study)
            bar.set_postfix(postfix)
    finally:
        bar.close()
    measured, cached = _work(run)
    print(f"worker {recorder.worker}: {measured} measurement groups taken, {cached} read from the store")


def _work(run: SearchRun) -> tuple[int, int]:
    """Measurement groups this worker measured and read from the store, over every fidelity."""
    recorders = [run.measurer.recorder, *(m.recorder for m in run.screens.values())]
    return sum(r.measured for r in recorders), sum(r.cache_hits for r in recorders)


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
    make_searcher: Callable[[optuna.Study, int], Searcher],
    anchors: list[tuple[float, Candidate]],
    attrs: dict,
) -> tuple[optuna.Study, Searcher]:
    """Create or resume study ``name`` and its searcher, ``make_searcher(study, worker)``: ``worker`` counts
    the processes that joined the study before this one (the study attribute ``workers_joined``), so each
    gets its own seed (``worker_seed``). A new study records ``attrs`` and starts with the ``anchors``; a
    resumed one keeps the attributes it was created with. Workers starting together are serialised, so
    exactly one of them sees the study new."""
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
        worker = int(study.user_attrs.get("workers_joined", 0))
        study.set_user_attr("workers_joined", worker + 1)
        searcher = make_searcher(study, worker)
        if new:
            searcher.start(anchors)
    return study, searcher


# Attributes a resumed study must share with the run that created it (what its values mean), and the
# settings that only say how workers cooperate.
IDENTITY_ATTRS = ("objectives", "resolution", "settings", "promotion", "limits", "trajectory")
# What a study created before an identity attribute was recorded had: it searched single subnets.
IDENTITY_DEFAULTS = {"trajectory": {"steps_choices": None, "segments": 1}}
COOPERATION_SETTINGS = ("claim_timeout_s",)


def check_same_protocol(name: str, recorded: dict, attrs: dict) -> None:
    """Refuse to resume study ``name`` under settings other than those it was created with: its values
    would silently mix protocols. One line naming the first difference and the fix."""
    for key in IDENTITY_ATTRS:
        if key not in attrs or (key not in recorded and key not in IDENTITY_DEFAULTS):
            continue  # a study created before the attribute was recorded
        old, new = recorded.get(key, IDENTITY_DEFAULTS.get(key)), attrs[key]
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
    this search, as the encoding represents them (one subnet at every step, at the protocol's steps or,
    when a trajectory search's step choices lack them, the nearest choice: ``CandidateEncoding.single``)."""
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
        cand = encoding.single(encoding.base_space.subnet_at_fraction(f), ssr)  # at the protocol's steps
        out.append((f, encoding.decode(encoding.params(cand))))
    return out

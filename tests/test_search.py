"""The search harness end to end: main command, PostgreSQL workers, resume, cache, searchers, bad input."""

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from harness.store import Store, optuna_storage

REPO = Path(__file__).resolve().parent.parent
FAST = ["--fvd-videos", "4", "--steps", "2", "--threads", "1", "--no-plot"]
ENV = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def search(*args, check=True, timeout=900, **kw):
    proc = subprocess.run(
        [sys.executable, "-m", "harness.search", *args],
        cwd=REPO,
        env=ENV,
        text=True,
        capture_output=True,
        timeout=timeout,
        check=False,
        **kw,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"search failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def completed(url, study):
    s = optuna.load_study(study_name=study, storage=optuna_storage(url))
    return [t for t in s.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]


def measurement_counts(url):
    df = Store(url).measurements_frame()
    return df[df.status == "ok"].groupby(["candidate_id", "metric", "protocol", "device"]).size()


@pytest.mark.slow
def test_main_command_end_to_end_with_plot(tmp_path):
    url = f"sqlite:///{tmp_path}/h.db"
    out = search("--objective", "latency", "--trials", "3", "--storage", url, *FAST[:-1]).stdout
    assert "Pareto front" in out and "front plot written to" in out
    plot = Path(out.split("front plot written to ")[1].split()[0])
    assert plot.is_file() and plot.stat().st_size > 1000
    trials = completed(url, "pixel-base-tiny-16px-latency+fvd-tpe-seed0")
    assert len(trials) == 3 and all(len(t.values) == 2 for t in trials)
    # A new study starts with the paper's 40/60/80% balanced subnets (as many anchors as trials allow).
    anchors = sorted(t.user_attrs["anchor_fraction"] for t in trials if "anchor_fraction" in t.user_attrs)
    assert anchors == [0.4, 0.6, 0.8]
    for t in trials:
        assert t.user_attrs["param_fraction"] == pytest.approx(t.user_attrs["anchor_fraction"], abs=0.03)


@pytest.mark.slow
def test_cache_second_study_measures_nothing(tmp_path):
    url = f"sqlite:///{tmp_path}/h.db"
    search("--objective", "latency", "--trials", "3", "--storage", url, "--study", "a", *FAST)
    before = measurement_counts(url)
    out = search("--objective", "latency", "--trials", "3", "--storage", url, "--study", "b", *FAST)
    after = measurement_counts(url)
    assert before.equals(after), "the second, identical search measured something again"
    assert ": 0 measurement groups taken" in out.stdout, out.stdout[-500:]  # the measurer's own count
    assert len(completed(url, "b")) == 3


@pytest.mark.slow
def test_optuna_and_evolution_share_one_store(tmp_path):
    url = f"sqlite:///{tmp_path}/h.db"
    search("--objective", "latency", "--trials", "3", "--storage", url, "--study", "t", *FAST)
    search(
        "--objective",
        "latency",
        "--trials",
        "12",
        "--searcher",
        "evolution",
        "--storage",
        url,
        "--study",
        "e",
        *FAST,
    )
    df = Store(url).measurements_frame()
    assert {"tpe", "evolution"} <= {s for row in df.searchers for s in row}
    evo = completed(url, "e")
    assert len(evo) == 12 and {t.user_attrs["searcher"] for t in evo} == {"evolution"}


def _complete_count(db: Path) -> int:
    """Completed trials, read with a plain read-only SQLite connection (never blocks the writer)."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return con.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


@pytest.mark.slow
def test_kill_and_resume_finishes_remaining_trials(tmp_path):
    url = f"sqlite:///{tmp_path}/h.db"
    args = [
        sys.executable,
        "-m",
        "harness.search",
        "--objective",
        "latency",
        "--trials",
        "3",
        "--storage",
        url,
        "--study",
        "k",
        *FAST,
    ]
    proc = subprocess.Popen(args, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and _complete_count(tmp_path / "h.db") < 1:
        time.sleep(1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(completed(url, "k")) < 4
    search("--objective", "latency", "--trials", "4", "--storage", url, "--study", "k", *FAST)
    assert len(completed(url, "k")) == 4
    trials = optuna.load_study(study_name="k", storage=optuna_storage(url)).get_trials(deepcopy=False)
    assert not [t for t in trials if t.state == TrialState.RUNNING], "the killed run's trial was left running"
    for dead in [t for t in trials if t.user_attrs.get("error") == "its worker ended without finishing it"]:
        again = [t for t in trials if t.user_attrs.get("requeued_from") == dead.number]
        assert again and again[0].state == TrialState.COMPLETE, (
            "the killed trial's candidate was not measured"
        )


@pytest.mark.slow
@pytest.mark.postgres
def test_three_postgres_workers_share_one_study(postgres_url):
    args = [
        sys.executable,
        "-m",
        "harness.search",
        "--objective",
        "latency",
        "--trials",
        "6",
        "--storage",
        postgres_url,
        "--study",
        "shared",
        *FAST,
    ]
    Store.open(postgres_url).close()  # create the schema once, so the workers race on trials, not DDL
    workers = [
        subprocess.Popen(args, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    taken = 0
    for w in workers:
        out, err = w.communicate(timeout=900)
        assert w.returncode == 0, err[-2000:]
        taken += int(out.split(f":{w.pid}: ")[1].split(" measurement groups taken")[0])
    study = optuna.load_study(study_name="shared", storage=optuna_storage(postgres_url))
    trials = study.get_trials(deepcopy=False)
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 6
    abandoned = [t for t in trials if t.state == TrialState.FAIL and "error" not in t.user_attrs]
    assert len(trials) == 6 + len(abandoned), "a worker asked for more trials than requested"
    # The work the workers did, by their own counters: every group one of them measured is one finished
    # group in the store; a group measured twice would count twice here and once there.
    with Store(postgres_url).session() as session:
        finished = session.execute(
            sqlalchemy.text("SELECT count(*) FROM sned_claim WHERE status = 'done'")
        ).scalar()
    assert taken == finished, f"{taken} groups measured for {finished} finished ones"
    keys = {t.user_attrs["candidate_key"] for t in trials}
    df = Store(postgres_url).measurements_frame()
    fvd = df[(df.metric == "fvd") & (df.status == "ok")]
    assert set(fvd.candidate_key) == keys, "a trial's measurement is missing from the store"


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--objective", "speed"], "unknown objective 'speed'"),
        (["--resolution", "24"], "resolution 24"),
        (["--max-params", "10"], "--max-params"),
        (["--storage", "/proc/forbidden/x.db"], ""),
        (["--storage", "postgresql://user:secret@:notaport/db"], ""),
        (["--checkpoint", "/nonexistent/ckpt"], "/nonexistent/ckpt"),
    ],
)
def test_bad_input_one_line_no_traceback_store_untouched(tmp_path, argv, needle):
    db = tmp_path / "h.db"
    search(
        "--objective", "latency", "--trials", "1", "--storage", str(db), "--study", "x", *FAST
    ) if needle == "--max-params" else None
    before = _digest(db)
    args = argv if "--storage" in argv else [*argv, "--storage", str(db)]
    proc = search(*args, "--trials", "1", *FAST, check=False, timeout=300)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line and "CUDA" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "secret" not in proc.stderr + proc.stdout
    assert needle in lines[0]
    assert _digest(db) == before


@pytest.mark.slow
def test_resume_under_other_settings_is_refused_in_one_line(tmp_path):
    db = tmp_path / "h.db"

    def run(study, steps="2", videos="4", check=True):
        return search(
            "--objective", "latency", "--trials", "1", "--storage", str(db), "--study", study,
            "--real-videos", "16", "--fvd-videos", videos, "--steps", steps, "--threads", "1",
            "--no-plot", check=check,
        )  # fmt: skip

    run("p")
    before = _digest(db)
    for changed, kw in (("steps", {"steps": "3"}), ("fvd_videos", {"videos": "5"})):
        proc = run("p", check=False, **kw)
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert proc.returncode != 0 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert f"settings.{changed}=" in lines[0] and "--study NEW" in lines[0], lines[0]
    assert _digest(db) == before, "a refused resume wrote to the store"
    run("p-steps3", steps="3")  # the same settings as a new study run

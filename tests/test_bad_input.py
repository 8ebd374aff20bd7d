"""Bad input to the CLIs, run as real subprocesses: one ``error:`` line naming the problem and the fix,
a non-zero exit, no traceback, nothing written; and the export's atomic directory."""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch

from harness.candidates import Candidate
from harness.store import Store, optuna_storage, validate_storage_url

REPO = Path(__file__).resolve().parent.parent
CHECKPOINT = REPO / "results" / "checkpoints" / "pixel-base-tiny"
ENV = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
FAST = ["--fvd-videos", "4", "--steps", "2", "--threads", "1"]


def run(module: str, *args: str, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO, env=ENV, text=True, capture_output=True, timeout=300, check=False, preexec_fn=preexec_fn,
    )  # fmt: skip


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line of a refused command (torch's CUDA-probe warning aside)."""
    assert proc.returncode != 0, proc.stdout[-1000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line and "CUDA_HOME" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


def tree(path: Path) -> dict[str, str]:
    """Every file under ``path`` with the digest of its content (directories as '')."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        for p in sorted(path.rglob("*"))
    }


# Measurement options of search and evaluate (MeasureSettings, load_chain).

DEVICE_CASES = [
    pytest.param(
        ["--device", "cuda"], "cuda",
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available: not bad input here"),
    ),
    (["--device", "tpu"], "tpu"),
]  # fmt: skip
SETTINGS_CASES = [
    (["--threads", "0"], "--threads"),
    (["--steps", "0"], "--steps"),
    (["--fvd-videos", "1"], "--fvd-videos"),
    *DEVICE_CASES,
]


@pytest.mark.parametrize(
    "argv,needle", [*SETTINGS_CASES, (["--resolution", "0"], "resolution 0")], ids=lambda v: str(v)
)
def test_search_refuses_bad_measurement_options(tmp_path: Path, argv: list[str], needle: str) -> None:
    proc = run(
        "harness.search", "--objective", "latency", "--trials", "1", "--no-plot",
        "--storage", str(tmp_path / "h.db"), *FAST, *argv,
    )  # fmt: skip
    assert needle in error_line(proc)
    assert list(tmp_path.iterdir()) == [], "a refused search wrote something"


@pytest.mark.parametrize("argv,needle", SETTINGS_CASES, ids=lambda v: str(v))
def test_evaluate_refuses_bad_measurement_options(tmp_path: Path, argv: list[str], needle: str) -> None:
    proc = run(
        "harness.evaluate", "--metrics", "params,latency", "--storage", str(tmp_path / "h.db"), *FAST, *argv
    )
    assert needle in error_line(proc)
    assert list(tmp_path.iterdir()) == [], "a refused evaluate wrote something"


# Read-only commands: a mistyped --storage creates nothing.


@pytest.mark.parametrize(
    "argv",
    [
        ["harness.export", "--study", "s", "--trial", "0", "--out", "OUT"],
        ["harness.plot", "--study", "s", "--out", "OUT"],
        ["harness.analysis", "reproduce", "--study", "s"],
    ],
    ids=lambda v: v[0].split(".")[1],
)
def test_read_only_commands_refuse_a_missing_store(tmp_path: Path, argv: list[str]) -> None:
    typo = tmp_path / "runs" / "harnes.db"
    args = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    line = error_line(run(*args, "--storage", str(typo)))
    assert str(typo) in line and "--storage" in line, line
    assert list(tmp_path.iterdir()) == [], "a read-only command created something"


# Export.


@pytest.fixture(scope="module")
def study_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A store holding study 's' with one completed trial: the shipped tiny base's smallest subnet (the
    trial is added through Optuna's API; the export only reads it)."""
    from harness.models import load_bundle

    url = validate_storage_url(tmp_path_factory.mktemp("store") / "h.db")
    Store.open(url).close()
    study = optuna.create_study(study_name="s", storage=optuna_storage(url), directions=["minimize"] * 2)
    study.set_user_attr("checkpoint", str(CHECKPOINT))
    candidate = Candidate(load_bundle(CHECKPOINT).supernet.space.smallest())
    study.add_trial(
        optuna.trial.create_trial(
            values=[1.0, 2.0], user_attrs={"candidate": candidate.to_json(), "description": "smallest"}
        )
    )
    return url


def export(url: str, out: Path, preexec_fn=None) -> subprocess.CompletedProcess:
    args = ["--storage", url, "--study", "s", "--trial", "0", "--out", str(out)]
    return run("harness.export", *args, preexec_fn=preexec_fn)


def test_export_writes_the_whole_directory(study_store: str, tmp_path: Path) -> None:
    out = tmp_path / "deep" / "exp"
    proc = export(study_store, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert set(tree(out)) == {"base", "base/config.json", "base/model.safetensors", "candidate.json"}
    assert os.listdir(tmp_path / "deep") == ["exp"], "a temporary directory was left beside --out"


def _file_size_limit() -> None:
    # A real I/O failure midway through the weights (EFBIG, as from a full disk), not a mock: the
    # limit is below the smallest subnet's safetensors (~0.8 MB) and above every other file written.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_export_failing_midway_leaves_nothing(study_store: str, tmp_path: Path) -> None:
    out = tmp_path / "deep" / "exp"
    line = error_line(export(study_store, out, preexec_fn=_file_size_limit))
    assert str(out) in line and "nothing was written" in line, line
    assert list(tmp_path.iterdir()) == [], "a failed export left files or directories behind"


@pytest.mark.parametrize("kind", ["file", "non-empty directory"])
def test_export_refuses_an_existing_out(study_store: str, tmp_path: Path, kind: str) -> None:
    out = tmp_path / "exp"
    if kind == "file":
        out.write_text("keep me")
    else:
        (out / "base").mkdir(parents=True)
        (out / "base" / "mine.txt").write_text("keep me")
    before = tree(tmp_path)
    line = error_line(export(study_store, out))
    assert str(out) in line and ("existing file" if kind == "file" else "not empty") in line, line
    assert tree(tmp_path) == before


def test_export_refuses_a_checkpoint_other_than_the_one_measured(tmp_path: Path) -> None:
    """A trial linked in the store to the shipped base's hash, exported with a copy whose weights were
    changed (a retrained file under the same path): refused in one line, nothing written; the untouched
    file exports."""
    import shutil

    from safetensors.torch import load_file, save_file

    from harness.measurement.recorder import Recorder, register_models
    from harness.models import load_bundle

    url = validate_storage_url(tmp_path / "h.db")
    store = Store.open(url)
    base = load_bundle(CHECKPOINT)
    cand = Candidate(base.supernet.space.smallest())
    recorder = Recorder(store, register_models(store, base, None), "test", 0, 0.0)
    cid = recorder.candidate_id(cand, cand.params(base.supernet, None), "smallest")
    study = optuna.create_study(study_name="m", storage=optuna_storage(url), directions=["minimize"] * 2)
    study.set_user_attr("checkpoint", str(CHECKPOINT))
    study.add_trial(optuna.trial.create_trial(values=[1.0, 2.0], user_attrs={"candidate": cand.to_json()}))
    store.link_trial(cid, "m", "tpe", trial_number=0)
    store.close()
    changed = tmp_path / "retrained"
    shutil.copytree(CHECKPOINT, changed)
    weights = load_file(changed / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-3
    save_file(weights, changed / "model.safetensors")
    args = ["--storage", url, "--study", "m", "--trial", "0"]
    line = error_line(
        run("harness.export", *args, "--checkpoint", str(changed), "--out", str(tmp_path / "a"))
    )
    assert "is not the base checkpoint trial 0 was measured with" in line and "--checkpoint" in line, line
    assert not (tmp_path / "a").exists()
    proc = run("harness.export", *args, "--out", str(tmp_path / "b"))
    assert proc.returncode == 0, proc.stderr[-2000:]

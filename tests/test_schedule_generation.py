"""Trajectory schedules (issue 20) in generation: the one supernet switched between subnets per step
equals the exported static subnets run per step, differs from either subnet alone, and a one-segment
schedule is the plain path; ``harness.export`` writes a schedule as one directory that
``harness.sample`` runs. All on the shipped tiny base at 16 px, 4 DDIM steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from PIL import Image

from harness import export as export_cli
from harness import sample as sample_cli
from harness import schedule_files
from harness.candidates import Candidate, Segment
from harness.diffusion import bind_subnet, ddim_sample
from harness.models import in_memory, load_bundle
from harness.paths import DEFAULT_BASE
from harness.pipeline import Chain, generate, video_seeds
from harness.store import Store, optuna_storage, validate_storage_url

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
PROMPTS = ["a small blue circle moving up", "a large red square moving left"]
STEPS = 4


@pytest.fixture(scope="module")
def base():
    torch.set_num_threads(1)
    return load_bundle(DEFAULT_BASE)


@pytest.fixture(scope="module")
def text(base):
    return base.text_encoder.load("cpu")


@pytest.fixture(scope="module")
def schedule(base) -> Candidate:
    """The smallest subnet for steps 1-2, a 60 % subnet for steps 3-4."""
    space = base.supernet.space
    return Candidate.schedule(STEPS, [(2, space.smallest()), (4, space.subnet_at_fraction(0.6))])


def _generate(chain: Chain) -> torch.Tensor:
    return generate(chain, PROMPTS, steps=STEPS, video_seeds=video_seeds(7, 0, len(PROMPTS)))


@pytest.fixture(scope="module")
def supernet_video(base, text, schedule) -> torch.Tensor:
    return _generate(Chain(base, None, text, base_segments=schedule.segments))


def test_supernet_schedule_equals_the_exported_static_subnets(base, text, schedule, supernet_video):
    nets = tuple(base.supernet.extract(seg.subnet) for seg in schedule.segments)
    static = in_memory(nets[0], base.schedule, base.text_encoder)
    video = _generate(Chain(static, None, text, base_segments=schedule.segments, base_networks=nets))
    assert video.shape == (len(PROMPTS), 3, base.frames, 16, 16)
    assert (video - supernet_video).abs().max().item() <= 1e-5


def test_the_schedule_really_switches_subnets(base, text, schedule, supernet_video):
    """Neither subnet alone gives the schedule's video: the switch between steps happens."""
    for seg in schedule.segments:
        alone = _generate(Chain(base, None, text, base_subnet=seg.subnet))
        assert (alone - supernet_video).abs().max().item() > 1e-2, f"steps {seg.first}-{seg.last}"


def test_one_segment_through_the_schedule_path_is_the_plain_path_bit_for_bit(base, text, schedule):
    cfg = schedule.segments[1].subnet
    plain = _generate(Chain(base, None, text, base_subnet=cfg))
    one = _generate(Chain(base, None, text, base_segments=(Segment(1, STEPS, cfg),)))
    assert torch.equal(plain, one)


def test_per_step_denoisers_in_ddim_sample(base):
    """``ddim_sample`` with ``steps`` copies of one denoiser is the single-denoiser call; a list of the
    wrong length is a one-line ValueError."""
    net = bind_subnet(base.supernet, base.supernet.space.smallest())
    shape = (1, 3, base.frames, 16, 16)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    one = ddim_sample(net, shape, None, None, steps=2, noise=noise)
    assert torch.equal(one, ddim_sample([net, net], shape, None, None, steps=2, noise=noise))
    with pytest.raises(ValueError, match="got 3 per-step denoisers for 2 steps"):
        ddim_sample([net] * 3, shape, None, None, steps=2, noise=noise)


def test_generation_refuses_other_steps_than_the_schedule(base, schedule):
    chain = Chain(base, None, None, base_segments=schedule.segments)
    with pytest.raises(ValueError, match=r"end at step 4 but generation runs 6 steps"):
        generate(chain, [""], steps=6)
    with pytest.raises(ValueError, match="one per segment"):
        Chain(base, None, None, base_segments=schedule.segments, base_networks=(base.network,))


# Export and sample.


def _store(tmp_path: Path, cand: Candidate) -> str:
    """A store with study 's' whose trial 0 measured ``cand`` (added through Optuna's API: the export
    only reads the trial)."""
    url = validate_storage_url(tmp_path / "h.db")
    Store.open(url).close()
    study = optuna.create_study(study_name="s", storage=optuna_storage(url), directions=["minimize"] * 2)
    study.set_user_attr("checkpoint", str(DEFAULT_BASE))
    attrs = {"candidate": cand.to_json(), "description": "schedule"}
    study.add_trial(optuna.trial.create_trial(values=[1.0, 2.0], user_attrs=attrs))
    return url


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=ENV, text=True,
                          capture_output=True, timeout=300, check=False)  # fmt: skip


def _frames(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_export_then_sample_a_schedule(base, text, schedule, supernet_video, tmp_path):
    """``python -m harness.export`` writes the schedule as one directory (a folder per segment subnet and
    schedule.json); ``python -m harness.sample`` runs it, and runs ``--schedule candidate.json`` on the
    supernet, to the same video."""
    url, out = _store(tmp_path, schedule), tmp_path / "exp"
    proc = _run("harness.export", "--storage", url, "--study", "s", "--trial", "0", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "candidate.json",
        "schedule.json",
        "segment1",
        "segment2",
    ]
    record = json.loads((out / "schedule.json").read_text())
    assert [(s["first_step"], s["last_step"], s["folder"]) for s in record["segments"]] == [
        (1, 2, "segment1"),
        (3, 4, "segment2"),
    ]
    assert json.loads((out / "candidate.json").read_text())["steps"] == STEPS

    # The exported files, loaded as sample loads them, give the supernet's video.
    steps, pairs = schedule_files.read_schedule(out)
    nets = tuple(load_bundle(folder).network for _, folder in pairs)
    exported = Chain(load_bundle(pairs[0][1]), None, text, base_segments=tuple(s for s, _ in pairs),
                     base_networks=nets)  # fmt: skip
    assert steps == STEPS and (_generate(exported) - supernet_video).abs().max().item() <= 1e-5

    # The commands: the exported directory as a subprocess, the supernet with --schedule in process.
    common = ["--prompt", PROMPTS[0], "--seed", "3"]
    proc = _run("harness.sample", "--checkpoint", str(out), *common, "--out", str(tmp_path / "a.gif"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    sample_cli.main(["--checkpoint", str(DEFAULT_BASE), "--schedule", str(out / "candidate.json"),
                     *common, "--out", str(tmp_path / "b.gif")])  # fmt: skip
    a, b = _frames(tmp_path / "a.png"), _frames(tmp_path / "b.png")
    assert a.shape == b.shape and np.abs(a - b).max() <= 1  # 8-bit frames of videos within 1e-5


def test_sample_refuses_bad_schedule_input(base, schedule, tmp_path):
    """One-line errors, nothing written: a --steps other than the schedule's, a file that is not a
    trajectory, a schedule.json that names a missing folder."""
    good = tmp_path / "cand.json"
    good.write_text(schedule.to_json())
    gif = tmp_path / "x.gif"
    argv = ["--checkpoint", str(DEFAULT_BASE), "--prompt", "x", "--out", str(gif)]
    with pytest.raises(ValueError, match="--steps 6 differs from the schedule's 4 steps"):
        sample_cli.main([*argv, "--schedule", str(good), "--steps", "6"])
    plain = tmp_path / "plain.json"
    plain.write_text(Candidate(base.supernet.space.smallest()).to_json())
    with pytest.raises(ValueError, match="not a trajectory candidate"):
        sample_cli.main([*argv, "--schedule", str(plain)])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "schedule.json").write_text(json.dumps(schedule_files.schedule_record(schedule)))
    with pytest.raises(ValueError, match="holds no model"):
        sample_cli.main(["--checkpoint", str(broken), "--prompt", "x", "--out", str(gif)])
    assert not gif.exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "broken",
        "cand.json",
        "plain.json",
    ]


def test_one_subnet_with_its_own_steps_exports_as_today_and_records_them(base, tmp_path):
    cand = Candidate(base.supernet.space.smallest(), steps=6)
    url, out = _store(tmp_path, cand), tmp_path / "exp"
    export_cli.main(["--storage", url, "--study", "s", "--trial", "0", "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["base", "candidate.json"]
    assert json.loads((out / "candidate.json").read_text())["steps"] == 6
    assert sample_cli._recorded_steps(out / "base") == 6


def test_segments_with_the_same_subnet_share_one_folder(base, tmp_path):
    """small, mid, small: two folders; the third segment runs the first one's network."""
    space = base.supernet.space
    small, mid = space.smallest(), space.subnet_at_fraction(0.6)
    cand = Candidate.schedule(3, [(1, small), (2, mid), (3, small)])
    url, out = _store(tmp_path, cand), tmp_path / "exp"
    export_cli.main(["--storage", url, "--study", "s", "--trial", "0", "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == [
        "candidate.json",
        "schedule.json",
        "segment1",
        "segment2",
    ]
    steps, pairs = schedule_files.read_schedule(out)
    assert steps == 3 and [f.name for _, f in pairs] == ["segment1", "segment2", "segment1"]
    assert [s.subnet for s, _ in pairs] == [small, mid, small]

"""Algorithm 1 training: frozen-rest updates, resume bit-exactness, data parallel, warm-up, options."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.training.checkpoint import find_checkpoint, load_checkpoint
from harness.training.loop import Trainer, TrainOptions, train, warmup_limits

from .conftest import randomize_

REPO = Path(__file__).resolve().parent.parent


def _opts(tmp_path, **kw) -> TrainOptions:
    base = {
        "family": "pixel-base",
        "preset": "tiny",
        "text_encoder": "none",
        "num_videos": 8,
        "batch": 2,
        "steps": 3,
        "warmup_steps": 0,
        "checkpoint_every": 1,
        "out": str(tmp_path / "run"),
        "lr": 1e-3,
        "weight_decay": 0.01,
    }
    base.update(kw)
    return TrainOptions(**base)


def _per_entry(tensors: dict[str, torch.Tensor], shapes: dict) -> dict[str, torch.Tensor]:
    """State tensors with cell-grid counts (``.step_cuts`` + ``.step_counts``, ``.ema_cuts`` +
    ``.ema_counts``) expanded to the per-entry form (``.step``, ``.ema_count``) the entry checks read."""
    from harness.training.cell_counts import CellCounts

    out = {}
    for key, value in tensors.items():
        for kind, entry in (("step", "step"), ("ema", "ema_count")):
            if key.endswith(f".{kind}_cuts"):
                name = key[: -len(f".{kind}_cuts")]
                cells = CellCounts.from_tensors(shapes[name], value, tensors[f"{name}.{kind}_counts"])
                out[f"{name}.{entry}"] = cells.per_entry()
        if not key.endswith(("_cuts", "_counts")):
            out[key] = value.clone()
    return out


def _snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    shapes = {n: p.shape for n, p in trainer.net.named_parameters()}
    out = {f"w:{k}": v.detach().clone() for k, v in trainer.net.state_dict().items()}
    out.update({f"ema:{k}": v for k, v in _per_entry(trainer.ema.state_dict(), shapes).items()})
    opt = _per_entry(trainer.optimizer.optimizer_state_tensors(), shapes)
    out.update({f"opt:{k}": v for k, v in opt.items()})
    return out


def test_warmup_schedule_steps_down_to_forty_percent():
    assert warmup_limits(0, 600) == (1.0, 1.0)
    assert warmup_limits(99, 600) == (1.0, 1.0)
    assert warmup_limits(100, 600) == (0.9, 0.9)
    assert warmup_limits(599, 600) == (0.5, 0.5)
    assert warmup_limits(600, 600) == (0.4, 0.4)
    assert warmup_limits(10**6, 600) == (0.4, 0.4)
    floors = [warmup_limits(s, 600)[0] for s in range(0, 700, 10)]
    assert floors == sorted(floors, reverse=True)


@pytest.mark.parametrize("family", ["pixel-base", "pixel-ssr"])
def test_step_leaves_every_unsampled_entry_bit_identical(tmp_path, family):
    trainer = Trainer(_opts(tmp_path, family=family))
    trainer.train_step()
    trainer.train_step()  # moments are now non-zero almost everywhere
    while True:  # a step whose subnet is strictly smaller than the supernet
        from harness.training.loop import subnets_for_step

        cfg = subnets_for_step(trainer.net, trainer.opts, trainer.step)[0]
        if trainer.net.space.param_fraction(cfg) < 0.9:
            break
        trainer.step += 1
    masks = trainer.net.active_masks(cfg)
    before = _snapshot(trainer)
    trainer.train_step()
    after = _snapshot(trainer)
    moved_inside = 0
    for key, old in before.items():
        kind, name = key.split(":", 1)
        pname = name
        for suffix in (".exp_avg_sq", ".exp_avg", ".step", ".ema_count", ".ema"):
            if kind != "w" and pname.endswith(suffix):
                pname = pname[: -len(suffix)]
                break
        mask = masks.get(pname)
        new = after[key]
        if mask is None:
            assert torch.equal(old, new), f"{key}: unused by the subnet, but changed"
            continue
        assert torch.equal(old[~mask], new[~mask]), f"{key}: entries outside the subnet changed"
        moved_inside += int((old[mask] != new[mask]).any())
    assert moved_inside > 0


def test_resume_is_bit_exact(tmp_path):
    straight = train(_opts(tmp_path / "a", steps=4), progress=False)
    train(_opts(tmp_path / "b", steps=2), progress=False)  # "killed" after 2 steps ...
    resumed = train(_opts(tmp_path / "b", steps=4, resume=True), progress=False)  # ... and resumed
    assert resumed.step == 4
    for (k, a), (_, b) in zip(straight.net.state_dict().items(), resumed.net.state_dict().items()):
        assert torch.equal(a, b), k
    sa, sb = straight.optimizer.optimizer_state_tensors(), resumed.optimizer.optimizer_state_tensors()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ea, eb = straight.ema.state_dict(), resumed.ema.state_dict()
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


def test_checkpoint_survives_a_kill_during_save(tmp_path):
    trainer = train(_opts(tmp_path, steps=1), progress=False)
    run = Path(trainer.opts.out)
    (run / "checkpoint").rename(run / "checkpoint.old")  # a kill between the two renames of a save
    (run / "checkpoint.tmp").mkdir()
    (run / "checkpoint.tmp" / "model.safetensors").write_bytes(b"half-written")
    found = find_checkpoint(run)
    assert found == run / "checkpoint.old"
    assert load_checkpoint(found)["training"]["step"] == 1


def test_sandwich_and_inplace_distillation(tmp_path):
    plain = Trainer(_opts(tmp_path / "p"))
    # Text-conditioned, with guidance dropout: every subnet's backward goes through the null-text mix.
    text = {"text_encoder": "minilm", "cond_drop": 0.5}
    sandwich = Trainer(_opts(tmp_path / "s", sandwich=True, **text))
    distill = Trainer(_opts(tmp_path / "d", sandwich=True, inplace_distill=True, **text))
    from harness.training.loop import subnets_for_step

    subs = subnets_for_step(sandwich.net, sandwich.opts, 0)
    assert subs[0] == sandwich.net.space.largest() and subs[1] == sandwich.net.space.smallest()
    assert len(subnets_for_step(plain.net, plain.opts, 0)) == 1
    s_stats, d_stats = sandwich.train_step(), distill.train_step()
    # Same data and subnets; distillation changes only the targets of the non-largest subnets.
    assert s_stats["Loss/train"] != d_stats["Loss/train"]
    w_s = dict(sandwich.net.named_parameters())
    w_d = dict(distill.net.named_parameters())
    assert any(not torch.equal(w_s[k], w_d[k]) for k in w_s)


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    common = [
        "--family",
        "pixel-base",
        "--text-encoder",
        "none",
        "--num-videos",
        "8",
        "--batch",
        "4",
        "--steps",
        "2",
        "--warmup-steps",
        "0",
        "--checkpoint-every",
        "2",
        "--threads",
        "1",
    ]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port=29533",
            "-m",
            "harness.train",
            *common,
            "--out",
            str(tmp_path / "ddp"),
        ],
        check=True,
        env=env,
        cwd=REPO,
        capture_output=True,
        timeout=600,
    )
    subprocess.run(
        [sys.executable, "-m", "harness.train", *common, "--out", str(tmp_path / "one")],
        check=True,
        env=env,
        cwd=REPO,
        capture_output=True,
        timeout=600,
    )
    a = load_checkpoint(tmp_path / "ddp" / "checkpoint")
    b = load_checkpoint(tmp_path / "one" / "checkpoint")
    la = [h["Loss/train"] for h in a["training"]["history_tail"]]
    lb = [h["Loss/train"] for h in b["training"]["history_tail"]]
    assert la == pytest.approx(lb, rel=1e-4, abs=1e-6)
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-5), k


def test_offset_noise_shifts_each_channel_by_a_constant(tmp_path):
    """--offset-noise adds one N(0, s^2) draw per sample and channel, constant over frames and pixels; every
    other draw of the step (clips, noise, timesteps, dropout) is unchanged, so 0 is exactly the plain batch."""
    from harness.data import build_dataset
    from harness.training.batches import ClipSource, make_batch

    source = ClipSource(build_dataset("synthetic", "train", frames=12, resolution=16, seed=0, num_videos=8))
    kw = {"seed": 0, "step": 5, "resolution": 16, "global_batch": 4, "cond_drop": 0.5}
    plain, shifted = make_batch(source, None, **kw), make_batch(source, None, offset_noise=0.1, **kw)
    assert torch.equal(plain.timesteps, shifted.timesteps) and torch.equal(plain.drop, shifted.drop)
    offset = shifted.noise - plain.noise  # (B, C, T, H, W)
    per_channel = offset.mean(dim=(2, 3, 4), keepdim=True)
    assert torch.allclose(offset, per_channel.expand_as(offset), atol=1e-6)
    assert per_channel.abs().min() > 0 and per_channel.abs().max() < 0.5
    assert torch.equal(make_batch(source, None, offset_noise=0.0, **kw).noisy, plain.noisy)
    proc = subprocess.run(
        [sys.executable, "-m", "harness.train", "--offset-noise", "-1", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode != 0 and "--offset-noise -1.0 is negative" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_init_from_a_supernet_saved_without_the_zero_initialised_parts(tmp_path):
    """--init accepts a supernet saved before the tiny base gained its frame embedding, pooled text and
    modulated and moving position embeddings (they start at zero) and refuses one of another architecture
    with a one-line error."""
    from search_spaces import build_supernet

    old = build_supernet("pixel-base", "tiny")
    old_hyper = dataclasses.replace(old.hyper, conditioning=())
    old = randomize_(build_supernet("pixel-base", "tiny", hyper=old_hyper))  # gradients reach it
    old.save_pretrained(tmp_path / "old")
    trainer = Trainer(_opts(tmp_path, init=str(tmp_path / "old")))
    added = [p for n, p in trainer.net.conditioning.named_parameters() if not n.endswith(".bias")]
    assert all(p.count_nonzero() == 0 for p in added)
    assert torch.equal(trainer.net.state_dict()["conv_in.weight"], old.state_dict()["conv_in.weight"])
    trainer.train_step()
    trainer.train_step()  # the modulation's and velocity's gradients flow through the embeddings they feed
    assert all(p.count_nonzero() for p in added)  # trained
    other = build_supernet("pixel-base", "tiny", hyper=dataclasses.replace(old_hyper, model_channels=16))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="does not match this pixel-base/tiny supernet .*size mismatch"):
        Trainer(_opts(tmp_path / "o", init=str(tmp_path / "other")))


def test_late_timestep_bias_draws_the_noisiest_timesteps_more_often():
    from harness.data import build_dataset
    from harness.training.batches import ClipSource, make_batch, timestep_weights

    assert timestep_weights(0.25, 1.0) is None  # uniform: the paper's draw, unchanged
    w = timestep_weights(0.25, 3.0)
    assert w.sum().item() == pytest.approx(1.0) and w[750] == pytest.approx(3 * w[749])
    source = ClipSource(build_dataset("synthetic", "train", frames=12, resolution=16, seed=0, num_videos=8))
    draws = torch.cat(
        [
            make_batch(source, None, seed=0, step=s, resolution=16, global_batch=64, t_weights=w).timesteps
            for s in range(8)
        ]
    )
    late = (draws >= 750).float().mean().item()
    assert 0.4 < late < 0.6  # expected 0.75 / 1.5 = 0.5 (uniform: 0.25)
    with pytest.raises(ValueError, match="portion in \\(0, 1\\] and a positive multiplier"):
        timestep_weights(0.0, 3.0)


def _legacy_name(key: str) -> str:
    from search_spaces.conditioning import legacy_key_map

    for old, new in legacy_key_map().items():
        if key == new or key.startswith(new + "."):
            return old + key[len(new) :]
    return key


def test_resume_of_a_run_saved_with_legacy_parameter_names_is_bit_exact(tmp_path):
    """A run checkpointed before the conditioning extras moved under ``conditioning.`` (old parameter
    names in weights, EMA, optimizer state and its saved groups; old flags in the config) resumes to the
    same bits as a straight run."""
    import json

    from safetensors.torch import load_file, save_file

    from harness.training.checkpoint import find_checkpoint

    straight = train(_opts(tmp_path / "a", steps=3), progress=False)
    train(_opts(tmp_path / "b", steps=2), progress=False)
    ckpt = find_checkpoint(tmp_path / "b" / "run")
    for name in ("model", "ema", "optimizer"):
        tensors = load_file(str(ckpt / f"{name}.safetensors"))
        legacy = {}
        for k, v in tensors.items():
            head, dot, tail = k.partition(":") if ":" in k else (k, "", "")
            legacy[_legacy_name(head) + dot + tail] = v
        assert legacy.keys() != tensors.keys()
        save_file(legacy, str(ckpt / f"{name}.safetensors"))
    training = json.loads((ckpt / "training.json").read_text())
    for group in training["optimizer"]["param_groups"]:
        group["param_names"] = [_legacy_name(n) for n in group["param_names"]]
    (ckpt / "training.json").write_text(json.dumps(training))
    config = json.loads((ckpt / "config.json").read_text())
    config["hyper"].update(dict.fromkeys(config["hyper"].pop("conditioning"), True))
    (ckpt / "config.json").write_text(json.dumps(config))

    resumed = train(_opts(tmp_path / "b", steps=3, resume=True), progress=False)
    assert resumed.step == 3
    for (k, a), (_, b) in zip(straight.net.state_dict().items(), resumed.net.state_dict().items()):
        assert torch.equal(a, b), k
    sa, sb = straight.optimizer.optimizer_state_tensors(), resumed.optimizer.optimizer_state_tensors()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

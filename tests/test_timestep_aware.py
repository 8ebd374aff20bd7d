"""Timestep-aware subnet sampling (``--timestep-aware``): off = the paper's draws bit for bit; on = each
step's timesteps follow its subnet's band (small subnets noisy, large ones clean); recorded and resumable."""

import json
import math

import pytest
import torch

from harness.diffusion import NUM_TRAIN_TIMESTEPS
from harness.train import build_parser, main
from harness.training.batches import draw_step, timestep_weights
from harness.training.checkpoint import find_checkpoint, load_checkpoint
from harness.training.loop import Trainer, TrainOptions, subnets_for_step, train
from harness.training.timestep_bands import (
    band_bounds,
    band_timestep_weights,
    normalised_size,
    subnet_timestep_weights,
)

from .test_training import _opts as training_opts

T = NUM_TRAIN_TIMESTEPS

# Timesteps of steps 0..5 (batch 4, seed 0, tiny pixel-base) drawn before the option existed.
BEFORE = {
    1.0: [
        [111, 771, 224, 957],
        [408, 990, 352, 140],
        [428, 635, 96, 526],
        [412, 462, 934, 252],
        [112, 708, 18, 70],
        [393, 63, 222, 603],
    ],
    3.0: [
        [788, 220, 945, 755],
        [593, 926, 326, 934],
        [403, 526, 798, 789],
        [479, 891, 347, 365],
        [543, 248, 871, 79],
        [915, 297, 808, 886],
    ],
}


def _opts(tmp_path, **kw) -> TrainOptions:
    """test_training's tiny options at this file's batch and length (weight decay off, as TrainOptions)."""
    return training_opts(tmp_path, **{"batch": 4, "steps": 6, "weight_decay": 0.0, **kw})


def _size(space, cfg) -> float:
    smallest = space.param_fraction(space.smallest(cfg.resolution))
    return normalised_size(space.param_fraction(cfg), smallest, min(1.0, space.size_caps[cfg.resolution]))


@pytest.mark.parametrize("multiplier", [1.0, 3.0])
def test_off_draws_are_bit_identical_to_before(tmp_path, multiplier):
    # A band width without the probability changes nothing either: the option is off at 0.
    trainer = Trainer(_opts(tmp_path, late_timestep_multiplier=multiplier, timestep_band=0.2))
    assert trainer.step_timestep_weights() is None
    loaded = list(trainer.loader())
    assert [s.timesteps.tolist() for s in loaded] == BEFORE[multiplier]
    draw = trainer._draw_kwargs()
    assert (
        draw["t_weights"] is None
        if multiplier == 1.0
        else torch.equal(draw["t_weights"], timestep_weights(0.25, multiplier))
    )
    for s in loaded:  # every other draw too: the loader is the plain draw_step of the base weights
        direct = draw_step(trainer.source, step=s.step, resolution=trainer.step_resolution()(s.step), **draw)
        for field in ("clips", "noise", "timesteps", "drop"):
            assert torch.equal(getattr(s, field), getattr(direct, field)), field
    assert "timestep_sampling" not in trainer.metadata()


def test_band_weights_place_small_subnets_at_noisy_timesteps():
    smallest, largest = band_timestep_weights(0.0, 1.0, 0.5), band_timestep_weights(1.0, 1.0, 0.5)
    assert smallest.shape == (T,) and math.isclose(float(smallest.sum()), 1.0)
    assert set(smallest.nonzero().flatten().tolist()) == set(range(T // 2, T))
    assert set(largest.nonzero().flatten().tolist()) == set(range(T // 2))
    assert band_bounds(0.5, 0.2) == (400, 600)
    base = timestep_weights(0.25, 3.0)
    torch.testing.assert_close(band_timestep_weights(0.3, 0.0, 0.5, base), base, rtol=0, atol=1e-15)
    half = band_timestep_weights(0.0, 0.5, 0.5, base)
    torch.testing.assert_close(half, 0.5 * base + 0.5 * smallest, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="--timestep-aware"):
        band_timestep_weights(0.0, 1.5, 0.5)
    with pytest.raises(ValueError, match="--timestep-band"):
        band_timestep_weights(0.0, 0.5, 0.0)


def test_every_step_draws_from_its_subnets_band(tmp_path):
    trainer = Trainer(_opts(tmp_path, steps=120, timestep_aware=1.0, timestep_band=0.5))
    space, small_t, large_t = trainer.net.space, [], []
    for samples in trainer.loader():
        cfg = subnets_for_step(trainer.net, trainer.opts, samples.step)[-1]
        lo, hi = band_bounds(_size(space, cfg), 0.5)
        ts = samples.timesteps.tolist()
        assert all(lo <= t < hi for t in ts), (samples.step, lo, hi, ts)
        (small_t if _size(space, cfg) < 0.5 else large_t).extend(ts)
    assert small_t and large_t and sum(small_t) / len(small_t) > sum(large_t) / len(large_t)

    # The extremes, through draw_step with the weights the loop hands it: the smallest subnet's
    # timesteps all lie in the noisiest half, the largest's in the cleanest.
    draw = trainer._draw_kwargs()
    res = space.default_resolution
    for cfg, (lo, hi) in ((space.smallest(res), (T // 2, T)), (space.largest(res), (0, T // 2))):
        draw["t_weights"] = subnet_timestep_weights(space, cfg, 1.0, 0.5, trainer.t_weights)
        for step in range(60):
            ts = draw_step(trainer.source, step=step, resolution=res, **draw).timesteps
            assert bool(((ts >= lo) & (ts < hi)).all()), (step, ts)


def test_half_aware_puts_the_expected_share_in_the_band(tmp_path):
    # A long warm-up keeps every early step at the largest subnet (ratios 1.0, nothing dropped), so the
    # loop's own draws are the largest subnet's. With P = 0.5 and a uniform base a timestep lies in its
    # band [0, W T) with probability 0.5 + 0.5 W.
    band, steps = 0.3, 150
    trainer = Trainer(
        _opts(tmp_path, steps=steps, warmup_steps=10**6, timestep_aware=0.5, timestep_band=band)
    )
    largest = trainer.net.space.largest()
    ts = []
    for samples in trainer.loader():
        assert subnets_for_step(trainer.net, trainer.opts, samples.step) == [largest]
        ts.extend(samples.timesteps.tolist())
    n, p = len(ts), 0.5 + 0.5 * band
    share = sum(t < band * T for t in ts) / n
    assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / n), share  # 4 sigma of the binomial
    assert any(t >= band * T for t in ts)  # the other half still draws from the base distribution


def test_training_run_records_the_option_and_resumes_exactly(tmp_path):
    kw = {"batch": 2, "steps": 2, "timestep_aware": 0.7, "timestep_band": 0.4}
    straight = train(_opts(tmp_path / "a", **kw), progress=False)
    meta = load_checkpoint(find_checkpoint(straight.opts.out))["training"]
    assert meta["options"]["timestep_aware"] == 0.7 and meta["options"]["timestep_band"] == 0.4
    assert meta["timestep_sampling"]["aware"] == 0.7
    assert json.loads((tmp_path / "a" / "run" / "options.json").read_text())["timestep_aware"] == 0.7

    # Killed after 1 step, resumed to 2: bit-identical to the straight run.
    train(_opts(tmp_path / "b", **{**kw, "steps": 1}), progress=False)
    resumed = train(_opts(tmp_path / "b", **kw, resume=True), progress=False)
    assert resumed.step == 2
    for (k, a), (_, b) in zip(straight.net.state_dict().items(), resumed.net.state_dict().items()):
        assert torch.equal(a, b), k


def test_checkpoint_without_the_fields_resumes(tmp_path):
    # A run saved before the option existed has no timestep_aware / timestep_band in its metadata.
    train(_opts(tmp_path, batch=2, steps=1), progress=False)
    path = find_checkpoint(tmp_path / "run") / "training.json"
    meta = json.loads(path.read_text())
    del meta["options"]["timestep_aware"], meta["options"]["timestep_band"]
    path.write_text(json.dumps(meta))
    resumed = train(_opts(tmp_path, batch=2, steps=2, resume=True), progress=False)
    assert resumed.step == 2


def test_cli_flags_reach_the_options():
    args = build_parser().parse_args(["--timestep-aware", "0.25", "--timestep-band", "0.3"])
    assert (args.timestep_aware, args.timestep_band) == (0.25, 0.3)
    defaults = build_parser().parse_args([])
    assert (defaults.timestep_aware, defaults.timestep_band) == (0.0, 0.5)
    with pytest.raises(ValueError, match="--timestep-aware"):
        main(["--timestep-aware", "-0.1"])  # refused before anything is built
    with pytest.raises(ValueError, match="--timestep-band"):
        Trainer(TrainOptions(text_encoder="none", num_videos=2, batch=2, timestep_band=1.5))


def test_a_step_drawn_in_process_matches_the_loaders(tmp_path):
    # train_step(None) draws its own batch (no DataLoader): it must use the same banded timesteps.
    opts = _opts(tmp_path, batch=2, steps=1, timestep_aware=1.0, timestep_band=0.2)
    own, loaded = Trainer(opts), Trainer(opts)
    own.train_step()
    loaded.train_step(next(iter(loaded.loader())))
    for (k, a), (_, b) in zip(own.net.state_dict().items(), loaded.net.state_dict().items()):
        assert torch.equal(a, b), k

"""Noise schedules: the v / zero-terminal-SNR schedule against an oracle denoiser, training targets, and the
schedule travelling with a model from training through export to sampling."""

import json

import pytest
import torch

from harness.checkpoints import export_supernet
from harness.diffusion import EPS_COSINE, SCHEDULES, ZERO_SNR_V, NoiseSchedule, ddim_sample
from harness.models import load_bundle
from harness.training.loop import TrainOptions, train
from search_spaces import save_static


def _oracle(x0: torch.Tensor, schedule: NoiseSchedule):
    """A denoiser that knows the clean video: returns the exact epsilon or v of ``x_t`` under ``schedule``."""
    abar = schedule.train_scheduler().alphas_cumprod

    def denoise(x, t, context=None):
        a = abar[t].view(-1, 1, 1, 1, 1)
        eps = (x - a.sqrt() * x0.repeat(x.shape[0] // x0.shape[0], 1, 1, 1, 1)) / (1 - a).sqrt()
        if schedule.prediction == "epsilon":
            return eps
        return a.sqrt() * eps - (1 - a).sqrt() * x0.repeat(x.shape[0] // x0.shape[0], 1, 1, 1, 1)

    return denoise


def _video(seed: int = 0) -> torch.Tensor:
    return torch.rand(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(seed)) * 1.6 - 0.8


def test_zero_snr_schedule_ends_at_pure_noise_and_starts_sampling_there():
    zero = ZERO_SNR_V.train_scheduler().alphas_cumprod
    paper = EPS_COSINE.train_scheduler().alphas_cumprod
    assert zero[-1] == 0 and paper[-1] > 0
    assert torch.allclose(zero[:900].sqrt(), paper[:900].sqrt(), atol=2e-4)  # rescaled, not new
    assert int(ZERO_SNR_V.sampling_scheduler(20).timesteps[0]) == 999
    assert int(EPS_COSINE.sampling_scheduler(20).timesteps[0]) == 951  # the paper's DDIM: SNR > 0 there


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_ddim_with_an_oracle_denoiser_recovers_the_video(name):
    schedule, x0 = SCHEDULES[name], _video()
    context = null = torch.zeros(2, 1, 4)
    out = ddim_sample(
        _oracle(x0, schedule),
        x0.shape,
        context,
        null,
        steps=10,
        guidance=3.0,
        generator=torch.Generator().manual_seed(1),
        schedule=schedule,
    )
    if schedule.zero_terminal_snr:  # DDIM ends on the clean sample itself
        torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)
    else:  # ends at t = 0 of the schedule, whose noise is sqrt(1 - abar[0]) ~ 0.006
        assert (out - x0).abs().max() < 0.05


def test_ddim_with_the_wrong_prediction_type_does_not_recover_the_video():
    x0 = _video()
    out = ddim_sample(
        _oracle(x0, ZERO_SNR_V),
        x0.shape,
        None,
        None,
        steps=10,
        generator=torch.Generator().manual_seed(1),
        schedule=EPS_COSINE,
    )
    assert (out - x0).abs().max() > 0.1  # the right type gets within 1e-4 (zero SNR) or 0.05


def test_v_target_matches_its_definition_and_gives_back_the_clean_video():
    x0, noise = _video(0), torch.randn(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([10, 999])
    sched = ZERO_SNR_V.train_scheduler()
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    v = ZERO_SNR_V.target(x0, noise, t)
    torch.testing.assert_close(v, a.sqrt() * noise - (1 - a).sqrt() * x0)
    x_t = sched.add_noise(x0, noise, t)
    torch.testing.assert_close(a.sqrt() * x_t - (1 - a).sqrt() * v, x0, atol=1e-5, rtol=0)
    assert torch.equal(EPS_COSINE.target(x0, noise, t), noise)


def test_schedule_errors_name_the_fix():
    with pytest.raises(ValueError, match="use v_prediction"):
        NoiseSchedule("epsilon", zero_terminal_snr=True)
    with pytest.raises(ValueError, match="unknown noise schedule 'v'; use one of"):
        NoiseSchedule.named("v")


def test_schedule_travels_from_training_to_export_to_extracted_subnet(tmp_path):
    opts = TrainOptions(
        family="pixel-base",
        preset="tiny",
        text_encoder="none",
        num_videos=4,
        batch=2,
        steps=1,
        warmup_steps=0,
        checkpoint_every=1,
        out=str(tmp_path / "run"),
        schedule="v-zero-snr",
    )
    trainer = train(opts, progress=False)
    assert load_bundle(tmp_path / "run").schedule == ZERO_SNR_V
    export_supernet(tmp_path / "run", tmp_path / "export")
    bundle = load_bundle(tmp_path / "export")
    saved = json.loads((tmp_path / "export" / "config.json").read_text())
    assert saved["noise_schedule"]["zero_terminal_snr"]
    assert bundle.schedule == ZERO_SNR_V
    net = bundle.supernet
    save_static(net.extract(net.space.smallest()), tmp_path / "sub", extra=bundle.provenance())
    assert load_bundle(tmp_path / "sub").schedule == ZERO_SNR_V
    assert trainer.history[-1]["Loss/train"] > 0
    legacy = tmp_path / "legacy"  # a subnet exported before schedules were saved: the paper's schedule
    legacy.mkdir()
    (tmp_path / "sub" / "model.safetensors").rename(legacy / "model.safetensors")
    config = json.loads((tmp_path / "sub" / "config.json").read_text())
    config.pop("noise_schedule")
    (legacy / "config.json").write_text(json.dumps(config))
    assert load_bundle(legacy).schedule == EPS_COSINE

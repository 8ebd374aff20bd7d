"""Latent-space family (LVDM-like UNet supernet) and the video autoencoder (SNED §4.3)."""

import json

import numpy as np
import pytest
import torch

from harness.autoencoder import (
    AUTOENCODER_PRESETS,
    AutoencoderConfig,
    VideoAutoencoder,
    build_autoencoder,
    load_autoencoder,
)
from harness.autoencoder_train import dataset_batches, train_autoencoder
from search_spaces import build_supernet, list_families, list_presets
from search_spaces.ops import DynamicConv

from .conftest import randomize_

FAMILY = "latent-unet"


@pytest.fixture(scope="module")
def tiny_latent():
    return randomize_(build_supernet(FAMILY, "tiny"), seed=11)


# -- UNet supernet -----------------------------------------------------------------------------------
def test_registered_with_presets():
    assert FAMILY in list_families()
    assert {"tiny", "paper"} <= set(list_presets(FAMILY))


def test_paper_preset_matches_lvdm_on_meta():
    with torch.device("meta"):
        net = build_supernet(FAMILY, "paper")
    n = sum(p.numel() for p in net.parameters())
    assert abs(n - 548e6) / 548e6 <= 0.02, f"paper preset has {n / 1e6:.1f}M parameters"
    assert net.space.total_params == n
    for fraction, target in ((0.75, 411e6), (0.5, 274e6)):
        got = net.count_params(net.space.subnet_at_fraction(fraction))
        assert abs(got - target) / target <= 0.03, f"{fraction:.0%} subnet has {got / 1e6:.1f}M parameters"


@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_lvdm_structure(preset):
    with torch.device("meta"):
        net = build_supernet(FAMILY, preset)
    spec = net.spec
    assert (spec.in_channels, spec.out_channels, spec.context_dim) == (4, 4, 0)
    assert spec.scale_shift and not spec.temporal_conv
    names = [name for name, _ in net.named_modules()]
    assert not any("temporal_cross" in n or n.endswith(".ff") for n in names)
    assert not hasattr(net, "null_text") and not any(name.endswith(".ff") for name in net.space.layers)
    assert any(n.endswith(".spatial") for n in names) and any(n.endswith(".temporal_self") for n in names)
    convs = [m for m in net.modules() if isinstance(m, DynamicConv)]
    assert all(m.kernel_size in ((1, 3, 3), (1, 1, 1)) for m in convs)  # space-only convolutions
    assert not any(n.startswith("down.0.") and ("spatial" in n or "temporal" in n) for n in names)


def test_tiny_preset_is_small():
    net = build_supernet(FAMILY, "tiny")
    n = sum(p.numel() for p in net.parameters())
    assert 200e3 <= n <= 1.5e6, f"tiny preset has {n} parameters"


# -- autoencoder -------------------------------------------------------------------------------------
def test_paper_autoencoder_size_and_shapes_on_meta():
    with torch.device("meta"):
        ae = build_autoencoder("paper")
        n = sum(p.numel() for p in ae.parameters())
        posterior = ae.encode(torch.empty(1, 3, 16, 256, 256))
        video = ae.decode(posterior.mode())
    assert abs(n - 19.5e6) / 19.5e6 <= 0.1, f"paper autoencoder has {n / 1e6:.2f}M parameters"
    assert posterior.mean.shape == (1, 4, 4, 32, 32)
    assert video.shape == (1, 3, 16, 256, 256)


def test_tiny_autoencoder_shapes():
    ae = build_autoencoder("tiny")
    assert AUTOENCODER_PRESETS["tiny"].latent_shape(16, 32, 32) == (4, 8, 8, 8)
    video = torch.rand(2, 3, 8, 16, 16) * 2 - 1
    with torch.no_grad():
        posterior = ae.encode(video)
        recon, _ = ae(video, generator=torch.Generator().manual_seed(0))
    assert posterior.mean.shape == posterior.logvar.shape == (2, 4, 4, 4, 4)
    assert posterior.kl().shape == (2,)
    assert ae.decode(posterior.sample()).shape == recon.shape == video.shape
    with pytest.raises(ValueError, match="divisible"):
        ae.encode(torch.zeros(1, 3, 7, 16, 16))


def _shift_gaps(ae: VideoAutoencoder, frames: int = 48, margin_frames: int = 16) -> tuple[float, float]:
    """Max |z(x)[j + 1] - z(x shifted by one latent stride)[j]| over latent frames ``j`` at least
    ``margin_frames`` video frames from either end (beyond the reach of the replicate padding), and the
    same for the decoder (latent shifted by one frame -> video shifted by one stride)."""
    stride = ae.config.downsample[0]
    margin = margin_frames // stride
    g = torch.Generator().manual_seed(0)
    video = torch.rand(1, 3, frames + stride, 8, 8, generator=g) * 2 - 1
    latents = frames // stride
    z = torch.randn(1, 4, latents + 1, 2, 2, generator=g)
    with torch.no_grad():
        a = ae.encode(video[:, :, :frames]).mean
        b = ae.encode(video[:, :, stride:]).mean
        da, db = ae.decode(z[:, :, :latents]), ae.decode(z[:, :, 1:])
    assert a.abs().mean() > 1e-3 and da.abs().mean() > 1e-3  # randomized weights, not a vacuous zero map
    interior = slice(margin, latents - 1 - margin)
    enc = (a[:, :, 1:][:, :, interior] - b[:, :, :-1][:, :, interior]).abs().max().item()
    pixels = slice(margin * stride, frames - stride - margin * stride)
    dec = (da[:, :, stride:][:, :, pixels] - db[:, :, :-stride][:, :, pixels]).abs().max().item()
    return enc, dec


@pytest.mark.parametrize("downsample", [(2, 4, 4), (1, 4, 4)])
def test_autoencoder_temporal_shift_equivariance(downsample):
    ae = randomize_(build_autoencoder("tiny", downsample=downsample), seed=5, scale=0.1)
    enc, dec = _shift_gaps(ae)
    assert enc <= 1e-5 and dec <= 1e-5, (enc, dec)


def test_clip_wide_norm_breaks_shift_equivariance():
    ae = randomize_(build_autoencoder("tiny", frame_norm=False), seed=5, scale=0.1)
    enc, _ = _shift_gaps(ae)
    assert enc > 1e-4  # why the default normalises per frame


def test_autoencoder_save_load_roundtrip(tmp_path):
    ae = randomize_(build_autoencoder("tiny", hidden=4), seed=2)
    ae.save_pretrained(tmp_path / "ae")
    again = load_autoencoder(tmp_path / "ae")
    assert again.config == ae.config
    assert sorted(p.name for p in (tmp_path / "ae").iterdir()) == ["config.json", "model.safetensors"]
    video = torch.rand(1, 3, 4, 8, 8) * 2 - 1
    with torch.no_grad():
        assert torch.equal(ae.encode(video).mean, again.encode(video).mean)
        assert torch.equal(ae.decode(torch.ones(1, 4, 2, 2, 2)), again.decode(torch.ones(1, 4, 2, 2, 2)))
    with pytest.raises(FileNotFoundError):
        load_autoencoder(tmp_path / "missing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"kind": "supernet"}))
    with pytest.raises(ValueError, match="autoencoder"):
        load_autoencoder(tmp_path / "other")


def test_config_validation():
    with pytest.raises(ValueError, match="powers of two"):
        AutoencoderConfig(downsample=(3, 4, 4))
    assert AutoencoderConfig.from_dict(AUTOENCODER_PRESETS["paper"].to_dict()) == AUTOENCODER_PRESETS["paper"]


def test_short_training_run_reduces_loss_and_checkpoints(tmp_path):
    g = torch.Generator().manual_seed(0)
    fixed = {r: torch.rand(2, 3, 4, r, r, generator=g).mul(2).sub(1).clamp(-1, 1) for r in (8, 16)}
    run = train_autoencoder(
        lambda r: fixed[r],
        resolutions=(8, 16),
        steps=12,
        out_dir=tmp_path / "run",
        config=AutoencoderConfig(hidden=4, downsample=(2, 4, 4)),
        lr=3e-3,
        seed=0,
    )
    assert len(run.losses) == 12 and set(run.resolutions) == {8, 16}
    assert np.mean(run.losses[-3:]) < np.mean(run.losses[:3])
    stats = [json.loads(line) for line in (run.directory / "stats.jsonl").read_text().splitlines()]
    assert [s["step"] for s in stats] == list(range(1, 13)) and "Loss/train" in stats[0]
    assert json.loads((run.directory / "training_options.json").read_text())["resolutions"] == [8, 16]
    loaded = load_autoencoder(run.directory)
    video = fixed[8][:1]
    with torch.no_grad():
        assert torch.equal(loaded.encode(video).mean, run.model.encode(video).mean)


def test_dataset_batches_from_synthetic_videos(tmp_path):
    data = pytest.importorskip("harness.data")

    def make_dataset(resolution: int):
        return data.SyntheticVideos(
            "train", num_videos=4, frames=4, resolution=resolution, render_resolution=32
        )

    batch_fn = dataset_batches(make_dataset, batch_size=2, seed=0)
    batch = batch_fn(16)
    assert batch.shape == (2, 3, 4, 16, 16) and batch.min() >= -1 and batch.max() <= 1
    run = train_autoencoder(
        batch_fn, resolutions=(16,), steps=1, out_dir=tmp_path, config=AutoencoderConfig(hidden=4)
    )
    assert (tmp_path / "model.safetensors").is_file() and np.isfinite(run.losses[0])

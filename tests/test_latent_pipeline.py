"""The latent family in the harness: autoencoder latents for training, decoding for samples and metrics,
and the same train -> search -> export -> sample commands as the pixel families."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState
from torch.utils.flop_counter import FlopCounterMode

from harness.autoencoder import build_autoencoder
from harness.diffusion import train_scheduler
from harness.latent import LatentCodec
from harness.metrics.flops import flop_analysis, matmul_flops
from harness.models import in_memory, load_bundle
from harness.paths import RESULTS
from harness.pipeline import Chain, generate
from harness.store import Store, optuna_storage
from harness.training.batches import ClipSource, make_batch
from search_spaces import build_supernet

from .conftest import randomize_

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _videos(n=4, frames=16, res=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, frames, res, res, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def codec():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        autoencoder = randomize_(build_autoencoder("tiny"), seed=3, scale=0.2)
    return LatentCodec.fit(autoencoder, _videos())


def test_codec_scales_latents_to_unit_std_and_round_trips(codec, tmp_path):
    videos = _videos()
    z = codec.encode(videos)
    assert z.shape == (4, 4, 8, 8, 8)
    assert float(z.std()) == pytest.approx(1.0, rel=1e-4)
    assert codec.decode(z).shape == videos.shape
    codec.save(tmp_path / "codec")
    loaded = LatentCodec.load(tmp_path / "codec")
    assert loaded.scale == codec.scale and torch.equal(loaded.encode(videos), z)


def test_latent_batches_noise_the_encoded_clips(codec):
    class Clips:  # four fixed clips; ClipSource resizes them to the requested resolution
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"video": _videos(seed=i)[0], "caption": ""}

    source = ClipSource(Clips())
    batch = make_batch(
        source, None, seed=0, step=3, resolution=32, global_batch=2, cond_drop=0.0, encode=codec.encode
    )
    assert batch.noisy.shape == (2, 4, 8, 8, 8)
    alphas = train_scheduler().alphas_cumprod[batch.timesteps].view(-1, 1, 1, 1, 1)
    x0 = (batch.noisy - (1 - alphas).sqrt() * batch.noise) / alphas.sqrt()
    indices = np.random.default_rng([0, 3, 2]).integers(0, 4, size=2)
    expected = torch.stack([codec.encode(source.clip(int(i), 32)[None])[0] for i in indices])
    torch.testing.assert_close(x0, expected, atol=2e-4, rtol=1e-4)


def test_generation_decodes_and_static_subnet_matches_supernet(codec):
    net = randomize_(build_supernet("latent-unet", "tiny"), seed=5).eval()
    cfg = net.space.sample(np.random.default_rng(1), resolution=8)
    from_super = generate(Chain(in_memory(net, codec=codec), base_subnet=cfg), ["", ""], steps=3, seed=4)
    from_static = generate(Chain(in_memory(net.extract(cfg).eval(), codec=codec)), ["", ""], steps=3, seed=4)
    assert from_super.shape == (2, 3, 16, 32, 32)
    assert (from_super - from_static).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="latent"):
        generate(Chain(in_memory(net, codec=codec), base_subnet=cfg), [""], resolution=16, steps=1)


def test_decoder_flops_agree_with_flop_counter_mode(codec):
    decoder = codec.decoder_module()
    inputs = {"latents": torch.randn(1, 4, 4, 8, 8)}
    analysis = flop_analysis(decoder, inputs)
    assert not analysis.unsupported_ops()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        decoder(**inputs)
    convs = matmul_flops({name: int(n) for name, n in analysis.by_operator().items()})
    assert convs == pytest.approx(counter.get_total_flops() / 2, rel=0.02)


def test_latent_training_needs_a_matching_autoencoder(tmp_path):
    from harness.train import main

    with pytest.raises(ValueError, match="--autoencoder DIR"):
        main(["--family", "latent-unet", "--steps", "1", "--out", str(tmp_path / "a")])
    build_autoencoder("tiny", z_channels=2).save_pretrained(tmp_path / "ae2")
    with pytest.raises(ValueError, match="2 latent channels"):
        main(
            [
                "--family",
                "latent-unet",
                "--steps",
                "1",
                "--autoencoder",
                str(tmp_path / "ae2"),
                "--out",
                str(tmp_path / "b"),
            ]
        )


def _run(module, *args, timeout=600):
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=ENV,
        text=True,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"{module} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _write_sky(root: Path, clips_per_split: int = 4, frames: int = 16, size: int = 40) -> Path:
    """A Sky-Timelapse-shaped folder (``<split>/<video>/<clip>/*.jpg``, no captions): drifting gradients."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for v in range(clips_per_split):
            folder = root / split / f"{split}{v}" / f"{split}{v}_1"
            folder.mkdir(parents=True)
            base = rng.uniform(0, 255, 3)
            for k in range(frames):
                x = np.linspace(0, 1, size)[None, :, None] + 0.05 * k
                image = (base * (0.5 + 0.5 * np.sin(6 * x + v))).clip(0, 255).astype(np.uint8)
                Image.fromarray(np.broadcast_to(image, (size, size, 3)).copy()).save(
                    folder / f"{split}{v}_frames_{k + 1:08d}.jpg"
                )
    return root


@pytest.mark.slow
def test_train_then_search_export_and_sample_the_latent_family(tmp_path):
    """Unconditional, on a Sky-Timelapse folder: autoencoder -> latent supernet -> search (FVD against the
    folder's test split) -> export -> sample the exported subnet."""
    sky = str(_write_sky(tmp_path / "sky"))
    ae, run, db = tmp_path / "ae", tmp_path / "run", f"sqlite:///{tmp_path / 'latent.db'}"
    _run(
        "harness.autoencoder_train",
        "--data",
        sky,
        "--resolutions",
        "32,64",
        "--steps",
        "4",
        "--out",
        str(ae),
        "--threads",
        "1",
    )
    _run(
        "harness.train",
        "--family",
        "latent-unet",
        "--data",
        sky,
        "--autoencoder",
        str(ae),
        "--steps",
        "4",
        "--batch",
        "2",
        "--warmup-steps",
        "0",
        "--checkpoint-every",
        "2",
        "--out",
        str(run),
        "--threads",
        "1",
    )
    assert json.loads((run / "autoencoder" / "latent.json").read_text())["source"] == str(ae)

    out = _run(
        "harness.search",
        "--checkpoint",
        str(run),
        "--trials",
        "3",
        "--storage",
        db,
        "--study",
        "lat",
        "--fvd-data",
        sky,
        "--fvd-split",
        "test",
        "--real-videos",
        "4",
        "--fvd-videos",
        "4",
        "--steps",
        "2",
        "--threads",
        "1",
        "--no-plot",
    )
    assert "Pareto front of 'lat'" in out
    df = Store(db).measurements_frame()
    ok = df[df.status == "ok"]
    assert set(ok.metric) >= {"params", "flops", "latency_ms", "fvd", "kvd"}
    assert (ok[ok.metric == "flops"].protocol.str.contains(r"8lat:8f:\+decode:32px:16f")).all()
    fvd = ok[ok.metric == "fvd"].iloc[0]
    extra = json.loads(fvd.extra) if isinstance(fvd.extra, str) else fvd.extra
    assert (extra["protocol"]["resolution"], extra["protocol"]["frames"]) == (32, 16)
    assert (extra["protocol"]["dataset"], extra["protocol"]["split"], extra["protocol"]["num_real"]) == (
        sky,
        "test",
        4,
    )
    assert (ok[ok.metric == "text_alignment"].value == -1).all()  # unconditional: not applicable

    assert "measurement failed" not in out, out
    # The first completed trial (a candidate put off while the machine was busy is asked again later).
    study = optuna.load_study(study_name="lat", storage=optuna_storage(db))
    trial = min(t.number for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE)
    _run(
        "harness.export",
        "--storage",
        db,
        "--study",
        "lat",
        "--trial",
        str(trial),
        "--out",
        str(tmp_path / "exp"),
    )
    assert load_bundle(tmp_path / "exp" / "base").codec is not None
    out = _run(
        "harness.sample",
        "--checkpoint",
        str(tmp_path / "exp" / "base"),
        "--num-videos",
        "2",
        "--steps",
        "2",
        "--out",
        str(tmp_path / "s.gif"),
    )
    assert "(2, 3, 16, 32, 32)" in out and (tmp_path / "s.gif").is_file()


def test_shipped_latent_pair_generates():
    """The shipped tiny latent supernet finds its autoencoder beside it and decodes what it generates."""
    bundle = load_bundle(RESULTS / "checkpoints" / "latent-unet-tiny")
    codec = bundle.codec
    assert codec is not None and codec.scale > 0 and codec.downsample == (2, 4, 4)
    assert bundle.text_encoder is None  # unconditional
    video = generate(Chain(bundle, base_subnet=bundle.supernet.space.smallest()), [""], steps=2, seed=0)
    assert video.shape == (1, 3, 16, 32, 32) and video.abs().max() <= 1

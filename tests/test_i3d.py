"""I3D feature extractor: reference state-dict layout, preprocessing, loading, download helper."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness.metrics.i3d import (
    I3DFeatureExtractor,
    InceptionI3d,
    WeightsDownloadError,
    fetch_i3d,
    file_sha256,
    load_i3d,
    preprocess,
)

# The layout of i3d_pretrained_400.pt, written out from the reference facts (pytorch-i3d / TATS):
# block -> (input channels, [b0, b1a, b1b, b2a, b2b, b3b] output channels).
REFERENCE_BLOCKS = {
    "Mixed_3b": (192, [64, 96, 128, 16, 32, 32]),
    "Mixed_3c": (256, [128, 128, 192, 32, 96, 64]),
    "Mixed_4b": (128 + 192 + 96 + 64, [192, 96, 208, 16, 48, 64]),
    "Mixed_4c": (192 + 208 + 48 + 64, [160, 112, 224, 24, 64, 64]),
    "Mixed_4d": (160 + 224 + 64 + 64, [128, 128, 256, 24, 64, 64]),
    "Mixed_4e": (128 + 256 + 64 + 64, [112, 144, 288, 32, 64, 64]),
    "Mixed_4f": (112 + 288 + 64 + 64, [256, 160, 320, 32, 128, 128]),
    "Mixed_5b": (256 + 320 + 128 + 128, [256, 160, 320, 32, 128, 128]),
    "Mixed_5c": (256 + 320 + 128 + 128, [384, 192, 384, 48, 128, 128]),
}


def _reference_layout() -> dict[str, tuple[int, ...]]:
    """Expected state-dict key -> shape: conv weight (no bias) + 4 batch-norm tensors per unit, logits."""
    conv_units = {
        "Conv3d_1a_7x7": (64, 3, 7, 7, 7),
        "Conv3d_2b_1x1": (64, 64, 1, 1, 1),
        "Conv3d_2c_3x3": (192, 64, 3, 3, 3),
    }
    for block, (cin, (c0, c1a, c1b, c2a, c2b, c3b)) in REFERENCE_BLOCKS.items():
        conv_units[f"{block}.b0"] = (c0, cin, 1, 1, 1)
        conv_units[f"{block}.b1a"] = (c1a, cin, 1, 1, 1)
        conv_units[f"{block}.b1b"] = (c1b, c1a, 3, 3, 3)
        conv_units[f"{block}.b2a"] = (c2a, cin, 1, 1, 1)
        conv_units[f"{block}.b2b"] = (c2b, c2a, 3, 3, 3)
        conv_units[f"{block}.b3b"] = (c3b, cin, 1, 1, 1)
    layout: dict[str, tuple[int, ...]] = {}
    for unit, shape in conv_units.items():
        layout[f"{unit}.conv3d.weight"] = shape
        for name in ("weight", "bias", "running_mean", "running_var"):
            layout[f"{unit}.bn.{name}"] = (shape[0],)
    layout["logits.conv3d.weight"] = (400, 1024, 1, 1, 1)
    layout["logits.conv3d.bias"] = (400,)
    return layout


def _random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A randomly initialised I3D state dict with non-trivial batch-norm statistics."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in InceptionI3d().state_dict().items():
        noise = torch.rand(value.shape, generator=generator)
        state[key] = noise + 0.5 if key.endswith("running_var") else value + 0.05 * noise
    return state


def test_state_dict_matches_reference_layout() -> None:
    expected = _reference_layout()
    state = InceptionI3d().state_dict()
    assert len(expected) == 287
    assert {key: tuple(value.shape) for key, value in state.items()} == expected
    assert not any("num_batches_tracked" in key for key in state)


@pytest.fixture(scope="module")
def random_state() -> dict[str, torch.Tensor]:
    """Built once per module (12M parameters); tests copy the dict before changing keys."""
    return _random_state_dict()


@pytest.fixture(scope="module")
def saved_weights(
    tmp_path_factory: pytest.TempPathFactory, random_state: dict[str, torch.Tensor]
) -> tuple[Path, dict[str, torch.Tensor]]:
    """A random state dict saved with torch.save as a plain dict (like i3d_pretrained_400.pt)."""
    path = tmp_path_factory.mktemp("i3d") / "i3d_pretrained_400.pt"
    torch.save(random_state, path)
    return path, random_state


def test_load_round_trip(saved_weights: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, state = saved_weights
    extractor = load_i3d(path, bn_eps=1e-5)
    assert isinstance(extractor.network, InceptionI3d) and not extractor.torchscript
    assert extractor.network.bn_eps == 1e-5
    loaded = extractor.network.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[key], state[key]) for key in state)


def test_extract_gives_400_logits(saved_weights: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """One full forward on CPU: a uint8-range 16-frame video resized to 224 x 224 -> (1, 400)."""
    extractor = load_i3d(saved_weights[0])
    videos = torch.randint(0, 256, (1, 3, 16, 64, 64), generator=torch.Generator().manual_seed(1))
    logits = extractor.extract(videos.to(torch.uint8), input_range=(0, 255))
    assert logits.shape == (1, 400)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_loads_pytorch_i3d_state_dict_with_batch_counters(
    tmp_path: Path, random_state: dict[str, torch.Tensor]
) -> None:
    """A state dict from nn.BatchNorm3d models (with num_batches_tracked) loads; the counters are dropped."""
    state = dict(random_state)
    for key in [key for key in state if key.endswith("bn.running_mean")]:
        state[key.replace("running_mean", "num_batches_tracked")] = torch.tensor(0)
    torch.save(state, tmp_path / "with_counters.pt")
    network = load_i3d(tmp_path / "with_counters.pt").network
    assert len(network.state_dict()) == 287


def test_load_rejects_other_files(tmp_path: Path, random_state: dict[str, torch.Tensor]) -> None:
    state = dict(random_state)
    del state["Mixed_4c.b2b.bn.running_var"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="does not match the i3d_pretrained_400.pt layout: 1 missing"):
        load_i3d(tmp_path / "partial.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="not an I3D state dict"):
        load_i3d(tmp_path / "tensor.pt")
    with pytest.raises(FileNotFoundError, match="--fvd-weights"):
        load_i3d(tmp_path / "absent.pt")


class _StubTorchScriptI3D(nn.Module):
    """Stands in for StyleGAN-V's i3d_torchscript.pt: same forward signature, tiny network."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 400)

    def forward(
        self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False
    ) -> torch.Tensor:
        assert not rescale and not resize
        logits = self.proj(x.mean(dim=(2, 3, 4)))
        return logits if return_features else logits.softmax(dim=1)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # torch.jit is deprecated in torch 2.14
def test_torchscript_checkpoint(tmp_path: Path) -> None:
    stub = _StubTorchScriptI3D()
    torch.jit.script(stub).save(str(tmp_path / "i3d_torchscript.pt"))
    extractor = load_i3d(tmp_path / "i3d_torchscript.pt")
    assert extractor.torchscript
    videos = torch.rand(3, 3, 9, 16, 16) * 2 - 1
    features = extractor.extract(videos, input_range=(-1, 1), batch_size=2)
    expected = stub.proj(preprocess(videos, input_range=(-1, 1)).mean(dim=(2, 3, 4)))
    torch.testing.assert_close(features, expected.detach())


# ---------------------------------------------------------------------------------------------------
# Preprocessing and frame count.


def test_preprocess_matches_tats_formula() -> None:
    """TATS ``preprocess``: frames bilinearly resized (align_corners=False), then 2 x / 255 - 1."""
    videos = torch.randint(0, 256, (2, 3, 9, 32, 48), generator=torch.Generator().manual_seed(3))
    frames = videos.float().transpose(1, 2).reshape(18, 3, 32, 48)
    resized = F.interpolate(frames, size=(224, 224), mode="bilinear", align_corners=False)
    expected = (2.0 * resized / 255.0 - 1.0).reshape(2, 9, 3, 224, 224).transpose(1, 2)
    result = preprocess(videos.to(torch.uint8), input_range=(0, 255))
    assert result.shape == (2, 3, 9, 224, 224) and result.dtype == torch.float32
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-5)
    signed = preprocess(videos.float() / 127.5 - 1.0, input_range=(-1, 1))
    torch.testing.assert_close(signed, result, rtol=0, atol=1e-5)


def test_preprocess_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\)"):
        preprocess(torch.zeros(1, 9, 3, 32, 32), input_range=(0, 255))
    with pytest.raises(ValueError, match="high > low"):
        preprocess(torch.zeros(1, 3, 9, 32, 32), input_range=(1, -1))


def test_too_few_frames_rejected() -> None:
    short = torch.zeros(1, 3, 8, 32, 32)
    with pytest.raises(ValueError, match="at least 9 frames"):
        preprocess(short, input_range=(0, 255))
    with pytest.raises(ValueError, match="at least 9 frames"):
        I3DFeatureExtractor(InceptionI3d()).extract(short, input_range=(0, 255))
    with pytest.raises(ValueError, match="at least 9 frames"):
        InceptionI3d()(torch.zeros(1, 3, 8, 224, 224))


# ---------------------------------------------------------------------------------------------------
# Download helper, exercised with file:// URLs only (no network).


def test_fetch_copies_and_verifies(tmp_path: Path) -> None:
    source = tmp_path / "source" / "i3d_pretrained_400.pt"
    source.parent.mkdir()
    source.write_bytes(b"PK\x03\x04 not really a checkpoint")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    path = fetch_i3d(cache, url=source.as_uri(), sha256=digest)
    assert path == cache / "i3d_pretrained_400.pt" and file_sha256(path) == digest
    assert sorted(p.name for p in cache.iterdir()) == ["i3d_pretrained_400.pt"]  # no temp file left
    source.unlink()
    assert fetch_i3d(cache, url=source.as_uri(), sha256=digest) == path  # cached, no download
    with pytest.raises(ValueError, match="sha256"):
        fetch_i3d(cache, url=source.as_uri(), sha256="0" * 64)


def test_fetch_checksum_mismatch_leaves_nothing(tmp_path: Path) -> None:
    source = tmp_path / "weights.pt"
    source.write_bytes(b"PK\x03\x04 payload")
    with pytest.raises(ValueError, match="expected 0000"):
        fetch_i3d(tmp_path / "cache", url=source.as_uri(), sha256="0" * 64)
    assert list((tmp_path / "cache").iterdir()) == []


def test_fetch_unreachable_points_to_flag(tmp_path: Path) -> None:
    with pytest.raises(WeightsDownloadError, match="pass --fvd-weights PATH") as info:
        fetch_i3d(tmp_path / "cache", url=(tmp_path / "missing.pt").as_uri())
    assert "\n" not in str(info.value)
    page = tmp_path / "download"
    page.write_bytes(b"<!DOCTYPE html><html>sign in</html>")
    with pytest.raises(WeightsDownloadError, match="HTML page"):
        fetch_i3d(tmp_path / "cache", url=page.as_uri())
    assert list((tmp_path / "cache").iterdir()) == []

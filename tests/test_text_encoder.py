"""Frozen text encoders: the offline MiniLM default and T5 from a local directory."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from harness.text_encoder import FrozenTextEncoder, TextEncoderError, load_text_encoder, minilm_directory


@pytest.fixture(scope="module")
def encoder() -> Iterator[FrozenTextEncoder]:
    """MiniLM loaded with the Hugging Face hub forced offline (loaded once: it takes a few seconds)."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        yield load_text_encoder("minilm", max_length=8)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_minilm_files_ship_with_the_package() -> None:
    folder = minilm_directory()
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()


def test_shape_dim_and_identity(encoder: FrozenTextEncoder) -> None:
    embeddings = encoder.encode(["a large red square moving left", "", "a small blue circle moving up"])
    assert embeddings.shape == (3, 8, 384) and embeddings.dtype == torch.float32
    assert encoder.dim == 384 and encoder.max_length == 8
    assert "all-MiniLM-L6-v2" in encoder.identity and "max_length=8" in encoder.identity
    long = encoder.encode(["a very long caption " * 20])
    assert long.shape == (1, 8, 384)
    assert encoder.encode([]).shape == (0, 8, 384)


def test_padding_is_zero_and_empty_caption_is_valid(encoder: FrozenTextEncoder) -> None:
    embeddings, mask = encoder.encode_with_mask(["", "a red square moving left"])
    assert mask.shape == (2, 8) and mask.dtype == torch.bool
    assert mask[0].tolist() == [True, True] + [False] * 6  # [CLS] [SEP] then padding
    assert mask[1].sum() == 7
    assert torch.all(embeddings[~mask] == 0) and torch.all(embeddings[mask].abs().sum(-1) > 0)


def test_deterministic_and_captions_differ(encoder: FrozenTextEncoder) -> None:
    captions = ["a large red square moving left", "a large red square moving right"]
    # Encoded in the same batch both times: on some CPUs (oneDNN on Xeon) a caption's embedding depends on
    # the batch it was encoded in by ~2e-6, and an earlier test put the first caption in a batch of three.
    encoder.clear_cache()
    first = encoder.encode(captions)
    encoder.clear_cache()
    second = encoder.encode(captions)
    assert torch.allclose(first, second, atol=1e-6)
    assert (first[0] - first[1]).abs().max() > 0.1


def test_cache_returns_identical_tensors(encoder: FrozenTextEncoder) -> None:
    first = encoder.encode(["a small green cross moving down", "a small green cross moving down"])
    assert encoder.cached("a small green cross moving down")
    again = encoder.encode(["a small green cross moving down"])
    assert torch.equal(first[0], first[1]) and torch.equal(first[0], again[0])
    again[0].add_(1.0)  # callers get copies: editing one does not touch the cache
    assert torch.equal(encoder.encode(["a small green cross moving down"])[0], first[0])


def test_disk_cache_round_trip(encoder: FrozenTextEncoder, tmp_path: Path) -> None:
    encoder.cache_path = tmp_path / "cache.safetensors"
    try:
        expected = encoder.encode(["a large yellow triangle moving up", ""])
        encoder.save_cache()
        encoder.clear_cache()
        assert encoder.load_cache() >= 2
        assert encoder.cached("a large yellow triangle moving up")
        assert torch.equal(encoder.encode(["a large yellow triangle moving up", ""]), expected)
    finally:
        encoder.cache_path = None


def test_frozen(encoder: FrozenTextEncoder) -> None:
    assert not encoder.model.training
    assert all(not p.requires_grad for p in encoder.model.parameters())
    embeddings = encoder.encode(["a large blue cross moving left"])
    assert not embeddings.requires_grad
    weight = torch.ones(384, requires_grad=True)  # usable as a constant inside a trained graph
    (embeddings * weight).sum().backward()
    assert weight.grad is not None


def test_bad_inputs(encoder: FrozenTextEncoder, tmp_path: Path) -> None:
    with pytest.raises(TextEncoderError, match="list of captions"):
        encoder.encode("a red square moving left")  # type: ignore[arg-type]
    with pytest.raises(TextEncoderError, match="T5 encoder directory .* does not exist"):
        load_text_encoder(f"t5:{tmp_path / 't5-v1_1-base'}")
    with pytest.raises(TextEncoderError, match="T5 encoder directory"):
        load_text_encoder(str(tmp_path / "t5-v1_1-xxl"))
    with pytest.raises(TextEncoderError, match="neither 'minilm'"):
        load_text_encoder("bert-base-uncased")
    with pytest.raises(TextEncoderError, match="no config.json"):
        load_text_encoder(str(tmp_path))


def test_t5_from_local_directory(tmp_path: Path) -> None:
    """A tiny random T5 saved locally (with MiniLM's tokenizer files) loads through ``T5EncoderModel``."""
    from transformers import T5Config, T5EncoderModel

    folder = tmp_path / "tiny-t5"
    config = T5Config(vocab_size=30522, d_model=16, d_kv=4, num_heads=2, d_ff=32, num_layers=1)
    T5EncoderModel(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_directory() / name, folder / name)
    encoder = load_text_encoder(f"t5:{folder}", max_length=6)
    assert type(encoder.model).__name__ == "T5EncoderModel"
    assert encoder.dim == 16 and encoder.identity.startswith("t5:tiny-t5@local")
    assert encoder.encode(["a red square", ""]).shape == (2, 6, 16)


def test_embedding_cache_is_bounded_and_backed_by_its_file(tmp_path: Path) -> None:
    """An LRU of ``cache_mib``: 12 KiB per MiniLM caption (8 x 384 float32 + mask), a 30 KiB bound
    keeps two; the others are re-encoded (same values) or, once saved, read back one at a time."""
    small = load_text_encoder("minilm", max_length=8, cache_mib=30 / 1024, cache_dir=tmp_path)
    captions = [f"a large red square moving left {k}" for k in range(6)]
    reference = small.encode(captions)  # one batch: the values below come from the same batch size
    assert len(small._cache) == 2 and small._held_bytes <= small.cache_bytes
    assert [small.cached(c) for c in captions] == [False] * 4 + [True] * 2
    small.save_cache()  # keeps what the file had, plus memory
    small.clear_cache()
    assert torch.equal(small.encode(captions[4:]), reference[4:])  # from the file, not the encoder
    reopened = load_text_encoder("minilm", max_length=8, cache_mib=30 / 1024, cache_dir=tmp_path)
    assert reopened.load_cache() == 2 and len(reopened._cache) == 0  # indexed, not read whole
    assert reopened.cached(captions[5]) and torch.equal(reopened.encode([captions[5]])[0], reference[5])
    with pytest.raises(TextEncoderError, match="positive size"):
        load_text_encoder("minilm", cache_mib=0)


def test_bf16_weights_give_float32_embeddings_close_to_fp32(encoder: FrozenTextEncoder) -> None:
    half = load_text_encoder("minilm", max_length=8, dtype="bf16")
    assert next(half.model.parameters()).dtype == torch.bfloat16 and half.identity.endswith(";dtype=bf16")
    assert "dtype" not in encoder.identity  # fp32 keeps the identity (and disk caches) of before
    captions = ["a large red square moving left", "a small blue circle moving up"]
    a, b = encoder.encode(captions), half.encode(captions)
    assert b.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min() > 0.99
    with pytest.raises(TextEncoderError, match="unknown text encoder dtype"):
        load_text_encoder("minilm", dtype="int8")


def test_a_callers_autocast_does_not_reach_the_encoder(encoder: FrozenTextEncoder) -> None:
    """Embeddings are cached for every later caller: one made under a generation's bf16 autocast must
    equal the fp32 one."""
    captions = ["a small yellow circle moving down"]
    encoder.clear_cache()
    plain = encoder.encode(captions)
    encoder.clear_cache()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = encoder.encode(captions)
    assert torch.equal(plain, under)

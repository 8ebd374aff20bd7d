"""One record per loaded model: ``ModelBundle`` (network, noise schedule, text encoder, frames, codec, hash).

Everything a tool needs to run, measure or export a model is read from its directory once, here, and
travels in the bundle; nothing is attached to the network after loading. A *model directory* is one of:

- a supernet saved with ``save_pretrained`` (``config.json`` kind ``supernet``), e.g. the shipped ones;
- a training run or its ``checkpoint`` folder (EMA weights are used);
- an extracted subnet (kind ``subnet``) written by ``harness.export``.

Latent models keep their autoencoder in an ``autoencoder/`` folder beside the weights (or beside the
folder, for an exported chain), so every tool finds it without an option.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from harness.diffusion import NoiseSchedule
from harness.latent import FOLDER as LATENT_FOLDER
from harness.latent import LATENT_FILE, LatentCodec
from harness.paths import DEFAULT_BASE, DEFAULT_SSR, RESULTS
from search_spaces import SubnetConfig, Supernet, VideoUNet, build_supernet, load_static, load_supernet
from search_spaces.plan import UNetHyper

DEFAULT_TEXT_ENCODER = "minilm"


@dataclass(frozen=True)
class TextEncoderSpec:
    """Which frozen text encoder a model was trained with, and its tokens per caption (the model's
    ``context_len``: a caption embedded at another length is not what the model saw)."""

    name: str = DEFAULT_TEXT_ENCODER
    max_length: int = 8

    def load(
        self,
        device: str | torch.device = "cpu",
        cache_dir: str | Path | None = None,
        dtype: str = "fp32",
        cache_mib: float | None = None,
    ):
        """The one factory of text encoders (``harness.text_encoder.FrozenTextEncoder``): on ``device``
        with weights in ``dtype`` (``"bf16"`` for T5 at scale) and an embedding cache of ``cache_mib``."""
        from harness.text_encoder import DEFAULT_CACHE_MIB, load_text_encoder

        return load_text_encoder(self.name, max_length=self.max_length, cache_dir=cache_dir, device=device,
                                 dtype=dtype, cache_mib=cache_mib or DEFAULT_CACHE_MIB)  # fmt: skip


@dataclass(frozen=True, eq=False)
class ModelBundle:
    """A denoiser with everything needed to sample, measure and export it.

    ``network`` is a ``Supernet`` or an extracted static ``VideoUNet``; ``text_encoder`` is ``None`` for an
    unconditional model; ``codec`` decodes a latent model's samples (``None`` for pixel models);
    ``directory`` and ``checkpoint_hash`` identify the files it came from (``None`` when built in memory).
    """

    network: Supernet | VideoUNet
    schedule: NoiseSchedule
    text_encoder: TextEncoderSpec | None
    frames: int
    codec: LatentCodec | None = None
    directory: Path | None = None
    checkpoint_hash: str | None = None

    @property
    def is_supernet(self) -> bool:
        return isinstance(self.network, Supernet)

    @property
    def supernet(self) -> Supernet:
        if not self.is_supernet:  # the user's choice of directory, reported as bad input
            raise ValueError(f"{self.directory} holds an extracted subnet; pass a supernet checkpoint")
        return self.network

    @property
    def subnet(self) -> SubnetConfig | None:
        """The config an extracted subnet was cut at (``None`` for a supernet)."""
        return None if self.is_supernet else self.network.subnet_config

    @property
    def default_resolution(self) -> int:
        """The resolution the model generates at by default (its first trained one, or its subnet's)."""
        if self.is_supernet:
            return self.network.space.default_resolution
        if self.subnet is None:
            raise ValueError(f"the subnet at {self.directory} does not record its config; re-export it")
        return self.subnet.resolution

    @property
    def channels(self) -> int:
        """Channels the model denoises (3 for pixels, the latent channels otherwise)."""
        return self.network.spec.in_channels

    def provenance(self) -> dict:
        """What a subnet extracted from this model must carry to be sampled like it (see ``save_static``)."""
        return {
            "text_encoder_name": self.text_encoder.name if self.text_encoder else "none",
            "noise_schedule": self.schedule.to_dict(),
        }


def in_memory(
    network: Supernet | VideoUNet,
    schedule: NoiseSchedule | None = None,
    text_encoder: TextEncoderSpec | None = None,
    codec: LatentCodec | None = None,
) -> ModelBundle:
    """A bundle for a network built in memory (tests, training probes): the paper's noise schedule unless
    ``schedule`` says otherwise, MiniLM at the model's context length when it is text-conditioned."""
    if text_encoder is None and network.spec.context_dim:
        text_encoder = TextEncoderSpec(DEFAULT_TEXT_ENCODER, network.spec.context_len)
    return ModelBundle(network, schedule or NoiseSchedule(), text_encoder, network.frames, codec)


# -- loading -----------------------------------------------------------------------------------------
def training_checkpoint_dir(path: Path) -> Path | None:
    """The checkpoint folder of a training run (the run itself, its ``checkpoint`` or ``checkpoint.old``)."""
    for candidate in (path, path / "checkpoint", path / "checkpoint.old"):
        if (candidate / "ema.safetensors").is_file() and (candidate / "config.json").is_file():
            return candidate
    return None


def load_bundle(path: str | Path, use_ema: bool = True) -> ModelBundle:
    """Load a model directory (see the module docstring) as a ``ModelBundle``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; pass --checkpoint with a model directory "
            f"(the shipped ones are under {RESULTS / 'checkpoints'})"
        )
    directory = training_checkpoint_dir(path)
    if directory is not None:
        network = _load_training_checkpoint(directory, use_ema)
    else:
        directory = path
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} holds no model (no config.json); pass a model directory")
        kind = json.loads((path / "config.json").read_text()).get("kind")
        network = (load_supernet(path) if kind == "supernet" else load_static(path)).float()
    network.eval()
    metadata = list(_recorded_metadata(directory))
    text = None
    if network.spec.context_dim:
        text = TextEncoderSpec(_text_encoder_name(metadata), network.spec.context_len)
    return ModelBundle(
        network,
        _noise_schedule(metadata),
        text,
        network.frames,
        _find_codec(directory, network),
        directory,
        checkpoint_hash(directory),
    )


def _load_training_checkpoint(directory: Path, use_ema: bool) -> Supernet:
    config = json.loads((directory / "config.json").read_text())
    net = build_supernet(config["family"], config["preset"], hyper=UNetHyper.from_dict(config["hyper"]))
    weights = load_file(str(directory / "model.safetensors"))
    if use_ema:
        ema = load_file(str(directory / "ema.safetensors"))
        weights.update({k[: -len(".ema")]: v for k, v in ema.items() if k.endswith(".ema")})
    net.load_state_dict(weights)
    return net


def _recorded_metadata(directory: Path) -> Iterator[dict]:
    """The JSON metadata saved beside a model's weights: a run's ``training.json``, then ``config.json``."""
    for name in ("training.json", "config.json"):
        f = directory / name
        if f.is_file():
            yield json.loads(f.read_text())


def _text_encoder_name(metadata: list[dict]) -> str:
    for meta in metadata:
        name = meta.get("text_encoder_name") or meta.get("options", {}).get("text_encoder")
        if name:
            return name
    return DEFAULT_TEXT_ENCODER


def _noise_schedule(metadata: list[dict]) -> NoiseSchedule:
    """The recorded schedule; the paper's (epsilon, cosine) for models saved before schedules were."""
    for meta in metadata:
        if "noise_schedule" in meta:
            return NoiseSchedule.from_dict(meta["noise_schedule"])
    return NoiseSchedule()


def _find_codec(directory: Path, network: torch.nn.Module) -> LatentCodec | None:
    """The autoencoder kept beside a latent model; a model that denoises RGB needs none."""
    for folder in (directory / LATENT_FOLDER, directory.parent / LATENT_FOLDER):
        if (folder / LATENT_FILE).is_file():
            codec = LatentCodec.load(folder)
            if codec.channels != network.spec.in_channels:
                raise ValueError(
                    f"the autoencoder at {folder} has {codec.channels} latent channels, the model "
                    f"{network.spec.in_channels}; keep each model with its own autoencoder"
                )
            return codec
    if network.spec.in_channels != 3:
        raise FileNotFoundError(
            f"latent model {directory} has no '{LATENT_FOLDER}/' folder beside it; it is "
            f"written by python -m harness.train --autoencoder DIR"
        )
    return None


def checkpoint_hash(path: str | Path) -> str:
    """sha256 over a model directory's weight files and config (identifies a model in the store)."""
    path = Path(path)
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")) + [path / "config.json"]:
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


# -- chains ------------------------------------------------------------------------------------------
def load_chain(
    base_path: str | Path, ssr_path: str | Path, resolution: int | None
) -> tuple[ModelBundle, ModelBundle | None, int]:
    """The base supernet and, when ``resolution`` is above its own, the SSR supernet that reaches it
    (doubling per stage); returns ``(base, ssr or None, resolution)``. The one place that decides
    whether a resolution needs a chain."""
    base = load_bundle(base_path)
    net = base.supernet
    base_res = net.space.default_resolution
    resolution = base_res if resolution is None else resolution  # 0 is bad input, not the default
    if resolution == base_res:
        return base, None, resolution
    factor = resolution // base_res
    if resolution < base_res or resolution % base_res or factor & (factor - 1):
        raise ValueError(
            f"resolution {resolution} is not one this supernet was trained for (base "
            f"{list(net.space.resolutions)}, chains: {base_res} x powers of 2)"
        )
    if base.codec is not None:
        raise ValueError(f"a latent model generates at its own latent size {base_res}; drop --resolution")
    ssr = load_bundle(ssr_path)
    if not ssr.is_supernet or ssr.network.spec.cond_channels == 0:
        raise ValueError(f"{ssr_path} is not a super-resolution supernet; pass one as --ssr-checkpoint")
    r = base_res * 2
    while r <= resolution:
        if r not in ssr.supernet.space.resolutions:
            raise ValueError(
                f"resolution {resolution} needs the SSR model at {r}px, which it was not trained "
                f"for (SSR resolutions {list(ssr.supernet.space.resolutions)})"
            )
        r *= 2
    return base, ssr, resolution


def add_model_arguments(parser) -> None:
    """``--checkpoint`` and ``--ssr-checkpoint``, shared by the commands that load a chain."""
    parser.add_argument("--checkpoint", default=str(DEFAULT_BASE), help="base supernet directory")
    parser.add_argument(
        "--ssr-checkpoint",
        default=str(DEFAULT_SSR),
        help="super-resolution supernet directory (used above the base resolution)",
    )

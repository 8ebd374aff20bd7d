"""Training of the video autoencoder with super-position over resolutions (SNED §4.3).

The autoencoder has no dynamic cost: each step draws one training resolution, reconstructs a batch at it
through a sampled latent, and takes an Adam step on ``L1 + kl_weight * KL``. A run directory holds
``training_options.json`` (resolved options), ``stats.jsonl`` (one line per logged step, keys
``Loss/train``, ``Loss/rec``, ``Loss/kl``) and the checkpoint ``config.json`` + ``model.safetensors``,
all written atomically (temp file, then ``os.replace``), so a crashed run never leaves half a file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from harness.autoencoder import AutoencoderConfig, DiagonalGaussian, VideoAutoencoder, build_autoencoder

# ``batch_fn(resolution)`` -> a video batch ``(B, 3, T, R, R)`` in ``[-1, 1]`` with ``R = resolution``.
BatchFn = Callable[[int], torch.Tensor]


@dataclass
class AutoencoderRun:
    """What ``train_autoencoder`` returns: the trained model, per-step losses and the run directory."""

    model: VideoAutoencoder
    directory: Path
    losses: list[float] = field(default_factory=list)  # ``Loss/train`` of every step
    resolutions: list[int] = field(default_factory=list)  # resolution drawn at every step


def dataset_batches(make_dataset: Callable[[int], Dataset], batch_size: int, seed: int = 0) -> BatchFn:
    """A ``BatchFn`` drawing ``batch_size`` random items (seeded) from a dataset per resolution.

    ``make_dataset(resolution)`` returns a dataset whose items are ``dict(video=(3, T, R, R), ...)``, e.g.
    ``lambda r: SyntheticVideos("train", 1024, 16, r, seed=0)``; each is built once and cached.
    """
    rng = np.random.default_rng(seed)
    datasets: dict[int, Dataset] = {}

    def batch(resolution: int) -> torch.Tensor:
        if resolution not in datasets:
            datasets[resolution] = make_dataset(resolution)
        dataset = datasets[resolution]
        indices = rng.integers(0, len(dataset), size=batch_size)
        return torch.stack([dataset[int(i)]["video"] for i in indices])  # (B, 3, T, R, R)

    return batch


def autoencoder_loss(
    video: torch.Tensor, reconstruction: torch.Tensor, posterior: DiagonalGaussian, kl_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(total, rec, kl)``: ``rec`` is the mean absolute error over video elements, ``kl`` the KL to
    ``N(0, I)`` averaged over latent elements, ``total = rec + kl_weight * kl``."""
    rec = (reconstruction - video).abs().mean()
    kl = posterior.kl().mean() / posterior.mean[0].numel()
    return rec + kl_weight * kl, rec, kl


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _append_stats(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def _check_resolutions(config: AutoencoderConfig, resolutions: Sequence[int]) -> list[int]:
    if not resolutions:
        raise ValueError("give at least one training resolution")
    _, down_h, down_w = config.downsample
    for r in resolutions:
        if r % down_h or r % down_w:
            raise ValueError(
                f"resolution {r} is not divisible by the spatial downsampling {config.downsample[1:]}"
            )
    return [int(r) for r in resolutions]


def train_autoencoder(
    dataset_factory: BatchFn,
    resolutions: Sequence[int],
    steps: int,
    out_dir: str | Path,
    *,
    preset: str = "tiny",
    config: AutoencoderConfig | None = None,
    lr: float = 1e-4,
    kl_weight: float = 1e-6,
    seed: int = 0,
    log_every: int = 1,
    save_every: int | None = None,
    device: str | torch.device = "cpu",
    model: VideoAutoencoder | None = None,
    progress: bool = False,
) -> AutoencoderRun:
    """Train a video autoencoder, sampling one resolution per step, and save it to ``out_dir``.

    Args:
        dataset_factory: ``dataset_factory(resolution)`` -> video batch ``(B, 3, T, R, R)`` in ``[-1, 1]``
            (see ``dataset_batches``); ``T`` must be divisible by the temporal downsampling.
        resolutions: training resolutions ``R`` in pixels, drawn uniformly per step.
        steps: number of optimizer steps.
        out_dir: run directory (created; an existing ``stats.jsonl`` is appended to).
        preset / config: the architecture (``config`` wins over ``preset``); ignored when ``model`` is given.
        lr: Adam learning rate.
        kl_weight: weight of the per-latent-element KL term (LVDM trains with a tiny or zero weight).
        seed: seeds the weights' initialisation, the resolution draws and the posterior samples.
        log_every: write a ``stats.jsonl`` line every this many steps (and at the last step).
        save_every: also checkpoint every this many steps; ``None`` means only at the end.
        device: where to train.
        model: continue training this model instead of building a fresh one.

    Returns:
        ``AutoencoderRun`` with the trained model (in eval mode), the losses and the directory.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)

    # Build the model (seeded without touching the global RNG) and the optimizer.
    if model is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = VideoAutoencoder(config) if config is not None else build_autoencoder(preset)
    model = model.to(device).train()
    resolutions = _check_resolutions(model.config, resolutions)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    noise = torch.Generator(device=device).manual_seed(seed)
    _write_atomic(
        directory / "training_options.json",
        json.dumps(
            {
                "resolutions": resolutions,
                "steps": steps,
                "lr": lr,
                "kl_weight": kl_weight,
                "seed": seed,
                "autoencoder": model.config_dict(),
            },
            indent=1,
            sort_keys=True,
        ),
    )

    run = AutoencoderRun(model, directory)
    for step in tqdm(range(1, steps + 1), desc="train autoencoder", disable=not progress, dynamic_ncols=True):
        # Sample a resolution and a batch at it.
        resolution = resolutions[int(rng.integers(len(resolutions)))]
        video = dataset_factory(resolution).to(device)

        # Reconstruct through a sampled latent; Adam step on L1 + KL.
        reconstruction, posterior = model(video, sample_posterior=True, generator=noise)
        loss, rec, kl = autoencoder_loss(video, reconstruction, posterior, kl_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        # Log and checkpoint.
        run.losses.append(loss.item())
        run.resolutions.append(resolution)
        if step % log_every == 0 or step == steps:
            _append_stats(
                directory / "stats.jsonl",
                {
                    "step": step,
                    "resolution": resolution,
                    "Loss/train": loss.item(),
                    "Loss/rec": rec.item(),
                    "Loss/kl": kl.item(),
                },
            )
        if save_every and step % save_every == 0 and step != steps:
            model.save_pretrained(directory)
    model.save_pretrained(directory)
    run.model = model.eval()
    return run


def main(argv=None) -> None:
    """``python -m harness.autoencoder_train``: train the video autoencoder of a latent family."""
    import argparse

    from harness.data import build_dataset
    from harness.training.batches import ClipSource

    p = argparse.ArgumentParser(
        prog="python -m harness.autoencoder_train",
        description="Train a video autoencoder with super-position over resolutions.",
    )
    p.add_argument("--preset", default="tiny", help="autoencoder preset (tiny, paper)")
    p.add_argument("--data", default="synthetic", help="'synthetic' (built in, offline) or a dataset folder")
    p.add_argument("--num-videos", type=int, default=1024, help="synthetic train-set size")
    p.add_argument(
        "--frames", type=int, default=16, help="frames per clip (divisible by the temporal stride)"
    )
    p.add_argument("--resolutions", default="32,64", help="comma-separated training resolutions in pixels")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps")
    p.add_argument("--batch", type=int, default=4, help="clips per step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--kl-weight", type=float, default=1e-6, help="weight of the KL term")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, resolution draws and clips")
    p.add_argument("--out", required=True, help="output directory (config.json + model.safetensors)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    resolutions = [int(r) for r in args.resolutions.split(",") if r.strip()]
    source = ClipSource(
        build_dataset(
            args.data,
            "train",
            frames=args.frames,
            resolution=max(resolutions),
            seed=args.seed,
            num_videos=args.num_videos if args.data == "synthetic" else None,
        )
    )
    rng = np.random.default_rng(args.seed)

    def batch(resolution: int) -> torch.Tensor:
        indices = rng.integers(0, len(source), size=args.batch)
        return torch.stack([source.clip(int(i), resolution) for i in indices])

    run = train_autoencoder(
        batch,
        resolutions,
        args.steps,
        args.out,
        preset=args.preset,
        lr=args.lr,
        kl_weight=args.kl_weight,
        seed=args.seed,
        log_every=10,
        save_every=max(1, args.steps // 10),
        progress=True,
    )
    print(f"trained {args.steps} steps (last loss {run.losses[-1]:.4f}); autoencoder at {args.out}")


if __name__ == "__main__":
    from harness.cli import run_cli

    run_cli(main)

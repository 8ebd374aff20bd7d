"""Train the offline FVD / KVD feature extractor ``proxy-v1`` (:mod:`harness.metrics.extractor`).

    python -m harness.metrics.train_extractor --out results/extractor/proxy-v1 [--steps N --batch B --seed S]

Supervised on the synthetic dataset's caption attributes (colour, shape, direction, size), one
cross-entropy term per attribute head. Each batch is drawn at one resolution picked at random from
``--resolutions`` (16, 32, 64: every resolution of the pixel chain; the network resizes to 32 itself),
with light augmentation: time reversal (direction labels swapped accordingly), small Gaussian noise
and an occasional slight blur. The run directory gets ``model.safetensors`` + ``extractor.json``
(written atomically), ``command.txt`` and ``train_log.jsonl`` (namespaced keys: ``Loss/train``,
``Acc/heldout16_colour``, ...). Heldout accuracy is measured on the float16-rounded weights that are
stored, at every training resolution.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from harness.data import ATTRIBUTES, SyntheticVideos
from harness.metrics.extractor import (
    PROXY_NAME,
    ProxyConfig,
    ProxyExtractor,
    ProxyVideoNet,
    attribute_accuracy,
    half_precision_state,
    preprocess,
    save_extractor,
)

# Time reversal turns left <-> right and up <-> down (ATTRIBUTES["direction"] = left, right, up, down).
_REVERSED_DIRECTION = torch.tensor(
    [ATTRIBUTES["direction"].index(d) for d in ("right", "left", "down", "up")]
)

VideoSet = tuple[dict[int, torch.Tensor], dict[str, torch.Tensor]]  # ({R: uint8 (N,3,T,R,R)}, {attr: (N,)})


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder, e.g. results/extractor/proxy-v1")
    parser.add_argument("--steps", type=int, default=900, help="optimizer steps")
    parser.add_argument("--batch", type=int, default=32, help="videos per batch")
    parser.add_argument("--seed", type=int, default=0, help="seeds initialisation, batches and augmentation")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--frames", type=int, default=12, help="frames per training video")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--num-train", type=int, default=1024, help="synthetic train videos")
    parser.add_argument("--num-heldout", type=int, default=256, help="synthetic heldout videos")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic dataset")
    parser.add_argument(
        "--noise-max", type=float, default=0.05, help="max Gaussian noise std ([-1, 1] units)"
    )
    parser.add_argument(
        "--blur-prob", type=float, default=0.25, help="probability of a slight blur per video"
    )
    parser.add_argument("--eval-every", type=int, default=150, help="steps between heldout evaluations")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser.parse_args(argv)


def render_split(split: str, num_videos: int, frames: int, resolutions: Sequence[int], seed: int) -> VideoSet:
    """Render a synthetic split at every resolution: uint8 videos ``{R: (N, 3, T, R, R)}`` and labels."""
    dataset = SyntheticVideos(
        split, num_videos=num_videos, frames=frames, resolution=resolutions[0], seed=seed
    )
    videos: dict[int, list[torch.Tensor]] = {r: [] for r in resolutions}
    for index in tqdm(range(num_videos), desc=f"render {split}", leave=False):
        for resolution in resolutions:
            video = dataset.video_at(index, resolution)  # (3, T, R, R) float on 8-bit levels
            videos[resolution].append(((video + 1.0) * 127.5).round().to(torch.uint8))
    labels = {
        name: torch.tensor([dataset.labels_at(i)[name] for i in range(num_videos)]) for name in ATTRIBUTES
    }
    return {r: torch.stack(v) for r, v in videos.items()}, labels


def to_unit_range(videos: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, 3, T, R, R)`` -> float32 in [-1, 1]."""
    return videos.float() / 127.5 - 1.0


def _blur(videos: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-video 3x3 Gaussian blur of every frame: ``(B, 3, T, R, R)``, ``sigma`` ``(B,)`` in pixels."""
    batch, channels, frames, height, width = videos.shape
    offsets = torch.tensor([-1.0, 0.0, 1.0])
    taps = torch.exp(-(offsets[None] ** 2) / (2 * sigma[:, None] ** 2))
    taps = taps / taps.sum(dim=1, keepdim=True)  # (B, 3)
    kernel = (taps[:, :, None] * taps[:, None, :]).repeat_interleave(
        channels * frames, dim=0
    )  # (B*3*T, 3, 3)
    flat = videos.reshape(1, batch * channels * frames, height, width)
    flat = F.conv2d(F.pad(flat, (1, 1, 1, 1), mode="replicate"), kernel[:, None], groups=flat.shape[1])
    return flat.reshape(batch, channels, frames, height, width)


def augment(
    videos: torch.Tensor,
    labels: dict[str, torch.Tensor],
    args: argparse.Namespace,
    generator: torch.Generator,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Time reversal (labels follow), slight blur, small Gaussian noise on ``(B, 3, T, R, R)`` in [-1, 1]."""
    batch = videos.shape[0]
    # Reverse time for half the videos; their direction label flips.
    reverse = torch.rand(batch, generator=generator) < 0.5
    videos = torch.where(reverse[:, None, None, None, None], videos.flip(2), videos)
    labels = dict(
        labels, direction=torch.where(reverse, _REVERSED_DIRECTION[labels["direction"]], labels["direction"])
    )
    # Slight blur (sigma 0.3-0.9 px) for some videos.
    blur = torch.rand(batch, generator=generator) < args.blur_prob
    if blur.any():
        sigma = 0.3 + 0.6 * torch.rand(batch, generator=generator)
        videos = torch.where(blur[:, None, None, None, None], _blur(videos, sigma), videos)
    # Small Gaussian noise for half the videos.
    noise_std = (
        args.noise_max
        * torch.rand(batch, generator=generator)
        * (torch.rand(batch, generator=generator) < 0.5)
    )
    noise = torch.randn(videos.shape, generator=generator) * noise_std[:, None, None, None, None]
    return videos + noise, labels


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to zero at ``steps``."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def evaluate(network: ProxyVideoNet, heldout: VideoSet) -> dict[str, dict[str, float]]:
    """Heldout accuracy ``{str(R): {attr: acc}}`` at every resolution, plus ``"mean"`` over resolutions."""
    extractor = ProxyExtractor(network)
    videos, labels = heldout
    result = {str(r): attribute_accuracy(extractor, to_unit_range(v), labels) for r, v in videos.items()}
    result["mean"] = {name: sum(acc[name] for acc in result.values()) / len(videos) for name in ATTRIBUTES}
    network.train()
    return result


def _log(handle: Any, row: dict[str, Any]) -> None:
    handle.write(json.dumps(row) + "\n")
    handle.flush()


def train(args: argparse.Namespace, train_set: VideoSet, heldout: VideoSet, log: Any) -> ProxyVideoNet:
    """The training loop: AdamW, one cross-entropy per attribute head, a random resolution per batch."""
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    network = ProxyVideoNet(ProxyConfig()).train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    videos, labels = train_set
    resolutions = sorted(videos)
    start = time.perf_counter()
    progress = tqdm(range(args.steps), desc=f"train {PROXY_NAME}")
    for step in progress:
        # Sample a resolution and a batch, then augment it.
        resolution = resolutions[int(torch.randint(len(resolutions), (1,), generator=generator))]
        rows = torch.randint(videos[resolution].shape[0], (args.batch,), generator=generator)
        batch = to_unit_range(videos[resolution][rows])
        batch, batch_labels = augment(batch, {k: v[rows] for k, v in labels.items()}, args, generator)

        # One cross-entropy per attribute head, summed.
        logits = network.logits(network(preprocess(batch, network.config.resolution)))
        losses = {name: F.cross_entropy(logits[name], batch_labels[name]) for name in ATTRIBUTES}
        loss = sum(losses.values())
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        # Log, and evaluate on the heldout split now and then.
        row = {
            "step": step,
            "Loss/train": float(loss),
            "Time/s": time.perf_counter() - start,
            "Res/px": resolution,
        }
        row.update({f"Loss/train_{k}": float(v) for k, v in losses.items()})
        if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            accuracy = evaluate(network, ({16: heldout[0][16]}, heldout[1]) if 16 in heldout[0] else heldout)
            row.update({f"Acc/heldout{r}_{k}": v for r, acc in accuracy.items() for k, v in acc.items()})
        _log(log, row)
        progress.set_postfix(loss=f"{float(loss):.3f}")
    return network.eval()


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m harness.metrics.train_extractor " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    (out / "command.txt").write_text(command + "\n", encoding="utf-8")
    start = time.perf_counter()

    # Data: both splits rendered once at every resolution.
    train_set = render_split("train", args.num_train, args.frames, args.resolutions, args.data_seed)
    heldout = render_split("heldout", args.num_heldout, args.frames, args.resolutions, args.data_seed)
    render_s = time.perf_counter() - start

    with open(out / "train_log.jsonl", "w", encoding="utf-8") as log:
        network = train(args, train_set, heldout, log)
        # Round to the stored float16 weights, then measure what ships.
        network.load_state_dict(
            {k: v.float() if v.is_floating_point() else v for k, v in half_precision_state(network).items()}
        )
        accuracy = evaluate(network.eval(), heldout)
        _log(
            log,
            {
                "step": args.steps,
                **{f"Acc/heldout{r}_{k}": v for r, a in accuracy.items() for k, v in a.items()},
            },
        )
    wall_s = time.perf_counter() - start

    dataset = {
        "spec": "synthetic",
        "seed": args.data_seed,
        "frames": args.frames,
        "resolutions": args.resolutions,
    }
    metadata = {
        "training": {
            "command": command,
            "options": vars(args),
            "wall_time_s": round(wall_s, 1),
            "render_time_s": round(render_s, 1),
            "torch_version": torch.__version__,
            "threads": args.threads,
        },
        "dataset": {
            "train": {**dataset, "split": "train", "num_videos": args.num_train},
            "heldout": {**dataset, "split": "heldout", "num_videos": args.num_heldout},
        },
        "heldout_accuracy": accuracy,
    }
    save_extractor(network, out, metadata)
    print(f"saved {PROXY_NAME} to {out} in {wall_s:.0f} s; heldout accuracy (mean over resolutions):")
    print(json.dumps(accuracy, indent=2))


if __name__ == "__main__":
    main()

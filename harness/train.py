"""``python -m harness.train``: train a supernet with SNED's Algorithm 1 (resumable, data-parallel).

Examples::

    python -m harness.train --family pixel-base --preset tiny --steps 2000 --out results/runs/base
    torchrun --nproc_per_node=2 -m harness.train --family pixel-base --steps 100 --out runs/ddp
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \
        -m harness.train --device cuda --precision bf16-autocast --batch 256 --out runs/paper

(README, "Training on GPUs and clusters".)
"""

from __future__ import annotations

import argparse
import dataclasses

import torch.distributed as dist

from harness.cli import run_cli
from harness.diffusion import SCHEDULES
from harness.training.loop import TrainOptions, init_distributed, train
from harness.training.precision import PRECISIONS
from harness.training.timestep_bands import check_timestep_options


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harness.train", description=__doc__.splitlines()[0])
    d = TrainOptions()
    p.add_argument("--family", default=d.family, help="supernet family (pixel-base, pixel-ssr, latent-unet)")
    p.add_argument("--preset", default=d.preset, help="preset of the family (tiny, paper)")
    p.add_argument("--data", default=d.data, help="'synthetic' (built in, offline) or a dataset folder")
    p.add_argument("--captions", default=None, help="WebVid-style captions CSV for a folder dataset")
    p.add_argument("--num-videos", type=int, default=d.num_videos, help="synthetic train-set size")
    p.add_argument("--text-encoder", default=d.text_encoder, help="minilm | t5:<dir> | <model dir> | none")
    p.add_argument("--steps", type=int, default=d.steps, help="total training iterations")
    p.add_argument("--batch", type=int, default=d.batch, help="global batch size (split across ranks)")
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="decoupled weight decay")
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=d.warmup_steps,
        help="sampling warm-up iterations: min ratio / kept fraction step 100%% -> 40%%",
    )
    p.add_argument("--cond-drop", type=float, default=d.cond_drop, help="classifier-free guidance dropout")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay, help="EMA decay of the weights")
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="clip (active entries only)")
    p.add_argument("--sandwich", action="store_true", help="largest + smallest + random subnet each step")
    p.add_argument(
        "--inplace-distill",
        action="store_true",
        help="with --sandwich: the largest subnet's prediction is the others' target",
    )
    p.add_argument(
        "--offset-noise",
        type=float,
        default=d.offset_noise,
        help="per-channel offset added to the diffusion noise (0: off; 0.1 fixes washed-out means)",
    )
    p.add_argument(
        "--schedule",
        default=d.schedule,
        choices=sorted(SCHEDULES),
        help="noise schedule and target: eps-cosine (the paper's) or v-zero-snr (Lin et al. 2024)",
    )
    p.add_argument(
        "--late-timestep-portion",
        type=float,
        default=d.late_timestep_portion,
        help="the noisiest portion of the timesteps that --late-timestep-multiplier favours",
    )
    p.add_argument(
        "--late-timestep-multiplier",
        type=float,
        default=d.late_timestep_multiplier,
        help="draw those timesteps this many times as often (1: uniform; >1 trains the coarse "
        "layout and motion that sampling decides first)",
    )
    p.add_argument(
        "--timestep-aware",
        type=float,
        default=d.timestep_aware,
        metavar="P",
        help="probability that a sample's timestep comes from its subnet's band (small subnets: the "
        "noisy steps, large: the clean ones, as trajectory schedules use them); 0: off, the paper's",
    )
    p.add_argument(
        "--timestep-band",
        type=float,
        default=d.timestep_band,
        metavar="W",
        help="width of a subnet's band as a fraction of the timesteps (with --timestep-aware)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="seed of every random choice")
    p.add_argument("--out", default=d.out, help="run directory (checkpoint, log.jsonl, samples)")
    p.add_argument(
        "--checkpoint-every", type=int, default=d.checkpoint_every, help="iterations per checkpoint"
    )
    p.add_argument(
        "--sample-every", type=int, default=d.sample_every, help="iterations per sample GIF (0: off)"
    )
    p.add_argument("--log-every", type=int, default=d.log_every, help="iterations per log.jsonl line")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint (bit-exact)")
    p.add_argument(
        "--autoencoder",
        default=None,
        help="latent families: trained video autoencoder directory (python -m harness.autoencoder_train)",
    )
    p.add_argument(
        "--init",
        default=None,
        help="start from this supernet directory's weights (e.g. a shipped one), fresh optimizer",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--device",
        default=d.device,
        help="auto (cuda:LOCAL_RANK when CUDA is available, else cpu), cpu, cuda or cuda:N",
    )
    p.add_argument(
        "--precision",
        default=d.precision,
        choices=PRECISIONS,
        help="fp32, or the forward under autocast in bf16 / fp16 (fp16 with a loss scaler); weights, "
        "optimizer and EMA stay fp32",
    )
    p.add_argument(
        "--tf32",
        action=argparse.BooleanOptionalAction,
        default=d.tf32,
        help="CUDA: TF32 for fp32 matmuls and convolutions (default off: full fp32; recorded either way)",
    )
    p.add_argument(
        "--checkpointing",
        action="store_true",
        help="activation checkpointing in the UNet: recompute activations in backward (less memory)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=d.workers,
        help="DataLoader worker processes per rank (default: 0 for synthetic data, up to 4 for a folder)",
    )
    p.add_argument(
        "--bucket-mb",
        type=float,
        default=d.bucket_mb,
        help="data parallel: MiB of active gradients per all-reduce bucket",
    )
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.inplace_distill and not args.sandwich:
        raise ValueError("--inplace-distill needs --sandwich (the largest subnet is the teacher)")
    if args.offset_noise < 0:
        raise ValueError(f"--offset-noise {args.offset_noise} is negative; pass 0 (off) or a std such as 0.1")
    if args.workers is not None and args.workers < 0:
        raise ValueError(f"--workers {args.workers} is negative; pass 0 (load in this process) or more")
    if args.bucket_mb <= 0:
        raise ValueError(f"--bucket-mb {args.bucket_mb} must be positive; pass e.g. 25")
    check_timestep_options(args.timestep_aware, args.timestep_band)
    opts = TrainOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainOptions)})
    init_distributed(opts.device)
    try:
        trainer = train(opts)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if trainer.rank == 0:
        print(
            f"trained {trainer.step} steps on {trainer.device} ({opts.precision}); checkpoint at {opts.out}/checkpoint"
        )


if __name__ == "__main__":
    run_cli(main)

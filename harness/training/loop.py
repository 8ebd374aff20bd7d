"""Supernet training, SNED Algorithm 1, readable top to bottom.

Each iteration samples one subnet and one resolution (within that resolution's size cap and the sampling
warm-up's limits), computes the diffusion loss of that subnet, and updates *only its weights*: the masked
AdamW leaves every other weight, its Adam moments and its step count bit-identical; the EMA moves only
where the weights moved. Options beyond the paper (off by default): the sandwich rule, in-place
distillation, and timestep-aware sampling (each subnet mostly trained at the timesteps trajectory
schedules give subnets of its size: ``timestep_bands.py``). Data-parallel under ``torchrun`` (every
rank samples the same subnet; only the gradients inside its regions are all-reduced, in overlapping
buckets: ``distributed.py``). ``--device`` places the supernet, codec, text encoder and every batch;
``--precision`` picks fp32 or bf16/fp16 autocast (``precision.py``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from harness.autoencoder import load_autoencoder
from harness.data import build_dataset
from harness.diffusion import NoiseSchedule, diffusion_loss
from harness.latent import FOLDER as LATENT_FOLDER
from harness.latent import LATENT_FILE, LatentCodec, is_latent
from harness.models import TextEncoderSpec, load_bundle
from harness.training.batches import (
    ClipSource,
    StepDataset,
    StepSamples,
    draw_step,
    step_loader,
    step_rng,
    timestep_weights,
    to_batch,
)
from harness.training.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from harness.training.distributed import (
    ActiveGradReducer,
    barrier,
    distributed_context,
    resolve_device,
)
from harness.training.distributed import init_distributed as _init_distributed
from harness.training.masked_optim import MaskedAdamW, MaskedEMA, masked_clip_grad_norm_
from harness.training.precision import Precision, set_tf32
from harness.training.timestep_bands import check_timestep_options, subnet_timestep_weights
from search_spaces import Supernet, build_supernet, upgrade_state_dict


@dataclass
class TrainOptions:
    family: str = "pixel-base"
    preset: str = "tiny"
    data: str = "synthetic"  # "synthetic" or a dataset folder
    captions: str | None = None  # WebVid-style CSV for a folder (None: unconditional)
    num_videos: int = 1024  # synthetic train-set size
    text_encoder: str = (
        "minilm"  # "minilm" (offline), "t5:<dir>", or a local model dir; "none" = unconditional
    )
    steps: int = 1000
    batch: int = 16  # global batch (split across ranks)
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 300  # sampling warm-up length (paper: 30,000)
    cond_drop: float = 0.1  # classifier-free-guidance dropout probability
    ema_decay: float = 0.999
    max_grad_norm: float = 1.0
    sandwich: bool = False  # largest + smallest + one random subnet per step (AttentiveNAS, BigNAS)
    inplace_distill: bool = False  # largest subnet's prediction is the others' target (needs sandwich)
    offset_noise: float = 0.0  # per-channel noise offset (see make_batch); 0 = the paper's plain noise
    schedule: str = "eps-cosine"  # noise schedule + prediction target (harness.diffusion.SCHEDULES)
    late_timestep_portion: float = 0.25  # the noisiest quarter of the timesteps ...
    late_timestep_multiplier: float = 1.0  # ... drawn this many times as often (1 = uniform, the paper's)
    timestep_aware: float = 0.0  # P(a timestep from its subnet's band), per sample (0 = off, the paper's)
    timestep_band: float = 0.5  # width of a subnet's band, as a fraction of the training timesteps
    seed: int = 0
    out: str = "results/runs/train"
    checkpoint_every: int = 200
    sample_every: int = 0  # 0 = no sample videos during training
    log_every: int = 10
    resume: bool = False
    threads: int | None = None
    init: str | None = None  # start from this model directory's weights (fresh optimizer state)
    autoencoder: str | None = None  # latent families: the trained video autoencoder directory
    device: str = "auto"  # "auto" (cuda:LOCAL_RANK if CUDA is available, else cpu), "cpu", "cuda", "cuda:N"
    precision: str = "fp32"  # "fp32", "bf16-autocast" or "fp16-autocast" (with a loss scaler)
    tf32: bool = False  # allow TF32 float32 matmuls/convolutions on CUDA (False: full fp32)
    checkpointing: bool = False  # activation checkpointing in the UNet (less memory, ~1/3 more compute)
    workers: int | None = None  # DataLoader workers per rank (None: 0 for synthetic, up to 4 for folders)
    bucket_mb: float = 25.0  # all-reduce bucket size in MiB (data parallel)


def warmup_limits(step: int, warmup_steps: int) -> tuple[float, float]:
    """Sampling warm-up (§3.4): the minimum channel ratio and minimum kept-component fraction step down
    from 1.0 to 0.4 in six equal stages over ``warmup_steps`` iterations. Returns both (they coincide)."""
    if warmup_steps <= 0:
        return 0.4, 0.4
    stage = min(6, math.floor(6 * step / warmup_steps))
    floor = round(1.0 - 0.1 * stage, 1)
    return floor, floor


def subnets_for_step(net: Supernet, opts: TrainOptions, step: int):
    """The subnet(s) of this step: one random (Algorithm 1), or the sandwich at one resolution. ``net`` is
    the supernet or its search space; the draw depends on ``(seed, step)`` only, so every rank agrees."""
    space = getattr(net, "space", net)
    min_ratio, min_keep = warmup_limits(step, opts.warmup_steps)
    rng = step_rng(opts.seed, step, 1)
    cfg = space.sample(rng, min_ratio=min_ratio, min_keep=min_keep)
    if not opts.sandwich:
        return [cfg]
    largest, smallest = space.largest(cfg.resolution), space.smallest(cfg.resolution)
    return [c for c in (largest, smallest, cfg) if space.fits(c)]


@dataclass(frozen=True)
class StepResolution:
    """Pixel resolution of a step's subnet (picklable, for DataLoader workers)."""

    space: object
    opts: TrainOptions
    pixel_scale: int = 1  # the codec's spatial downsampling (1 for pixel families)

    def __call__(self, step: int) -> int:
        return subnets_for_step(self.space, self.opts, step)[0].resolution * self.pixel_scale


@dataclass(frozen=True)
class StepTimestepWeights:
    """Timestep weights of a step under timestep-aware sampling (picklable, for DataLoader workers): the
    band of the step's subnet mixed into ``base`` (``timestep_bands.py``); a sandwich step uses its
    random subnet's band (its subnets share one batch)."""

    space: object
    opts: TrainOptions
    base: torch.Tensor | None = None  # the run's timestep_weights (None: uniform)

    def __call__(self, step: int) -> torch.Tensor:
        cfg = subnets_for_step(self.space, self.opts, step)[-1]  # the random one (the sandwich's last)
        return subnet_timestep_weights(
            self.space, cfg, self.opts.timestep_aware, self.opts.timestep_band, self.base
        )


class Trainer:
    """State of one training run: supernet, masked optimizer, EMA, data, text encoder, all on one device."""

    def __init__(self, opts: TrainOptions):
        self.opts = opts
        self.ctx = distributed_context(resolve_device(opts.device, _local_rank()))
        self.rank, self.world, self.device = self.ctx.rank, self.ctx.world, self.ctx.device
        if opts.batch % self.world:
            raise ValueError(f"--batch {opts.batch} must be divisible by the {self.world} ranks")
        self.precision = Precision(opts.precision, self.device)
        self.matmul = set_tf32(opts.tf32)  # explicit, and recorded in the checkpoint
        # Built on the CPU from the seed, then moved: identical initial weights on every rank and device.
        torch.manual_seed(opts.seed)
        self.net = build_supernet(opts.family, opts.preset)
        self.init_hash = self._load_init(opts.init) if opts.init else None
        self.net.to(self.device)
        if opts.checkpointing:
            self._enable_checkpointing()
        self.super_resolution = self.net.spec.cond_channels > 0
        autoencoder = self._load_autoencoder(opts.autoencoder) if is_latent(self.net) else None
        down = autoencoder.config.downsample if autoencoder is not None else (1, 1, 1)
        frames = self.net.hyper.frames * down[0]
        data_res = max(self.net.space.resolutions) * down[1]
        self.dataset = build_dataset(
            opts.data,
            "train",
            frames=frames,
            resolution=data_res,
            seed=opts.seed,
            captions=opts.captions,
            num_videos=opts.num_videos if opts.data == "synthetic" else None,
        )
        self.source = ClipSource(self.dataset)
        self.codec = self._fit_codec(autoencoder) if autoencoder is not None else None
        self.text = None
        if opts.text_encoder != "none" and self.net.spec.context_dim:
            self.text = TextEncoderSpec(opts.text_encoder, self.net.spec.context_len).load(self.device)
            if self.text.dim != self.net.spec.context_dim:
                raise ValueError(
                    f"text encoder dim {self.text.dim} != the supernet's context dim "
                    f"{self.net.spec.context_dim}"
                )
        self.optimizer = MaskedAdamW(self.net.named_parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
        self.ema = MaskedEMA(self.net.named_parameters(), decay=opts.ema_decay)
        self.schedule = NoiseSchedule.named(opts.schedule)
        self.t_weights = timestep_weights(opts.late_timestep_portion, opts.late_timestep_multiplier)
        check_timestep_options(opts.timestep_aware, opts.timestep_band)
        # Buckets launch from gradient hooks during the backward (the UNet's checkpointing is
        # non-reentrant: still one gradient per parameter and backward, which the reducer checks).
        self.reducer = (
            ActiveGradReducer(self.net.named_parameters(), self.world, opts.bucket_mb)
            if self.world > 1
            else None
        )
        self.step = 0
        self.history: list[dict] = []

    def _enable_checkpointing(self) -> None:
        enable = getattr(self.net, "set_activation_checkpointing", None)
        if enable is None:
            raise ValueError(
                "--checkpointing: this version of the UNet has no set_activation_checkpointing; drop the option"
            )
        enable(True)

    def _draw_kwargs(self) -> dict:
        """The ``draw_step`` arguments every step shares (this rank's share of the global batch)."""
        opts = self.opts
        return {
            "seed": opts.seed,
            "global_batch": opts.batch,
            "rank": self.rank,
            "world": self.world,
            "cond_drop": opts.cond_drop,
            "super_resolution": self.super_resolution,
            "latent": (self.codec.channels, self.codec.downsample) if self.codec is not None else None,
            "offset_noise": opts.offset_noise,
            "t_weights": self.t_weights,
        }

    def step_resolution(self) -> StepResolution:
        scale = self.codec.downsample[1] if self.codec is not None else 1
        return StepResolution(self.net.space, self.opts, scale)

    def step_timestep_weights(self) -> StepTimestepWeights | None:
        """Each step's timestep weights under timestep-aware sampling; None when it is off (every step
        then draws from ``t_weights``, bit-identical to a run without the option)."""
        if not self.opts.timestep_aware:
            return None
        return StepTimestepWeights(self.net.space, self.opts, self.t_weights)

    def loader(self) -> torch.utils.data.DataLoader:
        """This rank's step batches from the current step to ``opts.steps``, prefetched by workers."""
        opts = self.opts
        # Folder data: decoding and resizing videos is the slow part, so it runs in worker processes
        # (up to 4 per rank, the node's cores shared by its ranks); synthetic clips are cheap enough here.
        cores = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        auto = 0 if opts.data == "synthetic" else max(1, min(4, cores))
        workers = opts.workers if opts.workers is not None else auto
        if workers < 0:
            raise ValueError(f"--workers {workers} is negative; pass 0 (load in this process) or more")
        steps = range(self.step, opts.steps)
        dataset = StepDataset(
            self.source,
            self.step_resolution(),
            steps,
            t_weights_of=self.step_timestep_weights(),
            **self._draw_kwargs(),
        )
        return step_loader(dataset, workers, pin_memory=self.device.type == "cuda")

    # -- one iteration -------------------------------------------------------------------------------
    def train_step(self, samples: StepSamples | None = None) -> dict:
        """One iteration; ``samples`` are this step's CPU draws (from ``loader()``), drawn here when None."""
        opts, net, step = self.opts, self.net, self.step
        self.optimizer.zero_grad(set_to_none=True)

        # Sample a subnet (or the sandwich) and a resolution.
        subnets = subnets_for_step(net, opts, step)
        resolution = subnets[0].resolution
        active = self._union_masks(subnets)

        # This rank's share of the global batch at that resolution (latent families: encoded pixel clips).
        if samples is None:
            draw = self._draw_kwargs()
            t_weights_of = self.step_timestep_weights()
            if t_weights_of is not None:  # timestep-aware: the timesteps follow this step's subnet
                draw["t_weights"] = t_weights_of(step)
            samples = draw_step(self.source, step=step, resolution=self.step_resolution()(step), **draw)
        if samples.step != step:
            raise RuntimeError(f"batch of step {samples.step} handed to step {step}")
        encode = self.codec.encode if self.codec is not None else None
        batch = to_batch(samples, self.text, schedule=self.schedule, encode=encode, device=self.device)

        # Diffusion loss of each subnet (forward under autocast, loss in fp32); in-place distillation
        # targets the largest one's prediction. The last backward launches the gradient all-reduce.
        losses, teacher = [], None
        for i, cfg in enumerate(subnets):
            # Built per subnet: the null-text mix is part of each backward's graph.
            kwargs = batch.model_kwargs(getattr(net, "null_text", None))
            with self.precision.autocast():
                pred = net(batch.noisy, batch.timesteps, subnet=cfg, **kwargs).float()
            target = batch.target if (teacher is None or not opts.inplace_distill) else teacher
            loss = diffusion_loss(pred, target)
            if self.reducer is not None and i == len(subnets) - 1:
                self.reducer.arm(active)
            self.precision.backward(loss)
            losses.append(loss.detach())
            if i == 0 and opts.sandwich and opts.inplace_distill:
                teacher = pred.detach()

        # Masked update: only the sampled subnet(s)' entries move (weights, moments, step counts, EMA).
        if self.reducer is not None:
            self.reducer.finish()
        self.precision.unscale_(self.optimizer)
        grad_norm = masked_clip_grad_norm_(net.named_parameters(), active, opts.max_grad_norm)
        if self.precision.step(self.optimizer, active):  # fp16: skipped when a gradient overflowed
            self.ema.update(net.named_parameters(), active)

        loss = torch.stack(losses).mean()
        if self.world > 1:
            dist.all_reduce(loss)
            loss /= self.world
        self.step += 1
        stats = {
            "step": self.step,
            "Loss/train": float(loss),
            "Grad/norm": float(grad_norm),
            "Subnet/resolution": resolution,
            "Subnet/params_frac": net.space.param_fraction(subnets[-1]),
            "Warmup/min_ratio": warmup_limits(step, opts.warmup_steps)[0],
        }
        if self.reducer is not None:
            stats["Comm/reduced_frac"] = self.reducer.last_numel / self.reducer.full_numel
        if self.precision.scaler is not None:
            stats["Precision/loss_scale"] = self.precision.scaler.get_scale()
        return stats

    def _load_autoencoder(self, path: str | None):
        if not path:
            raise ValueError(
                f"{self.opts.family} denoises autoencoder latents: pass --autoencoder DIR (train one "
                f"with python -m harness.autoencoder_train)"
            )
        autoencoder = load_autoencoder(path, self.device)
        if autoencoder.config.z_channels != self.net.spec.in_channels:
            raise ValueError(
                f"--autoencoder {path} has {autoencoder.config.z_channels} latent channels, the "
                f"supernet {self.net.spec.in_channels}; pass an autoencoder of this family's preset"
            )
        return autoencoder

    def _fit_codec(self, autoencoder) -> LatentCodec:
        """The latent scale, fitted on 16 fixed training clips at the default resolution (saved on resume)."""
        saved = Path(self.opts.out) / LATENT_FOLDER
        if self.opts.resume and (saved / LATENT_FILE).is_file():
            return LatentCodec.load(saved, self.device)
        res = self.net.space.default_resolution * autoencoder.config.downsample[1]
        clips = torch.stack([self.source.clip(i % len(self.source), res) for i in range(16)]).to(self.device)
        return LatentCodec.fit(autoencoder, clips, source=self.opts.autoencoder)

    def _load_init(self, path: str) -> str:
        """Start from a saved supernet's weights (e.g. a shipped one, to train it longer); returns its hash."""
        bundle = load_bundle(path)
        model = bundle.network
        if not isinstance(model, Supernet) or (model.family, model.preset) != (
            self.opts.family,
            self.opts.preset,
        ):
            raise ValueError(
                f"--init {path} is not a {self.opts.family}/{self.opts.preset} supernet; pass one "
                f"saved by this family and preset"
            )
        mismatch = f"--init {path} does not match this {self.opts.family}/{self.opts.preset} supernet"
        try:
            missing, unexpected = self.net.load_state_dict(
                {k: v.float() for k, v in model.state_dict().items()}, strict=False
            )
        except RuntimeError as e:  # shapes differ
            raise ValueError(
                f"{mismatch} ({str(e).splitlines()[1].strip()}); pass one of this preset"
            ) from None
        # A supernet saved before its preset gained zero-initialised parts (the tiny base's frame embedding
        # and pooled text) starts with them at zero: the same function.
        own = self.net.state_dict()
        if unexpected or any(own[k].count_nonzero() for k in missing):
            raise ValueError(
                f"{mismatch} (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); "
                f"pass one of this preset"
            )
        return bundle.checkpoint_hash

    def _union_masks(self, subnets) -> dict:
        """Active entries of this step: the subnet's regions (boxes where it can), or for the sandwich
        the union of its subnets' masks."""
        if len(subnets) == 1:
            return self.net.active_regions(subnets[0])
        active: dict[str, torch.Tensor] = {}
        for cfg in subnets:
            for name, mask in self.net.active_masks(cfg).items():
                active[name] = active[name] | mask if name in active else mask
        return active

    # -- persistence ---------------------------------------------------------------------------------
    def metadata(self) -> dict:
        return {
            "step": self.step,
            "options": dataclasses.asdict(self.opts),
            "world_size": self.world,
            "data": {
                "spec": self.opts.data,
                "captions": self.opts.captions,
                "num_videos": len(self.dataset),
                "frames": self.net.hyper.frames,
            },
            "text_encoder": self.text.identity if self.text else None,
            "noise_schedule": self.schedule.to_dict(),
            "latent": {"autoencoder": self.opts.autoencoder, "scale": self.codec.scale}
            if self.codec
            else None,
            "init": {"path": self.opts.init, "sha256": self.init_hash} if self.opts.init else None,
            "optimizer": self.optimizer.hyperparameters(),
            "device": {
                "type": self.device.type,
                "name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
                "backend": dist.get_backend() if dist.is_initialized() else None,
            },
            "precision": {
                "mode": self.precision.mode,
                "matmul": self.matmul,
                "grad_scaler": self.precision.state_dict(),
                "activation_checkpointing": self.opts.checkpointing,
            },
            "torch_version": torch.__version__,
            "rng": {"scheme": "stateless: numpy default_rng([seed, step, stream])", "seed": self.opts.seed},
            **self._timestep_metadata(),
            "history_tail": self.history[-50:],
        }

    def _timestep_metadata(self) -> dict:
        """How timesteps were drawn, when timestep-aware (the options alone are in ``options``; a run
        without it keeps the metadata it always had)."""
        if not self.opts.timestep_aware:
            return {}
        return {
            "timestep_sampling": {
                "aware": self.opts.timestep_aware,
                "band": self.opts.timestep_band,
                "placement": "band start (1 - s)(1 - band) T, s = (f - f_smallest) / (min(1, cap) - "
                "f_smallest): smallest subnet the noisiest timesteps, largest the cleanest (T-Stitch)",
            }
        }

    def save(self) -> Path | None:
        """Rank 0 writes the checkpoint (every rank holds the same state); the others wait for it."""
        path = None
        if self.rank == 0:
            path = save_checkpoint(
                self.opts.out,
                model_state=self.net.state_dict(),
                # The live tensors, not copies (6.7 GB less at the paper base): written before the
                # next step changes them.
                ema_state=self.ema.state_dict(copy=False),
                optimizer_state=self.optimizer.optimizer_state_tensors(copy=False),
                config=self.net.config_dict(),
                training=self.metadata(),
            )
        barrier(self.ctx)  # no rank runs ahead of (or exits before) a published checkpoint
        return path

    def restore(self) -> bool:
        path = find_checkpoint(self.opts.out)
        if path is None:
            return False
        ckpt = load_checkpoint(path)
        cfg = ckpt["config"]
        if (cfg["family"], cfg["preset"]) != (self.opts.family, self.opts.preset):
            raise ValueError(
                f"--resume: {path} holds {cfg['family']}/{cfg['preset']}, not "
                f"{self.opts.family}/{self.opts.preset}"
            )
        self.net.load_state_dict(ckpt["model"])
        # A run saved before the conditioning extras moved under ``conditioning.`` names them the old way.
        self.ema.load_state_dict(upgrade_state_dict(ckpt["ema"]))
        hyper = ckpt["training"]["optimizer"]
        hyper = {
            **hyper,
            "param_groups": [
                {**g, "param_names": upgrade_state_dict(list(g["param_names"]))}
                for g in hyper["param_groups"]
            ],
        }
        self.optimizer.load_hyperparameters(hyper)
        self.optimizer.load_optimizer_state_tensors(upgrade_state_dict(ckpt["optimizer"]))
        self.precision.load_state_dict((ckpt["training"].get("precision") or {}).get("grad_scaler"))
        self.step = ckpt["training"]["step"]
        self.history = list(ckpt["training"].get("history_tail", []))
        return True


def train(opts: TrainOptions, progress: bool = True, on_step=None) -> Trainer:
    """Run (or resume) training to ``opts.steps`` iterations; returns the trainer."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    trainer = Trainer(opts)
    out = Path(opts.out)
    if opts.resume and trainer.restore() and trainer.rank == 0:
        tqdm.write(f"resumed from step {trainer.step}")
    if trainer.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "options.json").write_text(json.dumps(dataclasses.asdict(opts), indent=1))
        if trainer.codec is not None:
            trainer.codec.save(out / LATENT_FOLDER)
    barrier(trainer.ctx)  # rank 0's run directory exists before anyone goes on
    log = open(out / "log.jsonl", "a") if trainer.rank == 0 else None  # noqa: SIM115  (closed in the finally)
    bar = tqdm(
        total=opts.steps,
        initial=trainer.step,
        disable=not progress or trainer.rank != 0,
        dynamic_ncols=True,
        desc=f"train {opts.family}",
    )
    start = time.perf_counter()
    try:
        for samples in trainer.loader():
            stats = trainer.train_step(samples)
            trainer.history.append(stats)
            bar.update(1)
            bar.set_postfix(
                loss=f"{stats['Loss/train']:.4f}",
                res=stats["Subnet/resolution"],
                size=f"{stats['Subnet/params_frac']:.0%}",
            )
            if log and (trainer.step % opts.log_every == 0 or trainer.step == opts.steps):
                stats["Time/elapsed_s"] = round(time.perf_counter() - start, 2)
                log.write(json.dumps(stats) + "\n")
                log.flush()
            if on_step:
                on_step(trainer)
            if trainer.step % opts.checkpoint_every == 0 or trainer.step == opts.steps:
                trainer.save()
                if opts.sample_every and trainer.rank == 0 and trainer.step % opts.sample_every == 0:
                    from harness.training.samples import write_training_samples

                    write_training_samples(trainer)
    finally:
        bar.close()
        if log:
            log.close()
    return trainer


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_distributed(device: str = "auto"):
    """Join the ``torchrun`` process group when launched by it: ``LOCAL_RANK`` -> device, nccl on CUDA,
    gloo on the CPU (``harness.training.distributed.init_distributed``)."""
    return _init_distributed(device)

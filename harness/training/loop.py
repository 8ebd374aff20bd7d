"""Supernet training, SNED Algorithm 1, readable top to bottom.

Each iteration samples one subnet and one resolution (within that resolution's size cap and the sampling
warm-up's limits), computes the diffusion loss of that subnet, and updates *only its weights*: the masked
AdamW leaves every other weight, its Adam moments and its step count bit-identical; the EMA moves only
where the weights moved. Options beyond the paper (off by default): the sandwich rule and in-place
distillation. Data-parallel under ``torchrun`` (every rank samples the same subnet; gradients all-reduced).
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
from harness.training.batches import ClipSource, make_batch, step_rng, timestep_weights
from harness.training.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from harness.training.masked_optim import MaskedAdamW, MaskedEMA, masked_clip_grad_norm_
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
    seed: int = 0
    out: str = "results/runs/train"
    checkpoint_every: int = 200
    sample_every: int = 0  # 0 = no sample videos during training
    log_every: int = 10
    resume: bool = False
    threads: int | None = None
    init: str | None = None  # start from this model directory's weights (fresh optimizer state)
    autoencoder: str | None = None  # latent families: the trained video autoencoder directory


def warmup_limits(step: int, warmup_steps: int) -> tuple[float, float]:
    """Sampling warm-up (§3.4): the minimum channel ratio and minimum kept-component fraction step down
    from 1.0 to 0.4 in six equal stages over ``warmup_steps`` iterations. Returns both (they coincide)."""
    if warmup_steps <= 0:
        return 0.4, 0.4
    stage = min(6, math.floor(6 * step / warmup_steps))
    floor = round(1.0 - 0.1 * stage, 1)
    return floor, floor


def subnets_for_step(net: Supernet, opts: TrainOptions, step: int):
    """The subnet(s) of this step: one random (Algorithm 1), or the sandwich at one resolution."""
    min_ratio, min_keep = warmup_limits(step, opts.warmup_steps)
    rng = step_rng(opts.seed, step, 1)
    cfg = net.space.sample(rng, min_ratio=min_ratio, min_keep=min_keep)
    if not opts.sandwich:
        return [cfg]
    largest, smallest = net.space.largest(cfg.resolution), net.space.smallest(cfg.resolution)
    return [c for c in (largest, smallest, cfg) if net.space.fits(c)]


class Trainer:
    """State of one training run: supernet, masked optimizer, EMA, data, text encoder."""

    def __init__(self, opts: TrainOptions):
        self.opts = opts
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        if opts.batch % self.world:
            raise ValueError(f"--batch {opts.batch} must be divisible by the {self.world} ranks")
        torch.manual_seed(opts.seed)  # identical initial weights on every rank
        self.net = build_supernet(opts.family, opts.preset)
        self.init_hash = self._load_init(opts.init) if opts.init else None
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
            self.text = TextEncoderSpec(opts.text_encoder, self.net.spec.context_len).load()
            if self.text.dim != self.net.spec.context_dim:
                raise ValueError(
                    f"text encoder dim {self.text.dim} != the supernet's context dim "
                    f"{self.net.spec.context_dim}"
                )
        self.optimizer = MaskedAdamW(self.net.named_parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
        self.ema = MaskedEMA(self.net.named_parameters(), decay=opts.ema_decay)
        self.schedule = NoiseSchedule.named(opts.schedule)
        self.t_weights = timestep_weights(opts.late_timestep_portion, opts.late_timestep_multiplier)
        self.step = 0
        self.history: list[dict] = []

    # -- one iteration -------------------------------------------------------------------------------
    def train_step(self) -> dict:
        opts, net, step = self.opts, self.net, self.step
        self.optimizer.zero_grad(set_to_none=True)

        # Sample a subnet (or the sandwich) and a resolution.
        subnets = subnets_for_step(net, opts, step)
        resolution = subnets[0].resolution

        # This rank's share of the global batch at that resolution (latent families: encoded pixel clips).
        pixels = self.codec.pixel_resolution(resolution) if self.codec is not None else resolution
        batch = make_batch(
            self.source,
            self.text,
            seed=opts.seed,
            step=step,
            resolution=pixels,
            global_batch=opts.batch,
            rank=self.rank,
            world=self.world,
            cond_drop=opts.cond_drop,
            super_resolution=self.super_resolution,
            encode=self.codec.encode if self.codec is not None else None,
            offset_noise=opts.offset_noise,
            schedule=self.schedule,
            t_weights=self.t_weights,
        )

        # Diffusion loss of each subnet; in-place distillation targets the largest one's prediction.
        losses, teacher = [], None
        for i, cfg in enumerate(subnets):
            # Built per subnet: the null-text mix is part of each backward's graph.
            kwargs = batch.model_kwargs(getattr(net, "null_text", None))
            pred = net(batch.noisy, batch.timesteps, subnet=cfg, **kwargs)
            target = batch.target if (teacher is None or not opts.inplace_distill) else teacher
            loss = diffusion_loss(pred, target)
            loss.backward()
            losses.append(loss.detach())
            if i == 0 and opts.sandwich and opts.inplace_distill:
                teacher = pred.detach()

        # Masked update: only the sampled subnet(s)' entries move (weights, moments, step counts, EMA).
        active = self._union_masks(subnets)
        self._all_reduce_grads()
        grad_norm = masked_clip_grad_norm_(net.named_parameters(), active, opts.max_grad_norm)
        self.optimizer.step(active)
        self.ema.update(net.named_parameters(), active)

        loss = torch.stack(losses).mean()
        if self.world > 1:
            dist.all_reduce(loss)
            loss /= self.world
        self.step += 1
        return {
            "step": self.step,
            "Loss/train": float(loss),
            "Grad/norm": float(grad_norm),
            "Subnet/resolution": resolution,
            "Subnet/params_frac": net.space.param_fraction(subnets[-1]),
            "Warmup/min_ratio": warmup_limits(step, opts.warmup_steps)[0],
        }

    def _load_autoencoder(self, path: str | None):
        if not path:
            raise ValueError(
                f"{self.opts.family} denoises autoencoder latents: pass --autoencoder DIR (train one "
                f"with python -m harness.autoencoder_train)"
            )
        autoencoder = load_autoencoder(path)
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
            return LatentCodec.load(saved)
        res = self.net.space.default_resolution * autoencoder.config.downsample[1]
        clips = torch.stack([self.source.clip(i % len(self.source), res) for i in range(16)])
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

    def _all_reduce_grads(self) -> None:
        if self.world == 1:
            return
        for p in self.net.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world

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
            "torch_version": torch.__version__,
            "rng": {"scheme": "stateless: numpy default_rng([seed, step, stream])", "seed": self.opts.seed},
            "history_tail": self.history[-50:],
        }

    def save(self) -> Path | None:
        if self.rank != 0:
            return None
        return save_checkpoint(
            self.opts.out,
            model_state=self.net.state_dict(),
            ema_state=self.ema.state_dict(),
            optimizer_state=self.optimizer.optimizer_state_tensors(),
            config=self.net.config_dict(),
            training=self.metadata(),
        )

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
        while trainer.step < opts.steps:
            stats = trainer.train_step()
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


def init_distributed() -> None:
    """Join the ``torchrun`` process group when launched by it (gloo on CPU, nccl on GPU)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")

"""``python -m harness.paper_step``: one Algorithm-1 training step at a preset's native size, measured.

Builds the supernet (seeded, untrained), makes one batch of latents - from an untrained autoencoder of the
same preset built on the fly (``--latents autoencoder``: a random clip of the autoencoder's pixel size
encoded and sampled, scaled to unit variance) or drawn directly (``--latents random``) - and runs what the
trainer runs per iteration: ``subnets_for_step`` (the subnet and resolution Algorithm 1 draws at
``--step``), the diffusion loss on that subnet, masked clipping, masked AdamW and masked EMA on the
subnet's regions. Before that, ``--warm-steps`` iterations of the sampling warm-up (the largest subnet)
give every entry non-zero Adam moments, so the frozen-rest check is not vacuous: outside the subnet's
regions every weight, gradient, moment, step count and EMA entry of the real parameter set must hash the
same (BLAKE2b of the tensor with its active boxes zeroed) before and after the step. Then a checkpoint
(safetensors + JSON, ``harness.training.checkpoint``) is written under ``--out``, and the same step is
timed on the extracted static subnet with ``torch.optim.AdamW`` and a plain EMA (the super/static ratio).

Printed: parameters, the subnet's fraction, peak RSS (``getrusage``) after the supernet step and at the end,
the optimizer state measured in bytes per parameter, step times and their ratio. Example::

    python -m harness.paper_step --family latent-unet --preset paper --latents autoencoder --out /tmp/ps
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from harness.autoencoder import AUTOENCODER_PRESETS, build_autoencoder
from harness.cli import run_cli
from harness.diffusion import NoiseSchedule, diffusion_loss
from harness.latent import is_latent
from harness.training.checkpoint import save_checkpoint
from harness.training.loop import TrainOptions, subnets_for_step
from harness.training.masked_optim import MaskedAdamW, MaskedEMA, masked_clip_grad_norm_
from harness.training.optim_memory import state_bytes
from search_spaces import Supernet, build_supernet

LATENTS = ("random", "autoencoder")


@dataclass
class PaperStepOptions:
    family: str = "latent-unet"
    preset: str = "paper"
    latents: str = "random"  # "random" or "autoencoder" (an untrained one of the same preset)
    batch: int = 1
    step: int = 300  # the iteration whose subnet is drawn (>= the warm-up: the full sampling range)
    warmup_steps: int = 300  # the trainer's default sampling warm-up
    warm_steps: int = 1  # iterations (largest subnet) run first so every moment is non-zero
    static_steps: int = 2  # steps on the extracted static subnet (the first one warms up, the last timed)
    seed: int = 0
    lr: float = 1e-4
    out: str = "results/runs/paper_step"
    threads: int | None = None
    device: str = "cpu"  # "cuda": also checks that the masked update makes no host sync

    def check(self) -> None:
        if self.latents not in LATENTS:
            raise ValueError(f"--latents must be one of {', '.join(LATENTS)}, got {self.latents!r}")
        if self.batch < 1 or self.warm_steps < 0 or self.static_steps < 0 or self.step < 0:
            raise ValueError("--batch must be >= 1 and --step, --warm-steps, --static-steps >= 0")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def make_latents(net: Supernet, opts: PaperStepOptions, resolution: int) -> torch.Tensor:
    """Clean latents ``(B, C, T, R, R)`` at the supernet's frames and ``resolution``."""
    spec, frames = net.spec, net.hyper.frames
    gen = torch.Generator().manual_seed(opts.seed + 1)
    shape = (opts.batch, spec.in_channels, frames, resolution, resolution)
    if opts.latents == "random":
        return torch.randn(shape, generator=gen)
    if not is_latent(net) or opts.preset not in AUTOENCODER_PRESETS:
        raise ValueError(
            f"--latents autoencoder needs a latent family with an autoencoder preset {opts.preset!r}; "
            f"use --latents random"
        )
    torch.manual_seed(opts.seed + 2)
    autoencoder = build_autoencoder(opts.preset).eval()
    if autoencoder.config.z_channels != spec.in_channels:
        raise ValueError(f"autoencoder preset {opts.preset!r} has a different latent width; use random")
    d = autoencoder.config.downsample
    video = torch.rand(opts.batch, 3, frames * d[0], resolution * d[1], resolution * d[2], generator=gen)
    with torch.no_grad():
        z = autoencoder.encode(video * 2 - 1).sample(gen)
    if tuple(z.shape) != shape:
        raise RuntimeError(f"autoencoder latents {tuple(z.shape)} != {shape}")
    return z / z.std()  # the trainer's LatentCodec scales latents to unit variance the same way


def _outside(t: torch.Tensor, boxes) -> str:
    """BLAKE2b of ``t`` with its ``boxes`` zeroed (``None``: the whole tensor): equal digests before and
    after a step mean every entry outside the boxes is bit-identical. One tensor copy at a time."""
    c = t.detach().to("cpu", copy=True)
    for box in [] if boxes is None else [boxes] if isinstance(boxes, tuple) else boxes:
        c[box] = 0
    return hashlib.blake2b(c.reshape(-1).view(torch.uint8).numpy(), digest_size=16).hexdigest()


def frozen_digests(net: Supernet, opt: MaskedAdamW, ema: MaskedEMA, active: dict) -> dict[str, str]:
    """Digests of the inactive part of every weight, gradient, moment, step count and EMA entry."""
    out = {}
    for name, p in net.named_parameters():
        boxes = active.get(name)
        counts, warm = opt.step_counts([name]), ema.update_counts([name])  # one expansion at a time
        out[f"{name}:weight"] = _outside(p, boxes)
        if p.grad is not None:
            out[f"{name}:grad"] = _outside(p.grad, boxes)
        state = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                out[f"{name}:{key}"] = _outside(state[key], boxes)
        if name in counts:
            out[f"{name}:step"] = _outside(counts[name], boxes)
        out[f"{name}:ema"] = _outside(ema.shadow[name], boxes)
        if name in warm:
            out[f"{name}:ema_count"] = _outside(warm[name], boxes)
    return out


def _batch(net: Supernet, latents: torch.Tensor, seed: int, step: int):
    """Noisy latents, timesteps, extra inputs and the target of one step (the paper's schedule)."""
    schedule, gen = NoiseSchedule(), torch.Generator().manual_seed(seed * 1000 + step)
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.randint(0, 1000, (latents.shape[0],), generator=gen)
    noisy = schedule.train_scheduler().add_noise(latents, noise, t)
    extra = net.dummy_inputs(batch_size=latents.shape[0], seed=seed)  # conditioning of other families
    device = next(net.parameters()).device
    extra = {k: v.to(device) for k, v in extra.items() if k not in ("sample", "timestep")}
    target = schedule.target(latents, noise, t)
    return noisy.to(device), t.to(device), extra, target.to(device)


def super_step(net, opt, ema, cfg, latents, opts: PaperStepOptions, step: int, before=None):
    """One Algorithm-1 iteration on subnet ``cfg``; ``before`` (a callback) runs between backward and the
    masked update (the frozen-rest snapshot). Returns ``(seconds, update seconds, loss)``: the whole step
    and its clip + AdamW + EMA part, the snapshot excluded."""
    noisy, t, extra, target = _batch(net, latents, opts.seed, step)
    device = noisy.device
    _sync(device)
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = diffusion_loss(net(noisy, t, subnet=cfg, **extra), target)
    loss.backward()
    active = net.active_regions(cfg)
    paused = 0.0
    if before is not None:
        _sync(device)
        mark = time.perf_counter()
        before(active)
        paused = time.perf_counter() - mark
    _sync(device)
    update_start = time.perf_counter()
    if device.type == "cuda":  # any host sync in the masked update raises here
        torch.cuda.set_sync_debug_mode("error")
    try:
        masked_clip_grad_norm_(net.named_parameters(), active, 1.0)
        opt.step(active)
        ema.update(net.named_parameters(), active)
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    _sync(device)
    end = time.perf_counter()
    return end - start - paused, end - update_start, float(loss.detach())


def static_steps(static, batch, opts: PaperStepOptions) -> list[tuple[float, float]]:
    """The same iteration (``batch`` from ``_batch``) on an extracted static subnet: plain AdamW
    (``foreach``), clipping, EMA. Returns ``(seconds, update seconds)`` per step."""
    opt = torch.optim.AdamW(static.parameters(), lr=opts.lr, weight_decay=0.0)
    params = list(static.parameters())
    shadow = [p.detach().clone() for p in params]
    times = []
    noisy, t, extra, target = batch
    for _ in range(opts.static_steps):
        _sync(noisy.device)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.mse_loss(static(noisy, t, **extra), target).backward()
        _sync(noisy.device)
        update_start = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(shadow, [p.detach() for p in params], 1 - 0.999)
        _sync(noisy.device)
        end = time.perf_counter()
        times.append((end - start, end - update_start))
    return times


def run(opts: PaperStepOptions) -> dict:
    opts.check()
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here; use --device cpu")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    report: dict = {"options": asdict(opts), "torch": torch.__version__, "threads": torch.get_num_threads()}
    device = torch.device(opts.device)
    torch.manual_seed(opts.seed)
    net = build_supernet(opts.family, opts.preset).to(device)
    report["params"] = sum(p.numel() for p in net.parameters())
    train_opts = TrainOptions(
        family=opts.family, preset=opts.preset, warmup_steps=opts.warmup_steps, seed=opts.seed, lr=opts.lr
    )
    cfg = subnets_for_step(net, train_opts, opts.step)[0]
    report["subnet"] = {"resolution": cfg.resolution, "params_fraction": net.space.param_fraction(cfg)}
    latents = make_latents(net, opts, cfg.resolution)
    report["latents"] = {"source": opts.latents, "shape": list(latents.shape)}
    report["rss_after_build_gib"] = peak_rss_gib()

    opt = MaskedAdamW(net.named_parameters(), lr=opts.lr, weight_decay=0.0)
    ema = MaskedEMA(net.named_parameters(), decay=0.999)
    warm = []
    for step in range(opts.warm_steps):  # the sampling warm-up draws the largest subnet here
        largest = subnets_for_step(net, train_opts, step)[0]
        warm.append(super_step(net, opt, ema, largest, latents, opts, step)[0])
    report["warm_step_s"] = warm
    report["peak_rss_warm_gib"] = peak_rss_gib()  # training alone (the check below holds one copy more)

    snapshots: dict = {}
    seconds, update_seconds, loss = super_step(
        net,
        opt,
        ema,
        cfg,
        latents,
        opts,
        opts.step,
        before=lambda active: snapshots.update(active=active, digests=frozen_digests(net, opt, ema, active)),
    )
    report["super_step_s"], report["super_update_s"], report["loss"] = seconds, update_seconds, loss
    after = frozen_digests(net, opt, ema, snapshots["active"])
    changed = sorted(k for k, v in snapshots["digests"].items() if after.get(k) != v)
    report["frozen_rest"] = {"tensors_checked": len(after), "changed_outside": changed[:10]}
    sizes = state_bytes(net, opt, ema)
    report["state_bytes_per_param"] = {
        "tensors": sizes.tensor_bytes_per_param,
        "host": sizes.host_bytes_per_param,
    }
    report["peak_rss_super_gib"] = peak_rss_gib()

    opt.zero_grad(set_to_none=True)  # as the trainer would before its next step: no grads to hold
    start = time.perf_counter()
    path = save_checkpoint(  # the live tensors, not copies: saving costs no extra memory
        Path(opts.out) / "run",
        model_state=net.state_dict(),
        ema_state=ema.state_dict(copy=False),
        optimizer_state=opt.optimizer_state_tensors(copy=False),
        config=net.config_dict(),
        training={"step": opts.step + 1, "optimizer": opt.hyperparameters(), "paper_step": asdict(opts)},
    )
    report["checkpoint"] = {
        "path": str(path),
        "seconds": time.perf_counter() - start,
        "bytes": sum(f.stat().st_size for f in path.iterdir()),
    }
    report["peak_rss_after_save_gib"] = peak_rss_gib()

    if opts.static_steps:
        del opt, ema  # free the supernet's state before the static copy's own
        batch = _batch(net, latents, opts.seed, opts.step)
        static = net.extract(cfg)
        del net
        times = static_steps(static, batch, opts)
        best = min(times[1:] or times)  # the first one warms up
        report["static_step_s"], report["static_update_s"] = [t for t, _ in times], best[1]
        report["super_over_static"] = seconds / best[0]
        report["super_update_over_static_update"] = update_seconds / best[1]
    report["peak_rss_gib"] = peak_rss_gib()
    if device.type == "cuda":
        report["cuda_peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harness.paper_step", description=__doc__.splitlines()[0])
    d = PaperStepOptions()
    p.add_argument("--family", default=d.family, help="supernet family (latent-unet, pixel-base, pixel-ssr)")
    p.add_argument("--preset", default=d.preset, help="preset of the family (tiny, paper)")
    p.add_argument("--latents", default=d.latents, help="random | autoencoder (untrained, same preset)")
    p.add_argument("--batch", type=int, default=d.batch, help="clips in the batch")
    p.add_argument("--step", type=int, default=d.step, help="iteration whose subnet Algorithm 1 draws")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="the trainer's sampling warm-up")
    p.add_argument("--warm-steps", type=int, default=d.warm_steps, help="largest-subnet steps run first")
    p.add_argument("--static-steps", type=int, default=d.static_steps, help="static-subnet steps (0: none)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--out", default=d.out, help="directory for the checkpoint and report.json")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default=d.device, help="cpu | cuda")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    opts = PaperStepOptions(**{k: v for k, v in vars(args).items()})
    report = run(opts)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(format_report(report))
    if report["frozen_rest"]["changed_outside"]:
        print("FROZEN REST CHANGED", file=sys.stderr)
        sys.exit(1)
    return report


def format_report(r: dict) -> str:
    """The report as the lines printed (and kept in results/paper_step)."""
    sub, fr, sb, o = r["subnet"], r["frozen_rest"], r["state_bytes_per_param"], r["options"]
    frozen = (
        "bit-identical outside the subnet"
        if not fr["changed_outside"]
        else f"CHANGED {fr['changed_outside']}"
    )
    warm = [round(s, 2) for s in r["warm_step_s"]]
    lines = [
        f"supernet {o['family']}/{o['preset']}: {r['params'] / 1e6:.1f}M parameters; latents "
        + f"{r['latents']['source']} {r['latents']['shape']}; torch {r['torch']}, {r['threads']} threads",
        f"subnet drawn at step {o['step']}: resolution {sub['resolution']}, {sub['params_fraction']:.1%} of the"
        + " parameters",
        f"frozen rest: {fr['tensors_checked']} tensors (weights, grads, moments, step counts, EMA, EMA counts) "
        + frozen,
        f"state: {sb['tensors']:.3f} B/param in tensors + {sb['host']:.5f} B/param of host cell counts",
        f"super step: {r['super_step_s']:.2f} s, of which clip + masked AdamW + masked EMA "
        + f"{r['super_update_s']:.2f} s (loss {r['loss']:.4f}); largest-subnet warm-up steps {warm} s",
        f"checkpoint: {r['checkpoint']['bytes'] / 2**30:.2f} GiB in {r['checkpoint']['seconds']:.1f} s",
        f"peak RSS: {r['peak_rss_warm_gib']:.2f} GiB after the warm-up step(s), "
        + f"{r['peak_rss_super_gib']:.2f} GiB after the checked supernet step, "
        + f"{r['peak_rss_after_save_gib']:.2f} GiB after the save, {r['peak_rss_gib']:.2f} GiB at the end",
    ]
    if "cuda_peak_allocated_gib" in r:
        lines.append(
            f"CUDA peak allocated: {r['cuda_peak_allocated_gib']:.2f} GiB; no host sync in the update"
        )
    if "static_step_s" in r:
        times = [round(s, 2) for s in r["static_step_s"]]
        lines.append(
            f"static step: {times} s (update {r['static_update_s']:.2f} s); super/static step time "
            + f"{r['super_over_static']:.2f}, update time {r['super_update_over_static_update']:.2f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main)

"""The paper-scale table: modelled latency of SNED-S/M/L/B (40/60/80/100 % of the parameters, the
balanced subnets of ``SearchSpace.subnet_at_fraction``) of a paper preset on a named device, per
denoiser step (one forward of the guidance pair) and per video (``steps`` of them), in fp32 and bf16,
with the modelled B/S speedup beside the paper's Table 1 (SNED-S 16.0 s, SNED-B 24.4 s on one A100:
1.53x; the paper does not state its step count or frames, so its seconds and ours are compared only as
the ratio)."""

from __future__ import annotations

import torch

from harness.roofline.fit import load_model
from harness.roofline.model import denoiser_ops
from search_spaces import build_supernet

SIZES = (("SNED-S", 0.4), ("SNED-M", 0.6), ("SNED-L", 0.8), ("SNED-B", 1.0))
PAPER_SECONDS = {"SNED-S": 16.0, "SNED-M": 18.1, "SNED-L": 21.2, "SNED-B": 24.4}  # Table 1, one A100


def paper_table(
    device: str = "a100-sxm4-80gb",
    family: str = "pixel-base",
    preset: str = "paper",
    steps: int = 50,
    frames: int | None = None,
    guided: bool = True,
    precisions: tuple[str, ...] = ("fp32", "bf16"),
) -> list[dict]:
    """One row per (size, precision): parameters, modelled seconds per step and per video, and the
    parts of a step (roofline, overhead, compute- and memory-bound ops)."""
    if steps < 1:
        raise ValueError(f"--steps must be at least 1, got {steps}")
    with torch.device("meta"):  # nothing allocated: the trace needs shapes only
        net = build_supernet(family, preset)
    frames = frames or net.hyper.frames
    batch = 2 if guided else 1
    rows = []
    for precision in precisions:
        model = load_model(device, precision)
        for name, fraction in SIZES:
            cfg = net.space.subnet_at_fraction(fraction)
            arrays = denoiser_ops(net, cfg, frames, batch, model.dtype)
            t = model.forward(arrays)
            rows.append(
                {
                    "model": name,
                    "fraction": fraction,
                    "params": net.count_params(cfg),
                    "precision": precision,
                    "device": model.label,
                    "resolution": cfg.resolution,
                    "frames": frames,
                    "batch_per_forward": batch,
                    "steps": steps,
                    "step_s": t.seconds,
                    "video_s": t.seconds * steps,
                    "roofline_s": t.roofline_s,
                    "overhead_s": t.overhead_s,
                    "compute_bound_ops": t.compute_bound_ops,
                    "memory_bound_ops": t.memory_bound_ops,
                    "step_tflop": float(arrays.flops.sum()) / 1e12,
                    "paper_video_s": PAPER_SECONDS[name],
                }
            )
    return rows


def format_table(rows: list[dict], command: str) -> str:
    """Markdown: one line per size and precision, then the B/S speedups."""
    first = rows[0]
    lines = [
        f"# Modelled latency at paper scale: {first['device'].split(' (')[0]}",
        "",
        f"Command: `{command}`",
        "",
        (
            f"{first['resolution']} px x {first['frames']} frames, batch {first['batch_per_forward']} per "
            f"forward (the guidance pair), {first['steps']} steps per video; roofline v1, uncalibrated "
            "(catalogue figures, default efficiencies)."
        ),
        "",
        "| model | precision | params (M) | per step (s) | per video (s) | compute-/memory-bound ops | paper (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        params = f"{r['params'] / 1e6:.0f}"
        lines.append(
            f"| {r['model']} | {r['precision']} | {params} | {r['step_s']:.3f} | {r['video_s']:.1f} | "
            f"{r['compute_bound_ops']} / {r['memory_bound_ops']} | {r['paper_video_s']} |"
        )
    lines.append("")
    for precision in dict.fromkeys(r["precision"] for r in rows):
        by = {r["model"]: r for r in rows if r["precision"] == precision}
        speedup = by["SNED-B"]["step_s"] / by["SNED-S"]["step_s"]
        flops = by["SNED-B"]["step_tflop"] / by["SNED-S"]["step_tflop"]
        lines.append(
            f"- modelled B/S speedup, {precision}: {speedup:.2f}x (paper, A100: 24.4 / 16.0 = 1.53x); "
            f"FLOPs ratio B/S {flops:.2f}x ({by['SNED-B']['step_tflop']:.1f} / "
            f"{by['SNED-S']['step_tflop']:.1f} TFLOP per step)"
        )
    return "\n".join(lines) + "\n"

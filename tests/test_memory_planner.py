"""The memory planner (``harness.memory``): its traced peaks agree with the CPU allocator's measured peak
on the tiny presets, its meta-device runs of paper presets allocate nothing, and its CLI refuses bad input."""

import json
import subprocess
import sys

import pytest
import torch

from harness.memory import (
    GIB,
    Mode,
    StorageTimeline,
    main,
    measured_training_step,
    plan,
    trace_training_step,
)
from search_spaces import build_supernet

from .conftest import randomize_

MODES = ["fp32", "bf16", "fp32+ckpt", "bf16+ckpt"]
# (family, batch, frames): sizes at which the step's activations dominate what the allocator holds
CASES = [("pixel-base", 2, 12), ("pixel-ssr", 1, 12), ("latent-unet", 4, 8)]


@pytest.fixture(scope="module")
def pairs():
    """Per family: the tiny supernet on CPU (random weights) and the same preset on meta."""
    out = {}
    for family, _, _ in CASES:
        with torch.device("meta"):
            meta = build_supernet(family, "tiny")
        out[family] = (randomize_(build_supernet(family, "tiny")), meta)
    return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family,batch,frames", CASES)
def test_planned_step_peak_is_within_20_percent_of_the_measured_one(family, batch, frames, mode, pairs):
    """Planned: traced on meta. Measured: the same step run for real on CPU (real autocast, the real SDPA
    kernel), its peak read from the profiler's allocation records (``measured_cpu_peak``)."""
    net, meta = pairs[family]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # oneDNN's scratch does not depend on the other agents' load
    try:
        for res in net.space.resolutions:
            cfg = net.space.largest(res)
            _, planned = trace_training_step(meta, cfg, batch, frames, Mode.parse(mode), rules="cpu")
            measured = measured_training_step(net, cfg, batch, frames, Mode.parse(mode))
            assert measured > 4 * 2**20  # big enough for the step to dominate
            assert abs(planned - measured) <= 0.20 * measured, (res, planned, measured)
    finally:
        torch.set_num_threads(threads)


def test_checkpointing_and_bf16_lower_the_planned_peak(pairs):
    _, meta = pairs["pixel-base"]
    cfg = meta.space.largest()
    peak = {m: trace_training_step(meta, cfg, 2, 12, Mode.parse(m))[1] for m in MODES}
    assert peak["bf16"] < 0.8 * peak["fp32"]  # CUDA rules: norms keep fp32 inputs for backward
    assert peak["fp32+ckpt"] < 0.5 * peak["fp32"] and peak["bf16+ckpt"] < 0.5 * peak["bf16"]


def test_timeline_counts_live_storages():
    with torch.device("meta"):
        x = torch.empty(1000)  # made before: not counted
    with StorageTimeline() as timeline:
        y = x * 2  # 4000 B
        z = y + 1  # 8000 B live
        v = z.view(10, 100)  # a view: nothing new
        del y
        w = z * 3  # y was freed: 8000 B again
        assert timeline.current == 8000
    assert timeline.peak == 8000 and v.shape == (10, 100) and w.shape == (1000,)


def test_paper_base_fits_an_a100_with_bf16_and_checkpointing_without_allocating():
    """The 1.6B base at 64 px, 16 frames, batch 1: bf16 + checkpointing fits 80 GB; the child process that
    plans it (on meta) stays far below the ~36 GiB it plans."""
    code = (
        "import json, resource\n"
        "from harness.memory import plan\n"
        "rows = plan('pixel-base', 'paper', ['bf16+ckpt'])\n"
        "print(json.dumps({'peak': rows[0].train_peak, 'params': rows[0].supernet_params,"
        " 'rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["params"] > 1.5e9
    assert 20 * GIB < result["peak"] < 78.5 * GIB
    assert result["rss"] < 2 * GIB, result


def test_cli_prints_a_table_and_refuses_bad_input(capsys):
    main(["--family", "latent-unet", "--preset", "tiny", "--modes", "fp32,bf16+ckpt"])
    out = capsys.readouterr().out
    assert "bf16+ckpt" in out and "cap 70%" in out and "MiB" in out
    with pytest.raises(ValueError, match="unknown mode"):
        main(["--family", "latent-unet", "--preset", "tiny", "--modes", "fp16"])
    with pytest.raises(ValueError, match="resolution 12"):
        main(["--family", "latent-unet", "--preset", "tiny", "--resolution", "12"])
    with pytest.raises(ValueError, match="--batch"):
        plan("latent-unet", "tiny", batch=0)

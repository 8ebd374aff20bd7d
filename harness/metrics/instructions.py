"""Deterministic cost figures: instructions of one forward, counted by Callgrind.

For CI regression gates where wall-clock timing cannot be trusted (a shared 2-core machine: latency moves
by 10 % between processes and by 2-200x under contention), the instruction count of one forward of a
static subnet is counted by valgrind's Callgrind through ``torch.utils.benchmark.Timer.collect_callgrind``
(one thread; CPython's reference-counting noise removed with ``counts(denoise=True)``). Two repeats in one
run agreed to 0.02–0.15 % here; the count changes when the forward's code does (an extra op, another kernel),
not when the machine is busy.

Optional for users: it needs ``valgrind`` on the PATH (Debian/Ubuntu: ``apt-get install -y valgrind``);
without it :func:`forward_instructions` fails with one line saying so. It is slow: Callgrind runs the whole
Python process under valgrind, and importing torch and the search space there takes 3-4 minutes on the
2-core machine, whatever the forward, so count few forwards (the bench counts one).

The count depends on the CPU features valgrind exposes (oneDNN picks its kernels by them) and on the
torch build, so a count is only compared with one from the same machine type and torch version (both are
recorded).
"""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils.benchmark import Timer

INSTALL_HINT = "install valgrind (Debian/Ubuntu: apt-get install -y valgrind)"

_SETUP = textwrap.dedent(
    """
    import torch
    torch.manual_seed(0)
    from search_spaces import SubnetConfig, build_supernet, make_dummy_inputs
    net = build_supernet(family, preset).eval()
    static = net.extract(SubnetConfig.from_json(subnet_json)).eval()
    inputs = make_dummy_inputs(static.spec, resolution, frames, batch, seed=0)
    torch.set_grad_enabled(False)
    """
)


@dataclass(frozen=True)
class InstructionCount:
    """Instructions of one forward (``count``: the median of ``repeats``) and what they were counted on."""

    count: int
    repeats: list[int]
    family: str
    preset: str
    subnet: str  # SubnetConfig key
    batch: int
    frames: int
    resolution: int
    threads: int
    torch_version: str
    valgrind_version: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def valgrind_version() -> str | None:
    """``valgrind --version``, or ``None`` when valgrind is not on the PATH."""
    exe = shutil.which("valgrind")
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip() or "valgrind (unknown version)"


def forward_instructions(
    family: str,
    preset: str,
    subnet,
    *,
    batch: int = 2,
    frames: int | None = None,
    resolution: int | None = None,
    repeats: int = 1,
) -> InstructionCount:
    """Callgrind instruction count of one forward of ``subnet`` (a ``SubnetConfig`` of the family's
    untrained supernet, seeded: weights do not change the code path) on the dummy inputs of ``batch``
    (default 2: the guidance pair) x ``frames`` (default: the preset's) at ``resolution`` (default: the
    config's), one thread. ``repeats`` counted forwards in the one valgrind run (after one warm-up)."""
    version = valgrind_version()
    if version is None:
        raise FileNotFoundError(f"counting instructions needs valgrind on the PATH: {INSTALL_HINT}")
    if batch < 1 or repeats < 1:
        raise ValueError(f"batch and repeats must be at least 1, got {batch} and {repeats}")
    from search_spaces import build_supernet

    net = build_supernet(family, preset)
    cfg = net.space.validate(subnet)
    frames = frames or net.hyper.frames
    resolution = resolution or cfg.resolution
    # Callgrind runs the setup in a fresh interpreter and accepts only wrapped globals, so the values
    # travel as literals in the setup code.
    values = {
        "family": family,
        "preset": preset,
        "subnet_json": cfg.to_json(),
        "batch": int(batch),
        "frames": int(frames),
        "resolution": int(resolution),
    }
    literals = "".join(f"{name} = {value!r}\n" for name, value in values.items())
    timer = Timer(stmt="static(**inputs)", setup=literals + _SETUP, num_threads=1)
    # collect_callgrind first runs the setup in this process to check it, and the setup turns autograd off:
    # the caller's grad mode is put back so a count leaves no trace on later training in the same process.
    grad_enabled = torch.is_grad_enabled()
    try:
        stats = timer.collect_callgrind(number=1, repeats=repeats, collect_baseline=False)
    finally:
        torch.set_grad_enabled(grad_enabled)
    stats = stats if isinstance(stats, tuple) else (stats,)
    counts = [int(s.counts(denoise=True)) for s in stats]
    return InstructionCount(
        count=sorted(counts)[len(counts) // 2],
        repeats=counts,
        family=family,
        preset=preset,
        subnet=cfg.key,
        batch=int(batch),
        frames=int(frames),
        resolution=int(resolution),
        threads=1,
        torch_version=torch.__version__,
        valgrind_version=version,
    )

"""Planned peak memory of one training step and of one generation, from a meta-device trace.

``python -m harness.memory --family pixel-base --preset paper`` prints, per resolution, for the full
network and for the largest subnet under that resolution's size cap, and per mode (``fp32``, ``bf16``,
``bf16+ckpt``, ...): what one training step and one generation need, and whether that fits a GPU
(default an 80 GB A100).

How the numbers are made. The supernet is built on the ``meta`` device (shapes only: nothing is allocated,
nothing is computed) and one step is run on it under ``StorageTimeline``, a ``TorchDispatchMode`` that plays
the allocator: every storage an op creates is counted from that op on, until its last reference is gone
(autograd's saved tensors included, so what backward keeps is counted for as long as it is kept). The
largest total over the step is its activation peak. The parts that are not traced:

- persistent training state: ``PERSISTENT_BYTES`` (20 B) per supernet parameter, fp32 weights, gradients,
  two Adam moments and an EMA (the masked optimizer keeps its gradients between steps, so a step's
  backward accumulates into existing buffers: the trace starts with them allocated, outside the count);
- the optimizer step's transient, ``OPTIMIZER_TRANSIENT_BYTES`` (4 B) per *active* parameter; it comes
  after backward, when the activations are gone, so the step peak is persistent + max(activation peak,
  optimizer transient);
- the CUDA context, cuBLAS / cuDNN workspaces and allocator fragmentation: ``GPU_RESERVE_GIB`` is held back
  from the GPU's capacity before the verdict;
- scratch that kernels allocate and free inside one op. On CPU (``rules="cpu"``, the planner's check
  against a measured CPU peak) oneDNN's convolution backward reorders its output gradient and input, and
  the profiler puts the measured peak inside it with checkpointing on: that op gets a scratch of both
  sizes (``StorageTimeline(conv_scratch=True)``). On a GPU that is cuDNN's workspace, in the reserve.

Precision. ``bf16`` is autocast (fp32 master weights, bf16 compute). ``torch.autocast`` refuses the meta
device, so ``AutocastEmulation`` (a ``TorchFunctionMode``, i.e. above autograd, where autocast works) applies
autocast's casting rules: inputs of the lower-precision ops (convolutions, linear, matmuls, SDPA) cast to
bf16, inputs of the fp32 ops (CUDA: group / layer norm, softmax, MSE) cast to fp32, everything else in the
widest input type. Autograd therefore saves exactly the tensors it would save under autocast (bf16 conv /
linear inputs and weight casts, fp32 norm inputs). Generation in ``bf16`` runs the static subnet cast to
bf16 (2 B per weight, no autocast).

Attention. ``fused`` (default) stands for the flash / memory-efficient kernels a GPU uses: SDPA calls are
traced as ``aten._scaled_dot_product_flash_attention`` (saves q, k, v, the output and a log-sum-exp; no
``S x S`` matrix), or with a float mask (temporal attention without autograd) as the memory-efficient
kernel. ``math`` traces SDPA as the meta device runs it (saves the attention probabilities).

Checked against the CPU allocator (``measured_training_step``, ``tests/test_memory_planner.py``): on the
tiny presets the planned step peak is within 4-15 % of the measured one (under it), for every mode.

Checkpointing (``+ckpt``) is the model's own ``set_activation_checkpointing``: the trace records what it
does (block inputs kept, each block recomputed in backward), not a model of it.

A generation is one denoiser forward without autograd at batch ``2 * batch`` (classifier-free guidance
batched as a pair) plus the static subnet's weights; the sampler's few latents, the text encoder and a
latent family's decoder are not included.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

PERSISTENT_BYTES = 20  # per supernet parameter: fp32 weight, grad, Adam m and v, EMA
OPTIMIZER_TRANSIENT_BYTES = 4  # per active parameter, during the masked optimizer's step
GPU_RESERVE_GIB = 1.5  # CUDA context + library workspaces + fragmentation, held back from capacity
GIB = 2**30
MODES = ("fp32", "bf16", "fp32+ckpt", "bf16+ckpt")


# -- the allocator, played on meta tensors -------------------------------------------------------------
class StorageTimeline(TorchDispatchMode):
    """Bytes of the storages created inside the mode that are still referenced, op by op: ``peak``
    (largest total seen) and ``current``. Storages that existed before (parameters, their gradients,
    inputs) are not counted. Views and in-place results share their input's storage and add nothing.

    Frees are found by weak references to the storages. Checking every live storage after every op
    would cost O(live) per op, so ``current`` is kept as an upper bound (allocations only) and the
    references are checked only when that bound passes the peak: the peak is still exact.
    """

    def __init__(self, conv_scratch: bool = False):
        super().__init__()
        self.conv_scratch = conv_scratch
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.upper = 0  # bytes of ``live`` (some may have died since the last sweep)
        self.peak = 0
        self.ops = 0

    def _sweep(self) -> None:
        dead = [key for key, (ref, _) in self.live.items() if ref.expired()]
        for key in dead:
            self.upper -= self.live.pop(key)[1]

    @property
    def current(self) -> int:
        self._sweep()
        return self.upper

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        if self.conv_scratch and func is torch.ops.aten.convolution_backward.default:
            # oneDNN (CPU) reorders the output gradient and the input into its blocked layout for the
            # backward: scratch the size of both, alive during the op only (seen in the profiler).
            scratch = sum(t.untyped_storage().nbytes() for t in args[:2])
            self._sweep()
            self.peak = max(self.peak, self.upper + scratch)
        inputs = {
            StorageWeakRef(t.untyped_storage()).cdata
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            ref = StorageWeakRef(t.untyped_storage())
            key = ref.cdata
            if key in inputs:
                continue  # a view or an in-place result
            if key in self.live:
                old_ref, old_bytes = self.live[key]
                if not old_ref.expired():
                    continue  # another output of this op on the same storage
                self.upper -= old_bytes  # the address of a freed storage, reused
            nbytes = t.untyped_storage().nbytes()
            self.live[key] = (ref, nbytes)
            self.upper += nbytes
        if self.upper > self.peak:
            self._sweep()
            self.peak = max(self.peak, self.upper)
        return out


# -- autocast and fused attention, emulated above autograd ------------------------------------------------
_LOWER = {
    F.linear,
    F.conv1d,
    F.conv2d,
    F.conv3d,
    torch.matmul,
    torch.mm,
    torch.bmm,
    torch.addmm,
    torch.baddbmm,
    torch.einsum,
    F.scaled_dot_product_attention,
}
FP32_OPS = {
    "cuda": {F.group_norm, F.layer_norm, F.softmax, torch.softmax, F.log_softmax, F.mse_loss},
    "cpu": {F.mse_loss},  # CPU autocast runs the norms and softmax in their input's type
}


class AutocastEmulation(TorchFunctionMode):
    """Autocast's casting rules for device ``rules`` (``"cuda"`` or ``"cpu"``), on any device, meta
    included; ``attention="fused"`` also traces SDPA as the flash kernel (see the module docstring)."""

    def __init__(self, dtype: torch.dtype | None, rules: str = "cuda", attention: str = "fused"):
        super().__init__()
        self.dtype, self.fp32 = dtype, FP32_OPS[rules]
        self.attention = attention
        self.cache: dict[int, torch.Tensor] = {}  # autocast caches casts of leaf weights within a forward

    def _cast(self, value, dtype):
        if not (isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype):
            return value
        if value.is_leaf and value.requires_grad and dtype == self.dtype:
            if id(value) not in self.cache:
                self.cache[id(value)] = value.to(dtype)
            return self.cache[id(value)]
        return value.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.dtype is not None:
            target = self.dtype if func in _LOWER else torch.float32 if func in self.fp32 else None
            if target is not None:
                args = tuple(self._cast(a, target) for a in args)
                kwargs = {k: self._cast(v, target) for k, v in kwargs.items()}
        if func is F.scaled_dot_product_attention and self.attention == "fused":
            return _flash(*args, **kwargs)
        return func(*args, **kwargs)


def _flash(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA as a fused kernel: flash without a mask, memory-efficient (takes a float bias) with one; on a
    real CPU network, CPU's flash kernel (takes both)."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
        )[0]
    if attn_mask is None:
        return torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, dropout_p, is_causal, False, scale=scale
        )[0]
    bias = attn_mask.expand(*q.shape[:-1], k.shape[-2])  # a view: the kernel reads the broadcast bias
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, bias, torch.is_grad_enabled(), dropout_p, is_causal, scale=scale
    )[0]


# -- one step, one generation ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Mode:
    precision: str  # "fp32" | "bf16"
    checkpointing: bool

    @classmethod
    def parse(cls, text: str) -> Mode:
        if text not in MODES:
            raise ValueError(f"unknown mode {text!r}: use one of {', '.join(MODES)}")
        return cls(text.split("+")[0], text.endswith("+ckpt"))

    @property
    def dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.precision == "bf16" else None

    def __str__(self) -> str:
        return self.precision + ("+ckpt" if self.checkpointing else "")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Bytes of one row of the table."""

    resolution: int
    network: str  # "full" or "cap 80%"
    mode: str
    supernet_params: int
    active_params: int
    persistent: int  # PERSISTENT_BYTES * supernet parameters
    saved: int  # activations kept for backward at the end of the forward
    activation_peak: int  # traced peak of forward + backward (above the persistent state)
    optimizer_transient: int
    generation_weights: int
    generation_peak: int  # traced peak of one guided denoiser forward (above the weights)

    @property
    def train_peak(self) -> int:
        return self.persistent + max(self.activation_peak, self.optimizer_transient)

    @property
    def generation_total(self) -> int:
        return self.generation_weights + self.generation_peak


def _inputs(net, resolution: int, batch: int, frames: int) -> dict:
    """Inputs of one step; fp32, as the data loader gives them (autocast casts them where it casts)."""
    from search_spaces import make_dummy_inputs

    return make_dummy_inputs(net.spec, resolution, frames, batch, 0, net.conv_in.weight.device)


@contextmanager
def _grads_allocated(net) -> Iterator[None]:
    """Gradients exist before the step (they are part of the persistent state) and are dropped after."""
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    try:
        yield
    finally:
        net.zero_grad(set_to_none=True)


def trace_training_step(
    net, cfg, batch: int, frames: int, mode: Mode, attention: str = "fused", rules: str = "cuda"
) -> tuple[int, int]:
    """``(saved, peak)`` bytes of one forward + MSE loss + backward of ``net`` at subnet ``cfg``, traced on
    ``net``'s device (meta for planning; a real device works too)."""
    inputs = _inputs(net, cfg.resolution, batch, frames)
    spec = net.spec_for(cfg)

    def recompute_modes():
        # The autograd engine does not carry torch-function modes into backward, where checkpointing
        # recomputes: the recompute gets an emulation of its own (the dispatch-level timeline carries).
        return contextlib.nullcontext(), AutocastEmulation(mode.dtype, rules, attention)

    net.set_activation_checkpointing(mode.checkpointing, context_fn=recompute_modes)
    timeline = StorageTimeline(conv_scratch=rules == "cpu")
    try:
        with _grads_allocated(net), ExitStack() as stack:
            stack.enter_context(timeline)
            emulation = stack.enter_context(AutocastEmulation(mode.dtype, rules, attention))
            pred = net(**inputs, spec=spec)
            emulation.cache.clear()
            saved = timeline.current
            target = torch.empty_like(pred, dtype=torch.float32)
            F.mse_loss(pred, target).backward()
            del pred, target
    finally:
        net.set_activation_checkpointing(False)
    return saved, timeline.peak


def trace_generation(
    static, resolution: int, batch: int, frames: int, mode: Mode, attention: str = "fused"
) -> int:
    """Peak bytes (above the weights) of one denoiser forward of the static subnet, without autograd, at
    ``2 * batch`` (conditional and unconditional halves of classifier-free guidance)."""
    from search_spaces import make_dummy_inputs

    dtype = mode.dtype or torch.float32
    inputs = make_dummy_inputs(static.spec, resolution, frames, 2 * batch, 0, static.conv_in.weight.device)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    timeline = StorageTimeline()
    with torch.no_grad(), timeline, AutocastEmulation(None, attention=attention):
        static(**inputs)
    return timeline.peak


def plan(
    family: str,
    preset: str = "paper",
    modes: Sequence[str] = ("fp32", "bf16", "bf16+ckpt"),
    batch: int = 1,
    frames: int | None = None,
    resolutions: Sequence[int] | None = None,
    attention: str = "fused",
    net=None,
) -> list[Plan]:
    """Rows of the table for a preset, built on the meta device (or for ``net`` as it is, on its device)."""
    from search_spaces import build_supernet

    if attention not in ("fused", "math"):
        raise ValueError(f"unknown attention {attention!r}: use fused or math")
    if batch < 1:
        raise ValueError(f"--batch must be at least 1, got {batch}")
    if net is None:
        with torch.device("meta"):
            net = build_supernet(family, preset)
    frames = frames or net.frames
    known = net.space.resolutions
    for r in resolutions or ():
        if r not in known:
            raise ValueError(
                f"resolution {r} is not one of {family}/{preset}'s ({', '.join(map(str, known))})"
            )
    total = sum(p.numel() for p in net.parameters())
    rows = []
    for r in resolutions or known:
        cap = net.space.size_caps[r]
        configs = [("full", _full_at(net, r))]
        if cap < 1.0:
            configs.append((f"cap {cap:.0%}", largest_under_cap(net.space, r)))
        for label, cfg in configs:
            active = net.count_params(cfg)
            for text in modes:
                mode = Mode.parse(text)
                saved, peak = trace_training_step(net, cfg, batch, frames, mode, attention)
                static = _static(net, cfg).to(mode.dtype or torch.float32)
                gen = trace_generation(static, r, batch, frames, mode, attention)
                rows.append(
                    Plan(
                        r, label, str(mode), total, active,
                        PERSISTENT_BYTES * total, saved, peak, OPTIMIZER_TRANSIENT_BYTES * active,
                        active * (2 if mode.dtype is not None else 4), gen,
                    )
                )  # fmt: skip
    return rows


def largest_under_cap(space, resolution: int):
    """The balanced subnet (``subnet_at_fraction``: ratios stepped down evenly, no component dropped) with
    the most parameters that still fits ``resolution``'s size cap: the widest network Algorithm 1 trains
    at that resolution."""
    fraction = space.size_caps[resolution]
    while fraction > 0:
        cfg = space.subnet_at_fraction(fraction, resolution)
        if space.fits(cfg):
            return cfg
        fraction -= 0.005
    raise ValueError(f"no balanced subnet fits the {space.size_caps[resolution]:.0%} cap at {resolution}px")


def _full_at(net, resolution: int):
    """The whole network at ``resolution`` (over its size cap: the space would refuse it)."""
    return dataclasses.replace(net.space.largest(net.space.resolutions[0]), resolution=resolution)


def _static(net, cfg):
    """The static subnet of ``cfg``: extracted (weights copied) on a real device; on meta only built,
    since there are no values to copy (and the whole network over a size cap cannot be extracted)."""
    from search_spaces import VideoUNet

    device = net.conv_in.weight.device
    if device.type != "meta":
        return net.extract(cfg)
    with torch.device(device):
        return VideoUNet(net.spec_for(cfg), frames=net.frames)


# -- a real peak, measured ---------------------------------------------------------------------------------
def measured_cpu_peak(fn) -> int:
    """Peak bytes the CPU allocator holds while ``fn()`` runs, above what it held before: the allocation
    and free records of ``torch.profiler`` (``profile_memory=True``; every ``c10`` CPU allocation, with its
    size and time), summed in time order. Deterministic for a deterministic ``fn``, unlike the process's
    RSS (malloc keeps freed pages, threads' arenas). Allocations made outside ``c10`` (oneDNN scratch
    pads) are not seen."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (
            e
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.device_type() == torch._C._autograd.DeviceType.CPU
        ),
        key=lambda e: e.start_ns(),
    )
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def measured_training_step(net, cfg, batch: int, frames: int, mode: Mode) -> int:
    """``measured_cpu_peak`` of the step ``trace_training_step`` plans, run for real on CPU (real autocast
    for ``bf16``, the real SDPA kernel choice), gradients allocated before, as there."""
    inputs = _inputs(net, cfg.resolution, batch, frames)
    spec = net.spec_for(cfg)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode.dtype is not None):
            pred = net(**inputs, spec=spec)
            loss = F.mse_loss(pred, torch.empty_like(pred, dtype=torch.float32).normal_())
        loss.backward()

    net.set_activation_checkpointing(mode.checkpointing)
    try:
        with _grads_allocated(net):
            return measured_cpu_peak(step)
    finally:
        net.set_activation_checkpointing(False)


# -- the table --------------------------------------------------------------------------------------------
def format_table(rows: Sequence[Plan], gpu_gib: float = 80.0) -> str:
    """One line per row; sizes in GiB (MiB when every step is under 1 GiB, e.g. the tiny presets)."""
    usable = (gpu_gib - GPU_RESERVE_GIB) * GIB
    unit, scale = ("GiB", GIB) if any(p.train_peak >= GIB for p in rows) else ("MiB", 2**20)

    def g(b: int) -> str:
        return f"{b / scale:.1f}"

    head = (
        "res  network    mode       params   | train: state  saved  act.peak  step peak  fits "
        f"| generate: weights  peak  total  fits   ({unit}; fits: under {gpu_gib:g} GiB less "
        f"{GPU_RESERVE_GIB} held back)"
    )
    lines = [head, "-" * len(head)]
    for p in rows:
        lines.append(
            f"{p.resolution:<4} {p.network:<10} {p.mode:<10} {p.active_params / 1e6:7.1f}M "
            f"|        {g(p.persistent):>5}  {g(p.saved):>5}  {g(p.activation_peak):>8}  {g(p.train_peak):>9}"
            f"  {'yes' if p.train_peak <= usable else 'NO':<4} "
            f"|           {g(p.generation_weights):>7}  {g(p.generation_peak):>4}  {g(p.generation_total):>5}"
            f"  {'yes' if p.generation_total <= usable else 'NO'}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m harness.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True)
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--modes", default="fp32,bf16,bf16+ckpt", help=f"comma-separated: {', '.join(MODES)}")
    parser.add_argument("--batch", type=int, default=1, help="training batch (generation runs 2x: guidance)")
    parser.add_argument("--frames", type=int, default=None, help="default: the preset's")
    parser.add_argument("--resolution", type=int, action="append", help="repeatable; default: every one")
    parser.add_argument("--attention", default="fused", choices=("fused", "math"))
    parser.add_argument("--gpu-gib", type=float, default=80.0)
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        Mode.parse(m)
    rows = plan(args.family, args.preset, modes, args.batch, args.frames, args.resolution, args.attention)
    print(f"{args.family}/{args.preset}, batch {args.batch}, attention {args.attention}")
    print(format_table(rows, args.gpu_gib))


if __name__ == "__main__":
    from harness.cli import run_cli

    run_cli(main)

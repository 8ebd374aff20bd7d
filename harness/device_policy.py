"""One device and one precision for everything a run computes: :class:`DevicePolicy`.

``sample``, ``evaluate``, ``search``, ``bench`` and ``predictor`` take ``--device`` and ``--precision``
(and, for latency, ``--compile`` / ``--cuda-graphs``) through :func:`add_device_arguments`. The policy
puts every model where it is asked (:meth:`DevicePolicy.place`: denoisers, the autoencoder, and the text
encoder and FVD extractors at load time), runs every forward under its precision
(:meth:`DevicePolicy.autocast`), sets TF32 and the float32 matmul precision explicitly
(:meth:`DevicePolicy.apply`) and says what it was (:meth:`DevicePolicy.provenance`, recorded with every
measurement; :meth:`DevicePolicy.identity`, part of the cache key).

Precisions: ``fp32`` (weights and arithmetic in float32, TF32 off: the reference numerics),
``bf16-autocast`` and ``fp16-autocast`` (float32 weights, ``torch.autocast`` runs matmuls and
convolutions in the half type: what a deployed model does). Weights are never cast in place, so a model
shared by several consumers (the FVD generation and the latency timing) is the same model for both.

Random draws (initial noise, timing inputs) are made on the CPU by seeded CPU generators and then moved,
so a seed gives the same noise on every device; tensors the pipeline makes itself carry ``device=``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

PRECISIONS = ("fp32", "bf16-autocast", "fp16-autocast")
DEFAULT_PRECISION = "fp32"
_AUTOCAST_DTYPES = {"bf16-autocast": torch.bfloat16, "fp16-autocast": torch.float16}
TEXT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_device(device: str) -> torch.device:
    """``device`` as a ``torch.device``; a one-line ``ValueError`` unless torch can run on it here
    (raised before anything is loaded or written)."""
    try:
        kind = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown --device {device!r}; use cpu or cuda (cuda:N for the N-th GPU)") from None
    if kind.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported --device {device!r}; use cpu or cuda (cuda:N for the N-th GPU)")
    if kind.type == "cuda":
        count = torch.cuda.device_count()  # 0 without a driver; never initialises CUDA
        if count == 0:
            raise ValueError(
                f"{device} is not available on this machine (torch {torch.__version__} sees no CUDA "
                "device); use --device cpu or run where a GPU is"
            )
        if kind.index is not None and kind.index >= count:
            raise ValueError(
                f"--device {device}: this machine has {count} CUDA device(s); use cuda:0..{count - 1}"
            )
    return kind


@cache
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_description(device: str | torch.device = "cpu") -> str:
    """Human-readable device name: the CPU model (``/proc/cpuinfo``, else ``platform.processor()``) with
    its logical CPU count, or ``torch.cuda.get_device_name`` for CUDA devices."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"{_cpu_model()} ({os.cpu_count()} logical CPUs)"
    return device.type


def synchronize(device: str | torch.device) -> None:
    """Wait for ``device``'s queued kernels: that device, not the current one (``cuda:1`` while the
    current device is ``cuda:0`` is synchronised as ``cuda:1``). A no-op on the CPU."""
    device = torch.device(device)
    if device.type == "cpu":
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif torch.accelerator.is_available():
        torch.accelerator.synchronize(device)


@dataclass(frozen=True)
class DevicePolicy:
    """Where and in which precision a run computes (see the module docstring).

    ``compile``: time forwards through ``torch.compile``; ``cuda_graphs``: replay them from a captured
    CUDA graph (GPU only). Both concern the latency timing only: generation for FVD runs eagerly (a
    sampler compiled per candidate would cost more than it saves)."""

    device: str = "cpu"
    precision: str = DEFAULT_PRECISION
    compile: bool = False
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        kind = check_device(self.device)
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown --precision {self.precision!r}; use one of {', '.join(PRECISIONS)}")
        if self.cuda_graphs and kind.type != "cuda":
            raise ValueError("--cuda-graphs needs a CUDA device; drop it or pass --device cuda")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def is_default(self) -> bool:
        """Whether this is the protocol rows were recorded under before precisions existed."""
        return self == DevicePolicy()

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return _AUTOCAST_DTYPES.get(self.precision)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The precision's context for forwards: ``torch.autocast`` on this device type, or nothing."""
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.torch_device.type, dtype=dtype)

    def apply(self) -> dict[str, Any]:
        """Set the process's float32 numerics explicitly, never left to defaults a library may have
        changed: TF32 off for matmuls and cuDNN convolutions, matmul precision ``highest`` (float32 stays
        float32; the autocast precisions choose their half type explicitly). On CUDA the requested device
        becomes the current one (so a library's ``current device`` is the right one). Returns
        :meth:`numerics`."""
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        if self.torch_device.type == "cuda" and self.torch_device.index is not None:
            torch.cuda.set_device(self.torch_device)
        return numerics()

    def synchronize(self) -> None:
        synchronize(self.torch_device)

    def place(self, bundle) -> None:
        """Move a ``ModelBundle``'s network and codec to the device, once, before any consumer uses them
        (the bundle is shared: moving it later, in one consumer, would strand the others)."""
        if bundle is None:
            return
        bundle.network.to(self.torch_device)
        if bundle.codec is not None:
            bundle.codec.autoencoder.to(self.torch_device)

    def label(self) -> str:
        """The precision's part of a protocol string (``float32`` for fp32, as before precisions)."""
        return "float32" if self.precision == DEFAULT_PRECISION else self.precision

    def provenance(self) -> dict[str, Any]:
        """Everything about the device and numerics a measurement was taken under (recorded in extra)."""
        out: dict[str, Any] = {
            "device": str(self.torch_device),
            "device_name": device_description(self.torch_device),
            "precision": self.precision,
            "compile": self.compile,
            "cuda_graphs": self.cuda_graphs,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            **numerics(),
        }
        if self.torch_device.type == "cuda":
            out["cudnn"] = torch.backends.cudnn.version()
        return out

    def identity(self) -> dict[str, Any]:
        """What a value depends on beyond its protocol and device name, for the cache key. Only what
        differs from the default (fp32 on the CPU) enters, so rows recorded before precisions existed
        keep their keys: the precision when not fp32; on CUDA the CUDA and cuDNN versions and the matmul
        numerics (kernels differ by them; the torch version is in every key already)."""
        out: dict[str, Any] = {}
        if self.precision != DEFAULT_PRECISION:
            out["precision"] = self.precision
        if self.torch_device.type == "cuda":
            out.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), **numerics())
        return out


def numerics() -> dict[str, Any]:
    """The process's float32 matmul settings as they are now."""
    return {
        "matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "cudnn_tf32": bool(torch.backends.cudnn.allow_tf32),
    }


@contextlib.contextmanager
def default_device(device: str | torch.device) -> Iterator[None]:
    """Library code that builds tensors or modules without ``device=`` (diffusers' schedulers,
    tokenizers, module constructors) builds them on ``device`` inside this block, whatever the caller's
    default device is."""
    with torch.device(device):
        yield


def deployed(
    module: torch.nn.Module, inputs: dict[str, torch.Tensor], policy: DevicePolicy
) -> Callable[[], Any]:
    """``module(**inputs)`` as it would be deployed under ``policy``: the precision's autocast, then
    ``torch.compile`` (``mode="reduce-overhead"``, which captures CUDA graphs, when ``cuda_graphs``) or,
    with ``cuda_graphs`` alone, a CUDA graph captured here and replayed. ``module`` and ``inputs`` must be
    on the policy's device already. The first call of a compiled function compiles it (warm-up does)."""

    def eager():
        with policy.autocast():
            return module(**inputs)

    if policy.compile:
        mode = "reduce-overhead" if policy.cuda_graphs else "default"
        compiled = torch.compile(module, mode=mode, dynamic=False)

        def run():
            with policy.autocast():
                return compiled(**inputs)

        return run
    if policy.cuda_graphs:
        return _graphed(eager, policy.torch_device)
    return eager


def _graphed(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """``fn`` captured once in a CUDA graph (after warm-up on a side stream, as the CUDA graphs docs
    require) and replayed; its inputs are static, so a replay is exactly one more call of ``fn``."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.inference_mode(), torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out

    return replay


def add_device_arguments(
    parser: argparse.ArgumentParser, latency: bool = True, default_device: str = "cpu", text: bool = True
):
    """``--device`` and ``--precision`` (with ``latency``, ``--compile`` and ``--cuda-graphs``; with
    ``text``, ``--text-dtype`` for the text encoder's weights)."""
    g = parser.add_argument_group("device and precision (harness.device_policy)")
    g.add_argument(
        "--device",
        default=default_device,
        help="where every model and tensor lives: generation, text encoder, FVD extractor, latency (cpu, cuda, cuda:N)",
    )
    g.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=DEFAULT_PRECISION,
        help="fp32 (TF32 off) or autocast to bf16 / fp16 for every forward (default fp32)",
    )
    if text:
        g.add_argument(
            "--text-dtype",
            choices=tuple(TEXT_DTYPES),
            default="fp32",
            help="text encoder weights (bf16 halves T5's memory; embeddings stay float32)",
        )
    if latency:
        g.add_argument("--compile", action="store_true", help="time forwards through torch.compile")
        g.add_argument(
            "--cuda-graphs", action="store_true", help="time forwards replayed from a CUDA graph (GPU only)"
        )
    return g


def policy_from_args(args: argparse.Namespace) -> DevicePolicy:
    """The policy of :func:`add_device_arguments`' options (one-line ``ValueError`` on bad input)."""
    return DevicePolicy(
        device=args.device,
        precision=args.precision,
        compile=bool(getattr(args, "compile", False)),
        cuda_graphs=bool(getattr(args, "cuda_graphs", False)),
    )

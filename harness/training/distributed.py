"""Data-parallel training plumbing: the device of each rank, the process group, and an all-reduce that
sends only the gradients the step's subnet touched.

Every rank samples the same subnet (the subnet draw depends on ``(seed, step)`` alone), so every rank's
gradient is non-zero only inside the same boxes (``Supernet.active_regions``). ``ActiveGradReducer``
flattens those boxes - not the whole parameters - into buckets of about ``bucket_mb`` MiB, all-reduces
each bucket asynchronously (buckets overlap with each other and, through post-accumulate-grad hooks,
with the rest of the backward pass), and writes the averages back. Entries outside the boxes are never
read by the masked clip, optimizer or EMA, so they are not sent. This is what DDP does (buckets,
overlap, launch in a fixed order), minus the zeros: a 40 % subnet sends about 40 % of the bytes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

Box = tuple[slice, ...]


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: ``rank`` of ``world``, ``local_rank`` on its node, and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The torch device ``--device name`` asks for: ``auto`` (``cuda:LOCAL_RANK`` when CUDA is available,
    else ``cpu``), ``cpu``, ``cuda`` (``cuda:LOCAL_RANK``), ``cuda:N`` or ``mps``. Raises ``ValueError`` (one
    line) when the machine has no such device."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"--device {name!r} is not a torch device; pass auto, cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {name}: this machine has no CUDA device (torch.cuda.is_available() is False); "
                f"pass --device cpu"
            )
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {name}: cuda:{index} asked for, but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s); pass fewer --nproc_per_node or another index"
            )
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: this machine has no MPS device; pass --device cpu")
    if device.type not in ("cpu", "mps"):
        raise ValueError(f"--device {name}: training supports cpu, cuda and mps devices; pass one of them")
    return device


def _env_int(key: str, default: int) -> int:
    return int(os.environ.get(key, str(default)))


def init_distributed(device: str = "auto") -> DistributedContext:
    """Join the ``torchrun`` process group when launched by it and return this rank's context.

    ``LOCAL_RANK`` picks the GPU (``cuda:LOCAL_RANK``); the backend follows the device: nccl on CUDA, gloo
    on the CPU. Without ``torchrun`` (no ``RANK``/``WORLD_SIZE``) it is one process and no group is made.
    """
    local_rank = _env_int("LOCAL_RANK", 0)
    resolved = resolve_device(device, local_rank)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if launched and not dist.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=resolved if resolved.type == "cuda" else None)
    return distributed_context(resolved)


def distributed_context(device: torch.device) -> DistributedContext:
    """The context of this process on ``device`` (one process when no group is initialised)."""
    if not dist.is_initialized():
        return DistributedContext(device=device)
    backend = dist.get_backend()
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(
            f"the process group uses nccl, which needs CUDA tensors; pass --device cuda, not {device}"
        )
    return DistributedContext(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0), device)


def barrier(ctx: DistributedContext) -> None:
    """Wait for every rank (no-op for one process); nccl is told its device to avoid a guess."""
    if ctx.world == 1:
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[ctx.device.index])
    else:
        dist.barrier()


def _boxes(param: Tensor, value) -> list[Box]:
    """The boxes of one ``active`` entry; a mask (the sandwich's union) is sent whole."""
    if isinstance(value, tuple):
        return [value]
    if isinstance(value, list):
        return list(value)
    return [tuple(slice(0, n) for n in param.shape)]


def _numel(box: Box) -> int:
    n = 1
    for s in box:
        n *= s.stop - s.start
    return n


class ActiveGradReducer:
    """Averages the active gradient regions over the ranks in a few flat, asynchronously all-reduced buckets.

    Use per step: ``arm(active)`` before the (last) backward, then ``finish()`` after it. Every rank must
    pass the same ``active`` (same subnet): the bucket layout and launch order follow from it alone, which
    is what makes the collectives match across ranks. With ``overlap`` a bucket is launched from a
    post-accumulate-grad hook as soon as all its parameters' gradients are final; buckets are launched
    strictly in index order (as DDP does) so every rank issues the same sequence of collectives.
    ``last_numel`` / ``full_numel`` report what the last step sent against a full all-reduce.
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, Tensor]],
        world: int,
        bucket_mb: float = 25.0,
        overlap: bool = True,
        group=None,
    ) -> None:
        # Backward produces gradients roughly from the output layers back, the reverse of registration.
        self.params = dict(reversed(list(named_params)))
        self.world, self.group, self.overlap = world, group, overlap
        self.bucket_bytes = max(1, int(bucket_mb * 2**20))
        self.full_numel = sum(p.numel() for p in self.params.values())
        self.last_numel = 0
        self._buckets: list[list[tuple[str, Box]]] = []
        self._pending: list[int] = []
        self._bucket_of: dict[str, list[int]] = {}
        self._launched: list[tuple[object, Tensor] | None] = []
        self._next = 0
        self._armed = False
        self._hooks = []
        if overlap:
            for name, p in self.params.items():
                self._hooks.append(p.register_post_accumulate_grad_hook(self._hook(name)))

    # -- planning ------------------------------------------------------------------------------------
    def arm(self, active: Mapping[str, object]) -> None:
        """Lay out the buckets for this step's ``active`` regions; the next backward launches them."""
        buckets: list[list[tuple[str, Box]]] = [[]]
        size = 0
        for name, p in self.params.items():
            value = active.get(name)
            if value is None:
                continue
            for box in _boxes(p, value):
                nbytes = _numel(box) * p.element_size()
                if buckets[-1] and (size + nbytes > self.bucket_bytes or p.dtype != self._dtype(buckets[-1])):
                    buckets.append([])
                    size = 0
                buckets[-1].append((name, box))
                size += nbytes
        self._buckets = [b for b in buckets if b]
        self._bucket_of = {}
        for i, bucket in enumerate(self._buckets):
            for name in dict.fromkeys(n for n, _ in bucket):
                self._bucket_of.setdefault(name, []).append(i)
        self._pending = [len({n for n, _ in b}) for b in self._buckets]
        self._launched = [None] * len(self._buckets)
        self._next = 0
        self.last_numel = sum(_numel(box) for b in self._buckets for _, box in b)
        self._armed = True

    def _dtype(self, bucket: list[tuple[str, Box]]) -> torch.dtype:
        return self.params[bucket[0][0]].dtype

    # -- communication -------------------------------------------------------------------------------
    def _hook(self, name: str):
        def on_grad(_param: Tensor) -> None:
            if not self._armed:
                return  # an earlier backward of a sandwich step: its gradient is not final yet
            for i in self._bucket_of.get(name, ()):
                if self._launched[i] is not None:
                    raise RuntimeError(
                        f"gradient of {name} arrived after its bucket was reduced (a parameter used in "
                        f"several reentrant checkpoint segments?); build the reducer with overlap=False"
                    )
                self._pending[i] -= 1
            self._launch_ready()

        return on_grad

    def _launch_ready(self, force: bool = False) -> None:
        while self._next < len(self._buckets) and (force or self._pending[self._next] <= 0):
            self._launch(self._next)
            self._next += 1

    def _launch(self, i: int) -> None:
        pieces, present = [], []
        for name, box in self._buckets[i]:
            p = self.params[name]
            present.append(float(p.grad is not None))
            if p.grad is None:  # not reached on this rank this step: contributes zeros
                pieces.append(torch.zeros(_numel(box), dtype=p.dtype, device=p.device))
            else:
                pieces.append(p.grad[box].reshape(-1))
        # One flag per piece: whether any rank has a gradient there. A parameter no rank reached keeps
        # ``grad = None`` (the optimizer then skips it, as in one process) instead of becoming zeros.
        p0 = self.params[self._buckets[i][0][0]]
        pieces.append(torch.tensor(present, dtype=p0.dtype, device=p0.device))
        flat = torch.cat(pieces)
        # Average = sum / world; dividing first (like DDP's default hook) keeps large sums in range.
        flat.div_(self.world)
        self._launched[i] = (dist.all_reduce(flat, group=self.group, async_op=True), flat)

    def finish(self) -> None:
        """Launch what no hook launched, wait for every bucket and write the averages back."""
        if not self._armed:
            raise RuntimeError("ActiveGradReducer.finish() without arm()")
        self._launch_ready(force=True)
        for i, bucket in enumerate(self._buckets):
            work, flat = self._launched[i]
            work.wait()
            flags = flat[flat.numel() - len(bucket) :].tolist()
            offset = 0
            for (name, box), flag in zip(bucket, flags, strict=True):
                p, n = self.params[name], _numel(box)
                if flag > 0:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    region = p.grad[box]
                    region.copy_(flat[offset : offset + n].view(region.shape))
                offset += n
        self._armed = False
        self._launched = []

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

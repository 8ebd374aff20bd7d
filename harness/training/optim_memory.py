"""Measured memory of the masked optimizer: persistent bytes per parameter and the step's transient peak.

``state_bytes`` sums ``numel * element_size`` over every tensor that lives between steps - weights, their
gradients, every tensor in the optimizer's state and the EMA's - and, separately, the host bytes of the
cell step counts. ``TransientPeak`` watches every aten op run inside it (a ``TorchDispatchMode``) and
tracks the bytes of the storages those ops newly allocate while they are alive (weak references to the
storages), so its ``peak`` is the most extra memory the code inside held at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from harness.training.cell_counts import CellCounts
from harness.training.masked_optim import MaskedAdamW, MaskedEMA


@dataclass(frozen=True)
class StateBytes:
    params: int  # parameter count
    weights: int  # bytes of the parameters
    grads: int  # bytes of their .grad tensors (those that exist)
    optimizer: int  # bytes of every tensor in the optimizer's state
    ema: int  # bytes of every tensor the EMA holds
    host: int  # host bytes of the cell step/warm-up counts (numpy grids + cut points)

    @property
    def tensor_bytes_per_param(self) -> float:
        return (self.weights + self.grads + self.optimizer + self.ema) / self.params

    @property
    def host_bytes_per_param(self) -> float:
        return self.host / self.params


def state_bytes(model: nn.Module, optimizer: MaskedAdamW, ema: MaskedEMA) -> StateBytes:
    """The persistent memory of a model trained with ``optimizer`` and ``ema``, counted tensor by tensor."""

    def nbytes(t: Tensor) -> int:
        return t.numel() * t.element_size()

    params = list(model.parameters())
    opt_bytes = host = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, Tensor):
                opt_bytes += nbytes(value)
            elif isinstance(value, CellCounts):
                host += value.nbytes()
    ema_bytes = sum(nbytes(t) for t in ema.shadow.values())
    for counts in (ema.counts or {}).values():
        if isinstance(counts, Tensor):
            ema_bytes += nbytes(counts)
        else:
            host += counts.nbytes()
    return StateBytes(
        params=sum(p.numel() for p in params),
        weights=sum(nbytes(p) for p in params),
        grads=sum(nbytes(p.grad) for p in params if p.grad is not None),
        optimizer=opt_bytes,
        ema=ema_bytes,
        host=host,
    )


class TransientPeak(TorchDispatchMode):
    """``with TransientPeak() as peak: ...`` then ``peak.peak`` (bytes) and ``peak.allocated`` (total bytes
    of new storages). A storage counts from the op that returned it (a non-aliasing output) until it dies."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0
        self.allocated = 0

    def _current(self) -> int:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            del self.live[key]
        return sum(n for _, n in self.live.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs or {}))
            if isinstance(t, Tensor) and t.device.type != "meta"
        }
        out = func(*args, **(kwargs or {}))
        self._current()  # drop dead storages first: a new one may reuse a dead one's address
        for t in tree_leaves(out):
            if not isinstance(t, Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if storage.nbytes() and ptr not in inputs and ptr not in self.live:
                self.live[ptr] = (StorageWeakRef(storage), storage.nbytes())
                self.allocated += storage.nbytes()
        self.peak = max(self.peak, self._current())
        return out

"""Masked AdamW, masked gradient clipping and masked EMA for weight-sharing supernets.

Algorithm 1 updates only the sampled subnet's part of the shared weights and freezes the rest. With
first-k slicing every full tensor receives a gradient (zeros outside the slice), so ``torch.optim.AdamW``
still moves the frozen entries: decoupled weight decay touches every entry and the first moment from
earlier steps is non-zero (see ``shared/reference/frozen-rest.md``). Everything here takes an explicit
``active`` mapping instead:

``active[name]`` is the block(s) of the parameter the sampled subnet covers: a box
``(slice(a0, b0), slice(a1, b1), ...)`` or a list of disjoint boxes (first-k slicing gives one leading box;
a decoder input ``[h | skip]`` two), as ``Supernet.active_regions`` returns them - or, general but slower,
a boolean mask of the parameter's shape. A name that is absent or maps to ``None`` marks a parameter the
subnet did not use at all. Every entry outside - weight, gradient (for clipping), optimizer state and EMA -
stays bit-identical.

Two paths, bit-identical entry by entry (tested):

* Boxes (what the trainer uses for one subnet per step): each entry's AdamW step count and EMA warm-up
  count are kept exactly, per *cell* of a grid of the cut points seen (``harness.training.cell_counts``),
  on the host. The update runs in place on views of blocks of equal count with Python-float bias
  corrections (``_foreach`` kernels, no host sync, nothing outside the boxes touched). Persistent state:
  weights, grads, two moments, EMA = 20 bytes per fp32 parameter, plus a few host integers per tensor.
  Transient: the ``sqrt(v)`` denominators of one chunk at a time, ``min(CHUNK, active / 4)`` entries
  (1 byte per active fp32 parameter, 64 MiB at most) unless a single dim-0 row of a block is larger.
* Masks (the trainer's sandwich rule, the union of several subnets): full-tensor arithmetic selected with
  ``torch.where``; a parameter stepped with a mask keeps per-entry int32 counts from then on.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from harness.training.cell_counts import Block, Box, CellCounts

ActiveMasks = Mapping[str, "Tensor | tuple[slice, ...] | list[tuple[slice, ...]] | None"]
NamedParams = Iterable[tuple[str, Tensor]]

CHUNK = 1 << 24  # entries per chunk of denominators (64 MiB in fp32): bounds the step's transient memory
_MOMENTS = ("exp_avg", "exp_avg_sq")


def _check_mask(name: str, param: Tensor, mask: Tensor) -> None:
    """Raise ``ValueError`` unless ``mask`` is a boolean tensor shaped and placed like ``param``."""
    if mask.dtype != torch.bool or mask.shape != param.shape or mask.device != param.device:
        raise ValueError(
            f"mask for {name!r} must be a bool tensor of shape {tuple(param.shape)} on {param.device}, "
            f"got {mask.dtype} {tuple(mask.shape)} on {mask.device}"
        )


def _region(name: str, param: Tensor, value) -> tuple[Tensor | None, list[Box]]:
    """``(mask, [])`` or ``(None, boxes)`` for one entry of an ``active`` mapping (validated)."""
    if isinstance(value, (tuple, list)):
        boxes = [value] if isinstance(value, tuple) else list(value)
        for box in boxes:
            ok = (
                isinstance(box, tuple)
                and len(box) == param.dim()
                and all(
                    isinstance(b, slice)
                    and b.step is None
                    and b.start is not None
                    and b.stop is not None
                    and 0 <= b.start <= b.stop <= n
                    for b, n in zip(box, param.shape)
                )
            )
            if not ok:
                raise ValueError(
                    f"box for {name!r} must be one slice(start, stop) per dimension of "
                    f"{tuple(param.shape)}, got {box}"
                )
        return None, boxes
    _check_mask(name, param, value)
    return value, []


def box_to_mask(param: Tensor, boxes: Box | list[Box]) -> Tensor:
    """The boolean mask of a box or of a list of boxes."""
    mask = torch.zeros_like(param, dtype=torch.bool)
    for box in [boxes] if isinstance(boxes, tuple) else boxes:
        mask[box] = True
    return mask


# -- AdamW arithmetic ---------------------------------------------------------------------------------
def _bias_correction_scalars(t: int, beta1: float, beta2: float) -> tuple[float, float]:
    """``(1 - beta1**t, sqrt(1 - beta2**t))`` exactly as torch's AdamW computes them (Python floats)."""
    return 1 - beta1**t, (1 - beta2**t) ** 0.5


_TABLES: dict[tuple[float, float, torch.device], tuple[Tensor, Tensor]] = {}


def _bias_corrections(step: Tensor, beta1: float, beta2: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Per-entry ``_bias_correction_scalars`` of integer counts ``step`` (mask path): float64 ``1 - beta1**t``
    and ``sqrt(1 - beta2**t)`` cast to ``dtype``, gathered from a table of the same Python floats (so both
    paths agree bit for bit). ``t == 0`` is clamped to 1 to keep discarded values finite."""
    key = (beta1, beta2, step.device)
    needed = int(step.max()) + 1 if step.numel() else 1  # a host sync: the mask path only
    table = _TABLES.get(key)
    if table is None or table[0].numel() < needed:
        size = max(needed, 2 * (table[0].numel() if table else 1024))
        rows = [_bias_correction_scalars(max(t, 1), beta1, beta2) for t in range(size)]
        table = tuple(torch.tensor(col, dtype=torch.float64, device=step.device) for col in zip(*rows))
        _TABLES[key] = table
    index = step.long()
    return table[0][index], table[1][index].to(dtype)


def _pieces(block: tuple[Tensor, ...], limit: int) -> list[tuple[Tensor, ...]]:
    """The views of one block, cut along dimension 0 into pieces of at most ``limit`` entries (or one row):
    the update is elementwise, so the pieces give the same result and bound one chunk's denominators."""
    first = block[0]
    if first.dim() == 0 or first.numel() <= limit or first.shape[0] <= 1:
        return [block]
    rows = max(1, limit // (first.numel() // first.shape[0]))
    return [tuple(t[i : i + rows] for t in block) for i in range(0, first.shape[0], rows)]


def _adamw_update_blocks(views: list[list[Tensor]], counts: list[int], group: Mapping[str, Any]) -> None:
    """AdamW on blocks whose entries share one step count, in place: ``views`` = [params, grads, exp_avgs,
    exp_avg_sqs] (views of the blocks), ``counts`` each block's new step count. The ops of torch's
    ``foreach`` AdamW with one scalar bias correction per block; the denominators chunk by chunk."""
    if not counts:
        return
    lr, weight_decay, eps = group["lr"], group["weight_decay"], group["eps"]
    beta1, beta2 = group["betas"]
    params, grads, exp_avgs, exp_avg_sqs = views
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)

    limit = max(1, min(CHUNK, sum(p.numel() for p in params) // 4))
    pieces: list[tuple[Tensor, Tensor, Tensor, float, float]] = []  # param, m, v, -step size, sqrt(bc2)
    for p, m, v, t in zip(params, exp_avgs, exp_avg_sqs, counts, strict=True):
        bc1, bc2_sqrt = _bias_correction_scalars(t, beta1, beta2)
        pieces.extend((*views, -(lr / bc1), bc2_sqrt) for views in _pieces((p, m, v), limit))
    start = 0
    while start < len(pieces):  # chunks of at most ``limit`` entries (or a single larger row)
        stop, size = start + 1, pieces[start][0].numel()
        while stop < len(pieces) and size + pieces[stop][0].numel() <= limit:
            size += pieces[stop][0].numel()
            stop += 1
        p, m, v, neg_step, bc2_sqrt = (list(c) for c in zip(*pieces[start:stop]))
        denoms = torch._foreach_sqrt(v)
        torch._foreach_div_(denoms, bc2_sqrt)
        torch._foreach_add_(denoms, eps)
        torch._foreach_addcdiv_(p, m, denoms, neg_step)
        del denoms  # freed before the next chunk allocates
        start = stop


def _adamw_update_where(
    param: Tensor, grad: Tensor, mask: Tensor, state: dict[str, Tensor], group: Mapping[str, Any]
) -> None:
    """The mask path: full-tensor arithmetic kept only where ``mask`` is True, per-entry step counts.
    Entry by entry the arithmetic of ``_adamw_update_blocks`` (addcdiv's ``p + (value * m) / d``)."""
    lr, weight_decay, eps = group["lr"], group["weight_decay"], group["eps"]
    beta1, beta2 = group["betas"]
    exp_avg, exp_avg_sq, step = state["exp_avg"], state["exp_avg_sq"], state["step"]
    step.add_(mask.to(step.dtype))  # count this step for the active entries only
    if weight_decay != 0:
        param.copy_(torch.where(mask, param.mul(1 - lr * weight_decay), param))
    exp_avg.copy_(torch.where(mask, exp_avg.lerp(grad, 1 - beta1), exp_avg))
    new_exp_avg_sq = exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
    exp_avg_sq.copy_(torch.where(mask, new_exp_avg_sq, exp_avg_sq))
    bias_correction1, bias_correction2_sqrt = _bias_corrections(step, beta1, beta2, param.dtype)
    neg_step_size = (lr / bias_correction1).to(param.dtype).neg_()
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    updated = param + neg_step_size * exp_avg / denom
    param.copy_(torch.where(mask, updated, param))


def _step_tensors(name: str, state: Mapping[str, Any], prefix: str) -> dict[str, Tensor]:
    """A cell count state as flat tensors ``{name}.{prefix}_cuts`` + ``{name}.{prefix}_counts`` (none for
    per-entry counts: their callers save those under their old names)."""
    cells = state.get("cells")
    if isinstance(cells, CellCounts):
        cuts, counts = cells.to_tensors()
        return {f"{name}.{prefix}_cuts": cuts, f"{name}.{prefix}_counts": counts}
    return {}


def _load_counts(
    name: str, param: Tensor, tensors: Mapping[str, Tensor], prefix: str, single: str
) -> tuple[CellCounts | Tensor | None, list[str]]:
    """The count state of ``name`` from flat tensors (cells, or per-entry converted to cells when it is
    grid-shaped - it always is for boxes - else kept per entry), and the keys used."""
    cuts_key, counts_key, single_key = f"{name}.{prefix}_cuts", f"{name}.{prefix}_counts", f"{name}.{single}"
    if cuts_key in tensors or counts_key in tensors:
        if cuts_key not in tensors or counts_key not in tensors:
            raise KeyError(f"incomplete count state for {name!r}")
        return CellCounts.from_tensors(param.shape, tensors[cuts_key], tensors[counts_key]), [
            cuts_key,
            counts_key,
        ]
    if single_key in tensors:
        value = tensors[single_key]
        if value.shape != param.shape:
            raise ValueError(f"{single_key}: shape {tuple(value.shape)} != {tuple(param.shape)}")
        cells = CellCounts.from_per_entry(value)
        if cells is not None:
            return cells, [single_key]
        return value.to(device=param.device, dtype=torch.int32, copy=True), [single_key]
    return None, []


class MaskedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, no amsgrad) that updates only the active entries of each parameter.

    Construct it from ``model.named_parameters()`` (or param groups whose ``"params"`` are ``(name, param)``
    pairs) and call ``step(active)`` with the regions of the sampled subnet (see the module docstring).
    A parameter whose region is ``None``/absent, or whose ``.grad`` is ``None``, is skipped entirely (no
    update, no decay, no state change), like torch skips parameters without gradients.

    Step counts are per entry - an entry first trained late gets the bias correction of its own ``t`` -
    but stored per cell (``state["cells"]``, a ``CellCounts``), or, once a parameter is stepped with a
    mask, per entry (``state["step"]``, int32). Per entry the update equals
    ``torch.optim.AdamW(foreach=False)`` run on that entry alone over the steps where it was active.

    ``optimizer_state_tensors`` / ``load_optimizer_state_tensors`` / ``hyperparameters`` give a safetensors
    + JSON form (old checkpoints with per-entry ``.step`` tensors load); ``state_dict`` / ``load_state_dict``
    work as for any torch optimizer.
    """

    def __init__(
        self,
        params: NamedParams | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid hyperparameters lr={lr} betas={betas} eps={eps} wd={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        for group in self.param_groups:
            if "param_names" not in group:
                raise ValueError("MaskedAdamW needs named parameters: pass model.named_parameters()")

    def named_parameters(self) -> Iterable[tuple[str, Tensor, dict[str, Any]]]:
        """Yield ``(name, param, group)`` for every parameter, in group order."""
        for group in self.param_groups:
            for name, param in zip(group["param_names"], group["params"], strict=True):
                yield name, param, group

    def _init_state(self, param: Tensor) -> dict[str, Any]:
        state = self.state[param]
        if not state:
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["cells"] = CellCounts(param.shape)
        return state

    @torch.no_grad()
    def step(self, active: ActiveMasks) -> None:  # type: ignore[override]
        """Update the entries in ``active[name]``; raise ``KeyError`` for unknown names."""
        unknown = set(active) - {name for name, _, _ in self.named_parameters()}
        if unknown:
            raise KeyError(f"masks for unknown parameters: {sorted(unknown)}")
        blocks: dict[int, tuple[dict, list[list[Tensor]], list[int]]] = {}  # per group: views and counts
        for name, param, group in self.named_parameters():
            value = active.get(name)
            if value is None or param.grad is None:
                continue
            mask, regions = _region(name, param, value)
            state = self._init_state(param)
            if mask is None and "cells" in state:
                _, views, counts = blocks.setdefault(id(group), (group, [[], [], [], []], []))
                for box, count in state["cells"].update(regions):
                    for lst, t in zip(views, (param, param.grad, state["exp_avg"], state["exp_avg_sq"])):
                        lst.append(t[box])
                    counts.append(count)
                continue
            if "cells" in state:  # a first mask: per-entry counts from now on
                state["step"] = state.pop("cells").per_entry(param.device)
            _adamw_update_where(
                param, param.grad, box_to_mask(param, regions) if mask is None else mask, state, group
            )
        for group, views, counts in blocks.values():
            _adamw_update_blocks(views, counts, group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, then own copies of every state tensor (on its parameter's device)
        and of every cell grid."""
        super().load_state_dict(state_dict)
        for _, param, _ in self.named_parameters():
            state = self.state.get(param)
            for key, value in list(state.items()) if state else []:
                if isinstance(value, CellCounts):
                    state[key] = value.copy()
                elif isinstance(value, Tensor):
                    state[key] = value.to(device=param.device, copy=True)

    def optimizer_state_tensors(self, copy: bool = True) -> dict[str, Tensor]:
        """Flat tensors, safetensors-ready: ``{param_name}.exp_avg``, ``.exp_avg_sq`` and the step counts,
        ``.step_cuts`` + ``.step_counts`` (see ``CellCounts.to_tensors``) or, per entry, ``.step``.
        ``copy=False`` returns the live moments (no 8 B/param of copies: for saving right away)."""
        tensors: dict[str, Tensor] = {}
        for name, param, _ in self.named_parameters():
            state = self.state.get(param)
            if state:
                for key in [*_MOMENTS, "step"] if "step" in state else _MOMENTS:
                    value = state[key].detach()
                    tensors[f"{name}.{key}"] = value.clone().contiguous() if copy else value.contiguous()
                tensors.update(_step_tensors(name, state, "step"))
        return tensors

    def load_optimizer_state_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        """Inverse of ``optimizer_state_tensors`` (also of its old per-entry ``.step`` form, converted to
        cells); parameters without entries get fresh (empty) state."""
        expected: set[str] = set()
        for name, param, _ in self.named_parameters():
            moments = [f"{name}.{key}" for key in _MOMENTS]
            counts, count_keys = _load_counts(name, param, tensors, "step", "step")
            present = [key in tensors for key in moments] + [counts is not None]
            if any(present) and not all(present):
                raise KeyError(f"incomplete optimizer state for {name!r}")
            self.state.pop(param, None)
            if not all(present):
                continue
            expected.update(moments + count_keys)
            for key, flat_key in zip(_MOMENTS, moments, strict=True):
                value = tensors[flat_key]
                if value.shape != param.shape:
                    raise ValueError(f"{flat_key}: shape {tuple(value.shape)} != {tuple(param.shape)}")
                self.state[param][key] = value.to(device=param.device, dtype=param.dtype, copy=True)
            self.state[param]["cells" if isinstance(counts, CellCounts) else "step"] = counts
        unknown = set(tensors) - expected
        if unknown:
            raise KeyError(f"optimizer state for unknown parameters: {sorted(unknown)}")

    def step_counts(self, names: Iterable[str] | None = None) -> dict[str, Tensor]:
        """Per-entry step counts (int32, expanded from the cells; for tests and checks) of the parameters
        with state, or of those of ``names`` that have state (one at a time keeps the expansion small)."""
        wanted = None if names is None else set(names)
        out = {}
        for name, param, _ in self.named_parameters():
            state = self.state.get(param)
            if state and (wanted is None or name in wanted):
                cells = state.get("cells")
                out[name] = cells.per_entry(param.device) if cells is not None else state["step"].clone()
        return out

    def hyperparameters(self) -> dict[str, Any]:
        """JSON-able ``{"param_groups": [{"param_names": [...], "lr": ..., "betas": [...], ...}]}``."""
        groups = []
        for group in self.param_groups:
            entry = {k: list(v) if isinstance(v, tuple) else v for k, v in group.items() if k != "params"}
            groups.append(entry)
        return {"param_groups": groups}

    def load_hyperparameters(self, hyperparameters: Mapping[str, Any]) -> None:
        """Restore group settings saved by ``hyperparameters`` (groups must hold the same names; their order
        may differ: state is keyed by name)."""
        saved = hyperparameters["param_groups"]
        if len(saved) != len(self.param_groups):
            raise ValueError(f"{len(saved)} saved param groups, optimizer has {len(self.param_groups)}")
        for group, entry in zip(self.param_groups, saved, strict=True):
            if set(entry["param_names"]) != set(group["param_names"]):
                raise ValueError("saved param group lists different parameter names")
            for key, value in entry.items():
                if key != "param_names":
                    group[key] = tuple(value) if key == "betas" else value


@torch.no_grad()
def masked_clip_grad_norm_(
    named_params: NamedParams, active: ActiveMasks, max_norm: float, eps: float = 1e-6
) -> Tensor:
    """Clip by the global L2 norm of the active gradient entries, scaling only those entries.

    Follows ``torch.nn.utils.clip_grad_norm_`` (coefficient ``max_norm / (norm + eps)`` clamped to 1,
    applied without a host sync). Parameters without a mask or gradient are ignored; gradient entries
    outside the masks stay bit-identical. Returns the total norm of the active entries (0-dim tensor).
    """
    views: list[Tensor] = []  # box views of gradients: norms and scaling with _foreach kernels
    masked: list[tuple[Tensor, Tensor]] = []  # (gradient, mask)
    for name, param in named_params:
        value = active.get(name)
        if value is not None and param.grad is not None:
            mask, regions = _region(name, param, value)
            if mask is not None:
                masked.append((param.grad, mask))
            views.extend(param.grad[box] for box in regions if param.grad[box].numel())
    if not views and not masked:
        return torch.tensor(0.0)
    device = (views[0] if views else masked[0][0]).device
    # A reduction over a strided box view runs ~10x slower on the CPU than over contiguous memory; norms
    # of its dim-0 rows (each a contiguous run when only the leading dims are cut) first restore the speed.
    dense = [v for v in views if v.is_contiguous()]
    norms = list(torch._foreach_norm(dense)) if dense else []
    norms += [
        torch.linalg.vector_norm(torch.linalg.vector_norm(v, dim=tuple(range(1, v.dim()))))
        for v in views
        if not v.is_contiguous()
    ]
    norms += [
        torch.linalg.vector_norm(torch.where(m, g, torch.zeros((), dtype=g.dtype, device=g.device)))
        for g, m in masked
    ]
    total_norm = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
    clip_coef = torch.clamp(max_norm / (total_norm + eps), max=1.0)
    if views:
        torch._foreach_mul_(views, clip_coef)
    for grad, mask in masked:
        grad.copy_(torch.where(mask, grad * clip_coef.to(grad.device), grad))
    return total_norm


class MaskedEMA:
    """Exponential moving average of weights, updated only on the subnet's active entries.

    ``ema <- lerp(ema, weight, 1 - d)`` on active entries. With ``warmup=True`` the decay is per entry,
    ``d = min(decay, (1 + n) / (10 + n))`` where ``n`` counts that entry's previous EMA updates (kept per
    cell like MaskedAdamW's step counts; per entry once a mask was used), so an entry first trained late
    warms up like one trained from the start. With ``warmup=False`` ``d = decay`` and no counts are kept.
    Frozen entries' EMA stays bit-identical.
    """

    def __init__(self, named_params: NamedParams, decay: float = 0.999, warmup: bool = True) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.shadow: dict[str, Tensor] = {n: p.detach().clone() for n, p in named_params}
        self.counts: dict[str, CellCounts | Tensor] | None = (
            {n: CellCounts(s.shape) for n, s in self.shadow.items()} if warmup else None
        )

    def _weight(self, previous: int) -> float:
        """``1 - d`` after ``previous`` updates (Python float; the mask path computes the same in float64)."""
        return (
            1.0 - min(self.decay, (1.0 + previous) / (10.0 + previous)) if self.warmup else 1.0 - self.decay
        )

    @torch.no_grad()
    def update(self, named_params: NamedParams, active: ActiveMasks) -> None:
        """Move the EMA toward the current weights on the active entries of each named parameter."""
        by_weight: dict[float, tuple[list[Tensor], list[Tensor]]] = defaultdict(lambda: ([], []))
        for name, param in named_params:
            value = active.get(name)
            if value is None:
                continue
            if name not in self.shadow:
                raise KeyError(f"EMA does not track {name!r}")
            mask, regions = _region(name, param, value)
            ema, weight = self.shadow[name], param.detach()
            counts = self.counts[name] if self.counts is not None else None
            if mask is None and not isinstance(counts, Tensor):
                blocks: list[Block] = (
                    counts.update(regions) if counts is not None else [(b, 1) for b in regions]
                )
                for box, count in blocks:  # count is the new one: ``count - 1`` previous updates
                    lists = by_weight[self._weight(count - 1)]
                    lists[0].append(ema[box])
                    lists[1].append(weight[box])
                continue
            if mask is None:
                mask = box_to_mask(param, regions)
            if isinstance(counts, CellCounts):  # a first mask: per-entry counts from now on
                counts = self.counts[name] = counts.per_entry(param.device)  # type: ignore[index]
            if counts is None:
                w: Tensor | float = 1.0 - self.decay
            else:
                n = counts.to(torch.float64)
                w = (1.0 - torch.clamp((1.0 + n) / (10.0 + n), max=self.decay)).to(ema.dtype)
                counts.add_(mask.to(torch.int32))
            ema.copy_(torch.where(mask, torch.lerp(ema, weight, w), ema))
        for w, (emas, weights) in by_weight.items():
            torch._foreach_lerp_(emas, weights, w)

    def state_dict(self, copy: bool = True) -> dict[str, Tensor]:
        """Flat tensors, safetensors-ready: ``{name}.ema`` and, with warm-up, the counts:
        ``{name}.ema_cuts`` + ``{name}.ema_counts`` (cells) or ``{name}.ema_count`` (int32, per entry).
        ``copy=False`` returns the live EMA tensors (for saving right away)."""
        tensors = {
            f"{n}.ema": s.clone().contiguous() if copy else s.contiguous() for n, s in self.shadow.items()
        }
        for n, c in (self.counts or {}).items():
            if isinstance(c, CellCounts):
                tensors.update(_step_tensors(n, {"cells": c}, "ema"))
            else:
                tensors[f"{n}.ema_count"] = c.clone().contiguous()
        return tensors

    def load_state_dict(self, tensors: Mapping[str, Tensor]) -> None:
        """Inverse of ``state_dict`` (also of the old per-entry ``.ema_count`` form); the key set must match."""
        used: set[str] = set()
        for name, shadow in self.shadow.items():
            key = f"{name}.ema"
            if key not in tensors:
                raise KeyError(f"EMA state lacks {key!r}")
            if tensors[key].shape != shadow.shape:
                raise ValueError(f"{key}: shape {tuple(tensors[key].shape)} != {tuple(shadow.shape)}")
            used.add(key)
            if self.counts is not None:
                counts, keys = _load_counts(name, shadow, tensors, "ema", "ema_count")
                if counts is None:
                    raise KeyError(f"EMA state lacks the warm-up counts of {name!r}")
                used.update(keys)
        if set(tensors) != used:
            raise KeyError(f"EMA state keys differ: {sorted(set(tensors) - used)}")
        for name, shadow in self.shadow.items():  # validated: now copy
            shadow.copy_(tensors[f"{name}.ema"])
            if self.counts is not None:
                self.counts[name] = _load_counts(name, shadow, tensors, "ema", "ema_count")[0]  # type: ignore[assignment]

    def update_counts(self, names: Iterable[str] | None = None) -> dict[str, Tensor]:
        """Per-entry warm-up counts (int32; empty without warm-up; for tests and checks), of all parameters
        or of ``names``."""
        wanted = None if names is None else set(names)
        return {
            n: c.per_entry(self.shadow[n].device) if isinstance(c, CellCounts) else c.clone()
            for n, c in (self.counts or {}).items()
            if wanted is None or n in wanted
        }

    def averaged_parameters(self) -> dict[str, Tensor]:
        """The EMA tensors by parameter name (live references: copy before modifying)."""
        return dict(self.shadow)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Write the EMA weights into ``module``'s parameters of the same names (all must exist)."""
        params = dict(module.named_parameters())
        missing = set(self.shadow) - set(params)
        if missing:
            raise KeyError(f"module lacks EMA parameters: {sorted(missing)}")
        for name, ema in self.shadow.items():
            params[name].copy_(ema)

"""Masked AdamW, masked gradient clipping and masked EMA for weight-sharing supernets.

Algorithm 1 updates only the sampled subnet's part of the shared weights and freezes the rest. With
first-k slicing every full tensor receives a gradient (zeros outside the slice), so ``torch.optim.AdamW``
still moves the frozen entries: decoupled weight decay touches every entry and the first moment from
earlier steps is non-zero (see ``shared/reference/frozen-rest.md``). Everything here takes an explicit
``active`` mapping instead:

``active[name]`` is a boolean mask of the parameter's shape, ``True`` where the entry belongs to the sampled
subnet, or - cheaper - the block(s) it covers: a box ``(slice(a0, b0), slice(a1, b1), ...)`` or a list of
disjoint boxes (first-k slicing gives one leading box; a decoder input ``[h | skip]`` two), as
``Supernet.active_regions`` returns them; a name
that is absent or maps to ``None`` marks a parameter the subnet did not use at all. Every
entry outside the mask - weight, gradient (for clipping), optimizer state and EMA - stays bit-identical.

Boxes are updated in place on views (``_foreach`` kernels over all of them); masks by full-tensor
arithmetic selected with ``torch.where``. Both give bit-identical results entry by entry (tested).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

ActiveMasks = Mapping[str, "Tensor | tuple[slice, ...] | list[tuple[slice, ...]] | None"]
NamedParams = Iterable[tuple[str, Tensor]]

_STATE_KEYS = ("exp_avg", "exp_avg_sq", "step")


def _check_mask(name: str, param: Tensor, mask: Tensor) -> None:
    """Raise ``ValueError`` unless ``mask`` is a boolean tensor shaped and placed like ``param``."""
    if mask.dtype != torch.bool or mask.shape != param.shape or mask.device != param.device:
        raise ValueError(
            f"mask for {name!r} must be a bool tensor of shape {tuple(param.shape)} on {param.device}, "
            f"got {mask.dtype} {tuple(mask.shape)} on {mask.device}"
        )


_TABLES: dict[tuple[float, float, torch.device], tuple[Tensor, Tensor]] = {}


def _bias_corrections(step: Tensor, beta1: float, beta2: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Per-entry ``1 - beta1**t`` and ``sqrt(1 - beta2**t)`` for integer counts ``t`` (same shape as ``step``).

    Computed in float64 and then cast, like torch's single-tensor AdamW which uses Python floats (torch's
    float64 ``pow`` can differ from Python's in the last double bit; after the cast to float32 the results
    matched for every ``t`` up to 200k checked). ``t == 0`` is clamped to 1 to keep discarded values finite.
    The values for ``t = 0 .. max`` are tabulated once and gathered, instead of a ``pow`` per entry.
    """
    key = (beta1, beta2, step.device)
    needed = int(step.max()) + 1 if step.numel() else 1
    table = _TABLES.get(key)
    if table is None or table[0].numel() < needed:
        t = torch.arange(max(needed, 2 * (table[0].numel() if table else 1024)), device=step.device)
        t = t.clamp(min=1).to(torch.float64)
        table = (1.0 - torch.pow(beta1, t), (1.0 - torch.pow(beta2, t)).sqrt())
        _TABLES[key] = table
    index = step.long()
    return table[0][index], table[1][index].to(dtype)


Box = tuple[slice, ...]  # one block of a parameter: a slice(start, stop) per dimension


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


def _bias_corrections_many(steps: list[Tensor], beta1: float, beta2: float, dtype: torch.dtype):
    """``_bias_corrections`` of many step tensors with one table lookup: the flat ``1 - beta1**t`` of all of
    them, ``sqrt(1 - beta2**t)`` per tensor, and the sizes that split the flat one."""
    flat = torch.cat([s.reshape(-1) for s in steps])
    bc1, bc2 = _bias_corrections(flat, beta1, beta2, dtype)
    sizes = [s.numel() for s in steps]
    return bc1, [t.view(s.shape) for t, s in zip(bc2.split(sizes), steps)], sizes


def _adamw_update_boxes(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    group: Mapping[str, Any],
) -> None:
    """The masked update with all-True masks, in place on views of many tensors at once (torch's
    ``_foreach`` kernels): entry by entry the same arithmetic as ``_adamw_update_where`` (bit-identical,
    tested), without its full-tensor passes or per-tensor Python overhead."""
    if not params:
        return
    lr, weight_decay, eps = group["lr"], group["weight_decay"], group["eps"]
    beta1, beta2 = group["betas"]
    torch._foreach_add_(steps, 1)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    bc1_flat, bc2s, sizes = _bias_corrections_many(steps, beta1, beta2, params[0].dtype)
    neg_flat = (lr / bc1_flat).to(params[0].dtype).neg_()
    neg_step_sizes = [t.view(p.shape) for t, p in zip(neg_flat.split(sizes), params)]
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, bc2s)
    torch._foreach_add_(denoms, eps)
    updates = torch._foreach_mul(neg_step_sizes, exp_avgs)
    torch._foreach_div_(updates, denoms)
    torch._foreach_add_(params, updates)


def _adamw_update_where(
    param: Tensor, grad: Tensor, mask: Tensor, state: dict[str, Tensor], group: Mapping[str, Any]
) -> None:
    """The general path: full-tensor arithmetic, kept only where ``mask`` is True."""
    lr, weight_decay, eps = group["lr"], group["weight_decay"], group["eps"]
    beta1, beta2 = group["betas"]
    exp_avg, exp_avg_sq, step = state["exp_avg"], state["exp_avg_sq"], state["step"]

    # Count this step for the active entries only.
    step.add_(mask.to(step.dtype))

    # Decoupled weight decay.
    if weight_decay != 0:
        param.copy_(torch.where(mask, param.mul(1 - lr * weight_decay), param))

    # Moments.
    exp_avg.copy_(torch.where(mask, exp_avg.lerp(grad, 1 - beta1), exp_avg))
    new_exp_avg_sq = exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
    exp_avg_sq.copy_(torch.where(mask, new_exp_avg_sq, exp_avg_sq))

    # Bias-corrected update with each entry's own step count.
    bias_correction1, bias_correction2_sqrt = _bias_corrections(step, beta1, beta2, param.dtype)
    neg_step_size = (lr / bias_correction1).to(param.dtype).neg_()
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    updated = param + neg_step_size * exp_avg / denom
    param.copy_(torch.where(mask, updated, param))


class MaskedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, no amsgrad) that updates only the masked entries of each parameter.

    Construct it from ``model.named_parameters()`` (or param groups whose ``"params"`` are ``(name, param)``
    pairs) and call ``step(active)`` with the masks of the sampled subnet (see the module docstring).
    A parameter whose mask is ``None``/absent, or whose ``.grad`` is ``None``, is skipped entirely (no update,
    no decay, no state change), like torch skips parameters without gradients.

    Step counts are per entry: ``state["step"]`` is an int32 tensor of the parameter's shape counting how
    many times each entry was updated, so Adam's bias correction ``1 - beta**t`` uses each entry's own
    ``t``. One count per tensor would be wrong for entries updated fewer times (they would get too little
    bias correction). Per entry, the update equals ``torch.optim.AdamW(foreach=False)`` run on that entry
    alone over the steps where it was active; with an all-True mask it equals torch's AdamW on the tensor.

    State tensors are plain, contiguous tensors; ``optimizer_state_tensors`` / ``hyperparameters`` give a
    safetensors + JSON form, and ``state_dict`` / ``load_state_dict`` work as for any torch optimizer.
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

    def _init_state(self, param: Tensor) -> dict[str, Tensor]:
        state = self.state[param]
        if not state:
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["step"] = torch.zeros_like(param, dtype=torch.int32)
        return state

    @torch.no_grad()
    def step(self, active: ActiveMasks) -> None:  # type: ignore[override]
        """Update the entries where ``active[name]`` is True; raise ``KeyError`` for unknown names."""
        unknown = set(active) - {name for name, _, _ in self.named_parameters()}
        if unknown:
            raise KeyError(f"masks for unknown parameters: {sorted(unknown)}")
        boxes: dict[int, tuple[dict, list[list[Tensor]]]] = {}  # per group: views of every box
        for name, param, group in self.named_parameters():
            value = active.get(name)
            if value is None or param.grad is None:
                continue
            mask, regions = _region(name, param, value)
            state = self._init_state(param)
            if mask is not None:
                _adamw_update_where(param, param.grad, mask, state, group)
                continue
            lists = boxes.setdefault(id(group), (group, [[], [], [], [], []]))[1]
            for box in regions:  # disjoint boxes: each updated once, in place
                for i, t in enumerate(
                    (param, param.grad, state["exp_avg"], state["exp_avg_sq"], state["step"])
                ):
                    lists[i].append(t[box])
        for group, lists in boxes.values():
            _adamw_update_boxes(*lists, group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, then own copies of every state tensor on its parameter's device."""
        super().load_state_dict(state_dict)
        for _, param, _ in self.named_parameters():
            state = self.state.get(param)
            if state:
                for key in _STATE_KEYS:
                    state[key] = state[key].to(device=param.device, copy=True)

    def optimizer_state_tensors(self) -> dict[str, Tensor]:
        """Flat ``{"{param_name}.exp_avg" | ".exp_avg_sq" | ".step": tensor}`` copies (safetensors-ready)."""
        tensors: dict[str, Tensor] = {}
        for name, param, _ in self.named_parameters():
            state = self.state.get(param)
            if state:
                for key in _STATE_KEYS:
                    tensors[f"{name}.{key}"] = state[key].detach().clone().contiguous()
        return tensors

    def load_optimizer_state_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        """Inverse of ``optimizer_state_tensors``; parameters without entries get fresh (empty) state."""
        expected: set[str] = set()
        for name, param, _ in self.named_parameters():
            keys = [f"{name}.{key}" for key in _STATE_KEYS]
            present = [key in tensors for key in keys]
            if any(present) and not all(present):
                raise KeyError(f"incomplete optimizer state for {name!r}")
            self.state.pop(param, None)
            if not all(present):
                continue
            expected.update(keys)
            for key, flat_key in zip(_STATE_KEYS, keys, strict=True):
                value = tensors[flat_key]
                if value.shape != param.shape:
                    raise ValueError(f"{flat_key}: shape {tuple(value.shape)} != {tuple(param.shape)}")
                dtype = torch.int32 if key == "step" else param.dtype
                self.state[param][key] = value.to(device=param.device, dtype=dtype, copy=True)
        unknown = set(tensors) - expected
        if unknown:
            raise KeyError(f"optimizer state for unknown parameters: {sorted(unknown)}")

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
    selected: list[tuple[Tensor, Tensor | None]] = []  # (gradient or its box view, mask or None)
    for name, param in named_params:
        value = active.get(name)
        if value is not None and param.grad is not None:
            mask, regions = _region(name, param, value)
            if mask is not None:
                selected.append((param.grad, mask))
            selected.extend((param.grad[box], None) for box in regions)
    if not selected:
        return torch.tensor(0.0)
    zero = torch.zeros((), dtype=selected[0][0].dtype, device=selected[0][0].device)
    norms = [
        torch.linalg.vector_norm(grad if mask is None else torch.where(mask, grad, zero))
        for grad, mask in selected
    ]
    total_norm = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
    clip_coef = torch.clamp(max_norm / (total_norm + eps), max=1.0)
    for grad, mask in selected:
        if mask is None:
            grad.mul_(clip_coef.to(grad.device))
        else:
            grad.copy_(torch.where(mask, grad * clip_coef.to(grad.device), grad))
    return total_norm


class MaskedEMA:
    """Exponential moving average of weights, updated only where the subnet's mask is True.

    ``ema <- lerp(ema, weight, 1 - d)`` on active entries. With ``warmup=True`` the decay is per entry,
    ``d = min(decay, (1 + n) / (10 + n))`` where ``n`` counts that entry's previous EMA updates (an int32
    tensor per parameter, saved with the state), so an entry first trained late warms up like one trained
    from the start. With ``warmup=False`` ``d = decay`` and no counts are kept. Frozen entries' EMA stays
    bit-identical.
    """

    def __init__(self, named_params: NamedParams, decay: float = 0.999, warmup: bool = True) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.shadow: dict[str, Tensor] = {n: p.detach().clone() for n, p in named_params}
        self.counts: dict[str, Tensor] | None = (
            {n: torch.zeros_like(s, dtype=torch.int32) for n, s in self.shadow.items()} if warmup else None
        )

    def _decay_weight(self, name: str) -> Tensor | float:
        """``1 - d`` per entry (warm-up) or as a scalar."""
        if self.counts is None:
            return 1.0 - self.decay
        count = self.counts[name].to(self.shadow[name].dtype)
        return 1.0 - torch.clamp((1.0 + count) / (10.0 + count), max=self.decay)

    @torch.no_grad()
    def update(self, named_params: NamedParams, active: ActiveMasks) -> None:
        """Move the EMA toward the current weights on the active entries of each named parameter."""
        for name, param in named_params:
            value = active.get(name)
            if value is None:
                continue
            if name not in self.shadow:
                raise KeyError(f"EMA does not track {name!r}")
            mask, regions = _region(name, param, value)
            ema, weight = self.shadow[name], self._decay_weight(name)
            for box in regions:  # in place on each box: the same lerp entry by entry
                ema[box].lerp_(param.detach()[box], weight[box] if isinstance(weight, Tensor) else weight)
                if self.counts is not None:
                    self.counts[name][box].add_(1)
            if mask is None:
                continue
            ema.copy_(torch.where(mask, torch.lerp(ema, param.detach(), weight), ema))
            if self.counts is not None:
                self.counts[name].add_(mask.to(torch.int32))

    def state_dict(self) -> dict[str, Tensor]:
        """Flat ``{"{name}.ema": tensor, "{name}.ema_count": int32 tensor}`` copies (safetensors-ready)."""
        tensors = {f"{n}.ema": s.clone().contiguous() for n, s in self.shadow.items()}
        if self.counts is not None:
            tensors.update({f"{n}.ema_count": c.clone().contiguous() for n, c in self.counts.items()})
        return tensors

    def load_state_dict(self, tensors: Mapping[str, Tensor]) -> None:
        """Inverse of ``state_dict``; the key set must match exactly."""
        expected = {f"{n}.ema" for n in self.shadow}
        if self.counts is not None:
            expected |= {f"{n}.ema_count" for n in self.shadow}
        if set(tensors) != expected:
            raise KeyError(f"EMA state keys differ: {sorted(set(tensors) ^ expected)}")
        for key, value in tensors.items():
            name, kind = key.rsplit(".", 1)
            target = self.shadow[name] if kind == "ema" else self.counts[name]  # type: ignore[index]
            if value.shape != target.shape:
                raise ValueError(f"{key}: shape {tuple(value.shape)} != {tuple(target.shape)}")
            target.copy_(value)

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

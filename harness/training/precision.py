"""Numerical precision of a training run: autocast mode, fp16 loss scaling, and the fp32 matmul settings.

``fp32`` runs everything in float32. ``bf16-autocast`` / ``fp16-autocast`` run the forward under
``torch.autocast`` (matmuls and convolutions in the low precision, reductions and the loss in float32);
weights, gradients, Adam moments and the EMA stay float32. fp16's narrow exponent needs a loss scale:
``torch.amp.GradScaler`` multiplies the loss, divides the gradients back before clipping, skips a step
whose gradients overflowed and adapts the scale; its state is checkpointed so a resume is bit-exact.

TF32 (float32 matmuls and convolutions on tensor cores with a 10-bit mantissa) is set explicitly, never
left to torch's defaults (which differ between matmul and cuDNN and between torch versions), and the
settings in force are recorded in the checkpoint metadata.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16-autocast", "fp16-autocast")
_DTYPES = {"bf16-autocast": torch.bfloat16, "fp16-autocast": torch.float16}


def set_tf32(enabled: bool) -> dict:
    """Allow (or forbid) TF32 for float32 matmuls and cuDNN convolutions; returns what is now in force.

    Through the legacy flags, as ``harness.device_policy`` does: mixing them with torch 2.9's per-backend
    ``fp32_precision`` settings makes reading ``torch.backends.cudnn.allow_tf32`` raise."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    return {
        "tf32": enabled,
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


class Precision:
    """Autocast context, backward and optimizer step of one precision ``mode`` on ``device``."""

    def __init__(self, mode: str, device: torch.device):
        if mode not in PRECISIONS:
            raise ValueError(f"--precision {mode!r} is unknown; pass one of {', '.join(PRECISIONS)}")
        if mode == "fp16-autocast" and device.type not in ("cuda", "cpu"):
            raise ValueError(f"--precision fp16-autocast needs a cuda or cpu device, not {device}")
        self.mode, self.device = mode, device
        self.dtype = _DTYPES.get(mode)
        self.scaler = torch.amp.GradScaler(device.type) if mode == "fp16-autocast" else None

    def autocast(self):
        """The forward's context: ``torch.autocast`` in the low precision, or nothing for fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the loss scale out of the (all-reduced) gradients before they are clipped."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer, active) -> bool:
        """``optimizer.step(active)``; under fp16 skipped when a gradient overflowed. Returns whether the
        weights moved (the EMA should follow only then)."""
        if self.scaler is None:
            optimizer.step(active)
            return True
        before = self.scaler.get_scale()
        self.scaler.step(optimizer, active)
        self.scaler.update()
        return self.scaler.get_scale() >= before  # the scale backs off exactly when the step was skipped

    def state_dict(self) -> dict | None:
        """JSON-able scaler state (scale, growth tracker) or None."""
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)

"""Latent-space family (LVDM-like, SNED §4.3): an unconditional 3D UNet denoising video-autoencoder latents.

Registered as ``build_supernet("latent-unet", preset)``. The denoiser follows LVDM's short-video UNet
(``configs/lvdm_short/sky.yaml``, ``openaimodel3d.UNetModel`` with ``STAttentionBlock``):

* in/out 4 latent channels, unconditional (``context_dim=0``: no cross-attention, no null text);
* every convolution space-only ``1x3x3`` (``temporal_conv=False``), scale-shift norm (``scale_shift=True``);
* at downsampling factors 8, 4, 2 (levels 1..3) each ResBlock is followed by spatial self-attention then
  temporal self-attention with a learned relative position bias; no feed-forward (``ff_mult=0``), as
  LVDM's attention block has none.

Differences from LVDM, which the parameter count absorbs (paper preset: 557.1M here vs LVDM's 548.9M, +1.5%):
the middle is two diffusion blocks (ResBlock + attentions, twice) where LVDM has ResBlock, attention,
ResBlock; the head dim is fixed and the number of heads searched (``head_dim=128``: 4 heads at 512
channels as in LVDM, 6 and 8 at 768 and 1024 where LVDM keeps 4 wider heads); the relative position is a
per-head bias (Shaw-style scalar) rather than LVDM's key/value embedding tables.

The latents come from ``harness.autoencoder.VideoAutoencoder`` with the same-named preset:

* ``paper``: 16 frames of 256^2 -> downsample ``(4, 8, 8)`` -> 4 latent frames of 32^2.
* ``tiny``: 16 frames of 32^2 or 64^2 -> downsample ``(2, 4, 4)`` -> 8 latent frames of 8^2 or 16^2, so
  ``resolutions=(8, 16)`` are *latent* sizes (the larger one under a 70% size cap).
"""

from __future__ import annotations

from ..plan import UNetHyper
from ..registry import register_family

SPATIO_TEMPORAL = ("spatial", "temporal_self")  # LVDM's STAttentionBlock: spatial, then temporal

LATENT_PRESETS = {
    # Trainable on 2 CPU cores (~1.27M parameters): 8 latent frames, 8^2 and 16^2 latents.
    "tiny": UNetHyper(
        model_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attentions=((), SPATIO_TEMPORAL, SPATIO_TEMPORAL),
        mid_blocks=1,
        mid_attentions=SPATIO_TEMPORAL,
        head_dim=8,
        ff_mult=0,
        group_size=4,
        in_channels=4,
        out_channels=4,
        context_dim=0,
        context_len=0,
        frames=8,
        max_frames=8,
        temporal_conv=False,
        scale_shift=True,
        resolutions=(8, 16),
        size_caps=(1.0, 0.7),
    ),
    # LVDM Sky Timelapse UNet (~548M parameters): 4 latent frames of 32^2.
    "paper": UNetHyper(
        model_channels=256,
        channel_mult=(1, 2, 3, 4),
        num_res_blocks=3,
        attentions=((), SPATIO_TEMPORAL, SPATIO_TEMPORAL, SPATIO_TEMPORAL),
        mid_blocks=2,
        mid_attentions=SPATIO_TEMPORAL,
        head_dim=128,
        ff_mult=0,
        group_size=32,
        in_channels=4,
        out_channels=4,
        context_dim=0,
        context_len=0,
        frames=4,
        max_frames=4,
        temporal_conv=False,
        scale_shift=True,
        resolutions=(32,),
        size_caps=(1.0,),
    ),
}

register_family("latent-unet", LATENT_PRESETS)

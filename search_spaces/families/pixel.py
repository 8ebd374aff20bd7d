"""Pixel-space chain (Imagen-Video-like, SNED §4.2): a text-to-video base UNet and one super-resolution
(SSR) UNet applied recursively (the paper: 64 -> 128 -> 256).

Both use 2D spatial convolutions with factorised temporal layers (a 3x1x1 temporal convolution in each
ResBlock, temporal self-attention with a relative position bias), temporal cross-attention to frozen
text-encoder tokens, spatial attention at the low-resolution levels only (as imagen's ``layer_attns``),
and a learned null text embedding for classifier-free guidance. The SSR model also takes the
bilinearly upsampled low-resolution video (concatenated on channels) and a noise-augmentation level.
"""

from __future__ import annotations

from ..blocks import ATTENTIONS
from ..plan import UNetHyper
from ..priors import moving_shapes  # noqa: F401  (registers the position priors the tiny base lists)
from ..registry import register_family

TEMPORAL = ("temporal_self", "temporal_cross")

BASE_PRESETS = {
    # Trainable on 2 CPU cores: ~1M parameters, 12 frames, 16px; attention at the 8px level and the middle.
    # Beyond the paper, so that it can follow "moving left/right/...": a frame embedding and the pooled
    # prompt in the time embedding (as Imagen; level 0 has no cross-attention), and the position priors of
    # the built-in moving-shapes data (search_spaces.priors.moving_shapes).
    "tiny": UNetHyper(
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attentions=((), ATTENTIONS),
        mid_attentions=ATTENTIONS,
        head_dim=8,
        ff_mult=2,
        group_size=4,
        context_dim=384,
        context_len=8,
        frames=12,
        max_frames=16,
        conditioning=(
            "frame_embedding",
            "pooled_text",
            "position_embedding",
            "position_modulation",
            "position_velocity",
        ),
        resolutions=(16,),
        size_caps=(1.0,),
    ),
    # Paper scale (~1.6B parameters): 64px base of the SNED pixel chain, T5-XXL-sized text tokens.
    "paper": UNetHyper(
        model_channels=320,
        channel_mult=(1, 2, 4, 4),
        num_res_blocks=3,
        attentions=(TEMPORAL, ATTENTIONS, ATTENTIONS, ATTENTIONS),
        mid_blocks=2,
        mid_attentions=ATTENTIONS,
        head_dim=64,
        ff_mult=4,
        group_size=32,
        context_dim=4096,
        context_len=64,
        frames=16,
        max_frames=32,
        resolutions=(64,),
        size_caps=(1.0,),
    ),
}

SSR_PRESETS = {
    # Super-resolves 16->32 and 32->64 with one set of weights (64px under a 60% size cap).
    "tiny": UNetHyper(
        model_channels=16,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attentions=((), (), TEMPORAL),
        mid_attentions=ATTENTIONS,
        head_dim=8,
        ff_mult=2,
        group_size=2,
        context_dim=384,
        context_len=8,
        frames=12,
        max_frames=16,
        in_channels=3,
        cond_channels=3,
        noise_cond=True,
        resolutions=(32, 64),
        size_caps=(1.0, 0.6),
    ),
    # Paper scale (~428M parameters): 64->128->256, attention at the lowest level only.
    "paper": UNetHyper(
        model_channels=128,
        channel_mult=(1, 2, 4, 8),
        num_res_blocks=2,
        attentions=((), (), TEMPORAL, ATTENTIONS),
        mid_attentions=ATTENTIONS,
        head_dim=64,
        ff_mult=4,
        group_size=32,
        context_dim=4096,
        context_len=64,
        frames=16,
        max_frames=32,
        in_channels=3,
        cond_channels=3,
        noise_cond=True,
        resolutions=(128, 256),
        size_caps=(1.0, 0.8),
    ),
}

register_family("pixel-base", BASE_PRESETS)
register_family("pixel-ssr", SSR_PRESETS)

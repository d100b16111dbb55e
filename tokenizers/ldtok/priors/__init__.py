"""Small priors over a frozen tokenizer's latent shards, the models behind `train/prior_diffusion.py` (a diffusers
`UNet2DModel` on KL latents, nothing of ours to add) and `train/prior_transformer.py` (`GPT` on VQ codes)."""

from .config import GPTConfig, NoiseConfig, PriorDiffusionConfig, PriorTrainConfig, PriorTransformerConfig, UNetConfig
from .layout import CodeLayout, CodeLevel
from .transformer import GPT, GPTOutput, KVCache

__all__ = [
    "GPT",
    "CodeLayout",
    "CodeLevel",
    "GPTConfig",
    "GPTOutput",
    "KVCache",
    "NoiseConfig",
    "PriorDiffusionConfig",
    "PriorTrainConfig",
    "PriorTransformerConfig",
    "UNetConfig",
]

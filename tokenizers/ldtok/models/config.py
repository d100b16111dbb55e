"""The model section of a training config, and the architecture presets it can name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from ..config import check_choice, check_range, invalid
from ..quantizers import QuantizerConfig

MODEL_FAMILIES = ("kl", "vqgan", "vqvae2", "mlp", "vae2")  # model.type: the family (its shards' kind may differ)

# Architecture presets (DiT's `DiT_models`, LlamaGen's `VQ_models`): a name -> the `model.*` keys it sets.
# A YAML config selects one with `model.preset: NAME`; keys given next to it override the preset's.
MODEL_PRESETS: dict[str, dict] = {
    # Stable Diffusion's VAE: f8, 4 latent channels (CompVis kl-f8).
    "kl-f8": dict(
        type="kl", block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, sample_size=256
    ),
    # CompVis kl-f16: f16, 16 latent channels (ch_mult 1,1,2,2,4).
    "kl-f16": dict(
        type="kl", block_out_channels=[128, 128, 256, 256, 512], layers_per_block=2, latent_channels=16,
        sample_size=256,
    ),
    # A tiny f4 KL-VAE that trains on CPU in minutes. 4 GroupNorm groups (8 and 16 channels per group): with 16
    # groups its 32-channel layers had 2 channels per group, nearly InstanceNorm, which normalizes each image's colour
    # statistics away; the tokenizer then ignored the input's overall colour and painted the (warm) training-set
    # average instead, e.g. white and grey turned red-brown (issue 15, eval/ablate_colour.py). Stable Diffusion's VAE
    # (32 groups on 128-512 channels) has 4-16 channels per group, as the kl-/vq- presets above.
    "demo-kl": dict(
        type="kl", block_out_channels=[32, 64, 64], layers_per_block=1, latent_channels=4, norm_num_groups=4,
        sample_size=64, mid_block_add_attention=False,
    ),
    # LDM vq-f8: f8, 16384 codes of dimension 4.
    "vq-f8-16k": dict(
        type="vqgan", block_out_channels=[128, 128, 256, 512], layers_per_block=2, latent_channels=4,
        sample_size=256, quantizer=dict(codebook_size=16384, codebook_dim=4),
    ),
    # LlamaGen VQ-16: f16, 16384 l2-normalized codes of dimension 8.
    "vq-f16-16k": dict(
        type="vqgan", block_out_channels=[128, 128, 256, 256, 512], layers_per_block=2, latent_channels=256,
        sample_size=256, quantizer=dict(codebook_size=16384, codebook_dim=8, l2_normalize=True),
    ),
    # VQ-VAE-2 (Razavi et al. 2019) at 256 px: bottom f4 and top f8 levels, 512 codes of dimension 64 each.
    "vqvae2-256": dict(
        type="vqvae2", block_out_channels=[128, 128, 256], layers_per_block=2, latent_channels=64,
        sample_size=256, quantizer=dict(codebook_size=512, codebook_dim=64),
    ),
    # f16 FSQ VQGAN (Mentzer et al. 2023; Cosmos' discrete tokenizer): levels 8,8,8,5,5,5 = 64000 implicit codes.
    "fsq-f16": dict(
        type="vqgan", block_out_channels=[128, 128, 256, 256, 512], layers_per_block=2, latent_channels=256,
        sample_size=256, quantizer=dict(type="fsq", levels=[8, 8, 8, 5, 5, 5]),
    ),
    # f16 LFQ VQGAN with 18 bits (MAGVIT-v2 / Open-MAGVIT2): 2^18 codes, entropy over 2 groups of 9 bits.
    "lfq-f16-18bit": dict(
        type="vqgan", block_out_channels=[128, 128, 256, 256, 512], layers_per_block=2, latent_channels=256,
        sample_size=256, quantizer=dict(type="lfq", codebook_dim=18, entropy_groups=2, entropy_weight=0.1,
                                        diversity_gamma=1.0, beta=0.25),
    ),
    # Tiny f4 FSQ / LFQ VQGANs (the demo-vq architecture, about 8 bits per token) for CPU demos and tests, with
    # demo-vq's 4 GroupNorm groups (issue 15: 16 over-saturated them, configs/demo-fsq.yaml and demo-lfq.yaml).
    "demo-fsq": dict(
        type="vqgan", block_out_channels=[32, 64, 64], layers_per_block=1, latent_channels=4, norm_num_groups=4,
        sample_size=64, mid_block_add_attention=False, quantizer=dict(type="fsq", levels=[8, 6, 5], usage_window=50),
    ),
    "demo-lfq": dict(
        type="vqgan", block_out_channels=[32, 64, 64], layers_per_block=1, latent_channels=4, norm_num_groups=4,
        sample_size=64, mid_block_add_attention=False,
        quantizer=dict(type="lfq", codebook_dim=8, entropy_weight=0.1, usage_window=50),
    ),
    # Tiny f4 VQGAN / VQ-VAE-2 for CPU demos and tests; 4 GroupNorm groups as demo-kl (colour fidelity, issue 15).
    "demo-vq": dict(
        type="vqgan", block_out_channels=[32, 64, 64], layers_per_block=1, latent_channels=4, norm_num_groups=4,
        sample_size=64, mid_block_add_attention=False,
        quantizer=dict(codebook_size=256, codebook_dim=4, dead_code_steps=20, usage_window=50),
    ),
    "demo-vqvae2": dict(
        type="vqvae2", block_out_channels=[32, 64, 64], layers_per_block=1, latent_channels=16, norm_num_groups=4,
        sample_size=64, mid_block_add_attention=False,
        quantizer=dict(codebook_size=128, codebook_dim=16, dead_code_steps=20, usage_window=50),
    ),
}


@dataclass
class ModelConfig:
    """Architecture of the autoencoder being trained.

    Args:
        type (`"kl"`, `"vqgan"`, `"vqvae2"`, `"mlp"` or `"vae2"`): the model family (not the latent kind its shards
            store: a `vqgan` writes `"vq"` shards, an `mlp` `"kl"` ones; see `ldtok.models.base`). `mlp`: an MLP
            VAE / AE for small images (`block_out_channels` are then the hidden layer widths, `latent_channels` the
            latent size, e.g. 2; `ldtok.models.mlp`). `vae2`: a two-level hierarchical KL-VAE laid out like
            VQ-VAE-2, `latent_channels` Gaussian channels per level (`ldtok.models.vae2`).
        init_from (`str`, *optional*): a diffusers model directory to start from (fine-tuning). Its own config then
            defines the architecture, and the architecture keys below must be left at their defaults.
        in_channels (`int`, defaults to 3): image channels.
        block_out_channels (`list[int]`): channels per resolution level; the downsampling factor is
            `2 ** (len(block_out_channels) - 1)`.
        layers_per_block (`int`): ResNet blocks per level.
        latent_channels (`int`): channels of the latent (KL: of the posterior's mean).
        norm_num_groups (`int`): GroupNorm groups; must divide every entry of `block_out_channels`.
        sample_size (`int`): the training resolution written into the exported config.
        mid_block_add_attention (`bool`): self-attention in the encoder's and decoder's middle blocks.
        gradient_checkpointing (`bool`): recompute activations in the backward pass to save memory.
        deterministic (`bool`, KL only): a plain autoencoder: the decoder sees the posterior's mean, no sampling and
            no KL term.
        quantizer (`QuantizerConfig`, VQ only): the quantizer (`type: vq | fsq | lfq | bsq | residual`, codebook
            size and dimension, EMA, k-means init, dead-code restart, ...); for VQ-VAE-2 (`type: vq` only) each level
            gets a codebook of this kind.
    """

    presets: ClassVar[dict[str, dict]] = MODEL_PRESETS

    type: Literal["kl", "vqgan", "vqvae2", "mlp", "vae2"] = "kl"
    init_from: str | None = None
    in_channels: int = 3
    block_out_channels: list[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 256
    mid_block_add_attention: bool = True
    gradient_checkpointing: bool = False
    deterministic: bool = False
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)

    def __post_init__(self):
        self.block_out_channels = list(self.block_out_channels)
        check_choice(self, "type", MODEL_FAMILIES)
        for name in ("in_channels", "layers_per_block", "latent_channels", "norm_num_groups", "sample_size"):
            check_range(self, name, ge=1)
        if any(c < 1 for c in self.block_out_channels) or (not self.block_out_channels and self.type != "mlp"):
            # (an MLP without hidden layers is the linear autoencoder)
            raise invalid("block_out_channels", f"needs positive widths (at least one), got {self.block_out_channels}")
        for c in self.block_out_channels if self.type != "mlp" else ():  # MLP widths have no GroupNorm
            if c % self.norm_num_groups:
                raise invalid("block_out_channels", f"entry {c} is not divisible by norm_num_groups="
                                                    f"{self.norm_num_groups}")

    def diffusers_architecture(self) -> dict:
        """The keyword arguments that diffusers' `AutoencoderKL` and `VQModel` share, from this config."""
        n = len(self.block_out_channels)
        return dict(
            in_channels=self.in_channels,
            out_channels=self.in_channels,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            latent_channels=self.latent_channels,
            norm_num_groups=self.norm_num_groups,
            sample_size=self.sample_size,
            mid_block_add_attention=self.mid_block_add_attention,
        )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

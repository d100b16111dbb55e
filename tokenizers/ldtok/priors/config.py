"""Typed configs of the two prior scripts, `train/prior_diffusion.py` and `train/prior_transformer.py`.

Loaded with `ldtok.config.parse_args`: `--config configs/prior-diffusion-demo.yaml train.max_steps=100 ...`; an unknown
key or a value of the wrong type is an error naming the key. `python train/prior_diffusion.py --help` lists every key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..config import check_choice, check_range, invalid
from ..training.config import TrainLoopConfig, inherit_args


@inherit_args(TrainLoopConfig)
@dataclass
class PriorTrainConfig(TrainLoopConfig):
    """The `train` section of both prior scripts: the shared loop's keys (their prior defaults below) and these.

    Defaults that differ from the autoencoders': `max_steps` 10000, `batch_size` 64, `adam_betas` (0.9, 0.999),
    `mixed_precision` "no", `checkpoint_every` 0 (no checkpoints; the final weights are always written). The
    transformer applies `weight_decay` to matrices only; the loss is computed in fp32.

    Args:
        num_workers (`int`): DataLoader worker processes.
    """

    max_steps: int = 10_000
    batch_size: int = 64
    adam_betas: list[float] = (0.9, 0.999)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "no"
    checkpoint_every: int = 0
    num_workers: int = 0

    def __post_init__(self):
        super().__post_init__()
        check_range(self, "num_workers", ge=0)


# ------------------------------------------------------------------------------------------------ diffusion
@dataclass
class UNetConfig:
    """The diffusers `UNet2DModel` denoiser.

    Args:
        block_out_channels (`list[int]`): channels per resolution level; every level but the last halves the
            resolution, so the latent size must be divisible by `2 ** (len(block_out_channels) - 1)`.
        attention (`list[bool]`): self-attention in each level's blocks (one entry per level).
        layers_per_block (`int`): ResNet blocks per level.
        attention_head_dim (`int`): channels per attention head.
        norm_num_groups (`int`): GroupNorm groups; must divide every `block_out_channels` entry.
        dropout (`float`): ResNet dropout.
        num_classes (`int`, *optional*): class-conditional on the shards' `label` (a class embedding added to the
            timestep embedding); samples then cycle through the classes.
    """

    block_out_channels: list[int] = (128, 256, 256)
    attention: list[bool] = (False, True, True)
    layers_per_block: int = 2
    attention_head_dim: int = 32
    norm_num_groups: int = 32
    dropout: float = 0.0
    num_classes: int | None = None

    def __post_init__(self):
        self.block_out_channels, self.attention = list(self.block_out_channels), list(self.attention)
        if len(self.attention) != len(self.block_out_channels):
            raise invalid("attention", f"needs one entry per level ({len(self.block_out_channels)}), got "
                          f"{self.attention}")
        for key in ("layers_per_block", "attention_head_dim", "norm_num_groups", "num_classes"):
            check_range(self, key, gt=0)
        check_range(self, "dropout", ge=0, lt=1)
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise invalid("block_out_channels", f"entry {c} not divisible by norm_num_groups "
                              f"{self.norm_num_groups}")


@dataclass
class NoiseConfig:
    """The diffusion process (a diffusers `DDPMScheduler`; sampling uses DDIM or DDPM with the same betas).

    Args:
        num_train_timesteps (`int`): diffusion steps.
        beta_schedule (`"linear"`, `"scaled_linear"` or `"squaredcos_cap_v2"`): DDPM / DiT use linear.
        prediction_type (`"epsilon"` or `"v_prediction"`): what the UNet predicts.
    """

    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"

    def __post_init__(self):
        check_range(self, "num_train_timesteps", gt=0)
        check_choice(self, "beta_schedule", ("linear", "scaled_linear", "squaredcos_cap_v2"))
        check_choice(self, "prediction_type", ("epsilon", "v_prediction"))


@dataclass
class PriorDiffusionConfig:
    """`train/prior_diffusion.py`: a latent diffusion prior on KL latent shards.

    Args:
        shards (`str`): a KL latent-shard directory (with `index.json`).
        vae (`str`, *optional*): the diffusers `AutoencoderKL` directory that decodes samples; defaults to the
            manifest's `model.path` (the model the shards were encoded with).
        val_shards (`str`, *optional*): KL shards of held-out images (encoded by the same model): at the end, the
            final (EMA) UNet's denoising loss on them (`val_loss` in `summary.json`) at fixed timesteps and noise, with
            the training shards' latent scaling, so runs on different tokenizers compare on equal terms.
        val_timesteps (`int`): timesteps per validation latent, evenly spaced over the noise schedule.
        output_dir (`str`): metrics, samples, checkpoints and `final/`.
        resume (`str`, *optional*): `latest` or a checkpoint path (needs `train.checkpoint_every > 0`).
        sample_posterior (`bool`): train on a fresh posterior sample `mean + std * eps` at every access (else the
            mean).
        use_flip (`bool`): use the shards' horizontally flipped latents for half of the samples.
        num_samples (`int`): latents sampled and decoded at the end.
        num_inference_steps (`int`): sampler steps.
        sampler (`"ddim"` or `"ddpm"`): the sampling scheduler.
        grid_columns (`int`): samples per row of the grid PNG.
    """

    shards: str | None = None
    vae: str | None = None
    val_shards: str | None = None
    val_timesteps: int = 10
    output_dir: str = "runs/prior-diffusion"
    resume: str | None = None
    sample_posterior: bool = True
    use_flip: bool = False
    unet: UNetConfig = field(default_factory=UNetConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    train: PriorTrainConfig = field(default_factory=PriorTrainConfig)
    num_samples: int = 16
    num_inference_steps: int = 50
    sampler: Literal["ddim", "ddpm"] = "ddim"
    grid_columns: int = 8

    def __post_init__(self):
        if not self.shards:
            raise invalid("shards", "the latent-shard directory is required (shards=PATH)")
        for key in ("num_samples", "num_inference_steps", "grid_columns", "val_timesteps"):
            check_range(self, key, gt=0)
        check_choice(self, "sampler", ("ddim", "ddpm"))


# ------------------------------------------------------------------------------------------------ transformer
@dataclass
class GPTConfig:
    """The GPT (`ldtok.priors.GPT`); `vocab_size` and `block_size` come from the shards.

    Args:
        num_layers (`int`): transformer blocks.
        num_heads (`int`): attention heads; must divide `hidden_size`.
        hidden_size (`int`): width of the residual stream.
        dropout (`float`): dropout on embeddings, attention and MLP outputs.
        num_classes (`int`, *optional*): class-conditional on the shards' `label`; samples cycle through the classes.
    """

    num_layers: int = 8
    num_heads: int = 8
    hidden_size: int = 512
    dropout: float = 0.0
    num_classes: int | None = None

    def __post_init__(self):
        for key in ("num_layers", "num_heads", "hidden_size", "num_classes"):
            check_range(self, key, gt=0)
        check_range(self, "dropout", ge=0, lt=1)
        if self.hidden_size % self.num_heads:
            raise invalid("hidden_size", f"{self.hidden_size} not divisible by model.num_heads {self.num_heads}")


@dataclass
class PriorTransformerConfig:
    """`train/prior_transformer.py`: an autoregressive prior on VQ / VQ-VAE-2 code shards.

    Args:
        shards (`str`): a VQ or VQ-VAE-2 shard directory (with `index.json`).
        tokenizer (`str`, *optional*): the model that decodes sampled codes (a VQGAN / diffusers `VQModel` or a
            VQ-VAE-2 directory, loaded with `ldtok.models.load_tokenizer`); defaults to the manifest's `model.path`.
        decode (`bool`): decode the samples into a grid PNG (needs the tokenizer); the sampled codes are written to
            `samples.safetensors` either way.
        output_dir (`str`): metrics, samples, checkpoints and `final/`.
        resume (`str`, *optional*): `latest` or a checkpoint path (needs `train.checkpoint_every > 0`).
        use_flip (`bool`): use the shards' flipped codes for half of the samples.
        num_samples (`int`): sequences sampled at the end.
        temperature (`float`): sampling temperature.
        top_k (`int`, *optional*): sample among the `top_k` most likely codes only.
        grid_columns (`int`): samples per row of the grid PNG.
        code_groups (`int`): tokens each code is split into (its index's digits of radix `K ** (1 / code_groups)`),
            so that large implicit codebooks stay tractable: 2 for 18-bit LFQ / BSQ codes (two 512-way softmaxes).
            `K` must be a `code_groups`-th power. Residual VQ stages are extra tokens whatever this is.
        residual_stages (`"tokens"` or `"summed"`): how a position's residual VQ stages (and `code_groups` digits) enter
            the GPT: `tokens`, one token each, every one conditioned on the previous ones (a sequence of
            `S * h * w` tokens); `summed`, their embeddings summed into one step that predicts all of the next
            position's stages at once, each over its own range (RQ-Transformer's input, `h * w` steps).
    """

    shards: str | None = None
    tokenizer: str | None = None
    decode: bool = True
    output_dir: str = "runs/prior-transformer"
    resume: str | None = None
    use_flip: bool = False
    model: GPTConfig = field(default_factory=GPTConfig)
    train: PriorTrainConfig = field(default_factory=PriorTrainConfig)
    num_samples: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    grid_columns: int = 8
    code_groups: int = 1
    residual_stages: Literal["tokens", "summed"] = "tokens"

    def __post_init__(self):
        if not self.shards:
            raise invalid("shards", "the code-shard directory is required (shards=PATH)")
        check_range(self, "code_groups", ge=1)
        check_choice(self, "residual_stages", ("tokens", "summed"))
        for key in ("num_samples", "grid_columns", "temperature", "top_k"):
            check_range(self, key, gt=0)


__all__ = [
    "GPTConfig",
    "NoiseConfig",
    "PriorDiffusionConfig",
    "PriorTrainConfig",
    "PriorTransformerConfig",
    "UNetConfig",
]

"""Typed configs of the two prior scripts, `train/prior_diffusion.py` and `train/prior_transformer.py`.

Loaded with `ldtok.config.parse_args`: `--config configs/prior-diffusion-demo.yaml train.max_steps=100 ...`; an unknown
key or a value of the wrong type is an error naming the key. `python train/prior_diffusion.py --help` lists every key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..config import ConfigError


@dataclass
class PriorTrainConfig:
    """Optimization and infrastructure of a prior's training run (both scripts).

    Args:
        max_steps (`int`): optimizer steps.
        batch_size (`int`): samples per process per forward.
        gradient_accumulation_steps (`int`): batches accumulated into one optimizer step.
        lr (`float`): peak learning rate (after warm-up).
        adam_betas (`list[float]`): AdamW's betas.
        weight_decay (`float`): AdamW weight decay (the transformer applies it to matrices only).
        warmup_steps (`int`): linear learning-rate warm-up from 0.
        lr_schedule (`"constant"` or `"cosine"`): after warm-up (cosine decays to 10% of `lr` at `max_steps`).
        max_grad_norm (`float`, *optional*): gradient clipping; `None` disables it.
        max_nonfinite_steps (`int`): a non-finite loss or gradient norm skips the optimizer step (counted, logged);
            this many skipped steps in a row stop the run with an error naming the last good checkpoint.
        mixed_precision (`"no"`, `"fp16"` or `"bf16"`): Accelerate's autocast (the loss is computed in fp32).
        ema_decay (`float`, *optional*): keep an EMA of the weights (e.g. 0.9999); sampling and the export use it.
        seed (`int`): seeds initialization, data order, noise and sampling.
        num_workers (`int`): DataLoader worker processes.
        log_every (`int`): append the mean loss of the last `log_every` steps to `output_dir/metrics.jsonl`.
        checkpoint_every (`int`): `accelerator.save_state` checkpoint every this many steps (and at the end);
            0 disables checkpoints (the final weights are always written).
        keep_checkpoints (`int`): keep only the newest this many checkpoints.
    """

    max_steps: int = 10_000
    batch_size: int = 64
    gradient_accumulation_steps: int = 1
    lr: float = 1e-4
    adam_betas: list[float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    max_grad_norm: float | None = 1.0
    max_nonfinite_steps: int = 10
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    ema_decay: float | None = None
    seed: int = 0
    num_workers: int = 0
    log_every: int = 10
    checkpoint_every: int = 0
    keep_checkpoints: int = 2

    def __post_init__(self):
        self.adam_betas = list(self.adam_betas)
        assert len(self.adam_betas) == 2, f"train.adam_betas needs 2 values, got {self.adam_betas}"
        assert self.max_steps > 0, "train.max_steps must be positive"
        assert self.batch_size > 0, "train.batch_size must be positive"
        assert self.log_every > 0, "train.log_every must be positive"
        assert self.checkpoint_every >= 0, "train.checkpoint_every must be >= 0 (0: no checkpoints)"
        assert self.keep_checkpoints > 0, "train.keep_checkpoints must be positive"
        assert self.max_nonfinite_steps > 0, "train.max_nonfinite_steps must be positive"


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
        assert len(self.attention) == len(self.block_out_channels), (
            f"unet.attention needs one entry per level ({len(self.block_out_channels)}), got {self.attention}"
        )
        for c in self.block_out_channels:
            assert c % self.norm_num_groups == 0, f"unet.block_out_channels entry {c} not divisible by norm_num_groups"
        assert self.num_classes is None or self.num_classes > 0, "unet.num_classes must be positive or null"


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


@dataclass
class PriorDiffusionConfig:
    """`train/prior_diffusion.py`: a latent diffusion prior on KL latent shards.

    Args:
        shards (`str`): a KL latent-shard directory (with `index.json`).
        vae (`str`, *optional*): the diffusers `AutoencoderKL` directory that decodes samples; defaults to the
            manifest's `model.path` (the model the shards were encoded with).
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
        assert self.shards, "shards: the latent-shard directory is required (shards=PATH)"
        assert self.num_samples > 0 and self.num_inference_steps > 0 and self.grid_columns > 0, (
            "num_samples, num_inference_steps and grid_columns must be positive"
        )


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
        assert self.hidden_size % self.num_heads == 0, (
            f"model.hidden_size {self.hidden_size} not divisible by model.num_heads {self.num_heads}"
        )
        assert self.num_classes is None or self.num_classes > 0, "model.num_classes must be positive or null"


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

    def __post_init__(self):
        assert self.shards, "shards: the code-shard directory is required (shards=PATH)"
        if self.code_groups < 1:
            raise ConfigError(f"code_groups: must be >= 1, got {self.code_groups}")
        assert self.num_samples > 0 and self.grid_columns > 0, "num_samples and grid_columns must be positive"
        assert self.temperature > 0, f"temperature must be positive, got {self.temperature}"
        assert self.top_k is None or self.top_k > 0, f"top_k must be positive or null, got {self.top_k}"


__all__ = [
    "GPTConfig",
    "NoiseConfig",
    "PriorDiffusionConfig",
    "PriorTrainConfig",
    "PriorTransformerConfig",
    "UNetConfig",
]

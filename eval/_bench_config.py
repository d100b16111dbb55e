"""`eval/bench.py`'s configuration: what is measured (`BenchConfig`), ldtok's options under each setting, the presets'
model configs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from _bench_steps import DTYPES, EQUAL, Options

from ldtok.config import check_choice, check_range, from_dict, invalid
from ldtok.models import ModelConfig
from ldtok.performance import resolve_mixed_precision
from ldtok.training import TrainConfig

PERCEPTUAL_NOTE = "perceptual: lpips.LPIPS(net='vgg', pnet_rand=True) on both sides (random VGG backbone, same compute)"
SETTINGS = ("equal", "defaults", "custom")
TASKS = ("train", "encode")


def describe_options(options: Options) -> str:
    """`"bf16, channels-last, fused AdamW"` and the like."""
    flags = {"channels-last": options.channels_last, "compile": options.compile, "fused AdamW": options.fused_adamw,
             "bf16 perceptual backbone": options.precision == "bf16"}  # loss.perceptual_precision=auto
    return ", ".join([options.precision, *(name for name, on in flags.items() if on)])


def ldtok_options(config: BenchConfig, setting: str) -> Options:
    """ldtok's options under `setting` (see `BenchConfig.settings`)."""
    if setting == "equal":
        return EQUAL
    if setting == "custom":
        return Options(precision=config.precision, channels_last=config.channels_last, compile=config.compile)
    defaults = TrainConfig()
    precision = resolve_mixed_precision(defaults.mixed_precision, torch.device(config.device))
    return Options(precision={"no": "fp32"}.get(precision, precision), channels_last=defaults.channels_last,
                   compile=defaults.compile, fused_adamw=True)


@dataclass
class BenchConfig:
    """What `run_benchmark` measures.

    Args:
        presets (`list[str]`): model presets of `ldtok.models.MODEL_PRESETS` (KL and VQGAN families).
        tasks (`list[str]`): `"train"` (a generator + discriminator step) and/or `"encode"` (images to latents /
            indices, no gradients).
        device (`"cpu"` or `"cuda"`): where both sides run.
        settings (`list[str]`): ldtok's side in each comparison: `"equal"` (fp32, eager, NCHW, plain AdamW: the
            baseline's settings, so the ratio is the algorithmic gain alone), `"defaults"` (the trainer's defaults,
            `ldtok.training.TrainConfig`: mixed precision `auto`, channels-last, fused AdamW, compile as configured),
            `"custom"` (`precision`, `channels_last`, `compile` below). The baseline is always fp32 eager.
        precision (`"fp32"`, `"bf16"` or `"fp16"`): the `custom` setting's autocast dtype (fp16 with a `GradScaler`).
        channels_last (`bool`): the `custom` setting's memory format for models and inputs.
        compile (`bool`): the `custom` setting: `torch.compile` the autoencoder and discriminator (train) or the
            encode function.
        batch_size (`int`): images per step.
        resolution (`int`): image height and width.
        steps (`int`): timed steps per case.
        warmup (`int`): untimed steps before them (one-time costs: allocator, compilation, k-means init).
        repeats (`int`): measure each side this many times, alternating baseline and ldtok, and keep each side's
            fastest run: robust to other processes sharing the machine.
        seed (`int`): weights and inputs.
        lr, adam_betas, max_grad_norm: the optimizers (AdamW) and gradient clipping; the trainer's defaults.
        disc_channels, disc_layers: the PatchGAN discriminator (LDM's 64 and 3 by default).
        baseline (`"single-forward"` or `"lightning"`): how the baseline's training step runs the autoencoder.
            `single-forward`: once per step, its reconstruction shared by both optimizers' losses (the leanest way to
            write it). `lightning`: once per optimizer, as taming's `VQModel` and LDM's `AutoencoderKL` do (Lightning
            calls `training_step(batch, batch_idx, optimizer_idx)` once per optimizer and each call starts with
            `self(x)`); the discriminator's call builds a graph only its detached reconstruction is read from.
    """

    presets: list[str] = field(default_factory=lambda: ["demo-kl"])
    tasks: list[str] = field(default_factory=lambda: ["train", "encode"])
    device: Literal["cpu", "cuda"] = "cpu"
    settings: list[str] = field(default_factory=lambda: ["equal", "defaults"])
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False
    compile: bool = False
    batch_size: int = 8
    resolution: int = 64
    steps: int = 10
    warmup: int = 2
    repeats: int = 1
    seed: int = 0
    lr: float = 1e-4
    adam_betas: tuple[float, float] = (0.5, 0.9)
    max_grad_norm: float = 1.0
    disc_channels: int = 64
    disc_layers: int = 3
    baseline: Literal["single-forward", "lightning"] = "single-forward"

    def __post_init__(self):
        each_choice(self, "tasks", TASKS)
        check_choice(self, "baseline", ("single-forward", "lightning"))
        each_choice(self, "settings", SETTINGS)
        check_choice(self, "precision", tuple(DTYPES))
        for name in ("batch_size", "resolution", "steps", "repeats", "disc_channels", "disc_layers"):
            check_range(self, name, gt=0)
        check_range(self, "warmup", ge=0)
        if not self.presets:
            raise invalid("presets", "give at least one preset")
        for preset in self.presets:
            try:
                model_config(preset, self.resolution)  # unknown presets, families without a baseline
            except ValueError as e:
                raise invalid("presets", str(e).removeprefix("preset: ")) from None


def each_choice(section, field: str, allowed) -> None:
    """Every value of the list `section.field` is one of `allowed` (a `ConfigError` naming the first that is not)."""
    for value in getattr(section, field):
        if value not in allowed:
            raise invalid(field, f"unknown choice {value!r} (allowed: {', '.join(allowed)})")


def model_config(preset: str, resolution: int, overrides: dict | None = None) -> ModelConfig:
    """The preset's `ModelConfig` at `resolution`; `overrides` (`model.*` keys, validated) replace the preset's."""
    config = from_dict(ModelConfig, {"preset": preset, "sample_size": resolution, **(overrides or {})})
    if config.type not in ("kl", "vqgan"):
        raise ValueError(f"preset {preset!r} is a {config.type} model: no diffusers baseline exists for it")
    f = config.downsample_factor
    if resolution % f:
        raise ValueError(f"resolution {resolution} not divisible by preset {preset!r}'s downsampling factor {f}")
    return config

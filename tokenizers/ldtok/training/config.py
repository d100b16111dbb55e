"""The `train` sections of every trainer (one base, `TrainLoopConfig`, that the shared loop reads) and the autoencoder
trainer's `RunConfig`.

`TrainConfig` (autoencoders, `train/vae.py` and `train/vq.py`) and `ldtok.priors.PriorTrainConfig` (both prior
scripts) add their own keys to `TrainLoopConfig` and restate only the defaults that differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from ..config import ConfigError, check_choice, check_range, invalid
from ..data import DataConfig
from ..losses import LossConfig
from ..models import ModelConfig
from ..shaping.corruption import SCHEDULES
from ..shaping.trainable import TRAINABLE
from ..trackers import resolve_report_to

MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
LR_SCHEDULES = ("constant", "cosine")


def inherit_args(base: type):
    """Class decorator: append `base`'s docstring `Args:` entries to the class's own, so that `--help` (which reads a
    class's own docstring, `ldtok.config.arg_descriptions`) describes the inherited keys too."""

    def decorate(cls: type) -> type:
        base_doc = base.__doc__ or ""
        entries = base_doc[base_doc.index("Args:") + len("Args:"):].rstrip()
        cls.__doc__ = (cls.__doc__ or "").rstrip() + entries + "\n"
        return cls

    return decorate


@dataclass
class TrainLoopConfig:
    """What the shared training loop (`ldtok.training.loop`) reads: optimization and infrastructure of every trainer.

    Args:
        max_steps (`int`): optimizer steps to train for (a step may accumulate several batches).
        batch_size (`int`): samples per process per forward.
        gradient_accumulation_steps (`int`): batches accumulated into one optimizer step.
        lr (`float`): peak learning rate (after warm-up).
        adam_betas (`list[float]`): AdamW's betas.
        weight_decay (`float`): AdamW weight decay.
        warmup_steps (`int`): linear learning-rate warm-up from 0.
        lr_schedule (`"constant"` or `"cosine"`): after warm-up (cosine decays to 10% of `lr` at `max_steps`).
        max_grad_norm (`float`, *optional*): gradient clipping of each model; `None` disables it.
        max_nonfinite_steps (`int`): a non-finite loss or gradient norm skips the optimizer step (counted, logged);
            this many skipped steps in a row stop the run with an error naming the last good checkpoint.
        mixed_precision (`"auto"`, `"no"`, `"fp16"` or `"bf16"`): Accelerate's autocast (the losses stay fp32).
            `auto`: what `accelerate launch --mixed_precision` / `accelerate config` say, and without either bf16
            where the device runs it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX), else fp32
            (`ldtok.performance.resolve_mixed_precision`). An explicit value overrides Accelerate's.
        ema_decay (`float`, *optional*): keep an EMA of the model weights (e.g. 0.999); the final export uses it.
        seed (`int`): seeds model init, data order, augmentation and noise.
        checkpoint_every (`int`): save a resumable checkpoint every this many steps (and at the end).
        keep_checkpoints (`int`): keep only the newest this many checkpoints.
        log_every (`int`): log the loss terms every this many steps.
        report_to (`str`): Accelerate trackers, comma-separated (`tensorboard`, `wandb`, `mlflow`, ...), `all`,
            `none`, or `auto` (TensorBoard when installed); each gets the scalars, the resolved config as
            hyperparameters (and an autoencoder's reconstruction grids; `ldtok.trackers`). Metrics are always also
            appended to `output_dir/metrics.jsonl`.
    """

    max_steps: int = 1000
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    lr: float = 1e-4
    adam_betas: list[float] = (0.5, 0.9)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    max_grad_norm: float | None = 1.0
    max_nonfinite_steps: int = 10
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    ema_decay: float | None = None
    seed: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 10
    report_to: str = "auto"

    def __post_init__(self):
        self.adam_betas = list(self.adam_betas)
        if len(self.adam_betas) != 2:
            raise invalid("adam_betas", f"needs 2 values, got {self.adam_betas}")
        for key in ("max_steps", "batch_size", "gradient_accumulation_steps", "keep_checkpoints",
                    "max_nonfinite_steps", "log_every"):
            check_range(self, key, gt=0)
        for key in ("lr", "weight_decay", "warmup_steps", "checkpoint_every"):
            check_range(self, key, ge=0)
        check_range(self, "max_grad_norm", gt=0)
        check_range(self, "ema_decay", ge=0, lt=1)
        check_choice(self, "lr_schedule", LR_SCHEDULES)
        check_choice(self, "mixed_precision", MIXED_PRECISION)
        resolve_report_to(self.report_to)  # an unknown or uninstalled tracker is a ConfigError at load time


@inherit_args(TrainLoopConfig)
@dataclass
class TrainConfig(TrainLoopConfig):
    """The `train` section of an autoencoder run (`train/vae.py`, `train/vq.py`): the loop's keys and these.

    Args:
        disc_lr (`float`, *optional*): discriminator learning rate; defaults to `lr`.
        channels_last (`bool`): models and inputs in channels-last memory format (faster convolutions with cuDNN and
            oneDNN; the same results up to float rounding).
        compile (`bool`): `torch.compile` the autoencoder, the discriminator and the perceptual network (one-time
            compilation cost; pays off on long GPU runs).
        input_noise_std (`float`): denoising mode: add Gaussian noise of this std (in [-1, 1] units) to the input and
            reconstruct the clean image. 0 disables it.
        image_every (`int`): write a reconstruction grid PNG every this many steps (and at the end).
        val_every (`int`): compute validation metrics every this many steps (and at the end); 0: only at the end.
        val_images (`int`): validation images used for metrics.
        grid_images (`int`): images in the reconstruction grid.
        push_to_hub (`bool`): upload `final/` (with its model card) to the Hub at the end of training.
        hub_repo_id (`str`, *optional*): the Hub repository (`user/name`) for `push_to_hub`.
        latent_noise (`float`): l-DeTok: the decoder sees `z + σ·ε`, `σ ~ U[0, γ]` per sample, with this `γ`
            (`ldtok.shaping.corruption`); 0 is off. KL, VQGAN and VQ-VAE-2 models.
        latent_noise_schedule (`"constant"`, `"linear_decay"`, `"cosine_decay"` or `"linear_warmup"`): how `γ` goes
            over `max_steps` (`ldtok.shaping.corruption.scheduled`).
        mask_ratio (`float`): MAE/MAETok: this fraction of the input's patches is set to mid-grey before the encoder;
            the loss is on the whole clean image. 0 is off, < 1.
        mask_ratio_schedule (`str`): as `latent_noise_schedule`, for `mask_ratio`.
        mask_patch_size (`int`): side of a masked patch in pixels; 0: the model's downsampling factor.
        trainable (`"all"`, `"decoder"` or `"encoder"`): which half trains; `decoder` keeps the latent space
            bit-identical (e.g. with `model.init_from` an existing `AutoencoderKL`). The frozen half (VQ: the codebook
            with the encoder) is left out of the optimizer and stays in eval mode.
    """

    disc_lr: float | None = None
    channels_last: bool = True
    compile: bool = False
    input_noise_std: float = 0.0
    image_every: int = 500
    val_every: int = 0
    val_images: int = 64
    grid_images: int = 8
    push_to_hub: bool = False
    hub_repo_id: str | None = None
    latent_noise: float = 0.0
    latent_noise_schedule: Literal["constant", "linear_decay", "cosine_decay", "linear_warmup"] = "constant"
    mask_ratio: float = 0.0
    mask_ratio_schedule: Literal["constant", "linear_decay", "cosine_decay", "linear_warmup"] = "constant"
    mask_patch_size: int = 0
    trainable: Literal["all", "decoder", "encoder"] = "all"

    def __post_init__(self):
        super().__post_init__()
        check_range(self, "latent_noise", ge=0)
        check_range(self, "mask_ratio", ge=0, lt=1)
        check_range(self, "mask_patch_size", ge=0)
        check_choice(self, "latent_noise_schedule", SCHEDULES)
        check_choice(self, "mask_ratio_schedule", SCHEDULES)
        check_choice(self, "trainable", TRAINABLE)
        check_range(self, "checkpoint_every", gt=0)
        check_range(self, "disc_lr", ge=0)
        check_range(self, "input_noise_std", ge=0)
        check_range(self, "val_every", ge=0)
        for key in ("image_every", "val_images", "grid_images"):
            check_range(self, key, gt=0)
        if self.push_to_hub and not self.hub_repo_id:
            raise invalid("push_to_hub", "needs train.hub_repo_id (user/name)")


@dataclass
class RunConfig:
    """A training run: `output_dir`, `resume`, and the `data`, `val_data`, `model`, `loss` and `train` sections.

    Args:
        output_dir (`str`): where checkpoints, grids, logs and `final/` go.
        resume (`str`, *optional*): `latest` (the newest checkpoint in `output_dir`, if any) or a checkpoint path.
        val_data (`DataConfig`, *optional*): validation images; it inherits every key of `data` and overrides only the
            keys it gives (`val_data.split=test`). By default the dataset's validation split when it has one, else a
            deterministic `data.val_fraction` holdout, excluded from training (`ldtok.data.splits`).
    """

    inherit: ClassVar[dict[str, str]] = {"val_data": "data"}

    output_dir: str = "runs/default"
    resume: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    val_data: DataConfig | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.model.init_from is None and self.data.channels != self.model.in_channels:
            raise ConfigError(f"data.channels={self.data.channels} but model.in_channels={self.model.in_channels}: "
                              "set both to 1 (greyscale) or 3 (RGB)")


__all__ = ["RunConfig", "TrainConfig", "TrainLoopConfig", "inherit_args"]

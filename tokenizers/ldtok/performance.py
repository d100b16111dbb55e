"""Fast defaults for the hardware at hand: mixed precision, memory format, the optimizer's implementation, TF32.

Each is a training config key (`train.mixed_precision`, `train.channels_last`, `train.compile`, ...); this module
turns a key's value into what torch and Accelerate are given, so the trainer and the benchmark agree on what
"ldtok's defaults" are.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import nn

MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
# `accelerate launch` (its --mixed_precision flag, else the `accelerate config` file) passes its choice this way.
ACCELERATE_ENV = "ACCELERATE_MIXED_PRECISION"


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast runs natively (fast) on `device`: CUDA with bf16 units, or a CPU with AVX512-BF16/AMX."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def expected_device() -> torch.device:
    """The device type an `Accelerator` built now will use: CUDA when there is one, unless `ACCELERATE_USE_CPU`
    (what `accelerate launch --cpu` and CPU multi-process launches set) asks for the CPU."""
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return torch.device("cuda" if torch.cuda.is_available() and not use_cpu else "cpu")


def resolve_mixed_precision(setting: str, device: torch.device) -> str:
    """`"no"`, `"fp16"` or `"bf16"` for `train.mixed_precision=setting`.

    `"auto"`: what Accelerate was told (`accelerate launch --mixed_precision ...` or the `accelerate config` file,
    passed in `$ACCELERATE_MIXED_PRECISION`); without either, bf16 where `device` runs it natively, else fp32. An
    explicit `"no"`, `"fp16"` or `"bf16"` overrides Accelerate's setting.
    """
    if setting not in MIXED_PRECISION:
        raise ValueError(f"mixed precision must be one of {MIXED_PRECISION}, got {setting!r}")
    if setting != "auto":
        return setting
    launched = os.environ.get(ACCELERATE_ENV, "").lower()
    if launched in ("no", "fp16", "bf16"):
        return launched
    return "bf16" if bf16_supported(device) else "no"


def perceptual_dtype(setting: str, mixed_precision: str) -> torch.dtype | None:
    """The frozen perceptual backbone's autocast dtype for `loss.perceptual_precision=setting` in a run whose resolved
    mixed precision is `mixed_precision` (`"no"`, `"fp16"`, `"bf16"`); `None` is fp32. `auto` follows bf16 runs
    only: fp16 runs keep the perceptual net in fp32 (no fp16 backbone is offered: its narrow range is untested here)."""
    if setting == "auto":
        return torch.bfloat16 if mixed_precision == "bf16" else None
    return {"fp32": None, "bf16": torch.bfloat16}[setting]


def adamw(params: Iterable[nn.Parameter], *, lr: float, betas: tuple[float, float], weight_decay: float,
          device: torch.device) -> torch.optim.AdamW:
    """AdamW with the fused kernel where torch has one for `device` (CUDA; CPU since torch 2.4), else `foreach`."""
    fused = device.type == "cuda" or (device.type == "cpu" and _torch_version() >= (2, 4))
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused or None,
                             foreach=None if fused else True)


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def enable_tf32(device: torch.device) -> None:
    """TF32 matmuls and convolutions on CUDA (Ampere and later): fp32 models run on tensor cores."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format

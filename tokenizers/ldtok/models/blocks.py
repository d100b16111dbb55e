"""Helpers on diffusers' building blocks shared by the model families (gradient checkpointing of `Encoder` /
`Decoder` blocks inside models that do not declare support for it themselves)."""

from __future__ import annotations

import torch
from torch import nn


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute the activations of every diffusers block that supports it (`Encoder` / `Decoder` down, mid and up
    blocks) in the backward pass. `VQModel` does not declare `_supports_gradient_checkpointing`, so its
    `enable_gradient_checkpointing()` refuses; its `Encoder` and `Decoder` do support it."""

    def checkpoint(module: nn.Module, *args):
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    found = False
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = True
            module._gradient_checkpointing_func = checkpoint
            found = True
    if not found:
        raise ValueError(f"{type(model).__name__} has no block that supports gradient checkpointing")

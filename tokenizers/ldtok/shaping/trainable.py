"""Which half of an autoencoder trains: `all`, `decoder` (the latent space stays bit-identical) or `encoder`.

Parameters are split by name: the decoder side is every parameter under a `decoder` or `post_quant_conv` module
(diffusers' naming, which every ldtok family follows); the encoder side is everything else (encoder, `quant_conv`,
the quantizer's codebook). Frozen modules are also kept in eval mode, so a quantizer's EMA codebook and any dropout or
running statistics do not move either.
"""

from __future__ import annotations

import types

from torch import nn

TRAINABLE = ("all", "decoder", "encoder")
_DECODER_PARTS = ("decoder", "post_quant_conv")


def is_decoder_parameter(name: str) -> bool:
    """Whether parameter or module `name` (dotted) belongs to the decoder side."""
    return any(part in _DECODER_PARTS for part in name.split("."))


def frozen_modules(model: nn.Module, trainable: str) -> list[nn.Module]:
    """The largest submodules wholly on the frozen side (none for `all`)."""
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}, got {trainable!r}")
    if trainable == "all":
        return []
    keep_decoder = trainable == "decoder"
    out: list[nn.Module] = []

    def visit(module: nn.Module, prefix: str) -> None:
        params = [n for n, _ in module.named_parameters(prefix=prefix)]
        buffers = [n for n, _ in module.named_buffers(prefix=prefix)]
        names = params + buffers
        if names and all(is_decoder_parameter(n) != keep_decoder for n in names):
            out.append(module)
            return
        for child_name, child in module.named_children():
            visit(child, f"{prefix}.{child_name}" if prefix else child_name)

    visit(model, "")
    return out


def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def apply_trainable(model: nn.Module, trainable: str) -> list[nn.Module]:
    """Freeze the side `trainable` leaves out (`requires_grad_(False)`, eval mode); return the frozen modules.

    Each frozen module's `train` is replaced by one that keeps it (and its children) in eval mode, so every later
    `model.train()` (the loop's, after a validation's `eval()`, a deep copy's such as the weight EMA) leaves it in
    eval: a frozen quantizer's EMA codebook, dropout and running statistics never move.
    """
    frozen = frozen_modules(model, trainable)
    for module in frozen:
        module.requires_grad_(False)
        module.train = types.MethodType(_stay_in_eval, module)
        module.eval()
    return frozen


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that still require gradients (what the optimizer gets)."""
    return [p for p in model.parameters() if p.requires_grad]

"""PatchGAN discriminator (pix2pix's `NLayerDiscriminator`, as used by taming's VQGAN and LDM), without BatchNorm.

Layout for `num_layers=3`, `channels=64` (a 70x70 receptive field; a 256x256 image gives 30x30 logits):

    conv4x4(3 -> 64, stride 2)                       LeakyReLU(0.2)
    conv4x4(64 -> 128, stride 2)    GroupNorm        LeakyReLU(0.2)
    conv4x4(128 -> 256, stride 2)   GroupNorm        LeakyReLU(0.2)
    conv4x4(256 -> 512, stride 1)   GroupNorm        LeakyReLU(0.2)
    conv4x4(512 -> 1, stride 1)                      -> logits (B, 1, h, w)

Differences from taming/pix2pix, on purpose:
- GroupNorm instead of BatchNorm: BatchNorm's batch statistics differ per DDP rank and per micro-batch, are noisy at
  the small per-GPU batches autoencoders train with, and would mix real and fake samples when both are scored in one
  forward (the discriminator loss concatenates them). GroupNorm normalises each sample on its own.
- No sigmoid: the output is logits, as both the hinge and the non-saturating (softplus) losses expect.
- Conv biases start at zero (taming leaves PyTorch's default); weights are N(0, 0.02) and norm scales N(1, 0.02) as in
  taming's `weights_init`.
"""

from __future__ import annotations

import math
from typing import Literal

from torch import Tensor, nn

_MAX_GROUPS = 32


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator returning per-patch real/fake logits.

    Args:
        in_channels (`int`, defaults to 3): image channels.
        channels (`int`, defaults to 64): width of the first conv; layer `n` has `channels * min(2**n, 8)`.
        num_layers (`int`, defaults to 3): number of stride-2 convs; each adds a factor 2 of downsampling.
        norm (`"group"` or `"none"`, defaults to `"group"`): GroupNorm (32 groups, or the largest power of two that
            divides the width) after every conv but the first and the last, or no normalisation (convs then have
            biases).

    Shapes: `forward(x)` takes `(B, in_channels, H, W)` and returns logits `(B, 1, H / 2**num_layers - 2, ...)`.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        channels: int = 64,
        num_layers: int = 3,
        norm: Literal["group", "none"] = "group",
    ):
        super().__init__()
        if norm not in ("group", "none"):
            raise ValueError(f"norm must be 'group' or 'none', got {norm!r}")
        assert num_layers >= 1, f"num_layers must be >= 1, got {num_layers}"
        use_bias = norm == "none"  # a conv followed by an affine norm does not need a bias

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel_size=4, stride=stride, padding=1, bias=use_bias)]
            if norm == "group":
                layers.append(nn.GroupNorm(math.gcd(_MAX_GROUPS, c_out), c_out))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            return layers

        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        width = channels
        for n in range(1, num_layers + 1):
            stride = 2 if n < num_layers else 1  # the last widening conv keeps the resolution (pix2pix)
            next_width = channels * min(2**n, 8)
            layers += block(width, next_width, stride)
            width = next_width
        layers.append(nn.Conv2d(width, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> Tensor:
        """`x`: `(B, C, H, W)` images in `[-1, 1]`; returns logits `(B, 1, h, w)`."""
        return self.main(x)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.GroupNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)

"""EQ-VAE's equivariance regularization: one random spatial transform applied to the latent and to the image.

The decoder is asked to map `T(z)` to `T(x)` (Kouzelis et al., "EQ-VAE", 2025): the latent space then follows the
image's geometry, which a diffusion prior finds easier. `T` is a scale (the latent is resized by `s`, the image to the
decoded size of that latent), a rotation by 90°·k, a horizontal flip, or a composition drawn from the allowed set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

TRANSFORM_KINDS = ("scale", "rotate", "flip")


@dataclass(frozen=True)
class SpatialTransform:
    """A transform of `(B, C, H, W)` tensors: `scale` (1.0 = none), then `rotate` quarter turns, then `flip`.

    Args:
        scale (`float`): resize factor of the latent grid; the image is resized to `factor *` the new latent size, so
            the decoder's output and the target have the same shape.
        rotate (`int`): quarter turns counter-clockwise (0-3), `torch.rot90` over the last two axes.
        flip (`bool`): mirror left-right.
    """

    scale: float = 1.0
    rotate: int = 0
    flip: bool = False

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.rotate % 4 == 0 and not self.flip

    def latent_size(self, h: int, w: int) -> tuple[int, int]:
        """The latent grid after scaling (at least 1×1)."""
        return max(1, round(h * self.scale)), max(1, round(w * self.scale))

    def apply(self, t: Tensor, *, size: tuple[int, int] | None = None) -> Tensor:
        """Transform `t` (`(B, C, H, W)`); `size` is the target `(H', W')` of the scale step (default: `scale *`)."""
        if self.scale != 1.0:
            H, W = t.shape[-2:]
            size = size or (max(1, round(H * self.scale)), max(1, round(W * self.scale)))
            # bilinear with antialias: a downscaled image is what a camera at that distance would see. In fp32: the
            # antialiased kernel has no bf16 version on CPU, and the latent is rescaled at full precision either way.
            dtype = t.dtype
            with torch.autocast(t.device.type, enabled=False):
                t = F.interpolate(t.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
            t = t.to(dtype)
        if self.rotate % 4:
            t = torch.rot90(t, k=self.rotate % 4, dims=(-2, -1))
        if self.flip:
            t = torch.flip(t, dims=(-1,))
        return t

    def apply_pair(self, z: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """`(T(z), T(x))` for a latent `z` `(B, C, h, w)` and its image `x` `(B, 3, f·h, f·w)`."""
        h, w = z.shape[-2:]
        f = x.shape[-1] // w
        h2, w2 = self.latent_size(h, w)
        return self.apply(z, size=(h2, w2)), self.apply(x, size=(h2 * f, w2 * f))


def sample_transform(generator: torch.Generator, *, kinds: list[str] | tuple[str, ...],
                     scales: list[float] | tuple[float, ...] = (0.5, 0.75)) -> SpatialTransform:
    """Draw one non-identity transform of one allowed kind (uniformly), with `generator` (CPU) for reproducibility.

    Args:
        kinds (`list[str]`): a non-empty subset of `("scale", "rotate", "flip")`.
        scales (`list[float]`): the scale factors `scale` draws from (each in (0, 1)).
    """
    unknown = [k for k in kinds if k not in TRANSFORM_KINDS]
    if not kinds or unknown:
        raise ValueError(f"equivariance transforms must be a non-empty subset of {TRANSFORM_KINDS}, got {list(kinds)}")
    kind = kinds[int(torch.randint(len(kinds), (), generator=generator))]
    if kind == "scale":
        return SpatialTransform(scale=float(scales[int(torch.randint(len(scales), (), generator=generator))]))
    if kind == "rotate":
        return SpatialTransform(rotate=1 + int(torch.randint(3, (), generator=generator)))
    return SpatialTransform(flip=True)

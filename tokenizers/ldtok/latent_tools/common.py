"""What the latent tools share: their typed result, and how they ask a tokenizer for latents and images."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor


@dataclass
class LatentPicture:
    """A latent-space picture and the latents it decodes.

    Args:
        image (`PIL.Image.Image`): the picture.
        caption (`str`): what it shows (goes under it in report.html).
        latents (`Tensor` of shape `(N, C, h, w)`): the decoded latents, in picture order (row by row).
    """

    image: Image.Image
    caption: str
    latents: Tensor


def has_posterior(model) -> bool:
    """Whether `model` exposes a Gaussian latent the tools can move through (KL models, the MLP VAE / AE): the
    tokenizer says so (`Tokenizer.has_gaussian_latent`); a module outside the interface, by having
    `encode_posterior` and `decode_latents`."""
    says = getattr(model, "has_gaussian_latent", None)
    if says is not None:
        return bool(says)
    return hasattr(model, "encode_posterior") and hasattr(model, "decode_latents")


@torch.no_grad()
def posterior_means(model, x: Tensor) -> Tensor:
    """The posterior means `(B, C, h, w)` (fp32) of images `x`."""
    return model.encode_posterior(x).mean.float()


def latent_shape(model, x: Tensor) -> torch.Size:
    """`(C, h, w)` of the latent of images shaped like `x`."""
    return posterior_means(model, x[:1]).shape[1:]


@torch.no_grad()
def decode_images(model, z: Tensor) -> Tensor:
    """Decoded images `(N, C_img, H, W)` in `[-1, 1]`, fp32, on the CPU."""
    device = next(model.parameters()).device
    out = model.decode_latents(z.to(device))
    return (out.sample if hasattr(out, "sample") else out).float().clamp(-1, 1).cpu()

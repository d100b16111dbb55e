"""The latent atlas: for a 2-D latent space, decode a grid over the prior's quantiles (Kingma & Welling 2014, fig. 4:
the "MNIST manifold")."""

from __future__ import annotations

import torch
from scipy.stats import norm
from torch import Tensor

from ..images import make_grid
from .common import LatentPicture, decode_images, latent_shape


@torch.no_grad()
def latent_atlas(model, x: Tensor, *, size: int = 15, lo: float = 0.05, hi: float = 0.95) -> LatentPicture:
    """Decode `z = (Phi^-1(u), Phi^-1(v))` for `u, v` on a `size x size` grid of quantiles in `[lo, hi]`.

    The prior is the KL term's `N(0, I)` over the unscaled latent, so equal steps of quantile cover equal prior
    mass: the picture shows every region of the latent space in proportion to how often the prior visits it.

    Args:
        model: a KL-type tokenizer (`encode_posterior`, `decode_latents`) whose latent has exactly 2 values
            (`C * h * w == 2`, e.g. `model.type: mlp` with `latent_channels: 2`).
        x (`Tensor` of shape `(B, C_img, H, W)`): any image (one is enough): its encoding gives the latent shape.
        size (`int`, defaults to 15): grid side.
        lo, hi (`float`): the quantile range (the tails beyond are the prior's rarely visited edges).

    Returns:
        `LatentPicture`: row `i` (top to bottom) has the second coordinate at quantile `hi -> lo`, column `j` the
        first coordinate at quantile `lo -> hi`; `latents` `(size * size, C, h, w)`.
    """
    shape = latent_shape(model, x)
    if shape.numel() != 2:
        raise ValueError(f"the latent atlas needs a 2-D latent space; this model's latent has shape {tuple(shape)}")
    q = torch.from_numpy(norm.ppf(torch.linspace(lo, hi, size).double().numpy())).float()  # (size,)
    rows = []
    latents = []
    for i in range(size):
        z2 = torch.stack([q, q.flip(0)[i].expand(size)], dim=1)  # (size, 2): first coordinate varies along the row
        z = z2.view(size, *shape)
        latents.append(z)
        rows.append(decode_images(model, z))
    caption = (f"{size}x{size} decodings of z = (Phi^-1(u), Phi^-1(v)), u (left to right) and v (bottom to top) "
               f"quantiles of N(0, 1) from {lo:g} to {hi:g}")
    return LatentPicture(image=make_grid(rows), caption=caption, latents=torch.cat(latents))

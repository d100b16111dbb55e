"""Latent arithmetic: decode `z_a - z_b + z_c` (Mikolov-style analogies in latent space; with labels, the mean
latents of labelled groups, as in Radford et al. 2016's "smiling woman - neutral woman + neutral man")."""

from __future__ import annotations

import torch
from torch import Tensor

from ..images import make_grid
from .common import LatentPicture, decode_images, posterior_means

MAX_ROWS = 4


@torch.no_grad()
def latent_arithmetic(model, x: Tensor, *, labels: Tensor | None = None, rows: int = MAX_ROWS) -> LatentPicture:
    """Each row decodes `z_a`, `z_b`, `z_c` and `z_a - z_b + z_c`.

    Args:
        model: a KL-type tokenizer (`encode_posterior`, `decode_latents`).
        x (`Tensor` of shape `(B, C_img, H, W)`): images.
        labels (`Tensor` of shape `(B,)`, *optional*): integer labels. With them, `z_a`, `z_b`, `z_c` are the mean
            posterior means of three labelled groups (the sorted distinct labels taken three by three: (l0, l1, l2),
            (l3, l4, l5), ...); without, the posterior means of images (0, 1, 2), (3, 4, 5), ...
        rows (`int`, defaults to 4): at most this many triples.

    Returns:
        `LatentPicture`; `latents` `(4 * rows, C, h, w)`, row by row `[z_a, z_b, z_c, z_a - z_b + z_c]`.
    """
    means = posterior_means(model, x).cpu()  # (B, C, h, w)
    if labels is not None:
        labels = labels.cpu()
        distinct = sorted({int(v) for v in labels})
        triples = [distinct[i : i + 3] for i in range(0, len(distinct) - 2, 3)][:rows]
        groups = [[means[labels == v].mean(dim=0) for v in t] for t in triples]
        names = [f"mean(label {a}) - mean(label {b}) + mean(label {c})" for a, b, c in triples]
    else:
        triples = [list(range(i, i + 3)) for i in range(0, means.shape[0] - 2, 3)][:rows]
        groups = [[means[i] for i in t] for t in triples]
        names = [f"z(image {a}) - z(image {b}) + z(image {c})" for a, b, c in triples]
    if not groups:
        raise ValueError("latent arithmetic needs 3 images (or 3 distinct labels)")
    latents = torch.stack([z for a, b, c in groups for z in (a, b, c, a - b + c)])  # (4R, C, h, w)
    images = decode_images(model, latents)
    grid = make_grid([images[4 * r : 4 * r + 4] for r in range(len(groups))])
    caption = ("each row: decoded z_a, z_b, z_c, then z_a - z_b + z_c (posterior means); rows: " + "; ".join(names))
    return LatentPicture(image=grid, caption=caption, latents=latents)

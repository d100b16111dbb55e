"""Latent traversals: move one latent channel at a time around an encoded image (the beta-VAE disentanglement view,
Higgins et al. 2017), channels ranked by their KL (the informative ones first)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..images import make_grid
from .common import LatentPicture, decode_images, posterior_means


def rank_channels(kl_per_channel: list[float] | None, means: Tensor) -> list[int]:
    """Channel indices, most informative first: by KL when known, else by the variance of the posterior means over
    the given images (`means` `(B, C, h, w)`; a deterministic autoencoder has no KL)."""
    if kl_per_channel is not None:
        score = torch.tensor(kl_per_channel, dtype=torch.float64)
    else:
        score = means.double().transpose(0, 1).flatten(1).var(dim=1, unbiased=False)  # (C,)
    return [int(c) for c in torch.argsort(-score, stable=True)]


@torch.no_grad()
def latent_traversals(model, x: Tensor, *, kl_per_channel: list[float] | None = None, channels: int = 8,
                      steps: int = 7, span: float = 3.0) -> LatentPicture:
    """Decode `z` with `z_c = mu_c(x) + delta` for each of the top `channels` channels, `delta` from `-span` to `span`.

    Args:
        model: a KL-type tokenizer (`encode_posterior`, `decode_latents`).
        x (`Tensor` of shape `(B, C_img, H, W)`): images; `x[0]` is the one traversed (the others, when there are
            several, rank the channels when `kl_per_channel` is not given).
        kl_per_channel (`list[float]`, *optional*): mean KL per channel (`EvalResult.kl_per_channel`), the ranking.
        channels (`int`, defaults to 8): rows (at most the latent's channel count).
        steps (`int`, defaults to 7): columns; `delta` is spaced evenly in `[-span, span]` (prior std units, the
            offset added to every position of the channel).

    Returns:
        `LatentPicture`: one row per channel, most informative first; `latents` `(rows * steps, C, h, w)`.
    """
    means = posterior_means(model, x)  # (B, C, h, w)
    order = rank_channels(kl_per_channel, means)[:channels]
    deltas = torch.linspace(-span, span, steps)
    base = means[:1].cpu()  # (1, C, h, w)
    rows, latents = [], []
    for c in order:
        z = base.repeat(steps, 1, 1, 1)  # (steps, C, h, w)
        z[:, c] += deltas.view(steps, 1, 1).to(z)
        latents.append(z)
        rows.append(decode_images(model, z))
    names = ", ".join(f"{c} (KL {kl_per_channel[c]:.3g})" if kl_per_channel is not None else str(c) for c in order)
    ranking = "by KL per channel (nats per image)" if kl_per_channel is not None else "by variance of the means"
    caption = (f"rows: latent channels {names}, ranked {ranking}; columns: the first image's posterior mean with "
               f"that channel offset by {', '.join(f'{d:+.2g}' for d in deltas.tolist())}, decoded")
    return LatentPicture(image=make_grid(rows), caption=caption, latents=torch.cat(latents))

"""Corrupting the latent or the encoder's input during training, and the schedules of how much.

- Latent noise (l-DeTok, Yang et al. 2025): the decoder sees `z + σ·ε` with `σ ~ U[0, γ]` drawn per sample, so it
  learns to decode the slightly-off latents a prior will produce.
- Patch masking (MAE / MAETok): the encoder sees the image with a fraction of its patches replaced by zeros (mid-grey
  in [-1, 1]); the loss is still on the whole image, so the latents must carry context.

Randomness comes from an explicit `torch.Generator` (see `step_generator`), so a resumed run draws the same noise and
masks as an uninterrupted one, and ranks draw different ones.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SCHEDULES = ("constant", "linear_decay", "cosine_decay", "linear_warmup")


def scheduled(value: float, *, step: int, max_steps: int, schedule: str) -> float:
    """`value` at optimizer step `step` (0-based): constant, decayed to 0 (linearly / cosine) or warmed up from 0."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    progress = min(max(step / max(max_steps, 1), 0.0), 1.0)
    if schedule == "linear_decay":
        return value * (1.0 - progress)
    if schedule == "cosine_decay":
        return value * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear_warmup":
        return value * progress
    return value


def step_generator(seed: int, step: int, rank: int, stream: int) -> torch.Generator:
    """A CPU generator for one (step, rank, stream): reproducible across resumes, different between ranks/streams."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step * 7_919 + rank * 104_729 + stream * 15_485_863) % (2**63 - 1))
    return g


def add_latent_noise(z: Tensor, gamma: float, generator: torch.Generator) -> Tensor:
    """`z + σ·ε`, `σ ~ U[0, gamma]` per sample, `ε ~ N(0, I)`; differentiable in `z` (the noise is a constant)."""
    if gamma <= 0:
        return z
    B = z.shape[0]
    sigma = torch.rand(B, generator=generator) * gamma  # (B,)
    eps = torch.randn(z.shape, generator=generator)
    noise = sigma.view(B, *([1] * (z.dim() - 1))) * eps
    return z + noise.to(device=z.device, dtype=z.dtype)


def patch_mask(shape: tuple[int, int, int, int], *, ratio: float, patch: int,
               generator: torch.Generator) -> Tensor:
    """A keep-mask `(B, 1, H, W)` (1 = visible) hiding exactly `round(ratio · N)` of the `N` patches of each sample.

    Args:
        shape: the image batch's `(B, C, H, W)`; `H` and `W` must be multiples of `patch`.
        ratio (`float`): fraction of patches hidden, in [0, 1).
        patch (`int`): patch side in pixels (the model's downsampling factor makes one patch one latent cell).
    """
    B, _, H, W = shape
    if H % patch or W % patch:
        raise ValueError(f"image size {H}x{W} is not a multiple of the mask patch size {patch}")
    gh, gw = H // patch, W // patch
    n_hidden = round(ratio * gh * gw)
    order = torch.rand(B, gh * gw, generator=generator).argsort(dim=1)
    keep = torch.ones(B, gh * gw)
    keep.scatter_(1, order[:, :n_hidden], 0.0)
    keep = keep.view(B, 1, gh, 1, gw, 1).expand(B, 1, gh, patch, gw, patch)
    return keep.reshape(B, 1, H, W)


def mask_patches(x: Tensor, *, ratio: float, patch: int, generator: torch.Generator) -> Tensor:
    """`x` with `round(ratio · N)` random patches per sample set to 0 (mid-grey); `x` itself is not modified."""
    if ratio <= 0:
        return x
    keep = patch_mask(tuple(x.shape), ratio=ratio, patch=patch, generator=generator)
    return x * keep.to(device=x.device, dtype=x.dtype)

"""The latent-shaping terms of the generator loss: EQ-VAE's equivariance term and VA-VAE's alignment term.

Both are added to `AutoencoderLoss.generator_loss` beside the KL / quantizer terms (so the adaptive GAN weight still
compares the reconstruction NLL with the GAN term alone):

- equivariance: `equivariance_weight * (rec_weight * rec + perceptual_weight * perceptual)(D(T(z)), T(x))`, with the
  model's decoding of `T(z)` (`AutoencoderOutput.equivariant_sample`) and the same `T` applied to the clean image
  (a scaled pair is resized back to the input's size for the perceptual term only: perceptual networks have a
  minimum input size);
- alignment: `align_weight * (cosine term + distance-matrix term)` of the projected latent against the frozen vision
  model's features (`ldtok.shaping.alignment.alignment_terms`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldtok import regularizers as reg
from ldtok.outputs import AutoencoderOutput

if TYPE_CHECKING:
    from ldtok.shaping.equivariance import SpatialTransform


def _rgb(x: Tensor) -> Tensor:
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def equivariance_term(cfg, perceptual: nn.Module | None, x: Tensor, output: AutoencoderOutput | None,
                      transform: SpatialTransform | None, terms: dict[str, Tensor]) -> Tensor | None:
    """The weighted EQ-VAE term (`None` when off for this batch); adds `equivariance` (unweighted) to `terms`."""
    if cfg.equivariance_weight <= 0 or transform is None or output is None or output.equivariant_sample is None:
        return None
    sample = output.equivariant_sample  # (B, C, H', W'): D(T(z))
    target = transform.apply(x, size=tuple(sample.shape[-2:]))  # T(x) at the decoded size
    term = cfg.rec_weight * reg.reconstruction_term(cfg, target, sample, None)
    if perceptual is not None and cfg.perceptual_weight > 0:
        a, b = _rgb(target), _rgb(sample)
        if a.shape[-2:] != x.shape[-2:]:  # a scaled pair: back to the input's size (perceptual nets need a minimum)
            a, b = (F.interpolate(t, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False) for t in (a, b))
        term = term + cfg.perceptual_weight * perceptual(a, b).float().mean()
    terms["equivariance"] = term
    return cfg.equivariance_weight * term


def alignment_term(cfg, alignment: tuple[Tensor, Tensor] | None, terms: dict[str, Tensor]) -> Tensor | None:
    """The weighted VF term of `alignment = (projected latent, frozen features)` (`None` when off); adds
    `align_cos` and `align_dist` (unweighted) to `terms`."""
    if cfg.align_weight <= 0 or alignment is None:
        return None
    from ldtok.shaping.alignment import alignment_terms

    projected, features = alignment
    term_cos, term_dist = alignment_terms(projected, features, margin_cos=cfg.align_margin_cos,
                                          margin_dist=cfg.align_margin_dist)
    terms["align_cos"], terms["align_dist"] = term_cos, term_dist
    return cfg.align_weight * (term_cos + term_dist)


def shaping_terms(cfg, perceptual: nn.Module | None, x: Tensor, *, output: AutoencoderOutput | None,
                  transform: SpatialTransform | None, alignment: tuple[Tensor, Tensor] | None,
                  terms: dict[str, Tensor]) -> Tensor:
    """The sum of the weighted shaping terms that are on (a zero scalar when none is)."""
    total = torch.zeros((), device=x.device)
    equivariance = equivariance_term(cfg, perceptual, x, output, transform, terms)
    for term in (equivariance, alignment_term(cfg, alignment, terms)):
        if term is not None:
            total = total + term
    return total

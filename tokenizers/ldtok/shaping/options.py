"""`LatentShaping`: what one training batch's forward does to the latent besides decoding it.

The trainer draws it per batch (`ldtok.training`) and passes it to the model's forward, so the extra decode of the
equivariance term runs inside the (DDP-wrapped) forward like the rest of the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .corruption import add_latent_noise
from .equivariance import SpatialTransform


@dataclass
class LatentShaping:
    """Per-batch latent options of a training forward.

    Args:
        noise_gamma (`float`, defaults to 0): the decoder sees `z + σ·ε`, `σ ~ U[0, noise_gamma]` per sample
            (l-DeTok); 0 adds none.
        transform (`SpatialTransform`, *optional*): also decode `T(z)` (no noise) into
            `AutoencoderOutput.equivariant_sample`, for the EQ-VAE term against `T(x)`.
        generator (`torch.Generator`, *optional*): the noise's CPU generator (reproducible across resumes).
    """

    noise_gamma: float = 0.0
    transform: SpatialTransform | None = None
    generator: torch.Generator | None = None

    def noisy(self, z: Tensor) -> Tensor:
        """The decoder's input: `z` with this batch's noise (or `z` itself)."""
        if self.noise_gamma <= 0:
            return z
        return add_latent_noise(z, self.noise_gamma, self.generator or torch.Generator().manual_seed(0))


def shaped(shaping: LatentShaping | None, z: Tensor) -> Tensor:
    """`shaping.noisy(z)`, or `z` when there is no shaping."""
    return z if shaping is None else shaping.noisy(z)


def wants_equivariance(shaping: LatentShaping | None) -> bool:
    return shaping is not None and shaping.transform is not None and not shaping.transform.is_identity

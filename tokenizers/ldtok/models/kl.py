"""The KL-VAE: diffusers' `AutoencoderKL`, with the training forward that the losses need."""

from __future__ import annotations

import logging

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import Tensor, nn

from ..outputs import AutoencoderOutput
from ..regularizers import jacobian_frobenius_sq
from ..shaping.options import LatentShaping, shaped, wants_equivariance
from .base import GaussianTokenizer
from .config import ModelConfig
from .export import config_sha256, save_pretrained_atomic
from .shapes import check_image_size

logger = logging.getLogger("ldtok.models")


def build_autoencoder_kl(config: ModelConfig) -> AutoencoderKL:
    """A diffusers `AutoencoderKL` from `config` (a preset's architecture), or loaded from `config.init_from`."""
    if config.init_from is not None:
        vae = AutoencoderKL.from_pretrained(config.init_from)
        differs = {k: vae.config[k] for k in ("block_out_channels", "latent_channels", "layers_per_block",
                                              "norm_num_groups") if list(np.atleast_1d(vae.config[k]))
                   != list(np.atleast_1d(getattr(config, k)))}
        if differs:
            logger.warning("model.init_from=%s defines the architecture; these model.* keys differ and are not "
                           "used: %s", config.init_from, differs)
        return vae
    return AutoencoderKL(**config.diffusers_architecture())


class KLAutoencoder(nn.Module, GaussianTokenizer):
    """Training wrapper around a diffusers `AutoencoderKL`.

    `forward` encodes, samples the posterior (its mean in deterministic mode or in eval mode) and decodes, and returns
    the posterior so the loss can compute the KL term. The wrapped model is what gets exported: `export(path)` writes a
    plain `AutoencoderKL` directory that `AutoencoderKL.from_pretrained` loads with no missing or unexpected keys.

    Args:
        vae (`AutoencoderKL`): the model being trained.
        deterministic (`bool`, defaults to `False`): use the posterior's mean, return no posterior (no KL term).
        contractive_samples (`int`, defaults to 0): in training mode with autograd on, also return the Hutchinson
            estimate of the posterior mean's Jacobian norm (`AutoencoderOutput.contractive`) from this many
            projections; 0 computes none.
    """

    family = "kl"
    latent_kind = "kl"

    def __init__(self, *, vae: AutoencoderKL, deterministic: bool = False, contractive_samples: int = 0):
        super().__init__()
        self.vae = vae
        self.deterministic = deterministic
        self.contractive_samples = contractive_samples

    @classmethod
    def from_config(cls, config: ModelConfig, *, contractive_samples: int = 0) -> KLAutoencoder:
        vae = build_autoencoder_kl(config)
        if config.gradient_checkpointing:
            vae.enable_gradient_checkpointing()
        return cls(vae=vae, deterministic=config.deterministic, contractive_samples=contractive_samples)

    @property
    def downsample_factor(self) -> int:
        """`f`: latents are `(H/f, W/f)`; image sides must be multiples of it."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def forward(self, x: Tensor, *, shaping: LatentShaping | None = None) -> AutoencoderOutput:
        """Reconstruct `x` `(B, C, H, W)`; `shaping` (training options) adds latent noise before the decoder and/or
        the decoding of a transformed latent (`equivariant_sample`)."""
        check_image_size(*x.shape[-2:], self.downsample_factor)
        contract = self.contractive_samples > 0 and self.training and torch.is_grad_enabled()
        if contract:
            x = x.detach().requires_grad_(True)  # the Jacobian is taken with respect to the input
        posterior = self.vae.encode(x).latent_dist
        contractive = jacobian_frobenius_sq(posterior.mean, x, samples=self.contractive_samples) if contract else None
        z = posterior.sample() if self.training and not self.deterministic else posterior.mode()  # (B, C, h, w)
        x_rec, logits = self._decode_for_training(shaped(shaping, z))  # (B, C_img, H, W)
        equivariant = self._decode_for_training(shaping.transform.apply(z))[0] if wants_equivariance(shaping) else None
        return AutoencoderOutput(sample=x_rec, posterior=None if self.deterministic else posterior,
                                 latents=posterior.mean, logits=logits, contractive=contractive,
                                 equivariant_sample=equivariant)

    def _decode_for_training(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        """`(image, logits or None)`; families whose decoder outputs logits override it."""
        return self.vae.decode(z).sample, None

    @property
    def last_layer(self) -> Tensor:
        """The decoder's output convolution weight: where the adaptive GAN weight compares gradient norms."""
        return self.vae.decoder.conv_out.weight

    @torch.no_grad()
    def encode_posterior(self, x: Tensor) -> DiagonalGaussianDistribution:
        """The posterior `q(z | x)`: `.mean`, `.logvar`, `.std` of shape `(B, C, h, w)` (unscaled latent space)."""
        check_image_size(*x.shape[-2:], self.downsample_factor)
        return self.vae.encode(x).latent_dist

    @torch.no_grad()
    def encode_latents(self, x: Tensor, *, sample: bool = False) -> Tensor:
        """Unscaled latents `(B, C, h, w)`: the posterior's mean, or a sample of it."""
        posterior = self.encode_posterior(x)
        return posterior.sample() if sample else posterior.mode()

    @torch.no_grad()
    def decode_latents(self, z: Tensor) -> Tensor:
        """Images `(B, 3, H, W)` from unscaled latents `(B, C, h, w)`."""
        return self.vae.decode(z).sample

    def config_sha256(self) -> str:
        return config_sha256(self.vae.config)

    def set_latent_statistics(self, *, scaling_factor: float, shift_factor: float | None = None) -> None:
        """Record the latent scale (and shift) in the exported config, as diffusers pipelines read them."""
        self.vae.register_to_config(scaling_factor=float(scaling_factor), shift_factor=shift_factor)

    def export(self, path) -> None:
        """Write a diffusers `AutoencoderKL` directory at `path` (atomically)."""
        save_pretrained_atomic(self.vae, path)

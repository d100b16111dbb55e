"""The autoencoder loss: reconstruction + perceptual (+ colour) + KL / quantizer + adaptive-weight PatchGAN (+ LeCAM).

- `config.py`: `LossConfig` (weights and switches, validated: an out-of-range value or an unknown choice is a
  `ConfigError` naming the key).
- `autoencoder.py`: `AutoencoderLoss` (`generator_loss`, `discriminator_loss`), `build_loss`, `build_discriminator`.
- `colour.py`: the colour term (`loss.colour_weight`: L1 of the CIELAB a*/b* planes of pooled images) and the
  differentiable sRGB -> CIELAB conversion.
- `shaping.py`: the latent-shaping terms of the generator loss (EQ-VAE equivariance, VA-VAE alignment).

Scaling convention: every term is a per-pixel mean. Reconstruction and perceptual are means over pixels; the KL term is
LDM's per-sample KL sum (nats, summed over latent channels and positions, averaged over the batch) divided by the
number of image values `3 * H * W`. LDM's `LPIPSWithDiscriminator` sums its NLL over pixels instead, so each of our
terms is LDM's divided by the same constant `3 * H * W` (the adaptive GAN weight is a gradient-norm ratio against the
NLL, so it scales by the same constant too). LDM's weights (`kl_weight=1e-6`, `perceptual_weight=1.0`,
`disc_weight=0.5`) therefore carry over unchanged, and Adam, invariant to a constant loss scale, takes the same steps
(up to its epsilon and the adaptive weight's 1e-4 / clamp). The quantizer term is taming's VQGAN convention (per-pixel
mean NLL + `quant_weight * (beta * commit + codebook)`), which is already per-pixel.

Who owns what: the loss has no trainable parameters. The perceptual network is injected (frozen, see
`ldtok.perceptual`) and is left out of the loss's `state_dict` (it is rebuilt from its shipped files; the state dict
then only holds the LeCAM statistics). The discriminator is a separate model with its own optimizer (build it with
`build_discriminator(config)`); both loss methods receive it. The generator loss evaluates it with detached parameters
through `torch.func.functional_call` on the unwrapped module, so it never writes discriminator gradients and never
runs the DDP wrapper's forward; the discriminator loss calls the (possibly wrapped) discriminator exactly once.

The adaptive GAN weight costs one backward through the perceptual net and the discriminator, not two as in taming /
LDM: `ldtok.adaptive_weight` takes both losses' gradients at the reconstruction once and returns a loss with the same
value and parameter gradients.
"""

from .autoencoder import AutoencoderLoss, build_discriminator, build_loss
from .config import LossConfig

__all__ = ["AutoencoderLoss", "LossConfig", "build_discriminator", "build_loss"]

"""The textbook MLP autoencoder / VAE for small greyscale images (MNIST-sized), `model.type: mlp`.

`MLPAutoencoder` is a diffusers `ModelMixin` / `ConfigMixin` with the `AutoencoderKL` interface the rest of ldtok
uses (`encode(x).latent_dist`, `decode(z).sample`, `config.scaling_factor`), so the trainer's KL wrapper, the
evaluation, latent tools and `load_tokenizer` treat it as a KL model. Its latent is a vector, shaped `(B, L, 1, 1)`
so that every `(B, C, h, w)` latent tool works unchanged (a channel is a latent dimension); `L = 2` gives the classic
2-D latent space whose manifold `ldtok.latent_tools.latent_atlas` draws.

With no hidden layers (`hidden_dims=()`) and `deterministic=True` the encoder and the decoder are affine maps: the
linear autoencoder, whose optimum under L2 spans the PCA subspace (tests/test_classic_pca.py).
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from torch import Tensor, nn

from ..config import ConfigError
from ..regularizers import logits_to_image
from .config import ModelConfig
from .kl import KLAutoencoder
from .shapes import ImageSizeError


def _mlp(widths: list[int]) -> nn.Sequential:
    """Linear layers `widths[0] -> ... -> widths[-1]`, ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class MLPAutoencoder(ModelMixin, ConfigMixin):
    """MLP encoder / decoder over flattened images. Arguments are keyword-only and all saved in `config.json`.

    Args:
        in_channels (`int`, defaults to 1): image channels (also the output's).
        sample_size (`int`, defaults to 28): image side `R`; the model takes `(B, in_channels, R, R)` only.
        hidden_dims (`tuple[int, ...]`, defaults to `(512, 256)`): encoder hidden widths (the decoder mirrors them).
        latent_dim (`int`, defaults to 2): latent size `L`.
        deterministic (`bool`, defaults to `False`): a plain autoencoder: the encoder outputs `L` values (the mean),
            the posterior has zero variance and there is no KL term.
        decoder_logits (`bool`, defaults to `False`): the decoder's output is read as Bernoulli logits; `decode`
            then returns the Bernoulli mean `2 * sigmoid(logits) - 1` as the image.
        scaling_factor (`float`, defaults to 1.0), shift_factor (`float`, *optional*): latent statistics, as
            `AutoencoderKL` stores them (measured after training).
    """

    @register_to_config
    def __init__(
        self,
        *,
        in_channels: int = 1,
        sample_size: int = 28,
        hidden_dims: tuple[int, ...] = (512, 256),
        latent_dim: int = 2,
        deterministic: bool = False,
        decoder_logits: bool = False,
        scaling_factor: float = 1.0,
        shift_factor: float | None = None,
    ):
        super().__init__()
        D = in_channels * sample_size * sample_size
        hidden = list(hidden_dims)
        self.encoder = _mlp([D, *hidden, latent_dim if deterministic else 2 * latent_dim])
        self.decoder = _mlp([latent_dim, *hidden[::-1], D])

    @property
    def last_layer(self) -> Tensor:
        """The decoder's output layer weight (for the adaptive GAN weight)."""
        return self.decoder[-1].weight

    def _check(self, x: Tensor) -> None:
        C, R = self.config.in_channels, self.config.sample_size
        if x.shape[1:] != (C, R, R):
            raise ImageSizeError(f"MLPAutoencoder takes (B, {C}, {R}, {R}) images, got {tuple(x.shape)}: use "
                                 f"resolution {R} (model.sample_size) and {C} channel(s)")

    def encode(self, x: Tensor, return_dict: bool = True) -> AutoencoderKLOutput:
        """The posterior of `x` `(B, C, R, R)`: a diagonal Gaussian of shape `(B, L, 1, 1)`."""
        self._check(x)
        moments = self.encoder(x.flatten(1))[:, :, None, None]  # (B, 2L or L, 1, 1)
        if self.config.deterministic:
            moments = torch.cat([moments, torch.zeros_like(moments)], dim=1)
        return AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(
            moments, deterministic=self.config.deterministic))

    def decode_logits(self, z: Tensor) -> Tensor:
        """The decoder's raw output `(B, C, R, R)` from latents `(B, L, 1, 1)` (or `(B, L)`)."""
        C, R = self.config.in_channels, self.config.sample_size
        return self.decoder(z.flatten(1)).view(-1, C, R, R)

    def decode(self, z: Tensor, return_dict: bool = True) -> DecoderOutput:
        """Images `(B, C, R, R)` in `[-1, 1]` units from latents `(B, L, 1, 1)`."""
        out = self.decode_logits(z)
        return DecoderOutput(sample=logits_to_image(out) if self.config.decoder_logits else out)


class MLPVAEAutoencoder(KLAutoencoder):
    """The trainer's wrapper of an `MLPAutoencoder` (`model.type: mlp`): `KLAutoencoder`'s forward, export and
    latent interface, with the logits decoder and the MLP's last layer.

    Args:
        vae (`MLPAutoencoder`): the model being trained, and what `export` writes.
        contractive_samples (`int`, defaults to 0): see `KLAutoencoder`.
    """

    family = "mlp"

    def __init__(self, *, vae: MLPAutoencoder, contractive_samples: int = 0):
        super().__init__(vae=vae, deterministic=vae.config.deterministic, contractive_samples=contractive_samples)

    @property
    def downsample_factor(self) -> int:
        """1: the MLP checks the exact size it takes itself (`R x R`, one latent position)."""
        return 1

    @classmethod
    def from_config(cls, config: ModelConfig, *, decoder_logits: bool = False, contractive_samples: int = 0
                    ) -> MLPVAEAutoencoder:
        if config.init_from is not None:
            vae = MLPAutoencoder.from_pretrained(config.init_from)
            if vae.config.decoder_logits != decoder_logits:
                raise ConfigError(f"model.init_from={config.init_from} has decoder_logits="
                                  f"{vae.config.decoder_logits}, but loss.reconstruction asks for {decoder_logits}")
        else:
            vae = MLPAutoencoder(
                in_channels=config.in_channels, sample_size=config.sample_size,
                hidden_dims=tuple(config.block_out_channels), latent_dim=config.latent_channels,
                deterministic=config.deterministic, decoder_logits=decoder_logits,
            )  # fmt: skip
        return cls(vae=vae, contractive_samples=contractive_samples)

    def _decode_for_training(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        out = self.vae.decode_logits(z)
        return (logits_to_image(out), out) if self.vae.config.decoder_logits else (out, None)

    @property
    def last_layer(self) -> Tensor:
        return self.vae.last_layer


__all__ = ["MLPAutoencoder", "MLPVAEAutoencoder"]

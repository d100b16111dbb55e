"""The hierarchical KL-VAE (`model.type: vae2`): two Gaussian latent levels laid out like VQ-VAE-2.

The layout is `ldtok.models.vqvae2`'s with the quantizers replaced by diagonal Gaussians:

```
x -> encoder -> h (f) -> encoder_top -> q(z_top | x)            = N(mu_t, sigma_t)        at 2f
                 |                          z_top -> decoder_top -> c (f)
                 +---------- [h, c] -> q(z_bottom | x, z_top)  = N(mu_b, sigma_b)        at f
                                      c -> p(z_bottom | z_top) = N(mu_p, sigma_p)        at f (learned prior)
[z_bottom, upsample(z_top)] -> decoder -> x_rec
```

The top level's prior is `N(0, I)`; the bottom level's is conditional on the top latent (as in Ladder / NVAE
hierarchical VAEs), so sampling runs top-down: `z_top ~ N(0, I)`, `z_bottom ~ p(z_bottom | z_top)`, decode. The KL of
each level is reported per channel (`AutoencoderOutput.kl_maps`), so `loss.free_bits` floors each level's channels
separately. The prior's convolution starts at zero: the bottom prior is `N(0, I)` at initialisation.

`VAE2` is a diffusers `ModelMixin` / `ConfigMixin` (`save_pretrained` / `from_pretrained`, loaded by
`ldtok.models.load_tokenizer`); `VAE2Autoencoder` is the trainer's wrapper.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import Decoder, DiagonalGaussianDistribution, Encoder
from diffusers.models.upsampling import Upsample2D
from torch import Tensor, nn

from ..config import ConfigError
from ..outputs import AutoencoderOutput
from ..regularizers import logits_to_image
from .base import NoShardFormat
from .config import ModelConfig
from .export import config_sha256, save_pretrained_atomic
from .shapes import check_image_size


def gaussian_kl_map(q: DiagonalGaussianDistribution, p: DiagonalGaussianDistribution | None = None) -> Tensor:
    """`KL(q || p)` per element `(B, C, h, w)`, nats, fp32; `p = None` is `N(0, I)`."""
    mq, lq = q.mean.float(), q.logvar.float()
    if p is None:
        return 0.5 * (mq.pow(2) + lq.exp() - 1.0 - lq)
    mp, lp = p.mean.float(), p.logvar.float()
    return 0.5 * (lp - lq + (lq.exp() + (mq - mp).pow(2)) / lp.exp() - 1.0)


class VAE2(ModelMixin, ConfigMixin):
    """Two-level hierarchical KL-VAE. Arguments are keyword-only and all saved in `config.json`.

    Args:
        in_channels (`int`, defaults to 3): image channels (also the output's).
        block_out_channels (`tuple[int, ...]`, defaults to `(128, 128, 256)`): channels per level of the bottom
            encoder and of the decoder; the bottom latent is at `f = 2 ** (len(block_out_channels) - 1)`, the top
            latent at `2f`.
        layers_per_block (`int`, defaults to 2): ResNet blocks per level.
        latent_channels (`int`, defaults to 4): Gaussian channels of each level.
        norm_num_groups (`int`, defaults to 32): GroupNorm groups; must divide every `block_out_channels` entry.
        sample_size (`int`, defaults to 256): training resolution; `sample_prior` draws latents for this size.
        mid_block_add_attention (`bool`, defaults to `True`): self-attention in the middle blocks.
        decoder_logits (`bool`, defaults to `False`): the decoder's output is Bernoulli logits (`loss.reconstruction
            =bce`); `decode` returns the image `2 * sigmoid(logits) - 1`.
    """

    _supports_gradient_checkpointing = True
    level_names: ClassVar[list[str]] = ["top", "bottom"]

    @register_to_config
    def __init__(
        self,
        *,
        in_channels: int = 3,
        block_out_channels: tuple[int, ...] = (128, 128, 256),
        layers_per_block: int = 2,
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int = 256,
        mid_block_add_attention: bool = True,
        decoder_logits: bool = False,
    ):
        super().__init__()
        n = len(block_out_channels)
        C, D = block_out_channels[-1], latent_channels
        blocks = {"layers_per_block": layers_per_block, "norm_num_groups": norm_num_groups,
                  "mid_block_add_attention": mid_block_add_attention}
        self.encoder = Encoder(in_channels=in_channels, out_channels=C, down_block_types=("DownEncoderBlock2D",) * n,
                               block_out_channels=tuple(block_out_channels), double_z=False, **blocks)
        self.encoder_top = Encoder(in_channels=C, out_channels=C, down_block_types=("DownEncoderBlock2D",) * 2,
                                   block_out_channels=(C, C), double_z=False, **blocks)
        self.posterior_top = nn.Conv2d(C, 2 * D, 1)
        self.decoder_top = Decoder(in_channels=D, out_channels=C, up_block_types=("UpDecoderBlock2D",) * 2,
                                   block_out_channels=(C, C), **blocks)
        self.posterior_bottom = nn.Conv2d(2 * C, 2 * D, 1)
        self.prior_bottom = nn.Conv2d(C, 2 * D, 3, padding=1)
        nn.init.zeros_(self.prior_bottom.weight)  # the bottom prior starts as N(0, I)
        nn.init.zeros_(self.prior_bottom.bias)
        # Razavi et al.'s transposed convolution (k4, s2, p1) brings the top latent to the bottom resolution
        self.upsample_top = Upsample2D(D, use_conv_transpose=True, out_channels=D)
        self.post_latent_conv = nn.Conv2d(2 * D, C, 1)
        self.decoder = Decoder(in_channels=C, out_channels=in_channels, up_block_types=("UpDecoderBlock2D",) * n,
                               block_out_channels=tuple(block_out_channels), **blocks)

    @property
    def downsample_factor(self) -> int:
        """`f`, the bottom latent's downsampling factor (the top latent's is `2f`)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def last_layer(self) -> Tensor:
        return self.decoder.conv_out.weight

    def _check_size(self, x: Tensor) -> None:
        check_image_size(*x.shape[-2:], 2 * self.downsample_factor, what="image size (top latent: factor 2f)")

    def encode_top(self, x: Tensor) -> tuple[Tensor, DiagonalGaussianDistribution]:
        """Bottom features `h` `(B, C, H/f, W/f)` and the top posterior `q(z_top | x)` `(B, D, H/2f, W/2f)`."""
        self._check_size(x)
        h = self.encoder(x)
        return h, DiagonalGaussianDistribution(self.posterior_top(self.encoder_top(h)))

    def bottom_distributions(self, h: Tensor | None, z_top: Tensor
                             ) -> tuple[DiagonalGaussianDistribution | None, DiagonalGaussianDistribution]:
        """`(q(z_bottom | x, z_top) or None when h is None, p(z_bottom | z_top))`, both `(B, D, H/f, W/f)`."""
        c = self.decoder_top(z_top.contiguous())  # (B, C, H/f, W/f)
        prior = DiagonalGaussianDistribution(self.prior_bottom(c))
        posterior = None if h is None else DiagonalGaussianDistribution(self.posterior_bottom(torch.cat([h, c], 1)))
        return posterior, prior

    def decode_logits(self, z_top: Tensor, z_bottom: Tensor) -> Tensor:
        """The decoder's raw output `(B, C_img, H, W)` from both latents."""
        top_up = self.upsample_top(z_top.contiguous())  # (B, D, H/f, W/f)
        return self.decoder(self.post_latent_conv(torch.cat([z_bottom.contiguous(), top_up], dim=1)))

    def decode(self, z_top: Tensor, z_bottom: Tensor) -> Tensor:
        """Images `(B, C_img, H, W)` in `[-1, 1]` units from both latents."""
        out = self.decode_logits(z_top, z_bottom)
        return logits_to_image(out) if self.config.decoder_logits else out

    def forward(self, x: Tensor, *, sample_posterior: bool = False) -> AutoencoderOutput:
        """Reconstruct `x`; latents are posterior samples when `sample_posterior`, else the means."""
        h, q_top = self.encode_top(x)
        z_top = q_top.sample() if sample_posterior else q_top.mode()
        q_bottom, p_bottom = self.bottom_distributions(h, z_top)
        z_bottom = q_bottom.sample() if sample_posterior else q_bottom.mode()
        out = self.decode_logits(z_top, z_bottom)
        logits = out if self.config.decoder_logits else None
        return AutoencoderOutput(
            sample=logits_to_image(out) if logits is not None else out, logits=logits,
            kl_maps={"top": gaussian_kl_map(q_top), "bottom": gaussian_kl_map(q_bottom, p_bottom)},
        )

    @torch.no_grad()
    def sample_prior(self, num_samples: int, *, generator: torch.Generator | None = None,
                     size: int | None = None) -> Tensor:
        """Images `(N, C_img, S, S)` sampled top-down: `z_top ~ N(0, I)`, `z_bottom ~ p(z_bottom | z_top)`.

        Args:
            num_samples (`int`): `N`.
            generator (`torch.Generator`, *optional*): a CPU generator for the noise (reproducible samples).
            size (`int`, *optional*): image side `S`, defaults to `config.sample_size`.
        """
        S = size or self.config.sample_size
        f2, D = 2 * self.downsample_factor, self.config.latent_channels
        device = self.device
        z_top = torch.randn(num_samples, D, S // f2, S // f2, generator=generator).to(device, self.dtype)
        _, prior = self.bottom_distributions(None, z_top)
        eps = torch.randn(prior.mean.shape, generator=generator).to(device, self.dtype)
        return self.decode(z_top, prior.mean + prior.std * eps)

    def export(self, path) -> None:
        """`save_pretrained` at `path`, atomically."""
        save_pretrained_atomic(self, path)


class VAE2Autoencoder(nn.Module, NoShardFormat):
    """Trainable hierarchical KL-VAE (`model.type: vae2`): the trainer's interface around a `VAE2`.

    `forward` samples both posteriors in training mode and uses their means in eval mode, as `KLAutoencoder` does.

    Args:
        vae2 (`VAE2`): the model being trained, and what `export` writes.
    """

    family = "vae2"
    latent_kind = "vae2"  # no shard format yet
    level_names: ClassVar[list[str]] = VAE2.level_names

    def __init__(self, *, vae2: VAE2):
        super().__init__()
        self.vae2 = vae2

    @classmethod
    def from_config(cls, config: ModelConfig, *, decoder_logits: bool = False) -> VAE2Autoencoder:
        """Build from the `model` section (`init_from`: a `VAE2` directory, whose config defines the architecture)."""
        if config.init_from is not None:
            model = VAE2.from_pretrained(config.init_from)
            if model.config.decoder_logits != decoder_logits:
                raise ConfigError(f"model.init_from={config.init_from} has decoder_logits="
                                  f"{model.config.decoder_logits}, but loss.reconstruction asks for {decoder_logits}")
        else:
            model = VAE2(
                in_channels=config.in_channels, block_out_channels=tuple(config.block_out_channels),
                layers_per_block=config.layers_per_block, latent_channels=config.latent_channels,
                norm_num_groups=config.norm_num_groups, sample_size=config.sample_size,
                mid_block_add_attention=config.mid_block_add_attention, decoder_logits=decoder_logits,
            )  # fmt: skip
        if config.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        return cls(vae2=model)

    def forward(self, x: Tensor) -> AutoencoderOutput:
        return self.vae2(x, sample_posterior=self.training)

    @property
    def last_layer(self) -> Tensor:
        return self.vae2.last_layer

    def sample_prior(self, num_samples: int, *, generator: torch.Generator | None = None) -> Tensor:
        return self.vae2.sample_prior(num_samples, generator=generator)

    def config_sha256(self) -> str:
        return config_sha256(self.vae2.config)

    def export(self, path) -> None:
        """Write the `VAE2` directory at `path` (atomically)."""
        self.vae2.export(path)


__all__ = ["VAE2", "VAE2Autoencoder", "gaussian_kl_map"]

"""The autoencoder trainer's latent-shaping options (issue 13): what each batch's forward is given, and the alignment.

`BatchShaping.draw` turns `train.latent_noise`, `train.mask_ratio` and `loss.equivariance_*` into one batch's model
input and `LatentShaping`. Every draw comes from `step_generator(seed, key, rank, stream)` keyed by the optimizer step
and the batch's position in its epoch, so a resumed run draws exactly what the uninterrupted one did. The equivariance
draw (whether the term is on, and `T`) uses rank 0's stream on every rank: all ranks then decode the same extra graph,
which DDP needs; noise and masks differ per rank.

`Alignment` holds the frozen vision model (never prepared, never in the optimizer, never checkpointed) and computes
`(projected latent, features)` through the prepared projection, so DDP all-reduces the projection's gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..distributed import rank
from ..outputs import AutoencoderOutput
from ..shaping.alignment import AlignmentProjection, build_align_encoder
from ..shaping.corruption import mask_patches, scheduled, step_generator
from ..shaping.equivariance import sample_transform
from ..shaping.options import LatentShaping

SHAPING_FAMILIES = ("kl", "vqgan", "vqvae2")
_STREAM_EQUIVARIANCE, _STREAM_NOISE, _STREAM_MASK = 1, 2, 3


def shaping_keys_on(config) -> list[str]:
    """The dotted keys of the latent-shaping options that are on in run config `config`."""
    tc, lc = config.train, config.loss
    on = {"loss.equivariance_weight": lc.equivariance_weight > 0, "loss.align_weight": lc.align_weight > 0,
          "train.latent_noise": tc.latent_noise > 0, "train.mask_ratio": tc.mask_ratio > 0,
          "train.trainable": tc.trainable != "all"}
    return [key for key, value in on.items() if value]


def check_shaping_family(config) -> None:
    """A one-line `ConfigError` when a shaping option is on for a family that does not implement it."""
    keys = shaping_keys_on(config)
    if keys and config.model.type not in SHAPING_FAMILIES:
        raise ConfigError(f"{keys[0]}: implemented for model.type {', '.join(SHAPING_FAMILIES)}, not "
                          f"{config.model.type!r}")


class BatchShaping:
    """One batch's masked input and `LatentShaping` (see the module docstring).

    Args:
        config: the run config (`train.seed`, `train.max_steps`, the noise, mask and equivariance keys).
        downsample_factor (`int`): the model's factor (the default mask patch size).
    """

    def __init__(self, config, *, downsample_factor: int):
        self.tc, self.lc = config.train, config.loss
        self.patch = self.tc.mask_patch_size or downsample_factor
        resolution = config.data.resolution
        if self.tc.mask_ratio > 0 and resolution % self.patch:
            raise ConfigError(f"train.mask_patch_size={self.patch}: data.resolution={resolution} is not a multiple of "
                              "it; choose a divisor of the resolution (0: the model's downsampling factor)")

    def _generator(self, step: int, micro: int, rank_: int, stream: int) -> torch.Generator:
        return step_generator(self.tc.seed, step * 1_000_003 + micro, rank_, stream)

    def draw(self, x: Tensor, *, step: int, micro: int = 0) -> tuple[Tensor, LatentShaping | None]:
        """`(model input, shaping)` for batch `x` `(B, C, H, W)` at optimizer step `step`; `micro` tells apart the
        batches of one step (the batch's index in its epoch)."""
        tc, lc = self.tc, self.lc
        transform = None
        if lc.equivariance_weight > 0:  # drawn on every rank from rank 0's stream, used or not: the same graph
            g = self._generator(step, micro, 0, _STREAM_EQUIVARIANCE)
            use = float(torch.rand((), generator=g)) < lc.equivariance_prob
            drawn = sample_transform(g, kinds=lc.equivariance_transforms, scales=lc.equivariance_scales)
            transform = drawn if use else None
        x_in = x
        ratio = scheduled(tc.mask_ratio, step=step, max_steps=tc.max_steps, schedule=tc.mask_ratio_schedule)
        if ratio > 0:
            x_in = mask_patches(x, ratio=ratio, patch=self.patch,
                                generator=self._generator(step, micro, rank(), _STREAM_MASK))
        gamma = scheduled(tc.latent_noise, step=step, max_steps=tc.max_steps, schedule=tc.latent_noise_schedule)
        if gamma <= 0 and transform is None:
            return x_in, None
        return x_in, LatentShaping(noise_gamma=gamma, transform=transform,
                                   generator=self._generator(step, micro, rank(), _STREAM_NOISE))


def alignment_latent(output: AutoencoderOutput) -> Tensor:
    """The latent the alignment term projects: KL the posterior mean, VQ the quantized latent (VQ-VAE-2: bottom)."""
    if output.latents is not None:
        return output.latents
    quant = output.quant[-1] if isinstance(output.quant, (list, tuple)) else output.quant
    if quant is None:
        raise ValueError("the model's output has neither latents nor quantizer outputs to align")
    return quant.quantized


def latent_channels(model: nn.Module) -> int:
    """Channels of `alignment_latent` for a KL, VQGAN or VQ-VAE-2 training model (unwrapped)."""
    if hasattr(model, "vae"):
        return int(model.vae.config.latent_channels)
    if hasattr(model, "vqvae2"):
        return int(model.vqvae2.config.bottom_codebook_dim)
    return int(model.vqmodel.quantize.codebook_dim)


class Alignment:
    """The frozen vision model and the (prepared) projection of the alignment term.

    Args:
        encoder (`FrozenVisionEncoder` or `FrozenConvEncoder`): on the training device; stays in eval mode, without
            gradients.
        projection (`nn.Module`): the `AlignmentProjection` as prepared by Accelerate (DDP-wrapped when distributed).
    """

    def __init__(self, encoder: nn.Module, projection: nn.Module):
        self.encoder, self.projection = encoder, projection

    @staticmethod
    def build(align_model: str, *, model: nn.Module) -> tuple[nn.Module, AlignmentProjection]:
        """The frozen model (built-in or from its local directory), and a fresh projection from `model`'s latent to
        its width."""
        encoder = build_align_encoder(align_model)
        return encoder, AlignmentProjection(latent_channels=latent_channels(model), feature_dim=encoder.hidden_size)

    def __call__(self, x: Tensor, output: AutoencoderOutput) -> tuple[Tensor, Tensor]:
        """`(projected latent, features of the clean image x on the latent grid)`, both `(B, D, h, w)`."""
        z = alignment_latent(output)  # (B, C, h, w)
        features = self.encoder(x, grid=tuple(z.shape[-2:]))  # (B, D, h, w), no gradient
        return self.projection(z.float()), features

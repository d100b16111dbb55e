"""VQ-VAE-2 (Razavi et al. 2019): a two-level hierarchy of EMA codebooks, built from diffusers blocks.

```
x ─ encoder ─ h (C, H/f) ─ encoder_top ─ quant_conv_top ─ quantize_top ─ e_top (D_t, H/2f)
                 │                                                          │
                 │               decoder_top(e_top) (latent_channels, H/f) ─┤
                 └── concat ── quant_conv_bottom ─ quantize_bottom ─ e_bot  │   (D_b, H/f)
                                                                      │     │
image ─ decoder ─ post_quant_conv ─ concat(e_bot, upsample_top(e_top)) ─────┘
```

- `encoder` is diffusers' `Encoder` with `block_out_channels` (factor `f = 2 ** (len(block_out_channels) - 1)`), whose
  output keeps the last level's width `C = block_out_channels[-1]`;
- `encoder_top` is an `Encoder` with two levels of width C (factor 2 more), ending in `latent_channels`;
- the top code is decoded back to the bottom resolution (`decoder_top`, a two-level `Decoder`) and conditions the
  bottom quantization: the bottom quantizer sees `quant_conv_bottom(concat(h, decoder_top(e_top)))`, so the bottom
  code only has to carry what the top code misses;
- the decoder (a `Decoder` mirroring `encoder`) reads both codes: `post_quant_conv(concat(e_bot, upsample_top(e_top)))`.

Each level has its own `VectorQuantizer` (EMA, k-means init, dead-code restarts); a training-mode forward runs the top
quantizer and then the bottom one, each a collective across ranks, in the same order on every rank.

`VQVAE2` is a diffusers `ModelMixin` / `ConfigMixin`: its export is its own `save_pretrained` (atomic, safetensors),
and **it keeps the quantizers' buffers** (EMA statistics, usage counters), so an export can be fine-tuned or resumed
with `VQVAE2.from_pretrained` / `model.init_from`. `VQVAE2Autoencoder` is the trainer's wrapper (`model.type:
vqvae2`).
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import Decoder, Encoder
from diffusers.models.upsampling import Upsample2D
from torch import Tensor, nn

from ..config import ConfigError
from ..outputs import AutoencoderOutput, QuantizerOutput
from ..quantizers import QuantizerConfig, VectorQuantizer
from ..quantizers.state import check_quantizer_matches, quantizer_metrics, quantizers_eval
from ..shaping.options import LatentShaping, shaped, wants_equivariance
from .base import CodeTokenizer
from .blocks import enable_gradient_checkpointing
from .config import ModelConfig
from .export import config_sha256, save_pretrained_atomic
from .shapes import check_image_size

# Quantizer options shared by both levels (the codebook size and dimension are per level).
SHARED_QUANTIZER_FIELDS = ("l2_normalize", "ema", "decay", "eps", "beta", "kmeans_init", "kmeans_iters",
                           "dead_code_steps", "usage_window")


class VQVAE2Indices(NamedTuple):
    """Code indices of both levels: `top` `(B, H/2f, W/2f)` and `bottom` `(B, H/f, W/f)`, int64."""

    top: Tensor
    bottom: Tensor


class VQVAE2(ModelMixin, ConfigMixin):
    """Two-level VQ-VAE. Arguments are keyword-only and all saved in `config.json`.

    Args:
        in_channels (`int`, defaults to 3): image channels (also the output's).
        block_out_channels (`tuple[int, ...]`, defaults to `(128, 128, 256)`): channels per level of the bottom
            encoder and of the decoder; the bottom code is at `f = 2 ** (len(block_out_channels) - 1)`, the top code
            at `2f`.
        layers_per_block (`int`, defaults to 2): ResNet blocks per level.
        latent_channels (`int`, defaults to 64): channels of the top encoder's output, of the decoded top code that
            conditions the bottom quantizer, and of the decoder's input.
        norm_num_groups (`int`, defaults to 32): GroupNorm groups; must divide every `block_out_channels` entry.
        sample_size (`int`, defaults to 256): training resolution (informative).
        mid_block_add_attention (`bool`, defaults to `True`): self-attention in the middle blocks.
        top_codebook_size, bottom_codebook_size (`int`, defaults to 512): codes per level.
        top_codebook_dim, bottom_codebook_dim (`int`, defaults to 64): code dimension per level.
        l2_normalize, ema, decay, eps, beta, kmeans_init, kmeans_iters, dead_code_steps, usage_window: the
            `QuantizerConfig` options of both quantizers (see `ldtok.quantizers.QuantizerConfig`).
    """

    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns: ClassVar[list[str]] = ["quantize"]
    level_names: ClassVar[list[str]] = ["top", "bottom"]

    @register_to_config
    def __init__(
        self,
        *,
        in_channels: int = 3,
        block_out_channels: tuple[int, ...] = (128, 128, 256),
        layers_per_block: int = 2,
        latent_channels: int = 64,
        norm_num_groups: int = 32,
        sample_size: int = 256,
        mid_block_add_attention: bool = True,
        top_codebook_size: int = 512,
        top_codebook_dim: int = 64,
        bottom_codebook_size: int = 512,
        bottom_codebook_dim: int = 64,
        l2_normalize: bool = False,
        ema: bool = True,
        decay: float = 0.99,
        eps: float = 1e-5,
        beta: float = 0.25,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        dead_code_steps: int = 50,
        usage_window: int = 100,
    ):
        super().__init__()
        n = len(block_out_channels)
        C = block_out_channels[-1]
        D_t, D_b = top_codebook_dim, bottom_codebook_dim
        blocks = {"layers_per_block": layers_per_block, "norm_num_groups": norm_num_groups,
                  "mid_block_add_attention": mid_block_add_attention}
        quantizer_options = {"l2_normalize": l2_normalize, "ema": ema, "decay": decay, "eps": eps, "beta": beta,
                             "kmeans_init": kmeans_init, "kmeans_iters": kmeans_iters,
                             "dead_code_steps": dead_code_steps, "usage_window": usage_window}

        self.encoder = Encoder(in_channels=in_channels, out_channels=C, down_block_types=("DownEncoderBlock2D",) * n,
                               block_out_channels=tuple(block_out_channels), double_z=False, **blocks)
        self.encoder_top = Encoder(in_channels=C, out_channels=latent_channels,
                                   down_block_types=("DownEncoderBlock2D",) * 2, block_out_channels=(C, C),
                                   double_z=False, **blocks)
        self.quant_conv_top = nn.Conv2d(latent_channels, D_t, 1)
        self.quantize_top = VectorQuantizer(codebook_size=top_codebook_size, codebook_dim=D_t, **quantizer_options)
        self.decoder_top = Decoder(in_channels=D_t, out_channels=latent_channels,
                                   up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(C, C), **blocks)
        self.quant_conv_bottom = nn.Conv2d(C + latent_channels, D_b, 1)
        self.quantize_bottom = VectorQuantizer(codebook_size=bottom_codebook_size, codebook_dim=D_b,
                                               **quantizer_options)
        # Razavi et al.'s transposed convolution (k4, s2, p1) brings the top code to the bottom resolution
        self.upsample_top = Upsample2D(D_t, use_conv_transpose=True, out_channels=D_t)
        self.post_quant_conv = nn.Conv2d(D_t + D_b, latent_channels, 1)
        self.decoder = Decoder(in_channels=latent_channels, out_channels=in_channels,
                               up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(block_out_channels),
                               **blocks)

    # ------------------------------------------------------------------ properties

    @property
    def downsample_factor(self) -> int:
        """`f`, the bottom code's downsampling factor (the top code's is `2f`)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def codebook_sizes(self) -> list[int]:
        return [self.quantize_top.codebook_size, self.quantize_bottom.codebook_size]

    @property
    def last_layer(self) -> Tensor:
        """The decoder's output convolution weight: where the adaptive GAN weight compares gradient norms."""
        return self.decoder.conv_out.weight

    def codebook_metrics(self) -> dict[str, float]:
        return {**quantizer_metrics(self.quantize_top, "_top"), **quantizer_metrics(self.quantize_bottom, "_bottom")}

    # ------------------------------------------------------------------ forward

    def _check_size(self, x: Tensor) -> None:
        # the top code is 2f coarser: sides must be multiples of 2f
        check_image_size(*x.shape[-2:], 2 * self.downsample_factor, what="image size (top code: factor 2f)")

    def bottom_input(self, h: Tensor, top_codes: Tensor) -> Tensor:
        """The bottom quantizer's input `(B, D_b, H/f, W/f)` from encoder features `h` `(B, C, H/f, W/f)` and the
        quantized top code `(B, D_t, H/2f, W/2f)`."""
        condition = self.decoder_top(top_codes.contiguous())  # (B, latent_channels, H/f, W/f)
        return self.quant_conv_bottom(torch.cat([h, condition], dim=1))

    def decode_codes(self, top_codes: Tensor, bottom_codes: Tensor) -> Tensor:
        """Images `(B, 3, H, W)` from quantized codes `(B, D_t, H/2f, W/2f)` and `(B, D_b, H/f, W/f)`."""
        # contiguous NCHW (see VQGAN.decode_codes): the same kernels whether the codes come from forward or indices
        top_up = self.upsample_top(top_codes.contiguous())  # (B, D_t, H/f, W/f)
        # (B, latent_channels, H/f, W/f)
        latents = self.post_quant_conv(torch.cat([bottom_codes.contiguous(), top_up], dim=1))
        return self.decoder(latents)

    def quantize_features(self, h: Tensor) -> tuple[QuantizerOutput, QuantizerOutput]:
        """The top -> bottom chain, written once: both levels' quantizer outputs from encoder features `h`
        `(B, C, H/f, W/f)`: the top code `(B, D_t, H/2f, W/2f)`, then the bottom code `(B, D_b, H/f, W/f)`
        conditioned on it. In training mode each quantizer updates its codebook (a collective), top first."""
        quant_top = self.quantize_top(self.quant_conv_top(self.encoder_top(h)))  # (B, D_t, H/2f, W/2f)
        quant_bottom = self.quantize_bottom(self.bottom_input(h, quant_top.quantized))  # (B, D_b, H/f, W/f)
        return quant_top, quant_bottom

    @torch.no_grad()
    def reconstruct_from_features(self, h: Tensor) -> Tensor:
        """Images `(B, 3, H, W)` from encoder features `h` (`self.encoder(x)`, or an interpolation of them): both
        levels re-quantized as in `forward`, in eval semantics (no codebook update), and decoded."""
        with quantizers_eval(self.quantize_top, self.quantize_bottom):
            quant_top, quant_bottom = self.quantize_features(h)
        return self.decode_codes(quant_top.quantized, quant_bottom.quantized)

    def forward(self, x: Tensor, *, shaping: LatentShaping | None = None) -> AutoencoderOutput:
        """Reconstruct `x` `(B, 3, H, W)`; `quant` is `[top, bottom]` quantizer outputs. `shaping` (training
        options) adds noise to both levels before the decoder and/or decodes both levels transformed."""
        self._check_size(x)
        quant_top, quant_bottom = self.quantize_features(self.encoder(x))  # h: (B, C, H/f, W/f)
        top, bottom = quant_top.quantized, quant_bottom.quantized
        x_rec = self.decode_codes(shaped(shaping, top), shaped(shaping, bottom))
        equivariant = None
        if wants_equivariance(shaping):
            t_top = shaping.transform.apply(top)  # (B, D_t, h', w')
            # the bottom grid stays twice the top grid, whatever the rounding of the scale
            t_bottom = shaping.transform.apply(bottom, size=(2 * t_top.shape[-2], 2 * t_top.shape[-1]))
            equivariant = self.decode_codes(t_top, t_bottom)
        return AutoencoderOutput(sample=x_rec, posterior=None, quant=[quant_top, quant_bottom],
                                 equivariant_sample=equivariant)

    @torch.no_grad()
    def encode_to_indices(self, images: Tensor) -> VQVAE2Indices:
        """Both levels' code indices of `images` `(B, 3, H, W)`; eval semantics (no codebook update)."""
        self._check_size(images)
        with quantizers_eval(self.quantize_top, self.quantize_bottom):
            quant_top, quant_bottom = self.quantize_features(self.encoder(images))
        return VQVAE2Indices(top=quant_top.indices, bottom=quant_bottom.indices)

    @torch.no_grad()
    def decode_indices(self, top: Tensor, bottom: Tensor) -> Tensor:
        """Images `(B, 3, H, W)` of code indices `top` `(B, h/2, w/2)` and `bottom` `(B, h, w)`; equal to
        `forward(x).sample` in eval mode."""
        return self.decode_codes(self.quantize_top.codes_from_indices(top),
                                 self.quantize_bottom.codes_from_indices(bottom))

    def export(self, path) -> None:
        """`save_pretrained` at `path`, atomically; quantizer buffers included (resumable)."""
        save_pretrained_atomic(self, path)


class VQVAE2Autoencoder(nn.Module, CodeTokenizer):
    """Trainable VQ-VAE-2 (`model.type: vqvae2`): the trainer's interface around a `VQVAE2`.

    Args:
        vqvae2 (`VQVAE2`): the model being trained, and what `export` writes.
    """

    family = "vqvae2"
    latent_kind = "vqvae2"
    level_names: ClassVar[list[str]] = VQVAE2.level_names

    def __init__(self, *, vqvae2: VQVAE2):
        super().__init__()
        self.vqvae2 = vqvae2

    def config_sha256(self) -> str:
        return config_sha256(self.vqvae2.config)

    @property
    def downsample_factor(self) -> int:
        """The factor image sides must be multiples of: the top code's `2f`."""
        return 2 * self.vqvae2.downsample_factor

    @classmethod
    def from_config(cls, config: ModelConfig, quantizer: QuantizerConfig | None = None, *,
                    top_quantizer: QuantizerConfig | None = None) -> VQVAE2Autoencoder:
        """Build from the `model` section.

        Args:
            config (`ModelConfig`): architecture (`block_out_channels`, ...), `init_from`, `gradient_checkpointing`.
            quantizer (`QuantizerConfig`, *optional*): defaults to `config.quantizer`; the bottom level's codebook
                and both levels' options.
            top_quantizer (`QuantizerConfig`, *optional*): the top level's codebook size and dimension (defaults to
                `config.top_quantizer` when the config has one and it is set, else to `quantizer`); its other options
                must equal `quantizer`'s.

        With `config.init_from` (a `VQVAE2` directory) the checkpoint defines the architecture and codebooks (their
        sizes, dimensions, `l2_normalize` and `ema` must match the quantizer configs); the other quantizer options
        (beta, decay, dead-code restarts, ...) are taken from the config.
        """
        quantizer = quantizer if quantizer is not None else config.quantizer
        if top_quantizer is None:
            top_quantizer = getattr(config, "top_quantizer", None) or quantizer
        top_key = "quantizer" if top_quantizer is quantizer else "top_quantizer"  # for error messages
        for name, default in (("type", "vq"), ("gradient", "straight_through"), ("codebook_transform", "none")):
            if getattr(quantizer, name) != default:
                raise ConfigError(f"model.quantizer.{name}: VQ-VAE-2 supports only {default!r} (got "
                                  f"{getattr(quantizer, name)!r}); use model.type=vqgan for the other quantizers")
        for name in SHARED_QUANTIZER_FIELDS:
            if getattr(top_quantizer, name) != getattr(quantizer, name):
                raise ValueError(f"model.top_quantizer.{name}={getattr(top_quantizer, name)!r} differs from "
                                 f"model.quantizer.{name}={getattr(quantizer, name)!r}: only the codebook size and "
                                 "dimension may differ between the levels")
        options = {name: getattr(quantizer, name) for name in SHARED_QUANTIZER_FIELDS}
        if config.init_from is None:
            model = VQVAE2(
                in_channels=config.in_channels,
                block_out_channels=tuple(config.block_out_channels),
                layers_per_block=config.layers_per_block,
                latent_channels=config.latent_channels,
                norm_num_groups=config.norm_num_groups,
                sample_size=config.sample_size,
                mid_block_add_attention=config.mid_block_add_attention,
                top_codebook_size=top_quantizer.codebook_size,
                top_codebook_dim=top_quantizer.codebook_dim,
                bottom_codebook_size=quantizer.codebook_size,
                bottom_codebook_dim=quantizer.codebook_dim,
                **options,
            )
        else:
            saved = VQVAE2.load_config(config.init_from)
            source = f"model.init_from={config.init_from!r}"
            for level, q, key in (("bottom", quantizer, "quantizer"), ("top", top_quantizer, top_key)):
                check_quantizer_matches(
                    q,
                    {"codebook_size": saved[f"{level}_codebook_size"], "codebook_dim": saved[f"{level}_codebook_dim"],
                     "l2_normalize": saved["l2_normalize"], "ema": saved["ema"]},
                    source=f"the {level} codebook of {source}",
                    key=key,
                )
            # the checkpoint's `initialized` buffers (1) are loaded too: k-means does not run again
            training_options = {k: v for k, v in options.items() if k not in ("l2_normalize", "ema")}
            model = VQVAE2.from_pretrained(config.init_from, **training_options)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        return cls(vqvae2=model)

    @property
    def codebook_sizes(self) -> list[int]:
        return self.vqvae2.codebook_sizes

    @property
    def last_layer(self) -> Tensor:
        return self.vqvae2.last_layer

    def codebook_metrics(self) -> dict[str, float]:
        return self.vqvae2.codebook_metrics()

    def forward(self, x: Tensor, *, shaping: LatentShaping | None = None) -> AutoencoderOutput:
        return self.vqvae2(x, shaping=shaping)

    def encode_to_indices(self, images: Tensor) -> VQVAE2Indices:
        return self.vqvae2.encode_to_indices(images)

    def decode_indices(self, top: Tensor, bottom: Tensor) -> Tensor:
        return self.vqvae2.decode_indices(top, bottom)

    def export(self, path) -> None:
        """Write the `VQVAE2` directory at `path` (atomically), quantizer buffers included."""
        self.vqvae2.export(path)


__all__ = ["VQVAE2", "VQVAE2Autoencoder", "VQVAE2Indices"]

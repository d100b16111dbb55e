"""VQGAN: diffusers' `VQModel` layout with ldtok's `VectorQuantizer`, exported as a plain diffusers `VQModel`.

The trainable model holds a diffusers `VQModel` (encoder -> `quant_conv` -> quantizer -> `post_quant_conv` -> decoder)
whose `quantize` is replaced by our EMA / k-means / dead-code-restart `VectorQuantizer`, so every other parameter keeps
diffusers' key names. `export(path)` writes a fresh `VQModel` directory: our weights, and our codebook table
(`VectorQuantizer.export_codebook()`, normalized for l2-normalized codes) as `quantize.embedding.weight`; the EMA and
training buffers are dropped (`accelerate.save_state` keeps them for resuming).

Tokens in and out of the exported diffusers model (the recipe users keep asking for):

```python
from diffusers import VQModel

vq = VQModel.from_pretrained("run/final")          # exported with `lookup_from_codebook=True`
B, h, w = indices.shape                            # (B, h, w) int64, e.g. from `VQGAN.encode_to_indices`
images = vq.decode(indices, force_not_quantize=True, shape=(B, h, w, vq.config.vq_embed_dim)).sample

# any VQModel, whatever its `lookup_from_codebook`: look the codes up, then decode them (re-quantizing a code
# gives the code itself)
codes = vq.quantize.get_codebook_entry(indices, (B, h, w, vq.config.vq_embed_dim))   # (B, D, h, w)
images = vq.decode(codes).sample
```

`lookup_from_codebook=True` only changes `decode(..., force_not_quantize=True)`, which then reads its input as indices
(as in aMUSEd); `vq(images)` and `decode(latents)` still quantize as usual. (A pipeline that passes continuous
latents with `force_not_quantize=True`, like Kandinsky's MoVQ, needs `vq.register_to_config(lookup_from_codebook=False)`
after loading.) Indices out of diffusers: diffusers'
quantizer also takes the nearest code (squared euclidean), so for a model trained with `l2_normalize=False`
`indices_from_diffusers_vqmodel(vq, images)` gives ldtok's indices. Diffusers' quantizer does **not** normalize its
input: for `l2_normalize=True` models pass `l2_normalize=True` to that helper (it normalizes the latents first), or take
the indices from ldtok.
"""

from __future__ import annotations

import dataclasses
import json
from typing import ClassVar

import torch
import torch.nn.functional as F
from diffusers import VQModel
from torch import Tensor, nn

from ..config import ConfigError
from ..outputs import AutoencoderOutput
from ..quantizers import QuantizerConfig, VectorQuantizer, build_quantizer
from ..quantizers.state import check_quantizer_matches, load_codebook_, quantizer_metrics, quantizers_eval
from ..shaping.options import LatentShaping, shaped, wants_equivariance
from .base import CodeTokenizer
from .blocks import enable_gradient_checkpointing
from .config import ModelConfig
from .export import config_sha256, save_pretrained_atomic
from .shapes import check_image_size

# What diffusers' VQModel config cannot say about our codes (l2 normalization), next to config.json.
LDTOK_SIDECAR = "ldtok.json"


def build_vqmodel(config: ModelConfig, quantizer: QuantizerConfig) -> VQModel:
    """A fresh diffusers `VQModel` with `config`'s architecture and `quantizer`'s codebook shape (a one-code
    placeholder table for the implicit and residual quantizers, whose `quantize` is replaced anyway)."""
    return VQModel(
        **config.diffusers_architecture(),
        num_vq_embeddings=quantizer.codebook_size if quantizer.type == "vq" else 1,
        vq_embed_dim=quantizer.codebook_dim,
        lookup_from_codebook=True,
    )


@torch.no_grad()
def indices_from_diffusers_vqmodel(vqmodel: VQModel, images: Tensor, *, l2_normalize: bool = False) -> Tensor:
    """Code indices of `images` computed by a diffusers `VQModel` alone (its encoder and its own quantizer).

    Args:
        vqmodel (`VQModel`): e.g. an ldtok export loaded with `VQModel.from_pretrained`.
        images (`Tensor` of shape `(B, 3, H, W)`): in [-1, 1].
        l2_normalize (`bool`, defaults to `False`): normalize the latents before the nearest-code search; required
            for models trained with `l2_normalize=True` (diffusers' quantizer does not normalize).

    Returns:
        `Tensor` of shape `(B, h, w)`, int64.
    """
    z = vqmodel.encode(images).latents  # (B, D, h, w)
    B, _, h, w = z.shape
    if l2_normalize:
        z = F.normalize(z, dim=1)
    _, _, (_, _, indices) = vqmodel.quantize(z)
    return indices.reshape(B, h, w)


class VQGAN(nn.Module, CodeTokenizer):
    """Trainable VQGAN (`model.type: vqgan`): a diffusers `VQModel` whose `quantize` is one of ldtok's quantizers.

    Args:
        vqmodel (`VQModel`): encoder, `quant_conv`, `post_quant_conv` and decoder; its `quantize` is replaced.
        quantizer (`nn.Module`): a `VectorQuantizer` (exported as a plain diffusers `VQModel`) or an FSQ / LFQ /
            BSQ / residual quantizer (exported as `ldtok.models.quantized.QuantizedAutoencoder`), with
            `codebook_dim == vqmodel.config.vq_embed_dim`.
        quantizer_config (`QuantizerConfig`, *optional*): the config `quantizer` was built from; required to export
            a quantizer other than `VectorQuantizer`.
    """

    family = "vqgan"
    latent_kind = "vq"  # the family is "vqgan"; its shards hold "vq" indices
    level_names: ClassVar[list[str]] = ["code"]

    def __init__(self, *, vqmodel: VQModel, quantizer: nn.Module, quantizer_config: QuantizerConfig | None = None):
        super().__init__()
        cfg = vqmodel.config
        embed_dim = cfg.vq_embed_dim if cfg.vq_embed_dim is not None else cfg.latent_channels
        if quantizer.codebook_dim != embed_dim:
            raise ValueError(f"quantizer codebook_dim {quantizer.codebook_dim} != the VQModel's vq_embed_dim "
                             f"{embed_dim}")
        vqmodel.quantize = quantizer  # one registration: the state dict has no duplicate keys
        self.vqmodel = vqmodel
        self.quantizer_config = quantizer_config

    @classmethod
    def from_config(cls, config: ModelConfig, quantizer: QuantizerConfig | None = None) -> VQGAN:
        """Build from the `model` section; `quantizer` defaults to `config.quantizer`.

        With `config.init_from` the diffusers `VQModel` directory defines the architecture and the codebook, which
        is copied into the quantizer (marked initialized, so k-means does not overwrite it).
        """
        quantizer = quantizer if quantizer is not None else config.quantizer
        if quantizer.type != "vq" and config.init_from is not None:
            raise ConfigError(f"model.init_from: fine-tuning from a diffusers VQModel needs model.quantizer.type=vq, "
                              f"got {quantizer.type!r}")
        if config.init_from is None:
            vqmodel = build_vqmodel(config, quantizer)
            vq = build_quantizer(quantizer)
        else:
            vqmodel = VQModel.from_pretrained(config.init_from)
            table = vqmodel.quantize.embedding.weight.detach().float()  # (K, D)
            K, D = table.shape
            check_quantizer_matches(quantizer, {"codebook_size": K, "codebook_dim": D},
                                    source=f"the codebook of model.init_from={config.init_from!r}", key="quantizer")
            if vqmodel.config.vq_embed_dim is None:  # written explicitly from now on (the decode recipe reads it)
                vqmodel.register_to_config(vq_embed_dim=D)
            vq = VectorQuantizer.from_config(quantizer)
            load_codebook_(vq, table)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(vqmodel)
        return cls(vqmodel=vqmodel, quantizer=vq, quantizer_config=quantizer)

    # ------------------------------------------------------------------ properties

    @property
    def quantizer(self) -> nn.Module:
        return self.vqmodel.quantize

    @property
    def codebook_sizes(self) -> list[int]:
        return [self.quantizer.codebook_size]

    @property
    def last_layer(self) -> Tensor:
        """The decoder's output convolution weight: where the adaptive GAN weight compares gradient norms."""
        return self.vqmodel.decoder.conv_out.weight

    def codebook_metrics(self) -> dict[str, float]:
        return quantizer_metrics(self.quantizer)

    # ------------------------------------------------------------------ forward

    def encode_latents(self, x: Tensor) -> Tensor:
        """Continuous latents before quantization, `(B, D, H/f, W/f)` (encoder and `quant_conv`)."""
        return self.vqmodel.quant_conv(self.vqmodel.encoder(x))

    def decode_codes(self, codes: Tensor) -> Tensor:
        """Images `(B, 3, H, W)` from quantized codes `(B, D, h, w)` (`post_quant_conv` and decoder)."""
        # contiguous NCHW: the quantizer's rearranged output has channels-last strides, and convolutions pick a
        # different kernel for those, so decoding would differ (~1e-6) between ldtok, its indices and diffusers
        codes = codes.contiguous()
        latents = self.vqmodel.post_quant_conv(codes)  # (B, latent_channels, h, w)
        spatial = codes if self.vqmodel.config.norm_type == "spatial" else None  # MoVQ-style checkpoints
        return self.vqmodel.decoder(latents, spatial)

    @property
    def downsample_factor(self) -> int:
        """`f`: codes are `(H/f, W/f)`; image sides must be multiples of it."""
        return 2 ** (len(self.vqmodel.config.block_out_channels) - 1)

    def forward(self, x: Tensor, *, shaping: LatentShaping | None = None) -> AutoencoderOutput:
        """Reconstruct `x`; `shaping` (training options) adds noise to the quantized latent before the decoder and/or
        decodes a transformed one (`equivariant_sample`)."""
        check_image_size(*x.shape[-2:], self.downsample_factor)
        quant = self.quantizer(self.encode_latents(x))  # quantized: (B, D, H/f, W/f)
        sample = self.decode_codes(shaped(shaping, quant.quantized))
        equivariant = None
        if wants_equivariance(shaping):
            equivariant = self.decode_codes(shaping.transform.apply(quant.quantized))  # (B, 3, H', W')
        return AutoencoderOutput(sample=sample, posterior=None, quant=quant, equivariant_sample=equivariant)

    @torch.no_grad()
    def encode_to_indices(self, images: Tensor) -> Tensor:
        """Code indices `(B, H/f, W/f)` int64 of `images` `(B, 3, H, W)`; eval semantics (no codebook update)."""
        check_image_size(*images.shape[-2:], self.downsample_factor)
        with quantizers_eval(self.quantizer):
            return self.quantizer(self.encode_latents(images)).indices

    @torch.no_grad()
    def reconstruct_from_latents(self, latents: Tensor) -> Tensor:
        """Images `(B, 3, H, W)` from continuous latents `(B, D, h, w)` (`encode_latents(x)`, or an interpolation of
        them): quantized in eval semantics (no codebook update) and decoded."""
        with quantizers_eval(self.quantizer):
            return self.decode_codes(self.quantizer(latents).quantized)

    @torch.no_grad()
    def decode_indices(self, indices: Tensor) -> Tensor:
        """Images `(B, 3, H, W)` of code indices `(B, h, w)`; equal to `forward(x).sample` in eval mode."""
        return self.decode_codes(self.quantizer.codes_from_indices(indices))

    # ------------------------------------------------------------------ export

    def to_diffusers(self) -> VQModel:
        """A plain diffusers `VQModel` (CPU, fp32) with our weights and `export_codebook()` as its embedding."""
        config = {**self.vqmodel.config, "vq_embed_dim": self.quantizer.codebook_dim, "lookup_from_codebook": True}
        exported = VQModel.from_config(config)
        state = {k: v for k, v in self.vqmodel.state_dict().items() if not k.startswith("quantize.")}
        state["quantize.embedding.weight"] = self.quantizer.export_codebook()
        exported.load_state_dict({k: v.detach().float().cpu() for k, v in state.items()}, strict=True)
        return exported

    def to_quantized_autoencoder(self):
        """An `ldtok.models.quantized.QuantizedAutoencoder` (CPU, fp32) with our weights, for quantizers that a
        diffusers `VQModel` cannot hold (FSQ, LFQ, BSQ, residual VQ)."""
        from .quantized import QuantizedAutoencoder

        if self.quantizer_config is None:
            raise ValueError("export of a non-VQ quantizer needs quantizer_config")
        cfg = self.vqmodel.config
        keys = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
                "layers_per_block", "latent_channels", "norm_num_groups", "sample_size", "mid_block_add_attention")
        quantizer = dataclasses.asdict(self.quantizer_config)
        exported = QuantizedAutoencoder(**{k: cfg[k] for k in keys}, quantizer=quantizer)
        exported.vqmodel.load_state_dict({k: v.detach().float().cpu() if v.is_floating_point() else v.cpu()
                                          for k, v in self.vqmodel.state_dict().items()}, strict=True)
        return exported

    def export(self, path) -> None:
        """Write the model directory at `path` (atomically): a diffusers `VQModel` for `VectorQuantizer` (SimVQ's
        map folded into the table; training buffers dropped), else a `QuantizedAutoencoder`."""
        if not isinstance(self.quantizer, VectorQuantizer):
            save_pretrained_atomic(self.to_quantized_autoencoder(), path)
            return
        sidecar = {"family": "vqgan", "l2_normalize": self.quantizer.l2_normalize}
        save_pretrained_atomic(self.to_diffusers(), path, extra_files={LDTOK_SIDECAR: json.dumps(sidecar, indent=2)})

    def config_sha256(self) -> str:
        if isinstance(self.quantizer, VectorQuantizer):
            return config_sha256(self.vqmodel.config)
        return config_sha256({**self.vqmodel.config, "quantizer": dataclasses.asdict(self.quantizer_config)})


__all__ = ["VQGAN", "build_vqmodel", "indices_from_diffusers_vqmodel"]

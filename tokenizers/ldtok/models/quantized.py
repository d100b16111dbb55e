"""`QuantizedAutoencoder`: the exported form of a VQGAN whose quantizer a diffusers `VQModel` cannot hold.

FSQ, LFQ and BSQ have implicit codebooks and residual VQ has several: the export is a diffusers-style
`ModelMixin, ConfigMixin` directory (`config.json` with `_class_name: QuantizedAutoencoder`, the diffusers `VQModel`
architecture keys and the `quantizer` section; `diffusion_pytorch_model.safetensors`), loaded by
`QuantizedAutoencoder.from_pretrained` or `ldtok.models.load_tokenizer`:

```python
from ldtok.models.quantized import QuantizedAutoencoder

tok = QuantizedAutoencoder.from_pretrained("runs/demo-fsq/final")
indices = tok.encode_to_indices(images)     # (B, h, w) int64; residual VQ: (B, S, h, w)
images = tok.decode_indices(indices)
fields = tok.encode_fields(images)          # what `ldtok encode` stores: {"indices": (B, h, w)}, residual VQ
                                            # {"indices_stage0": (B, h, w), ..., "indices_stage{S-1}": ...}
```

The weights keep diffusers' `VQModel` key names under `vqmodel.` (encoder, `quant_conv`, `post_quant_conv`,
decoder), and `vqmodel.quantize.*` holds the quantizer's state (residual codebooks; usage counters).
"""

from __future__ import annotations

from diffusers import ConfigMixin, ModelMixin, VQModel
from diffusers.configuration_utils import register_to_config
from torch import Tensor

from ..quantizers import QuantizerConfig, build_quantizer
from .base import CodeTokenizer


class QuantizedAutoencoder(ModelMixin, ConfigMixin, CodeTokenizer):
    """Encoder, quantizer and decoder of an ldtok VQGAN with an FSQ / LFQ / BSQ / residual quantizer.

    Args:
        in_channels, out_channels, down_block_types, up_block_types, block_out_channels, layers_per_block,
        latent_channels, norm_num_groups, sample_size, mid_block_add_attention: diffusers `VQModel`'s arguments.
        quantizer (`dict`): the `QuantizerConfig` fields (`type`, `levels`, `codebook_dim`, ...).
    """

    family = "vqgan"
    latent_kind = "vq"
    level_names = ["code"]  # noqa: RUF012 - the Tokenizer interface's class attribute

    @register_to_config
    def __init__(
        self,
        *,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",),
        up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",),
        block_out_channels: tuple[int, ...] = (64,),
        layers_per_block: int = 1,
        latent_channels: int = 3,
        norm_num_groups: int = 32,
        sample_size: int = 32,
        mid_block_add_attention: bool = True,
        quantizer: dict | None = None,
    ):
        super().__init__()
        cfg = QuantizerConfig(**(quantizer or {}))
        self.vqmodel = VQModel(
            in_channels=in_channels, out_channels=out_channels, down_block_types=tuple(down_block_types),
            up_block_types=tuple(up_block_types), block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block, latent_channels=latent_channels, norm_num_groups=norm_num_groups,
            sample_size=sample_size, mid_block_add_attention=mid_block_add_attention, num_vq_embeddings=1,
            vq_embed_dim=cfg.codebook_dim,
        )
        self.vqmodel.quantize = build_quantizer(cfg)
        self.quantizer_config = cfg

    def to_vqgan(self):
        """The `ldtok.models.vqgan.VQGAN` sharing these modules (forward, `encode_to_indices`, `decode_indices`)."""
        from .vqgan import VQGAN

        return VQGAN(vqmodel=self.vqmodel, quantizer=self.vqmodel.quantize, quantizer_config=self.quantizer_config)

    @property
    def quantizer(self):
        """The quantizer module (`vqmodel.quantize`); residual VQ's `num_stages` gives `index_stages`."""
        return self.vqmodel.quantize

    @property
    def codebook_sizes(self) -> list[int]:
        return [self.quantizer.codebook_size]

    @property
    def last_layer(self) -> Tensor:
        return self.vqmodel.decoder.conv_out.weight

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode_to_indices(self, images: Tensor) -> Tensor:
        """Code indices of `images` `(B, 3, H, W)` in [-1, 1] (eval semantics)."""
        return self.to_vqgan().encode_to_indices(images)

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Images `(B, 3, H, W)` of code indices; equal to the eval-mode reconstruction."""
        return self.to_vqgan().decode_indices(indices)

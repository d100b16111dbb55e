"""Load any tokenizer directory for inference: ldtok/diffusers KL-VAEs, VQGANs and VQ-VAE-2s.

`load_tokenizer(path)` looks at `config.json`'s `_class_name`:

- `AutoencoderKL` (ours or anyone's, e.g. Stable Diffusion's VAE) -> `KLAutoencoder`;
- `VQModel` (ours or anyone's) -> `VQGAN` with the directory's codebook (`ldtok.json`, written by our export, says
  whether codes are l2-normalized; other VQModels use plain nearest-code quantization, as diffusers does);
- `QuantizedAutoencoder` (ldtok's export of FSQ / LFQ / BSQ / residual-VQ VQGANs) -> `VQGAN` with that quantizer;
- `VQVAE2` -> `VQVAE2Autoencoder`.

The result is in eval mode with gradients off, and has `kind` ("kl", "vq" or "vqvae2"), `forward(x) ->
AutoencoderOutput`, `config_sha256()`, and per family `encode_posterior` / `decode_latents` (KL) or
`encode_to_indices` / `decode_indices` / `codebook_sizes` (VQ).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch import nn

from ..quantizers import QuantizerConfig
from .config import ModelConfig
from .kl import KLAutoencoder


def load_tokenizer(path: str | os.PathLike, *, device: torch.device | str = "cpu") -> nn.Module:
    """Load the tokenizer saved at `path` (see the module docstring), in eval mode on `device`."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
    config = json.loads(config_file.read_text())
    class_name = config.get("_class_name")
    if class_name == "AutoencoderKL":
        model = KLAutoencoder(vae=AutoencoderKL.from_pretrained(path))
    elif class_name == "VQModel":
        from .vqgan import LDTOK_SIDECAR, VQGAN

        sidecar = json.loads((path / LDTOK_SIDECAR).read_text()) if (path / LDTOK_SIDECAR).is_file() else {}
        quantizer = QuantizerConfig(
            codebook_size=config["num_vq_embeddings"],
            codebook_dim=config.get("vq_embed_dim") or config["latent_channels"],
            l2_normalize=bool(sidecar.get("l2_normalize", False)),
            kmeans_init=False,
        )
        model = VQGAN.from_config(ModelConfig(type="vqgan", init_from=str(path), quantizer=quantizer))
    elif class_name == "QuantizedAutoencoder":
        from .quantized import QuantizedAutoencoder

        model = QuantizedAutoencoder.from_pretrained(path).to_vqgan()
    elif class_name == "VQVAE2":
        from .vqvae2 import VQVAE2, VQVAE2Autoencoder

        model = VQVAE2Autoencoder(vqvae2=VQVAE2.from_pretrained(path))
    else:
        raise ValueError(f"{config_file}: _class_name {class_name!r} is not a tokenizer ldtok can load "
                         "(AutoencoderKL, VQModel, QuantizedAutoencoder or VQVAE2)")
    return model.eval().requires_grad_(False).to(device)

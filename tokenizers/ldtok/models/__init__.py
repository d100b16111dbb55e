"""Autoencoder families: KL-VAE (diffusers `AutoencoderKL`), VQGAN and VQ-VAE-2."""

from .config import MODEL_PRESETS, ModelConfig
from .export import save_pretrained_atomic
from .kl import KLAutoencoder, build_autoencoder_kl
from .loading import load_tokenizer, tokenizer_sha256


def build_model(config: ModelConfig):
    """The trainable autoencoder for `config.type`: a module whose forward returns an `AutoencoderOutput`."""
    if config.type == "kl":
        return KLAutoencoder.from_config(config)
    if config.type == "vqgan":
        from .vqgan import VQGAN

        return VQGAN.from_config(config)
    if config.type == "vqvae2":
        from .vqvae2 import VQVAE2Autoencoder

        return VQVAE2Autoencoder.from_config(config)
    raise ValueError(f"model.type: unknown model family {config.type!r}")


__all__ = [
    "MODEL_PRESETS",
    "KLAutoencoder",
    "ModelConfig",
    "build_autoencoder_kl",
    "build_model",
    "load_tokenizer",
    "save_pretrained_atomic",
    "tokenizer_sha256",
]

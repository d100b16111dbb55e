"""Autoencoder families: KL-VAE (diffusers `AutoencoderKL`), VQGAN and VQ-VAE-2."""

from .config import MODEL_PRESETS, ModelConfig
from .export import save_pretrained_atomic
from .kl import KLAutoencoder, build_autoencoder_kl


def build_model(config: ModelConfig):
    """The trainable autoencoder for `config.type`: a module whose forward returns an `AutoencoderOutput`."""
    if config.type == "kl":
        return KLAutoencoder.from_config(config)
    raise NotImplementedError(f"model.type {config.type!r} is not available yet")


__all__ = [
    "MODEL_PRESETS",
    "KLAutoencoder",
    "ModelConfig",
    "build_autoencoder_kl",
    "build_model",
    "save_pretrained_atomic",
]

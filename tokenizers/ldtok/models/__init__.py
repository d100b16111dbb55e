"""Autoencoder families (KL-VAE on diffusers' `AutoencoderKL`, MLP VAE, VAE-2, VQGAN, VQ-VAE-2), each implementing the
`Tokenizer` interface of `base.py` (family vs latent kind, shard fields, encode / decode to them)."""

from .base import Tokenizer
from .config import MODEL_PRESETS, ModelConfig
from .export import save_pretrained_atomic
from .kl import KLAutoencoder, build_autoencoder_kl
from .loading import load_tokenizer, tokenizer_in_channels, tokenizer_sha256


def build_model(config: ModelConfig, *, decoder_logits: bool = False, contractive_samples: int = 0):
    """The trainable autoencoder for `config.type`: a module whose forward returns an `AutoencoderOutput`.

    Args:
        config (`ModelConfig`): the model section.
        decoder_logits (`bool`, defaults to `False`): the decoder's output is read as Bernoulli logits
            (`loss.reconstruction=bce`; `mlp` and `vae2` only).
        contractive_samples (`int`, defaults to 0): random projections of the encoder-Jacobian estimate computed in
            the training forward (`loss.contractive_weight > 0`; `kl` and `mlp` only); 0 computes none.
    """
    from ..config import ConfigError

    if decoder_logits and config.type not in ("mlp", "vae2"):
        raise ConfigError(f"loss.reconstruction=bce needs a decoder read as logits: model.type mlp or vae2, not "
                          f"{config.type!r}")
    if contractive_samples and config.type not in ("kl", "mlp"):
        raise ConfigError(f"loss.contractive_weight > 0 is implemented for model.type kl and mlp, not {config.type!r}")
    if config.type == "kl":
        return KLAutoencoder.from_config(config, contractive_samples=contractive_samples)
    if config.type == "mlp":
        from .mlp import MLPVAEAutoencoder

        return MLPVAEAutoencoder.from_config(config, decoder_logits=decoder_logits,
                                             contractive_samples=contractive_samples)
    if config.type == "vae2":
        from .vae2 import VAE2Autoencoder

        return VAE2Autoencoder.from_config(config, decoder_logits=decoder_logits)
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
    "Tokenizer",
    "build_autoencoder_kl",
    "build_model",
    "load_tokenizer",
    "save_pretrained_atomic",
    "tokenizer_in_channels",
    "tokenizer_sha256",
]

"""ldtok: image tokenizers for latent diffusion and autoregressive priors.

KL-VAE (diffusers `AutoencoderKL`), VQGAN (exported as diffusers `VQModel`) and VQ-VAE-2, trained with L1/L2 + LPIPS +
PatchGAN losses under HF Accelerate, and used to encode image datasets into safetensors latent shards.

The public API is importable from the top level (`from ldtok import load_tokenizer, train, load_config, RunConfig`);
each name is imported on first use (PEP 562 module `__getattr__`), so `import ldtok` loads neither torch nor diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_API: dict[str, str] = {
    # loading and using tokenizers
    "load_tokenizer": "ldtok.models.loading",
    "KLAutoencoder": "ldtok.models.kl",
    "VQGAN": "ldtok.models.vqgan",
    "VQVAE2": "ldtok.models.vqvae2",
    "VQVAE2Autoencoder": "ldtok.models.vqvae2",
    "ModelConfig": "ldtok.models.config",
    "Tokenizer": "ldtok.models.base",
    "build_model": "ldtok.models",
    # training
    "train": "ldtok.training",
    "RunConfig": "ldtok.training",
    "TrainConfig": "ldtok.training",
    "LossConfig": "ldtok.losses",
    "load_config": "ldtok.config",
    "save_config": "ldtok.config",
    "ConfigError": "ldtok.config",
    # data
    "DataConfig": "ldtok.data",
    "build_dataset": "ldtok.data",
    "collate": "ldtok.data",
    # encoding datasets into latent shards, priors
    "encode_dataset": "ldtok.encoding",
    "EncodeConfig": "ldtok.encoding",
    "EncodeResult": "ldtok.encoding",
    "LatentShardDataset": "ldtok.shards",
    "LatentPriorPipeline": "ldtok.priors.pipeline",
    # evaluation, sharing
    "evaluate_tokenizer": "ldtok.evaluation",
    "EvalOptions": "ldtok.evaluation",
    "write_model_card": "ldtok.model_card",
    "push_to_hub": "ldtok.hub",
    "LdtokError": "ldtok.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'ldtok' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


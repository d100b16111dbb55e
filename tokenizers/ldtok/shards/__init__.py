"""Latent shards: pre-encoded datasets for training priors on a frozen tokenizer.

One safetensors file holds many samples (as LightningDiT's `latents_rank{RR}_shard{NNN}.safetensors`), not one file
per image (LlamaGen's per-image `.npy` codes, which drown filesystems at ImageNet scale). `ShardWriter` writes them
resumably from each encoding rank, `write_manifest` merges the ranks into `index.json` with dataset-wide latent
statistics, `verify` checks a directory end to end,
`resolve_model` finds the model it was encoded with, and `LatentShardDataset` / `LatentShardIterable` read it back.
"""

from .manifest import ShardRecord, load_manifest, write_manifest
from .model_ref import ModelMismatchError, resolve_model
from .readers import LatentShardDataset, LatentShardIterable, ShardChecksumError
from .resume import ResumeState
from .stats import LATENT_CONVENTIONS, ChannelStats
from .verify import VerifyReport, verify
from .writer import ShardWriter, index_dtype_for

__all__ = [
    "LATENT_CONVENTIONS",
    "ChannelStats",
    "LatentShardDataset",
    "LatentShardIterable",
    "ModelMismatchError",
    "ResumeState",
    "ShardChecksumError",
    "ShardRecord",
    "ShardWriter",
    "VerifyReport",
    "index_dtype_for",
    "load_manifest",
    "resolve_model",
    "verify",
    "write_manifest",
]

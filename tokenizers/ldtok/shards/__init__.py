"""Latent shards: pre-encoded datasets for training priors on a frozen tokenizer.

One safetensors file holds many samples (as LightningDiT's `latents_rank{RR}_shard{NNN}.safetensors`), not one file
per image (LlamaGen's per-image `.npy` codes, which drown filesystems at ImageNet scale). `ShardWriter` writes them
resumably from each encoding rank, `write_manifest` merges the ranks into `index.json` with dataset-wide latent
statistics, `verify` checks a directory end to end, and `LatentShardDataset` / `LatentShardIterable` read it back.
"""

from .manifest import ShardRecord, load_manifest, write_manifest
from .readers import LatentShardDataset, LatentShardIterable, ShardChecksumError
from .resume import ResumeState
from .stats import LATENT_CONVENTIONS, ChannelStats
from .verify import VerifyReport, verify
from .writer import KIND_FIELDS, ShardWriter, index_dtype_for

__all__ = [
    "KIND_FIELDS",
    "LATENT_CONVENTIONS",
    "ChannelStats",
    "LatentShardDataset",
    "LatentShardIterable",
    "ResumeState",
    "ShardChecksumError",
    "ShardRecord",
    "ShardWriter",
    "VerifyReport",
    "index_dtype_for",
    "load_manifest",
    "verify",
    "write_manifest",
]

"""Latent shards: pre-encoded datasets for training priors on a frozen tokenizer.

One safetensors file holds many samples (as LightningDiT's `latents_rank{RR}_shard{NNN}.safetensors`), not one file
per image (LlamaGen's per-image `.npy` codes, which drown filesystems at ImageNet scale). `ShardWriter` writes them
resumably from each encoding rank, `write_manifest` merges the ranks into `index.json` with dataset-wide latent
statistics, `verify` checks a directory end to end, and `LatentShardDataset` / `LatentShardIterable` read it back.
"""

from .manifest import ShardRecord, VerifyReport, load_manifest, verify, write_manifest
from .readers import LatentShardDataset, LatentShardIterable
from .stats import ChannelStats
from .writer import KIND_FIELDS, ResumeState, ShardWriter, index_dtype_for

__all__ = [
    "KIND_FIELDS",
    "ChannelStats",
    "LatentShardDataset",
    "LatentShardIterable",
    "ResumeState",
    "ShardRecord",
    "ShardWriter",
    "VerifyReport",
    "index_dtype_for",
    "load_manifest",
    "verify",
    "write_manifest",
]

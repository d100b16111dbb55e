"""`ldtok encode`: encode a dataset into latent shards with a trained tokenizer (KL-VAE, VQGAN or VQ-VAE-2).

A thin adapter: flags -> `ldtok.encoding.EncodeConfig` (one field per flag) -> `ldtok.encoding.encode_dataset` ->
the printed summary of its `EncodeResult`.

One process:
    ldtok encode --model runs/kl/final --out latents/train --data-source folder --data-path ~/images \\
        --resolution 256 --batch-size 32 --samples-per-shard 1024 --dtype fp16 --flip --write-scaling-factor

Several processes: the dataset is split by rank, each rank writes its own shards:
    accelerate launch --multi_gpu --num_processes 8 -m ldtok.cli encode --model runs/kl/final --out latents/train ...
On CPUs, launch the same way with `ACCELERATE_USE_CPU=1` in the environment (gloo; CPU-only machines need nothing
more), or use `torchrun --nproc_per_node N -m ldtok.cli encode ...`: accelerate 1.x's `launch --cpu` starts a single
process whatever `--num_processes` says (unless given `--mpirun_hostfile`).

What is stored per sample (see `ldtok.shards`): KL: the posterior's `mean` and `logvar` in `--dtype`; VQGAN:
`indices` in the smallest integer dtype that holds the codebook; VQ-VAE-2: `indices_top`, `indices_bottom`; the
sample id always, `label` / caption when `--label-column` / `--caption-column` are given; with `--flip` the same
fields of the horizontally flipped image as `*_flip`. Latents are unscaled: the scale and shift are in `index.json`.

Resuming: every shard records the model's `tokenizer_sha256` (weights and architecture); a directory written by
another model (or another checkpoint of the same architecture) is refused with a message naming both, and
`--overwrite` removes the old shards to start afresh. Rank `r` of `W` encodes dataset items `r, r + W, ...` in that
order and `ShardWriter` finds which of its shards are complete, so rerunning the same command after a crash or
`kill -9` redoes only the unfinished shards (the same number of processes and the same `--samples-per-shard`, data
and model flags are required; `--batch-size` and `--num-workers` may change). A rerun hashes the complete shards: one
that does not match its checksum (damaged on disk) is re-encoded, with the rank's later shards. Exact resume needs a
map-style dataset. With `--streaming` every rank reads the whole stream and keeps its own rows (`index % W == r`),
skipping those already in complete shards: exact only if the stream yields rows in the same order every time (true
for local files and HF streaming without shuffling), and the skipped rows are still downloaded; streaming uses at
most one DataLoader worker, which keeps the order.

At the end the main process writes `index.json` with the dataset-wide latent statistics (KL: per channel, from the
posterior moments; VQ: code usage) and, with `--write-scaling-factor`, writes them into the KL model's `config.json`,
where diffusers pipelines read them, in the convention of `--latent-convention`: `sd` (default; Stable Diffusion
1.x/2.x/XL pipelines, `latents = z * scaling_factor`): `scaling_factor` = 1 / sqrt(E[z^2]) and no `shift_factor`;
`sd3` (SD3 / Flux, `latents = (z - shift_factor) * scaling_factor`): `shift_factor` = mean, `scaling_factor` = 1 / std.
The shard readers apply the same convention. The per-channel mean/std stay in the manifest
only: SDXL-style pipelines combine `latents_mean`/`latents_std` *with* `scaling_factor`, so writing both would scale
twice.
"""

from __future__ import annotations

import argparse
import dataclasses

from ldtok.commands.data_args import RENAME as DATA_RENAME
from ldtok.commands.data_args import SHARED as DATA_SHARED
from ldtok.commands.data_args import add_data_arguments
from ldtok.config_cli import add_config_arguments
from ldtok.config_cli import config_from_args as _config_from_args
from ldtok.data import DataConfig
from ldtok.encoding import EncodeConfig, EncodeResult, encode_dataset
from ldtok.encoding.statistics import SCALING_KEYS

# the `DataConfig` fields `ldtok encode` has flags for: the shared data flags and the stored columns
DATA_ONLY = ("label_column", "caption_column", "on_bad_image")
DATA_FIELDS = (*DATA_SHARED, *DATA_ONLY)
# EncodeConfig's dotted `data.*` keys -> their flags (`data.source` -> `--data-source`, `data.split` -> `--split`)
RENAME = {f"data.{key}": DATA_RENAME.get(key, key.replace("_", "-")) for key in DATA_FIELDS}
ENCODING = tuple(f.name for f in dataclasses.fields(EncodeConfig) if f.name not in ("model", "out", "data"))
FLAGS = ("model", "out", *RENAME, *ENCODING)  # every EncodeConfig key that has a flag


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per `EncodeConfig` field (`data.*` as the data flags `ldtok eval` shares); defaults and help come
    from the dataclasses."""
    add_config_arguments(parser, EncodeConfig, only=("model", "out"))
    data = add_data_arguments(parser, split_default="train", split_help="split to encode", verb="encode")
    add_config_arguments(data, DataConfig, only=DATA_ONLY)
    add_config_arguments(parser.add_argument_group("encoding (EncodeConfig)"), EncodeConfig, only=ENCODING)


def config_from_args(args: argparse.Namespace) -> EncodeConfig:
    """The `EncodeConfig` the flags describe (one field per flag; the data flags as its `DataConfig`), validated as a
    YAML config is: a bad value is a one-line `ConfigError` naming the flag (exit code 2)."""
    return _config_from_args(EncodeConfig, args, only=FLAGS, rename=RENAME)


def summary_lines(result: EncodeResult) -> list[str]:
    """What `ldtok encode` prints about a finished run (main process)."""
    t = result.totals
    lines = [f"encoded {result.encoded} samples ({result.skipped} skipped) this run on {result.world_size} "
             f"process(es) in {result.seconds:.1f}s: {result.images_per_s:.1f} img/s; peak memory "
             f"{result.peak_memory_mib:.0f} MiB per process",
             f"{result.out_dir}: {t['num_samples']} samples, {t['num_skipped']} skipped, {t['num_shards']} shards, "
             f"{t['num_bytes'] / 2**20:.1f} MiB"]  # fmt: skip
    s = result.statistics
    if s and "scaling_factor" in s:
        shift = "none" if s["shift_factor"] is None else f"{s['shift_factor']:.5f}"
        lines.append(f"latent stats: mean {s['mean']:.5f}, std {s['std']:.5f}, rms {s['rms']:.5f} -> "
                     f"{s['convention']} convention: scaling_factor {s['scaling_factor']:.5f}, shift_factor {shift}")
    if result.scaling_written is not None:
        lines.append(f"wrote {', '.join(SCALING_KEYS)} into {result.model_dir / 'config.json'}")
    return lines


def run(args: argparse.Namespace) -> int:
    result = encode_dataset(config_from_args(args))
    if result.manifest is not None:  # the main process
        print("\n".join(summary_lines(result)))
    return 0

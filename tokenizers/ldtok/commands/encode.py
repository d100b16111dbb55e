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

from ldtok.commands.data_args import add_data_arguments
from ldtok.data import DataConfig
from ldtok.encoding import EncodeConfig, EncodeResult, encode_dataset
from ldtok.encoding.config import AUTOCAST_CHOICES, CROPS, LATENT_CONVENTIONS, STORED_DTYPES
from ldtok.encoding.statistics import SCALING_KEYS


def _default(name: str):
    """`EncodeConfig`'s default for a flag: defaults are stated once, in the dataclass."""
    return next(f.default for f in dataclasses.fields(EncodeConfig) if f.name == name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="tokenizer directory (AutoencoderKL, VQModel or VQVAE2)")
    parser.add_argument("--out", required=True, help="shard directory (created; a rerun resumes in it)")
    data = add_data_arguments(parser, split_default="train", split_help="split to encode", verb="encode")
    data.add_argument("--label-column", help="integer class column, stored as `label`")
    data.add_argument("--caption-column", help="text column, stored as captions")
    data.add_argument("--on-bad-image", choices=["skip", "error"], default=DataConfig.on_bad_image,
                      help="skip (record the id as skipped) or stop on an undecodable image")
    enc = parser.add_argument_group("encoding")
    enc.add_argument("--resolution", type=int, default=_default("resolution"),
                     help="side of the square images fed to the encoder")
    enc.add_argument("--crop", choices=CROPS, default=_default("crop"),
                     help="center: shorter side to R, then the center square; resize: the whole image squashed")
    enc.add_argument("--flip", action="store_true", help="also store the flipped image's latents as *_flip fields")
    enc.add_argument("--dtype", choices=sorted(STORED_DTYPES), default=_default("dtype"),
                     help="stored dtype of KL latents")
    enc.add_argument("--autocast", choices=AUTOCAST_CHOICES, default=_default("autocast"),
                     help="compute the encoder under autocast in this dtype (quantizers stay in fp32); auto: bf16 "
                          "where the device runs it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX), else no. "
                          "Latents then match fp32 up to bf16 rounding; `no` for bit-exact fp32 latents")
    enc.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=_default("channels_last"),
                     help="the model and the images in channels-last memory format (faster convolutions)")
    enc.add_argument("--compile", action="store_true",
                     help="torch.compile the encoder (a one-time cost that pays off on large datasets)")
    enc.add_argument("--batch-size", type=int, default=_default("batch_size"), help="images per forward, per process")
    enc.add_argument("--samples-per-shard", type=int, default=_default("samples_per_shard"),
                     help="items per shard; a multiple of --batch-size")
    enc.add_argument("--num-workers", type=int, default=_default("num_workers"), help="DataLoader workers per process")
    enc.add_argument("--write-scaling-factor", action="store_true",
                     help="KL: write the latent scale into the model's config.json (see --latent-convention)")
    enc.add_argument("--latent-convention", choices=LATENT_CONVENTIONS, default=_default("latent_convention"),
                     help="sd: scaling_factor = 1/sqrt(E[z^2]), no shift_factor (StableDiffusionPipeline: latents = "
                          "z * scaling_factor); sd3: shift_factor = mean, scaling_factor = 1/std (SD3/Flux: latents = "
                          "(z - shift_factor) * scaling_factor). index.json and the shard readers follow it")
    enc.add_argument("--overwrite", action="store_true",
                     help="remove the shards, parts and index.json already in --out (of any model) and start afresh")
    enc.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> EncodeConfig:
    """The `EncodeConfig` the flags describe (one field per flag; the data flags as its `DataConfig`)."""
    data = DataConfig(
        source=args.data_source, path=args.data_path, name=args.data_name, subset=args.data_subset, split=args.split,
        image_column=args.image_column, label_column=args.label_column, caption_column=args.caption_column,
        streaming=args.streaming, max_samples=args.max_samples, cache_dir=args.cache_dir,
        on_bad_image=args.on_bad_image,
    )  # fmt: skip
    names = {f.name for f in dataclasses.fields(EncodeConfig)} - {"data"}
    return EncodeConfig(data=data, **{name: getattr(args, name) for name in names})


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

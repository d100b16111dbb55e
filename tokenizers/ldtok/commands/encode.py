"""Encode a dataset into latent shards with a trained tokenizer (KL-VAE, VQGAN or VQ-VAE-2).

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
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, Subset

from ldtok.commands.data_args import add_data_arguments, build_dataset_or_error, data_config_from_args
from ldtok.commands.encode_resume import check_existing_run, remove_encoded_files
from ldtok.errors import LdtokError
from ldtok.models.loading import checkpoint_model_dir
from ldtok.models.shapes import check_resolution
from ldtok.performance import bf16_supported, memory_format

STORED_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
AUTOCAST_DTYPES = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}
AUTOCAST_CHOICES = ("auto", *AUTOCAST_DTYPES)
SCALING_KEYS = ("scaling_factor", "shift_factor")
LATENT_CONVENTIONS = ("sd", "sd3")


class ResizeTransform:
    """`--crop resize`: squash the whole image to `R x R` (bicubic, antialiased; aspect ratio not kept), to [-1, 1].

    Args:
        resolution (`int`): output side `R`.
    """

    def __init__(self, *, resolution: int):
        assert resolution > 0, f"resolution must be positive, got {resolution}"
        self.resolution = resolution

    def __call__(self, image: Image.Image) -> Tensor:
        image = image.resize((self.resolution, self.resolution), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # (R, R, 3) -> (3, R, R)
        return x.float().div_(127.5).sub_(1.0)


class RankStream(IterableDataset):
    """A streaming dataset's rows `index % world_size == rank`, from position `start` of that sequence on.

    Ids are `"<split>/<row index>"` (or path / key based, as `IterableImageDataset` gives them with one worker).
    Rows before `start` and other ranks' rows are read but not decoded.

    Args:
        dataset (`IterableImageDataset`): from `build_dataset` with `streaming=True`.
        rank (`int`), world_size (`int`): this process's split.
        start (`int`): positions of the rank's sequence already encoded (`ShardWriter.items_done`).
    """

    def __init__(self, *, dataset, rank: int, world_size: int, start: int):
        self.dataset, self.rank, self.world_size, self.start = dataset, rank, world_size, start

    def __iter__(self):
        first = self.rank + self.start * self.world_size
        for index, row in enumerate(self.dataset.hf_dataset):
            if index >= first and index % self.world_size == self.rank:
                yield self.dataset.processor(row, row_id=f"{self.dataset.split}/{index}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="tokenizer directory (AutoencoderKL, VQModel or VQVAE2)")
    parser.add_argument("--out", required=True, help="shard directory (created; a rerun resumes in it)")
    data = add_data_arguments(parser, split_default="train", split_help="split to encode", verb="encode")
    data.add_argument("--label-column", help="integer class column, stored as `label`")
    data.add_argument("--caption-column", help="text column, stored as captions")
    data.add_argument("--on-bad-image", choices=["skip", "error"], default="skip",
                      help="skip (record the id as skipped) or stop on an undecodable image")
    enc = parser.add_argument_group("encoding")
    enc.add_argument("--resolution", type=int, default=256, help="side of the square images fed to the encoder")
    enc.add_argument("--crop", choices=["center", "resize"], default="center",
                     help="center: shorter side to R, then the center square; resize: the whole image squashed")
    enc.add_argument("--flip", action="store_true", help="also store the flipped image's latents as *_flip fields")
    enc.add_argument("--dtype", choices=sorted(STORED_DTYPES), default="fp32", help="stored dtype of KL latents")
    enc.add_argument("--autocast", choices=AUTOCAST_CHOICES, default="auto",
                     help="compute the encoder under autocast in this dtype (quantizers stay in fp32); auto: bf16 "
                          "where the device runs it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX), else no. "
                          "Latents then match fp32 up to bf16 rounding; `no` for bit-exact fp32 latents")
    enc.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                     help="the model and the images in channels-last memory format (faster convolutions)")
    enc.add_argument("--compile", action="store_true",
                     help="torch.compile the encoder (a one-time cost that pays off on large datasets)")
    enc.add_argument("--batch-size", type=int, default=32, help="images per forward, per process")
    enc.add_argument("--samples-per-shard", type=int, default=1024,
                     help="items per shard; a multiple of --batch-size")
    enc.add_argument("--num-workers", type=int, default=2, help="DataLoader workers per process")
    enc.add_argument("--write-scaling-factor", action="store_true",
                     help="KL: write the latent scale into the model's config.json (see --latent-convention)")
    enc.add_argument("--latent-convention", choices=LATENT_CONVENTIONS, default="sd",
                     help="sd: scaling_factor = 1/sqrt(E[z^2]), no shift_factor (StableDiffusionPipeline: latents = "
                          "z * scaling_factor); sd3: shift_factor = mean, scaling_factor = 1/std (SD3/Flux: latents = "
                          "(z - shift_factor) * scaling_factor). index.json and the shard readers follow it")
    enc.add_argument("--overwrite", action="store_true",
                     help="remove the shards, parts and index.json already in --out (of any model) and start afresh")
    enc.add_argument("--no-progress", action="store_true", help="no progress bar")


def describe_dataset(config, num_items: int | None) -> dict:
    """What identifies the encoded data; stored in every shard, so a resume on other data is refused."""
    path = config.path
    if config.source == "folder" and path:
        path = os.path.abspath(os.path.expanduser(path))
    return {
        "source": config.source, "path": path, "name": config.name, "subset": config.subset, "split": config.split,
        "image_column": config.image_column, "label_column": config.label_column,
        "caption_column": config.caption_column, "streaming": config.streaming, "max_samples": config.max_samples,
        "num_items": num_items,
    }  # fmt: skip


@torch.inference_mode()
def encode_batch(model, x: Tensor, *, flip: bool, dtype: torch.dtype) -> dict[str, Tensor]:
    """The shard fields of a batch of images `x` `(B, 3, R, R)` in [-1, 1].

    Returns:
        KL: `mean`, `logvar` `(B, C, h, w)` in `dtype`; VQ: `indices` `(B, h, w)` int64; VQ-VAE-2: `indices_top`
        `(B, h_t, w_t)`, `indices_bottom` `(B, h_b, w_b)` int64; with `flip`, the same names suffixed `_flip` for
        `x.flip(-1)`.
    """
    views = {"": x, "_flip": x.flip(-1)} if flip else {"": x}  # flip(-1): (B, 3, H, W) mirrored along W
    out = {}
    for suffix, view in views.items():
        if model.kind == "kl":
            posterior = model.encode_posterior(view)
            out["mean" + suffix] = posterior.mean.to(dtype)  # (B, C, h, w)
            out["logvar" + suffix] = posterior.logvar.to(dtype)  # clamped to [-30, 20] by diffusers
        elif model.kind == "vq":
            out["indices" + suffix] = model.encode_to_indices(view)  # (B, h, w)
        else:
            levels = model.encode_to_indices(view)
            out["indices_top" + suffix], out["indices_bottom" + suffix] = levels.top, levels.bottom
    return out


def code_usage(out_dir: Path, *, world_size: int, fields: list[str], codebook_sizes: list[int]) -> dict:
    """Code usage of the stored VQ indices (non-flip fields), read back one shard at a time.

    Returns:
        `dict` field name -> `{"codebook_size", "codes_used", "usage", "perplexity", "count"}`.
    """
    from safetensors import safe_open

    from ldtok.shards import ShardWriter

    counts = {name: torch.zeros(K, dtype=torch.int64) for name, K in zip(fields, codebook_sizes)}
    for rank in range(world_size):
        for rec in ShardWriter.completed(out_dir, rank).shards:
            if rec.num_samples == 0:
                continue
            with safe_open(str(out_dir / rec.file), framework="pt") as f:
                for name in fields:
                    counts[name] += torch.bincount(f.get_tensor(name).long().flatten(), minlength=len(counts[name]))
    result = {}
    for name, c in counts.items():
        total = int(c.sum())
        p = c.double() / max(total, 1)
        entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
        result[name] = {
            "codebook_size": len(c),
            "codes_used": int((c > 0).sum()),
            "usage": int((c > 0).sum()) / len(c),
            "perplexity": math.exp(entropy),
            "count": total,
        }
    return result


def write_latent_statistics(model_dir: Path, stats: dict) -> dict:
    """Write the manifest's KL scale into a diffusers `AutoencoderKL` `config.json`, atomically.

    Writes `scaling_factor` and `shift_factor` as `stats` states them for its `convention` (`ChannelStats.result`):
    `sd`: 1 / RMS and `None` (diffusers' default, which SD pipelines ignore anyway); `sd3`: 1 / std and the mean.
    Returns the values written.
    """
    from ldtok.atomic import write_bytes_atomic

    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    if config.get("_class_name") != "AutoencoderKL":
        raise LdtokError(f"{path} is a {config.get('_class_name')!r} config, not AutoencoderKL's")
    values = {key: stats[key] for key in SCALING_KEYS}
    config.update(values)
    write_bytes_atomic(path, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())  # diffusers' format
    return values


def check_finite(fields: dict[str, Tensor], ids: list[str], *, model_dir: Path) -> None:
    """Refuse to store non-finite latents (a diverged model): nothing of the batch is written."""
    for name, t in fields.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            rows = (~torch.isfinite(t)).flatten(1).any(dim=1)  # (n,)
            raise LdtokError(f"{model_dir} gives non-finite {name} (NaN/inf) for {int(rows.sum())} of {len(ids)} "
                             f"images of this batch (first: {ids[int(rows.nonzero()[0])]!r}): the model diverged? "
                             "nothing of this batch was written")


def _all_reduce(values: list[float], *, op: str, device: torch.device) -> list[float]:
    """Sum or max of per-rank numbers over all ranks (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def prepare_encoder(model, args: argparse.Namespace, device: torch.device):
    """`(autocast context, encode function)` for `--autocast`, `--channels-last`, `--compile` and `--flip`."""
    precision = args.autocast if args.autocast != "auto" else auto_precision(device)
    dtype = AUTOCAST_DTYPES[precision]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    model.to(memory_format=memory_format(args.channels_last))
    stored = STORED_DTYPES[args.dtype]

    def encoder(x: Tensor) -> dict[str, Tensor]:
        return encode_batch(model, x, flip=args.flip, dtype=stored)

    return autocast, torch.compile(encoder) if args.compile else encoder


def auto_precision(device: torch.device) -> str:
    """`--autocast auto`: bf16 where `device` runs it natively, else none."""
    return "bf16" if bf16_supported(device) else "no"


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    from tqdm.auto import tqdm

    from ldtok.data import collate
    from ldtok.meters import peak_memory_mib
    from ldtok.models import load_tokenizer, tokenizer_in_channels, tokenizer_sha256
    from ldtok.shards import KIND_FIELDS, ShardWriter, write_manifest
    from ldtok.shards.background import BackgroundWriter

    B, S = args.batch_size, args.samples_per_shard
    if B < 1 or S < 1 or S % B:
        raise LdtokError(f"--samples-per-shard ({S}) must be a positive multiple of --batch-size ({B})", exit_code=2)
    # accelerate's PartialState() ignores ACCELERATE_USE_CPU and, without CUDA, sees torchrun's ranks as one process
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
    rank, world_size, device = state.process_index, state.num_processes, state.device
    out_dir, model_dir = Path(args.out), checkpoint_model_dir(Path(args.model).expanduser().resolve())

    model = load_tokenizer(str(model_dir), device=device)
    model_sha256 = tokenizer_sha256(model_dir)
    kind = model.kind
    check_resolution(args.resolution, model.downsample_factor)
    if args.write_scaling_factor and kind != "kl":
        raise LdtokError("--write-scaling-factor needs a KL model (VQ models store indices, which are not scaled)",
                         exit_code=2)
    stored_dtype = STORED_DTYPES[args.dtype]

    config = data_config_from_args(
        args, split=args.split, resolution=args.resolution, label_column=args.label_column,
        caption_column=args.caption_column, on_bad_image=args.on_bad_image, channels=tokenizer_in_channels(model),
    )
    dataset = build_dataset_or_error(config)
    if args.crop == "resize":  # same decoding, ids and columns; only the pixel pipeline differs
        dataset.processor.transform = ResizeTransform(resolution=args.resolution)
    num_items = None if args.streaming else len(dataset)

    transforms = {"resolution": args.resolution, "crop": args.crop, "resample": "bicubic", "range": "[-1, 1]",
                  "flip_fields": args.flip}  # fmt: skip
    metadata = {
        "model_config_sha256": model.config_sha256(),
        "model_sha256": model_sha256,
        "model_kind": kind,
        "resolution": str(args.resolution),
        "transforms": json.dumps(transforms, sort_keys=True),
        "dataset": json.dumps(describe_dataset(config, num_items), sort_keys=True),
    }
    codebook_size = None
    if kind == "kl":
        metadata["dtype"] = str(stored_dtype).removeprefix("torch.")
    else:
        codebook_size = max(model.codebook_sizes)
        metadata["codebook_sizes"] = json.dumps(list(model.codebook_sizes))

    if args.overwrite:
        if state.is_main_process and remove_encoded_files(out_dir):
            print(f"--overwrite: removed the shards already in {out_dir}", file=sys.stderr)
        state.wait_for_everyone()
    check_existing_run(out_dir, world_size=world_size, samples_per_shard=S, model_sha256=model_sha256,
                       model_path=str(model_dir))
    try:
        writer = ShardWriter(out_dir, kind=kind, samples_per_shard=S, metadata=metadata, rank=rank,
                             world_size=world_size, codebook_size=codebook_size,
                             provenance={"model_path": str(model_dir)})  # fmt: skip
    except (ValueError, RuntimeError) as e:  # other data / transforms, or a state no crash produces
        raise LdtokError(f"{e}; pass --overwrite to start afresh, or use a new --out") from None
    for problem in writer.resume_state.problems:
        print(f"repairing rank {rank}: {problem}", file=sys.stderr)
    start = writer.items_done
    if args.streaming:
        source, total = RankStream(dataset=dataset, rank=rank, world_size=world_size, start=start), None
        num_workers = min(args.num_workers, 1)  # HF splits a stream between workers: more than one breaks the order
    else:
        items = ShardWriter.items_for_rank(len(dataset), rank=rank, world_size=world_size, start=start)
        source, total, num_workers = Subset(dataset, items), len(items), args.num_workers
    if writer.finished:
        total = 0
    loader = DataLoader(source, batch_size=B, shuffle=False, num_workers=num_workers, collate_fn=collate,
                        pin_memory=device.type == "cuda", prefetch_factor=4 if num_workers else None)  # fmt: skip
    autocast, encoder = prepare_encoder(model, args, device)

    if state.is_main_process and start:
        print(f"resuming: rank 0 has {len(writer.records)} complete shards ({start} items)", file=sys.stderr)
    bar = tqdm(total=total, unit="img", desc=f"encode (rank 0 of {world_size})", dynamic_ncols=True,
               disable=args.no_progress or not state.is_main_process)  # fmt: skip
    encoded = skipped = 0
    t0 = time.perf_counter()
    with BackgroundWriter(writer) as sink:  # the disk work overlaps the next batches' encoding
        if not writer.finished:
            for batch in loader:
                n = len(batch["id"])
                fields: dict[str, Tensor] = {}
                if n:
                    x = batch["pixel_values"].to(device, non_blocking=True, memory_format=memory_format(
                        args.channels_last))  # (n, 3, R, R)
                    # pad short batches (skipped items, a rank's last batch) to B rows: kernels then always see the
                    # same shape, and a sample's latents do not depend on the number of processes
                    x = torch.cat([x, x.new_zeros(B - n, *x.shape[1:])]) if n < B else x  # (B, 3, R, R)
                    with autocast:
                        fields = encoder(x)
                    fields = {name: t[:n] for name, t in fields.items()}
                    check_finite(fields, batch["id"], model_dir=model_dir)
                    if "label" in batch:
                        fields["label"] = batch["label"]
                captions = batch.get("caption") if n and config.caption_column else None
                sink.add(fields, batch["id"], captions, skipped=batch["skipped"])
                encoded, skipped = encoded + n, skipped + len(batch["skipped"])
                bar.update(n + len(batch["skipped"]))
    bar.close()
    seconds = time.perf_counter() - t0

    totals = _all_reduce([encoded, skipped], op="sum", device=device)
    slowest, peak = _all_reduce([seconds, peak_memory_mib(device)], op="max", device=device)
    state.wait_for_everyone()
    if not state.is_main_process:
        return 0

    stats = None
    if kind != "kl":
        names = list(KIND_FIELDS[kind])
        stats = {"code_usage": code_usage(out_dir, world_size=world_size, fields=names,
                                          codebook_sizes=list(model.codebook_sizes))}  # fmt: skip
    class_name = json.loads((model_dir / "config.json").read_text()).get("_class_name")
    model_info = {"path": str(model_dir), "kind": kind, "class": class_name, "sha256": model_sha256,
                  "config_sha256": metadata["model_config_sha256"]}  # fmt: skip
    extra = {"dataset": json.loads(metadata["dataset"]), "transforms": transforms,
             "arguments": {k: v for k, v in vars(args).items() if k not in ("func", "command")}}
    manifest = write_manifest(out_dir, model=model_info, stats=stats, extra=extra,
                              latent_convention=args.latent_convention)

    rate = totals[0] / slowest if slowest > 0 else 0.0
    t = manifest["totals"]
    print(f"encoded {int(totals[0])} samples ({int(totals[1])} skipped) this run on {world_size} process(es) in "
          f"{slowest:.1f}s: {rate:.1f} img/s; peak memory {peak:.0f} MiB per process")  # fmt: skip
    print(f"{out_dir}: {t['num_samples']} samples, {t['num_skipped']} skipped, {t['num_shards']} shards, "
          f"{t['num_bytes'] / 2**20:.1f} MiB")
    if kind == "kl" and manifest["stats"]:
        s = manifest["stats"]
        shift = "none" if s["shift_factor"] is None else f"{s['shift_factor']:.5f}"
        print(f"latent stats: mean {s['mean']:.5f}, std {s['std']:.5f}, rms {s['rms']:.5f} -> {s['convention']} "
              f"convention: scaling_factor {s['scaling_factor']:.5f}, shift_factor {shift}")
    if args.write_scaling_factor:
        if not manifest["stats"]:
            raise LdtokError("no latent statistics (fewer than 2 latent values?): nothing to write")
        write_latent_statistics(model_dir, manifest["stats"])
        print(f"wrote {', '.join(SCALING_KEYS)} into {model_dir / 'config.json'}")
    return 0

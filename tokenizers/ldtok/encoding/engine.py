"""`encode_dataset`: the encode engine (the `ldtok encode` command, the tests and the benchmark call it).

Rank `r` of `W` (under `accelerate launch` or `torchrun`) encodes dataset items `r, r + W, ...` into its own shards
(`ldtok.shards.ShardWriter`), resuming after its complete shards; the main process then merges the ranks into
`index.json` with the dataset-wide statistics. Every shard records the model's `tokenizer_sha256`; a directory of
another model is refused (`resume.check_existing_run`) unless `overwrite`. The tokenizer says what is stored
(`Tokenizer.encode_fields`, `shard_fields`, `latent`): nothing here switches on the model's family.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from .. import distributed
from ..errors import LdtokError
from ..performance import bf16_supported, memory_format
from .config import AUTOCAST_DTYPES, EncodeConfig, EncodeResult
from .resume import check_existing_run, remove_encoded_files
from .statistics import check_finite, code_usage, write_latent_statistics
from .transforms import RankStream, ResizeTransform


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


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


def auto_precision(device: torch.device) -> str:
    """`autocast="auto"`: bf16 where `device` runs it natively, else none."""
    return "bf16" if bf16_supported(device) else "no"


def prepare_encoder(model, config: EncodeConfig, device: torch.device):
    """`(autocast context, encode function)` for `autocast`, `channels_last`, `compile` and `flip`.

    The encode function maps images `(B, C, R, R)` to the tokenizer's shard fields (`Tokenizer.encode_fields`), with
    `flip` also those of `x.flip(-1)` (mirrored along W), suffixed `_flip`.
    """
    precision = config.autocast if config.autocast != "auto" else auto_precision(device)
    dtype = AUTOCAST_DTYPES[precision]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    model.to(memory_format=memory_format(config.channels_last))
    stored = config.stored_dtype

    def encoder(x: Tensor) -> dict[str, Tensor]:
        return encode_views(model, x, flip=config.flip, dtype=stored)

    return autocast, torch.compile(encoder) if config.compile else encoder


@torch.inference_mode()
def encode_views(model, x: Tensor, *, flip: bool, dtype: torch.dtype) -> dict[str, Tensor]:
    """The shard fields of a batch `x` `(B, C, R, R)` in [-1, 1] (`model.encode_fields`), and with `flip` those of
    `x.flip(-1)` (mirrored along W) suffixed `_flip`."""
    views = {"": x, "_flip": x.flip(-1)} if flip else {"": x}
    return {name + suffix: t for suffix, view in views.items()
            for name, t in model.encode_fields(view, dtype=dtype).items()}


def _process_state():
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # accelerate's PartialState() ignores ACCELERATE_USE_CPU and, without CUDA, sees torchrun's ranks as one process
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


def _metadata(model, model_sha256: str, config: EncodeConfig, data_config, num_items: int | None) -> dict[str, str]:
    """The run-wide text metadata every shard stores (identical on resume)."""
    transforms = {"resolution": config.resolution, "crop": config.crop, "resample": "bicubic", "range": "[-1, 1]",
                  "flip_fields": config.flip}  # fmt: skip
    metadata = {
        "model_config_sha256": model.config_sha256(),
        "model_sha256": model_sha256,
        "model_kind": model.latent.name,
        "resolution": str(config.resolution),
        "transforms": json.dumps(transforms, sort_keys=True),
        "dataset": json.dumps(describe_dataset(data_config, num_items), sort_keys=True),
    }
    if model.latent.gaussian:
        metadata["dtype"] = str(config.stored_dtype).removeprefix("torch.")
    else:
        metadata["codebook_sizes"] = json.dumps(list(model.codebook_sizes))
    return metadata


def _open_writer(config: EncodeConfig, state, model, model_dir: Path, metadata: dict, log):
    """The rank's `ShardWriter`, after `overwrite` and the check that `out` holds no other model's shards."""
    from ..shards import ShardWriter

    out_dir = Path(config.out)
    if config.overwrite:
        if state.is_main_process and remove_encoded_files(out_dir):
            log(f"--overwrite: removed the shards already in {out_dir}")
        state.wait_for_everyone()
    check_existing_run(out_dir, world_size=state.num_processes, samples_per_shard=config.samples_per_shard,
                       model_sha256=metadata["model_sha256"], model_path=str(model_dir))
    codebook_size = None if model.latent.gaussian else max(model.codebook_sizes)
    try:
        writer = ShardWriter(out_dir, kind=model.latent.name, samples_per_shard=config.samples_per_shard,
                             metadata=metadata, rank=state.process_index, world_size=state.num_processes,
                             codebook_size=codebook_size, num_stages=model.latent.num_stages,
                             provenance={"model_path": str(model_dir)})  # fmt: skip
    except (ValueError, RuntimeError) as e:  # other data / transforms, or a state no crash produces
        raise LdtokError(f"{e}; pass --overwrite to start afresh, or use a new --out") from None
    for problem in writer.resume_state.problems:
        log(f"repairing rank {state.process_index}: {problem}")
    return writer


def _loader(config: EncodeConfig, dataset, writer, state) -> tuple[DataLoader, int | None]:
    """The rank's DataLoader over the items it has not encoded yet, and their number (`None`: streaming)."""
    from ..data import collate
    from ..shards import ShardWriter

    rank, world_size, start = state.process_index, state.num_processes, writer.items_done
    if config.data.streaming:
        source, total = RankStream(dataset=dataset, rank=rank, world_size=world_size, start=start), None
        num_workers = min(config.num_workers, 1)  # HF splits a stream between workers: more than one breaks the order
    else:
        items = ShardWriter.items_for_rank(len(dataset), rank=rank, world_size=world_size, start=start)
        source, total, num_workers = Subset(dataset, items), len(items), config.num_workers
    if writer.finished:
        total = 0
    loader = DataLoader(source, batch_size=config.batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate, pin_memory=state.device.type == "cuda",
                        prefetch_factor=4 if num_workers else None)  # fmt: skip
    return loader, total


def _encode_loop(config: EncodeConfig, model, loader, writer, state, total, model_dir: Path) -> tuple[int, int, float]:
    """Encode every batch of `loader` into `writer` (disk work in a background thread); `(encoded, skipped, s)`."""
    from tqdm.auto import tqdm

    from ..shards.background import BackgroundWriter

    B, device = config.batch_size, state.device
    autocast, encoder = prepare_encoder(model, config, device)
    bar = tqdm(total=total, unit="img", desc=f"encode (rank 0 of {state.num_processes})", dynamic_ncols=True,
               disable=config.no_progress or not state.is_main_process)  # fmt: skip
    encoded = skipped = 0
    t0 = time.perf_counter()
    with BackgroundWriter(writer) as sink:  # the disk work overlaps the next batches' encoding
        for batch in [] if writer.finished else loader:
            n = len(batch["id"])
            fields: dict[str, Tensor] = {}
            if n:
                x = batch["pixel_values"].to(device, non_blocking=True,
                                             memory_format=memory_format(config.channels_last))  # (n, C, R, R)
                # pad short batches (skipped items, a rank's last batch) to B rows: kernels then always see the
                # same shape, and a sample's latents do not depend on the number of processes
                x = torch.cat([x, x.new_zeros(B - n, *x.shape[1:])]) if n < B else x  # (B, C, R, R)
                with autocast:
                    fields = encoder(x)
                fields = {name: t[:n] for name, t in fields.items()}
                check_finite(fields, batch["id"], model_dir=model_dir)
                if "label" in batch:
                    fields["label"] = batch["label"]
            captions = batch.get("caption") if n and config.data.caption_column else None
            sink.add(fields, batch["id"], captions, skipped=batch["skipped"])
            encoded, skipped = encoded + n, skipped + len(batch["skipped"])
            bar.update(n + len(batch["skipped"]))
    bar.close()
    return encoded, skipped, time.perf_counter() - t0


def _write_index(config: EncodeConfig, model, model_dir: Path, metadata: dict, data_config, world_size: int) -> dict:
    """Merge the ranks' parts into `index.json` (main process), with VQ code usage; returns the manifest."""
    from ..shards import write_manifest

    out_dir = Path(config.out)
    stats = None
    if not model.latent.gaussian:
        sizes = model.field_codebook_sizes  # per stored field: residual VQ's stages each count on their own
        stats = {"code_usage": code_usage(out_dir, world_size=world_size, fields=list(sizes),
                                          codebook_sizes=list(sizes.values()))}  # fmt: skip
    class_name = json.loads((model_dir / "config.json").read_text()).get("_class_name")
    # the model by a path relative to the shard directory (a moved pair still resolves) and the absolute path as a hint
    model_info = {"path": str(model_dir), "relative_path": os.path.relpath(model_dir, out_dir.resolve()),
                  "kind": model.latent.name, "family": model.family, "class": class_name,
                  "sha256": metadata["model_sha256"], "config_sha256": metadata["model_config_sha256"]}  # fmt: skip
    extra = {"dataset": json.loads(metadata["dataset"]),
             "transforms": json.loads(metadata["transforms"]), "arguments": config_arguments(config)}
    return write_manifest(out_dir, model=model_info, stats=stats, extra=extra,
                          latent_convention=config.latent_convention)


def config_arguments(config: EncodeConfig) -> dict:
    """The config as the flat `ldtok encode` arguments it mirrors (`data.source` as `data_source`, ...)."""
    flat = {k: v for k, v in dataclasses.asdict(config).items() if k != "data"}
    data = config.data
    flat.update(data_source=data.source, data_path=data.path, data_name=data.name, data_subset=data.subset,
                split=data.split, image_column=data.image_column, streaming=data.streaming,
                max_samples=data.max_samples, cache_dir=data.cache_dir, label_column=data.label_column,
                caption_column=data.caption_column, on_bad_image=data.on_bad_image)
    return flat


def _build_dataset(config: EncodeConfig, model):
    from ..commands.data_args import build_dataset_or_error
    from ..models import tokenizer_in_channels

    data_config = dataclasses.replace(config.data, resolution=config.resolution, crop="center", flip=False,
                                      num_workers=config.num_workers, channels=tokenizer_in_channels(model))
    dataset = build_dataset_or_error(data_config)
    if config.crop == "resize":  # same decoding, ids and columns; only the pixel pipeline differs
        dataset.processor.transform = ResizeTransform(resolution=config.resolution)
    return data_config, dataset


def encode_dataset(config: EncodeConfig, *, log: Callable[[str], None] = _stderr) -> EncodeResult:
    """Encode `config.data` with `config.model` into resumable latent shards in `config.out` (see the module
    docstring); every rank of a launched run calls it. `log` receives the notes (resuming, repairs, `--overwrite`).

    Raises:
        `LdtokError` (one line) for what a user can cause: a missing model or data, a model of another kind or
        resolution, another model's shards in `out`, non-finite latents.
    """
    from ..meters import peak_memory_mib
    from ..models import load_tokenizer, tokenizer_sha256
    from ..models.loading import checkpoint_model_dir
    from ..models.shapes import check_resolution

    state = _process_state()
    model_dir = checkpoint_model_dir(Path(config.model).expanduser().resolve())
    model = load_tokenizer(str(model_dir), device=state.device)
    latent = model.latent  # a family without a shard format stops here
    check_resolution(config.resolution, model.downsample_factor)
    for flag, on in (("--write-scaling-factor", config.write_scaling_factor),
                     ("--write-latent-stats", config.write_latent_stats)):
        if on and not latent.gaussian:
            raise LdtokError(f"{flag} needs a KL model (VQ models store indices, which are not scaled)", exit_code=2)
    data_config, dataset = _build_dataset(config, model)
    num_items = None if data_config.streaming else len(dataset)
    metadata = _metadata(model, tokenizer_sha256(model_dir), config, data_config, num_items)
    writer = _open_writer(config, state, model, model_dir, metadata, log)
    start = writer.items_done
    loader, total = _loader(config, dataset, writer, state)
    if state.is_main_process and start:
        log(f"resuming: rank 0 has {len(writer.records)} complete shards ({start} items)")
    encoded, skipped, seconds = _encode_loop(config, model, loader, writer, state, total, model_dir)

    totals = distributed.all_reduce_values([encoded, skipped], op="sum", device=state.device)
    slowest, peak = distributed.all_reduce_values([seconds, peak_memory_mib(state.device)], op="max",
                                                  device=state.device)
    state.wait_for_everyone()
    result = EncodeResult(out_dir=Path(config.out), model_dir=model_dir, kind=latent.name, encoded=int(totals[0]),
                          skipped=int(totals[1]), seconds=slowest, images_per_s=totals[0] / slowest if slowest else 0.0,
                          peak_memory_mib=peak, world_size=state.num_processes, resumed_items=start)
    if not state.is_main_process:
        return result
    result.manifest = _write_index(config, model, model_dir, metadata, data_config, state.num_processes)
    if config.write_scaling_factor or config.write_latent_stats:
        if not result.manifest["stats"]:
            raise LdtokError("no latent statistics (fewer than 2 latent values?): nothing to write")
        result.scaling_written = write_latent_statistics(model_dir, result.manifest["stats"],
                                                         per_channel=config.write_latent_stats)
    return result

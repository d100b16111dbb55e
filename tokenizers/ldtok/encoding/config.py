"""`EncodeConfig`, what `encode_dataset` does (one field per `ldtok encode` flag), and `EncodeResult`, what it did."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ..config import check_choice, check_range, invalid
from ..data import DataConfig

STORED_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
AUTOCAST_DTYPES = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}
AUTOCAST_CHOICES = ("auto", *AUTOCAST_DTYPES)
CROPS = ("center", "resize")
LATENT_CONVENTIONS = ("sd", "sd3")


@dataclass
class EncodeConfig:
    """What `ldtok.encoding.encode_dataset` encodes, how, and where; each field is one `ldtok encode` flag
    (`--batch-size` is `batch_size`, `data.source` is `--data-source`, ...).

    Args:
        model (`str`): tokenizer directory (`AutoencoderKL`, `VQModel`, `QuantizedAutoencoder` or `VQVAE2`), or a
            training checkpoint holding a `diffusers/` export.
        out (`str`): shard directory, created if missing (a rerun resumes in it).
        data (`DataConfig`): the dataset (`source`, `path`, `name`, `subset`, `split` (defaults to `"train"`),
            `image_column`, `label_column` (stored as `label`), `caption_column` (stored as captions), `streaming`,
            `max_samples`, `cache_dir`, `on_bad_image`: `skip` records the id as skipped, `error` stops). Its
            `resolution`, `crop`, `flip`, `num_workers` and `channels` are set from this config and the model.
        resolution (`int`, defaults to 256): side of the square images fed to the encoder.
        crop (`"center"` or `"resize"`, defaults to `"center"`): center (the shorter side to R, then the center
            square) or resize (the whole image squashed to R x R).
        flip (`bool`, defaults to `False`): also store the flipped image's latents as `*_flip` fields.
        dtype (`"fp16"`, `"bf16"` or `"fp32"`, defaults to `"fp32"`): stored dtype of KL latents.
        autocast (`"auto"`, `"no"`, `"fp16"` or `"bf16"`, defaults to `"auto"`): compute the encoder under autocast in
            this dtype, quantizers staying in fp32 (auto: bf16 where the device runs it natively, CUDA with bf16 or
            CPUs with AVX512-BF16/AMX, else no). Latents then match fp32 up to bf16 rounding; `no` for bit-exact
            fp32 latents.
        channels_last (`bool`, defaults to `True`): the model and the images in channels-last memory format.
        compile (`bool`, defaults to `False`): `torch.compile` the encoder (pays off on large datasets).
        batch_size (`int`, defaults to 32): images per forward, per process.
        samples_per_shard (`int`, defaults to 1024): items per shard, a multiple of `batch_size`.
        num_workers (`int`, defaults to 2): DataLoader workers per process (streaming: at most 1, to keep the order).
        write_scaling_factor (`bool`, defaults to `False`): KL: write the latent scale into the model's `config.json`
            (see `latent_convention`).
        latent_convention (`"sd"` or `"sd3"`, defaults to `"sd"`): the scale written by `write_scaling_factor`, sd
            (Stable Diffusion: `scaling_factor = 1/sqrt(E[z^2])`, no `shift_factor`) or sd3 (SD3 / Flux:
            `shift_factor` = mean, `scaling_factor` = 1/std). `index.json` and the shard readers follow it.
        write_latent_stats (`bool`, defaults to `False`): KL: as `write_scaling_factor`, and also the per-channel
            `latents_mean` / `latents_std` (lists of length C, over the data) into the model's `config.json`, for
            pipelines that normalize each channel (SDXL's decode: `latents * latents_std / scaling_factor +
            latents_mean`); leave it off for a prior trained on `z * scaling_factor` alone.
        overwrite (`bool`, defaults to `False`): remove the shards, parts and `index.json` already in `out` (of any
            model) and start afresh.
        no_progress (`bool`, defaults to `False`): no progress bar.
    """

    model: str
    out: str
    data: DataConfig = field(default_factory=DataConfig)
    resolution: int = 256
    crop: Literal["center", "resize"] = "center"
    flip: bool = False
    dtype: Literal["fp16", "bf16", "fp32"] = "fp32"
    autocast: Literal["auto", "no", "fp16", "bf16"] = "auto"
    channels_last: bool = True
    compile: bool = False
    batch_size: int = 32
    samples_per_shard: int = 1024
    num_workers: int = 2
    write_scaling_factor: bool = False
    latent_convention: Literal["sd", "sd3"] = "sd"
    write_latent_stats: bool = False
    overwrite: bool = False
    no_progress: bool = False

    def __post_init__(self):
        check_choice(self, "crop", CROPS)
        check_choice(self, "dtype", sorted(STORED_DTYPES))
        check_choice(self, "autocast", AUTOCAST_CHOICES)
        check_choice(self, "latent_convention", LATENT_CONVENTIONS)
        check_range(self, "resolution", gt=0)
        check_range(self, "num_workers", ge=0)
        check_range(self, "batch_size", gt=0)
        check_range(self, "samples_per_shard", gt=0)
        if self.samples_per_shard % self.batch_size:
            raise invalid("samples_per_shard", f"must be a positive multiple of --batch-size ({self.batch_size}), "
                                               f"got {self.samples_per_shard}")

    @property
    def stored_dtype(self) -> torch.dtype:
        return STORED_DTYPES[self.dtype]


@dataclass
class EncodeResult:
    """What one `encode_dataset` call did (identical on every rank, except `manifest`: the main process's only).

    Args:
        out_dir (`Path`): the shard directory.
        model_dir (`Path`): the model directory used (a checkpoint resolved to its `diffusers/` export).
        kind (`str`): the latent kind stored (`"kl"`, `"vq"`, `"vqvae2"`).
        encoded (`int`), skipped (`int`): samples encoded and items skipped (undecodable) by this run, all ranks.
        seconds (`float`): the slowest rank's encoding loop (reading, encoding, writing; not the start-up).
        images_per_s (`float`): `encoded / seconds`.
        peak_memory_mib (`float`): the largest rank's peak memory (CUDA allocator, else resident set size).
        world_size (`int`): processes.
        resumed_items (`int`): items of rank 0's sequence already in complete shards when the run started.
        manifest (`dict`, *optional*): `index.json` as written (main process; `None` on the others).
        scaling_written (`dict`, *optional*): `scaling_factor` / `shift_factor` (and, with `write_latent_stats`,
            `latents_mean` / `latents_std`) written into the model's config.
    """

    out_dir: Path
    model_dir: Path
    kind: str
    encoded: int
    skipped: int
    seconds: float
    images_per_s: float
    peak_memory_mib: float
    world_size: int
    resumed_items: int = 0
    manifest: dict | None = None
    scaling_written: dict | None = None

    @property
    def totals(self) -> dict:
        """The directory's totals (`num_samples`, `num_skipped`, `num_shards`, `num_bytes`), main process only."""
        return self.manifest["totals"] if self.manifest else {}

    @property
    def statistics(self) -> dict | None:
        """KL: the dataset-wide latent statistics (`ChannelStats.result`); VQ: `{"code_usage": ...}`."""
        return self.manifest["stats"] if self.manifest else None

    @property
    def code_usage(self) -> dict | None:
        """VQ: per index field `{"codebook_size", "codes_used", "usage", "perplexity", "count"}`."""
        stats = self.statistics
        return stats.get("code_usage") if isinstance(stats, dict) else None

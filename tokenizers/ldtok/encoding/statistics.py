"""What the encode engine measures and checks about the latents: code usage of stored indices, the KL scale written
into a model's `config.json`, and the refusal to store non-finite latents."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor

from ..atomic import write_bytes_atomic
from ..errors import LdtokError

SCALING_KEYS = ("scaling_factor", "shift_factor")


def code_usage(out_dir: Path, *, world_size: int, fields: list[str], codebook_sizes: list[int]) -> dict:
    """Code usage of the stored VQ indices (non-flip fields), read back one shard at a time.

    Returns:
        `dict` field name -> `{"codebook_size", "codes_used", "usage", "perplexity", "count"}`.
    """
    from safetensors import safe_open

    from ..shards import ShardWriter

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


def write_latent_statistics(model_dir: Path, stats: dict, *, per_channel: bool = False) -> dict:
    """Write the manifest's KL scale into a diffusers `AutoencoderKL` `config.json`, atomically.

    Writes `scaling_factor` and `shift_factor` as `stats` states them for its `convention` (`ChannelStats.result`):
    `sd`: 1 / RMS and `None` (diffusers' default, which SD pipelines ignore anyway); `sd3`: 1 / std and the mean.
    `per_channel`: also `latents_mean` / `latents_std`, the per-channel mean and std of the unscaled latents
    (`AutoencoderKL`'s config keys, read by SDXL-family pipelines when both are set). Returns the values written.
    """
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    if config.get("_class_name") != "AutoencoderKL":
        raise LdtokError(f"{path} is a {config.get('_class_name')!r} config, not AutoencoderKL's")
    values = {key: stats[key] for key in SCALING_KEYS}
    if per_channel:
        values.update(latents_mean=list(stats["channel_mean"]), latents_std=list(stats["channel_std"]))
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

"""The end of an autoencoder run: the final export and `summary.json`, and the lines a training script prints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..atomic import write_text_atomic
from ..distributed import all_gather_objects
from ..meters import peak_memory_mib
from ..validation import calibrate_latent_scale
from .autoencoder import weights_checksum

if TYPE_CHECKING:
    from .config import RunConfig
    from .loop import TrainingLoop
    from .trainer import AutoencoderTask


def final_summary(loop: TrainingLoop, task: AutoencoderTask) -> dict:
    """Export `final/` (a plain diffusers directory, with latent statistics measured on the validation images), push
    it to the Hub if asked, write `summary.json` (main process) and return the summary (collective)."""
    accelerator, out, state, tc = loop.accelerator, loop.out, loop.state, task.config.train
    summary = {
        "steps": state["step"],
        "images_seen": state["images_seen"],
        "skipped_files": state["skipped_files"],
        "nonfinite_steps": state["nonfinite_steps"],
        "images_per_s": task.meter.rate(),
        "peak_memory_mib": peak_memory_mib(accelerator.device),
        "num_processes": accelerator.num_processes,
        # CPU kernels sum in an order that depends on the thread count: the same seed on 1 and 2 threads diverges
        # like two seeds (bit-exact reruns and resumes need the same count)
        "torch_threads": torch.get_num_threads(),
        "mixed_precision": accelerator.mixed_precision,
        "perceptual_precision": _perceptual_precision(task),
        "rank_checksums": all_gather_objects(weights_checksum(*task.weights.values())),
        "validation": task.last_val,
    }
    if loop.is_main:
        stats = calibrate_latent_scale(task.eval_model, task.val_images[: tc.val_images], device=accelerator.device)
        if stats:
            summary["latent_statistics"] = stats
        task.export(out / "final", stats)
        summary["final"] = str(out / "final")
        if tc.push_to_hub:
            from ..hub import push_to_hub

            summary["hub_url"] = push_to_hub(out / "final", tc.hub_repo_id).url
        if not (loop.finished and (out / "summary.json").is_file()):
            write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def _perceptual_precision(task: AutoencoderTask) -> str | None:
    """`"bf16"` / `"fp32"`: how the frozen perceptual backbone ran (`loss.perceptual_precision`); None without one."""
    perceptual = task.loss_fn.perceptual
    perceptual = getattr(perceptual, "_orig_mod", perceptual)  # torch.compile's wrapper
    if perceptual is None:
        return None
    return "bf16" if perceptual.backbone_dtype == torch.bfloat16 else "fp32"


def finished_summary(out: Path, state: dict, *, main: bool) -> dict:
    """What `train` returns for a run that had already finished: its `summary.json` (untouched), marked so."""
    if not main:
        return {"already_finished": True, "steps": state["step"]}
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    return {**summary, "already_finished": True, "steps": state["step"], "final": str(out / "final")}


def summary_lines(config: RunConfig, summary: dict, *, kind: str) -> list[str]:
    """What a training script prints at the end (nothing on the other ranks): where the final model is (`kind`, e.g.
    "diffusers AutoencoderKL"), its validation numbers and the throughput, or that the run had already finished."""
    if "final" not in summary:
        return []
    if summary.get("already_finished"):
        action = "exported its final model" if summary.get("exported") else "nothing to do"
        return [f"{config.output_dir}: the run already finished at step {summary['steps']} (train.max_steps="
                f"{config.train.max_steps}); {action}; final model: {summary['final']}"]
    val = summary["validation"]
    usage = "".join(f", {k} {100 * v:.1f}%" for k, v in val.items() if k.startswith("codebook_usage"))
    return [f"final model: {summary['final']}  ({kind})",
            f"validation PSNR {val['psnr']:.2f} dB, SSIM {val['ssim']:.4f}{usage}; reconstructions: {val.get('grid')}",
            f"training: {summary['images_per_s']:.1f} img/s, peak memory {summary['peak_memory_mib']:.0f} MiB"]


__all__ = ["final_summary", "finished_summary", "summary_lines"]

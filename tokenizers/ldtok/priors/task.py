"""What the two prior trainers share on top of the training loop: shard checks, the loader, the logged mean loss,
the sample grid and the rerun of a finished run."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..config import ConfigError
from ..distributed import all_reduce_, world_size
from ..images import make_grid, save_image_atomic
from ..run_checks import check_batch_fills
from ..shards import load_manifest
from ..shards.model_ref import ModelMismatchError, resolve_model
from ..training.loop import Task, TrainingLoop


def load_shards_manifest(shards: str, *, kinds: tuple[str, ...], needs: str, labels: str | None) -> dict:
    """The manifest of `shards`, checked to hold `kinds` shards (and labels, if `labels`: the key that asks for them).

    Raises:
        `ConfigError`: naming `shards` (or the key that asks for labels).
    """
    try:
        manifest = load_manifest(shards)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"shards: {e}") from None
    if manifest["kind"] not in kinds:
        raise ConfigError(f"shards: {shards} holds kind={manifest['kind']!r} shards; {needs}")
    if labels and "label" not in manifest["fields"]:
        raise ConfigError(f"{labels} is set but {shards} stores no labels")
    return manifest


def shard_model_dir(shards: str, explicit: str | None, *, key: str, what: str, manifest: dict) -> Path:
    """The model the shards were encoded with: `explicit` (the `key` setting) if given, else the one `index.json`
    records (by a path relative to the shard directory, then the absolute path), its weights hash checked.

    Raises:
        `ConfigError`: naming `key`: no `what` at the path, or a moved / changed model (`resolve_model`'s message).
    """
    from ..models.loading import checkpoint_model_dir

    if explicit is not None and not (checkpoint_model_dir(Path(explicit).expanduser()) / "config.json").is_file():
        raise ConfigError(f"{key}: no {what} at {explicit!r} (set {key}=DIR)")
    try:
        return resolve_model(shards, explicit, manifest=manifest)
    except ModelMismatchError as e:
        raise ConfigError(f"{key}: {e}") from None


def shard_loader(dataset, loop: TrainingLoop, *, batch_size: int, num_workers: int) -> DataLoader:
    """A shuffled loader of whole batches of `dataset` (checked to fill a batch on every process); the task prepares
    it with its models, before the per-rank seeding."""
    check_batch_fills(num_images=len(dataset), batch_size=batch_size, num_processes=loop.accelerator.num_processes,
                      what="samples")
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=num_workers)


def already_finished(loop: TrainingLoop) -> bool:
    """A finished run rerun (`summary.json` is written last, after the export): says so; nothing to do."""
    if not (loop.finished and (loop.out / "summary.json").is_file()):
        return False
    if loop.is_main:
        print(f"{loop.out}: the run already finished at step {loop.state['step']} (train.max_steps="
              f"{loop.tc.max_steps}); nothing to do; final model: {loop.out / 'final'}")
    loop.accelerator.end_training()
    return True


def train_to_end(loop: TrainingLoop, task: Task) -> bool:
    """Resume (if asked), train to `train.max_steps` and check `output_dir/final` can be written; `False` when the
    run had already finished (said so; nothing to do)."""
    loop.resume(task)
    if already_finished(loop):
        return False
    loop.fit(task, task.loader)
    loop.check_final(task, loop.out / "final")
    return True


def save_sample_grid(images: torch.Tensor, *, columns: int, path: Path) -> Path:
    """Images `(N, 3, H, W)` in [-1, 1] as a grid of `columns` per row, white tiles completing the last row."""
    N = images.shape[0]
    cols = min(columns, N)
    pad = (-N) % cols
    images = torch.cat([images, images.new_ones(pad, *images.shape[1:])])
    return save_image_atomic(make_grid(list(images.split(cols))), path)


class PriorTask(Task):
    """A prior's loop task: logs the mean loss over the steps since the last log (averaged over ranks; a skipped
    step's non-finite loss left out), the steps per second and the learning rate. Subclasses call `record(loss)`."""

    def __init__(self, loop: TrainingLoop):
        self.loop = loop
        self.window: list[torch.Tensor] = []
        self.window_start = time.perf_counter()
        self.mean_loss = float("nan")

    def record(self, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        self.window.append(loss.detach())
        return {"loss": loss.detach()}

    def log_values(self, terms: dict[str, torch.Tensor]) -> dict[str, float]:
        finite = [w for w in self.window if torch.isfinite(w)] or self.window  # a skipped step's loss is not news
        mean = all_reduce_(torch.stack(finite).mean().float(), op="sum") / world_size()
        self.mean_loss = mean.item()
        it_per_s = len(self.window) / self.loop.tc.gradient_accumulation_steps / (
            time.perf_counter() - self.window_start)
        self.window.clear()
        self.window_start = time.perf_counter()
        return {"loss": self.mean_loss, "it_per_s": it_per_s, "lr": self.optimizers[0][0].param_groups[0]["lr"]}


__all__ = ["PriorTask", "already_finished", "load_shards_manifest", "save_sample_grid", "shard_loader",
           "shard_model_dir", "train_to_end"]

"""Checks that stop an autoencoder run which cannot make progress, before or during training, with the reason.

A training loop whose epochs yield no optimizer step never ends (nothing raises: each epoch is simply empty); a crop
size the model cannot reproduce fails deep in the loss at step 1. Both are found here, with a message naming the
numbers involved.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError
from .errors import LdtokError


class NoProgressError(LdtokError):
    """The data cannot form a single training batch."""


def resolution_multiple(model_type: str, downsample_factor: int) -> int:
    """The side every training image must be a multiple of: the downsampling factor (VQ-VAE-2: its top code's, 2f)."""
    return 2 * downsample_factor if model_type == "vqvae2" else downsample_factor


def downsample_factor(block_out_channels: list[int], init_from: str | None) -> int:
    """`2 ** (levels - 1)` of the model being trained; with `model.init_from` its own config defines the levels."""
    config_file = Path(init_from) / "config.json" if init_from else None
    if config_file is not None and config_file.is_file():
        block_out_channels = json.loads(config_file.read_text()).get("block_out_channels", block_out_channels)
    return 2 ** (len(block_out_channels) - 1)


def check_resolution(*, model_type: str, downsample_factor: int, resolutions: dict[str, int]) -> None:
    """Raise a `ConfigError` naming the key when a resolution is not a multiple of the model's downsampling factor.

    Args:
        resolutions (`dict[str, int]`): config key -> value, e.g. `{"data.resolution": 66}`.
    """
    f = resolution_multiple(model_type, downsample_factor)
    for key, value in resolutions.items():
        if value % f:
            lower, upper = value // f * f, (value // f + 1) * f
            raise ConfigError(f"{key}={value} is not divisible by the model's downsampling factor {f} (a {model_type} "
                              f"model with these model.block_out_channels); use e.g. {lower or upper} or {upper}")


def check_batch_fills(*, num_images: int, batch_size: int, num_processes: int, what: str = "images") -> None:
    """Raise when `num_images` cannot fill one batch per process (incomplete batches are dropped, so no step)."""
    if num_images < batch_size * num_processes:
        raise NoProgressError(
            f"the training data has {num_images} {what}, fewer than one batch of train.batch_size={batch_size} per "
            f"process on {num_processes} process(es) ({batch_size * num_processes} {what}; incomplete batches are "
            f"dropped): no training step could ever run; lower train.batch_size or add {what}")


@dataclass
class EpochProgress:
    """What one epoch read and trained on, to stop a run whose epochs yield no step (`check` at the epoch's end).

    Args:
        fresh (`bool`): the epoch started from its first batch (a resumed epoch may legitimately have none left).
    """

    fresh: bool
    batches: int = 0
    images: int = 0
    skipped: int = 0
    trained_batches: int = 0

    def read(self, *, images: int, skipped: int) -> None:
        self.batches += 1
        self.images += images
        self.skipped += skipped

    def check(self, *, epoch: int, batch_size: int, num_processes: int) -> None:
        """Raise a `NoProgressError` saying why when this (fresh) epoch trained on no batch."""
        if not self.fresh or self.trained_batches:
            return
        if self.batches == 0:
            raise NoProgressError(f"epoch {epoch} yielded no batch: the data cannot fill one batch of "
                                  f"train.batch_size={batch_size} on each of {num_processes} process(es); lower "
                                  "train.batch_size or add images")
        raise NoProgressError(
            f"epoch {epoch} yielded no training step: {self.skipped} of the {self.skipped + self.images} images this "
            f"process read were undecodable ({self.images} decoded; warnings above name the files; under several "
            "processes a batch runs only when every process has images); check data.path / data.source")

"""The torch datasets over HF datasets: `SampleProcessor` (one row -> one ldtok item), `ImageDataset` (map-style)
and `IterableImageDataset` (streaming), with per-sample augmentation seeded from (seed, epoch, index)."""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Literal

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .config import DataError
from .decode import decode_image
from .transforms import ImageTransform

logger = logging.getLogger("ldtok.data")


class SampleProcessor:
    """Turn one HF row into an ldtok item (decode, transform, id, label, caption); picklable for DataLoader workers.

    Args:
        transform (`ImageTransform`): the pixel pipeline.
        image_column, label_column, caption_column: see `DataConfig`.
        on_bad_image (`"skip"` or `"error"`): see `DataConfig`.
        id_from (`"path"`, `"key"` or `"index"`): sample ids are the image path relative to `root` (folders), the
            WebDataset shard name and `__key__`, or the row id the dataset wrapper passes in.
        root (`str`, *optional*): the folder that `"path"` ids are relative to.
    """

    def __init__(
        self,
        *,
        transform: ImageTransform,
        image_column: str,
        label_column: str | None,
        caption_column: str | None,
        on_bad_image: Literal["skip", "error"],
        id_from: Literal["path", "key", "index"],
        root: str | None = None,
    ):
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column
        self.caption_column = caption_column
        self.on_bad_image = on_bad_image
        self.id_from = id_from
        self.root = root

    def sample_id(self, row: dict, row_id: str) -> str:
        cell = row[self.image_column]
        path = cell.get("path") if isinstance(cell, dict) else None
        if self.id_from == "path" and path and self.root is not None:
            return os.path.relpath(path, self.root).replace(os.sep, "/")
        if self.id_from == "key" and row.get("__key__") is not None:
            shard = os.path.basename(str(row.get("__url__") or ""))
            return f"{shard}/{row['__key__']}" if shard else str(row["__key__"])
        return row_id

    def __call__(self, row: dict, *, row_id: str, generator: torch.Generator | None = None) -> dict:
        sample_id = self.sample_id(row, row_id)
        try:
            image = decode_image(row[self.image_column], min_side=self.transform.resolution)
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error, EOFError, ...
            cell = row[self.image_column]
            where = cell.get("path") if isinstance(cell, dict) and cell.get("path") else sample_id
            message = f"cannot decode image {sample_id!r} ({where}): {type(err).__name__}: {err}"
            if self.on_bad_image == "error":
                raise DataError(message) from err
            logger.warning("skipping %s", message)
            return {"skipped": sample_id, "error": message}
        item = {"pixel_values": self.transform(image, generator=generator), "id": sample_id}
        if self.label_column is not None:
            label = row[self.label_column]
            if label is None:
                raise DataError(f"sample {sample_id!r} has no value in label column {self.label_column!r}")
            item["label"] = int(label)
        if self.caption_column is not None:
            item["caption"] = str(row[self.caption_column])
        return item


class _EpochSeeded:
    """Per-sample augmentation generators seeded from (seed, epoch, index); `set_epoch` before each epoch."""

    seed: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _generator(self, *key: int) -> torch.Generator | None:
        if not self.processor.transform.is_random:
            return None
        digest = hashlib.blake2b(repr((self.seed, self.epoch, *key)).encode(), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


class ImageDataset(_EpochSeeded, Dataset):
    """Map-style dataset over an HF `Dataset` whose image column is not decoded (row ids `"<split>/<row index>"`)."""

    def __init__(self, *, hf_dataset, processor: SampleProcessor, split: str, seed: int = 0):
        self.hf_dataset = hf_dataset
        self.processor = processor
        self.split = split
        self.seed = seed

    def __len__(self) -> int:
        return len(self.hf_dataset)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        return self.processor(self.hf_dataset[index], row_id=f"{self.split}/{index}", generator=self._generator(index))


class IterableImageDataset(_EpochSeeded, IterableDataset):
    """Streaming dataset over an HF `IterableDataset` (HF gives each DataLoader worker its own shards).

    Row ids are `"<split>/<row index>"` in stream order. With several DataLoader workers a worker cannot know the
    global index of its rows, so ids become `"<split>/worker<w>of<n>/<row index in that worker's stream>"`: still
    unique and stable for a given worker count. Path- and key-based ids (folders, WebDataset) are unaffected.
    """

    def __init__(self, *, hf_dataset, processor: SampleProcessor, split: str, seed: int = 0):
        self.hf_dataset = hf_dataset
        self.processor = processor
        self.split = split
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if hasattr(self.hf_dataset, "set_epoch"):  # HF's shuffle: seed + epoch, so every epoch has its own order
            self.hf_dataset.set_epoch(self.epoch)

    def __iter__(self):
        worker = get_worker_info()
        prefix = self.split
        worker_id = 0
        if worker is not None and worker.num_workers > 1:
            prefix = f"{self.split}/worker{worker.id}of{worker.num_workers}"
            worker_id = worker.id
        for index, row in enumerate(self.hf_dataset):
            yield self.processor(row, row_id=f"{prefix}/{index}", generator=self._generator(worker_id, index))

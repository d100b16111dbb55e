"""The pixel pipeline and the data split of the encode engine: `ResizeTransform` (`crop="resize"`) and
`RankStream` (a streaming dataset's rows of one rank)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import IterableDataset


class ResizeTransform:
    """`--crop resize`: squash the whole image to `R x R` (bicubic, antialiased; aspect ratio not kept), to [-1, 1].

    Args:
        resolution (`int`): output side `R`.
    """

    def __init__(self, *, resolution: int):
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
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

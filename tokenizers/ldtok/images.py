"""Image grids: tensors in [-1, 1] to PNG files people can look at."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .atomic import write_bytes_atomic


def to_pil(x: Tensor) -> Image.Image:
    """One image `(3, H, W)` (or greyscale `(1, H, W)`, shown as grey RGB) in [-1, 1] to an RGB PIL image."""
    x = x.expand(3, -1, -1) if x.shape[0] == 1 else x
    array = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (3, H, W)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy())


def make_grid(rows: list[Tensor], *, padding: int = 2) -> Image.Image:
    """Stack image rows into one picture.

    Args:
        rows (`list[Tensor]`): each `(N, 3, H, W)` (or greyscale `(N, 1, H, W)`) in [-1, 1]; all rows share N, H
            and W (e.g. originals, then their reconstructions).
        padding (`int`): white pixels between images.
    """
    n, _, h, w = rows[0].shape
    for r in rows:
        assert r.shape[0] == n and r.shape[-2:] == (h, w), f"grid rows must match: {tuple(r.shape)} vs {(n, 3, h, w)}"
    grid = np.full((len(rows) * (h + padding) + padding, n * (w + padding) + padding, 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j in range(n):
            y, x = padding + i * (h + padding), padding + j * (w + padding)
            grid[y : y + h, x : x + w] = np.asarray(to_pil(row[j]))
    return Image.fromarray(grid)


def save_image_atomic(image: Image.Image, path: str | os.PathLike) -> Path:
    """Save a PNG through a temporary file and a rename."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return write_bytes_atomic(path, buffer.getvalue())

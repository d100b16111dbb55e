"""`collate`: batch ldtok items, dropping the ones that could not be decoded."""

from __future__ import annotations

import torch


def collate(samples: list[dict]) -> dict:
    """Batch ldtok items, dropping the skipped ones.

    Args:
        samples (`list[dict]`): items from `build_dataset`.

    Returns:
        `dict` with `"pixel_values"` (`FloatTensor` of shape `(B, 3, R, R)`), `"id"` (`list[str]`, B ids),
        `"skipped"` (`list[str]`, the ids of dropped items) and, when configured, `"label"` (`LongTensor` of shape
        `(B,)`) and `"caption"` (`list[str]`). When every item was skipped the batch is empty: `B == 0`,
        `pixel_values` has shape `(0, 3, 0, 0)` and there is no label / caption; callers must skip it (under DDP,
        all ranks must agree to skip, or the others wait in the gradient all-reduce).
    """
    kept = [s for s in samples if "skipped" not in s]
    batch = {
        "pixel_values": torch.stack([s["pixel_values"] for s in kept]) if kept else torch.empty(0, 3, 0, 0),
        "id": [s["id"] for s in kept],
        "skipped": [s["skipped"] for s in samples if "skipped" in s],
    }
    if kept and "label" in kept[0]:
        batch["label"] = torch.tensor([s["label"] for s in kept], dtype=torch.long)
    if kept and "caption" in kept[0]:
        batch["caption"] = [s["caption"] for s in kept]
    return batch

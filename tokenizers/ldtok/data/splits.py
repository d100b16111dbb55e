"""Held-out validation data: which images validate a training run, and keeping them out of training.

`plan_validation(data, val_data)` decides, in this order:

1. `val_data` given (it inherits every key of `data`, see `RunConfig`): those images;
2. else the dataset's own validation split: the default dataset's `validation`, a folder's `validation/` (or `val/`,
   `valid/`, `dev/`, then `test/`) next to `train/`, an HF dataset's `validation` (then `test`) split;
3. else, and whenever validation would read the very split training reads, a deterministic holdout: each image is
   held out when a hash of its id (its path relative to the folder, its WebDataset key, or its row index for HF
   datasets) falls below `data.val_fraction`. Training then excludes exactly the images validation reads; the same
   image stays on the same side when others are added (for path- and key-identified sources).

`data.val_fraction=0` turns the holdout off: validation then reads the training images (and the plan says so).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, replace
from typing import Literal

logger = logging.getLogger("ldtok.splits")

Holdout = Literal["exclude", "only"]
_IDENTITY = ("source", "path", "name", "subset", "split")
_FOLDER_SPLITS = (("validation", ("validation", "valid", "val", "dev")), ("test", ("test", "testing", "eval")))


@dataclass
class ValidationPlan:
    """Where validation images come from.

    Args:
        train (`DataConfig`): what training reads.
        validation (`DataConfig`): what validation reads.
        holdout (`bool`): the `val_fraction` holdout is in use: build training data with `holdout="exclude"` and
            validation data with `holdout="only"`.
        reason (`str`): one line for the log.
    """

    train: object
    validation: object
    holdout: bool
    reason: str


def plan_validation(data, val_data=None) -> ValidationPlan:
    """Decide the validation data of a run training on `data` (see the module docstring)."""
    if val_data is not None:
        validation, reason = val_data, "val_data"
    else:
        split = dataset_validation_split(data)
        validation = replace(data, split=split) if split else data
        reason = f"the dataset's {split!r} split" if split else "no validation split in the dataset"
    if any(getattr(validation, k) != getattr(data, k) for k in _IDENTITY):
        return ValidationPlan(train=data, validation=validation, holdout=False, reason=reason)
    if data.val_fraction > 0:
        return ValidationPlan(train=data, validation=validation, holdout=True,
                              reason=f"{reason}: holding out data.val_fraction={data.val_fraction} of {data.split!r}")
    return ValidationPlan(train=data, validation=validation, holdout=False,
                          reason=f"{reason} and data.val_fraction=0: validating on the training images")


def dataset_validation_split(data) -> str | None:
    """The name of `data`'s validation split, if its dataset has one besides the one `data` trains on."""
    if data.split != "train":
        return None
    if data.source in ("default", "digits"):  # the embedded sets ship a validation split
        return "validation"
    if data.source == "folder" and data.path:
        root = os.path.expanduser(data.path)
        if not os.path.isdir(os.path.join(root, "train")):
            return None
        for split, names in _FOLDER_SPLITS:
            if any(os.path.isdir(os.path.join(root, n)) for n in names):
                return split
        return None
    if data.source == "hf" and data.name:
        import datasets

        try:
            names = datasets.get_dataset_split_names(os.path.expanduser(data.name), data.subset,
                                                     cache_dir=data.cache_dir)
        except Exception as error:  # offline and not cached, a builder that cannot list splits: fall back to holdout
            logger.info("could not list the splits of %s (%s); using the val_fraction holdout", data.name, error)
            return None
        return next((s for s in ("validation", "test") if s in names), None)
    return None


def _hash_fraction(key: str) -> float:
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def held_out(key: str, fraction: float) -> bool:
    """Whether the sample with id `key` is in the validation holdout of size `fraction` (deterministic)."""
    return _hash_fraction(key) < fraction


def _row_key(row: dict, index: int, *, id_from: str, image_column: str, root: str | None) -> str:
    if id_from == "path":
        cell = row[image_column]
        path = cell.get("path") if isinstance(cell, dict) else None
        if path:
            return os.path.relpath(path, root) if root else path
    elif id_from == "key" and "__key__" in row:
        return str(row["__key__"])
    return str(index)


def apply_holdout(ds, *, holdout: Holdout, fraction: float, id_from: str, image_column: str, root: str | None,
                  streaming: bool):
    """Keep only the holdout (`"only"`) or everything but it (`"exclude"`) of an HF dataset (before shuffling).

    A map-style dataset whose hashes put no image below `fraction` (a tiny folder) holds out its image of smallest
    hash, so validation is never empty; a stream cannot know that in advance.
    """
    keep_held = holdout == "only"
    if streaming:
        def keep(row: dict, index: int) -> bool:
            key = _row_key(row, index, id_from=id_from, image_column=image_column, root=root)
            return held_out(key, fraction) == keep_held

        return ds.filter(keep, with_indices=True)
    if id_from == "index":  # no need to read the rows (HF datasets may embed the image bytes)
        keys = [str(i) for i in range(len(ds))]
    else:
        rows = ds.select_columns([c for c in (image_column, "__key__") if c in ds.column_names])
        keys = [_row_key(rows[i], i, id_from=id_from, image_column=image_column, root=root) for i in range(len(rows))]
    held = [held_out(k, fraction) for k in keys]
    if keys and not any(held):
        held[min(range(len(keys)), key=lambda i: _hash_fraction(keys[i]))] = True
    return ds.select([i for i, h in enumerate(held) if h == keep_held])


__all__ = ["ValidationPlan", "apply_holdout", "dataset_validation_split", "held_out", "plan_validation"]

"""`build_dataset(config)`: load the configured source through HF `datasets` (default set, folder, hf, webdataset,
digits), check its columns, apply the holdout / `max_samples` / streaming shuffle and wrap it as an ldtok dataset."""

from __future__ import annotations

import glob
import os

from .config import DataConfig, DataError
from .datasets import ImageDataset, IterableImageDataset, SampleProcessor
from .splits import Holdout, apply_holdout
from .transforms import ImageTransform


def build_dataset(config: DataConfig, *, train: bool = True, seed: int = 0, holdout: Holdout | None = None
                  ) -> ImageDataset | IterableImageDataset:
    """Build the dataset that `config` describes.

    Args:
        config (`DataConfig`): the data settings.
        train (`bool`, defaults to `True`): training transforms (`config.crop`, `config.flip`, the colour jitter);
            `False` gives the deterministic evaluation / encoding transform (center crop, no flip, no jitter) whatever
            the config says.
        seed (`int`, defaults to 0): seeds the random crops and flips, with the epoch (`dataset.set_epoch`) and the
            sample index; and, with `train=True`, a streaming dataset's shuffle (`config.shuffle_buffer`).
        holdout (`"exclude"` or `"only"`, *optional*): drop the `config.val_fraction` validation holdout, or keep only
            it (see `ldtok.data.splits`); applied before `max_samples`.

    Returns:
        A map-style `ImageDataset` (with `__len__`), or an `IterableImageDataset` when `config.streaming`. Items are
        dicts as described in the module docstring; batch them with `collate`.
    """
    ds, id_from, root = _load_source(config)
    ds = _prepare_columns(ds, config)
    if holdout is not None:
        ds = apply_holdout(ds, holdout=holdout, fraction=config.val_fraction, id_from=id_from,
                           image_column=config.image_column, root=root, streaming=config.streaming)
    if config.max_samples is not None:
        ds = ds.take(config.max_samples) if config.streaming else ds.select(range(min(config.max_samples, len(ds))))
    if config.streaming and train and config.shuffle_buffer > 0:
        ds = ds.shuffle(seed=seed, buffer_size=config.shuffle_buffer)
    transform = ImageTransform(
        resolution=config.resolution,
        random_crop=train and config.crop == "random",
        random_flip=train and config.flip,
        channels=config.channels,
        hue_jitter=config.hue_jitter if train else 0.0,
        saturation_jitter=config.saturation_jitter if train else 0.0,
    )
    processor = SampleProcessor(
        transform=transform,
        image_column=config.image_column,
        label_column=config.label_column,
        caption_column=config.caption_column,
        on_bad_image=config.on_bad_image,
        id_from=id_from,
        root=root,
    )
    wrapper = IterableImageDataset if config.streaming else ImageDataset
    return wrapper(hf_dataset=ds, processor=processor, split=config.split, seed=seed)


def _load_source(config: DataConfig):
    """The HF dataset of `config.source` (image column not yet cast), how its ids are made, and the folder that
    path ids are relative to (`None` unless the source is a folder)."""
    import datasets

    common = {"split": config.split, "streaming": config.streaming, "cache_dir": config.cache_dir}
    root = None
    if config.source == "default":
        from .default_dataset import default_dataset_dir

        if config.split not in ("train", "validation"):
            raise DataError(f"the default dataset has splits 'train' and 'validation', not {config.split!r}")
        root = str(default_dataset_dir())
        data_dir = os.path.join(root, config.split)
        common["split"] = "train"  # one folder, which HF calls "train"
        ds = datasets.load_dataset("imagefolder", data_dir=data_dir, drop_labels=True, **common)
        id_from = "path"
    elif config.source == "folder":
        if not config.path or not os.path.isdir(os.path.expanduser(config.path)):
            raise DataError(f"data.path must be an existing folder for source 'folder', got {config.path!r}")
        root = os.path.abspath(os.path.expanduser(config.path))
        try:
            ds = datasets.load_dataset("imagefolder", data_dir=root, **common)
        except datasets.data_files.EmptyDatasetError as e:
            raise DataError(f"data.path={config.path!r} holds no image files (imagefolder found none: {e}); "
                            "point data.path at a folder of images") from e
        id_from = "path"
    elif config.source == "hf":
        if not config.name:
            raise DataError("data.name (HF dataset name or local dataset directory) is required for source 'hf'")
        ds = datasets.load_dataset(os.path.expanduser(config.name), config.subset, **common)
        id_from = "index"
    elif config.source == "digits":
        from .digits_dataset import load_digits_dataset

        ds = load_digits_dataset(config.split)
        id_from = "index"
    elif config.source == "webdataset":
        ds = datasets.load_dataset("webdataset", data_files={config.split: _shard_list(config.path)}, **common)
        id_from = "key"
    else:
        raise DataError(f"unknown data.source {config.source!r}; expected default, folder, hf, webdataset or digits")
    return ds, id_from, root


def _shard_list(path: str | None) -> list[str]:
    """WebDataset shards from a glob or a comma-separated list; local patterns must match something."""
    if not path:
        raise DataError("data.path (a glob or comma-separated list of .tar shards) is required for 'webdataset'")
    shards = []
    for pattern in (p.strip() for p in path.split(",") if p.strip()):
        if "://" in pattern:
            shards.append(pattern)  # remote: HF resolves it
            continue
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise DataError(f"no WebDataset shard matches {pattern!r}")
        shards.extend(os.path.abspath(m) for m in matches)
    return shards


def _prepare_columns(ds, config: DataConfig):
    """Check the configured columns exist and stop HF from decoding the images (we decode, and catch failures)."""
    import datasets

    features = ds.features
    if features is None:  # some streaming builders only know their columns once read: nothing to cast
        return ds
    for field in ("image_column", "label_column", "caption_column"):
        column = getattr(config, field)
        if column is not None and column not in features:
            raise DataError(f"data.{field}={column!r} is not a column of the dataset; columns: {sorted(features)}")
    if isinstance(features[config.image_column], datasets.Image):
        ds = ds.cast_column(config.image_column, datasets.Image(decode=False))
    return ds

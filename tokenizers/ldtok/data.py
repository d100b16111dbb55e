"""Image datasets for tokenizer training and encoding: local folders, HF datasets, WebDataset shards, the default set.

Every source goes through HF `datasets`, with the image column cast to `Image(decode=False)`: HF hands us the raw
bytes or path and we decode with PIL ourselves, so one truncated or corrupt file yields a `{"skipped": id}` sample
instead of killing a worker (or a whole run) from inside HF. Items are dicts:

```
{"pixel_values": FloatTensor (3, R, R) in [-1, 1], "id": str, "label": int (optional), "caption": str (optional)}
{"skipped": str (the id), "error": str}                               # an image that could not be decoded
```

`collate` drops the skipped items and batches the rest. All randomness (crop offsets, flips) is drawn from torch's
global RNG, which Accelerate checkpoints and restores, so a resumed run sees the same crops.
"""

from __future__ import annotations

import glob
import hashlib
import io
import logging
import os
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .errors import LdtokError
from .splits import Holdout, apply_holdout

logger = logging.getLogger("ldtok.data")

_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "PA")


class DataError(LdtokError, ValueError):
    """The configured data cannot be read: a missing path, an empty folder, an unknown column (one-line message)."""


@dataclass
class DataConfig:
    """Where the images come from and how they are turned into training tensors.

    Args:
        source (`"default"`, `"folder"`, `"hf"`, `"webdataset"` or `"digits"`, defaults to `"default"`):
            `"default"`: the embedded photo crops of `ldtok.default_dataset` (splits `"train"`, `"validation"`);
            `"folder"`: a local folder of images (HF `imagefolder`; sub-folders `train/`, `validation/`... become
            splits); `"hf"`: `load_dataset(name)`, a Hub dataset in the local HF cache or a local dataset directory;
            `"webdataset"`: `.tar` shards read by HF's `webdataset` builder; `"digits"`: scikit-learn's bundled 8x8
            handwritten digits with labels (`ldtok.digits_dataset`; splits `"train"`, `"validation"`; greyscale).
        path (`str`, *optional*): the image folder (`"folder"`), or the shards (`"webdataset"`): a glob or a
            comma-separated list of paths / URLs.
        name (`str`, *optional*): the HF dataset name or local dataset directory (`"hf"`).
        subset (`str`, *optional*): the HF dataset configuration name (`"hf"`), e.g. a language or a resolution.
        split (`str`, defaults to `"train"`): the split to read.
        image_column (`str`, defaults to `"image"`): the image column (WebDataset: the file extension, e.g. `"jpg"`).
        label_column (`str`, *optional*): an integer class column, returned as `"label"`.
        caption_column (`str`, *optional*): a text column, returned as `"caption"`.
        streaming (`bool`, defaults to `False`): stream the data (`build_dataset` returns an `IterableDataset`).
        resolution (`int`, defaults to 256): side `R` of the square output images.
        crop (`"random"` or `"center"`, defaults to `"random"`): training crop; evaluation always crops the center.
        flip (`bool`, defaults to `True`): random horizontal flips (p=0.5) in training.
        on_bad_image (`"skip"` or `"error"`, defaults to `"skip"`): what an undecodable image does: yield a
            `{"skipped": id}` item (and log a warning), or raise a `ValueError` naming it.
        num_workers (`int`, defaults to 0): DataLoader worker processes (read by the scripts that build loaders).
        max_samples (`int`, *optional*): keep only the first `max_samples` samples.
        cache_dir (`str`, *optional*): HF datasets cache directory (defaults to HF's own, `HF_DATASETS_CACHE`).
        channels (`int`, 1 or 3, defaults to 3): image channels of the tensors: 3 (RGB) or 1 (greyscale, PIL's `L`
            conversion of the RGB image); must equal the model's `in_channels`.
        val_fraction (`float`, defaults to 0.05): when the dataset has no validation split, this fraction of its
            images (chosen by a hash of their ids, see `ldtok.splits`) is held out of training for validation; 0 turns
            the holdout off.
        shuffle_buffer (`int`, defaults to 1000): streaming training data is shuffled with a buffer of this many
            samples (and a shuffled shard order), seeded by the run's seed and the epoch; 0 disables it.
    """

    source: Literal["default", "folder", "hf", "webdataset", "digits"] = "default"
    path: str | None = None
    name: str | None = None
    subset: str | None = None
    split: str = "train"
    image_column: str = "image"
    label_column: str | None = None
    caption_column: str | None = None
    streaming: bool = False
    resolution: int = 256
    crop: Literal["random", "center"] = "random"
    flip: bool = True
    on_bad_image: Literal["skip", "error"] = "skip"
    num_workers: int = 0
    max_samples: int | None = None
    cache_dir: str | None = None
    channels: int = 3
    val_fraction: float = 0.05
    shuffle_buffer: int = 1000

    def __post_init__(self):
        from .config import ConfigError

        if self.channels not in (1, 3):
            raise ConfigError(f"data.channels must be 1 (greyscale) or 3 (RGB), got {self.channels!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.shuffle_buffer < 0:
            raise ConfigError(f"data.shuffle_buffer must be >= 0, got {self.shuffle_buffer}")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB the way a viewer would show it.

    Transparent pixels are composited on white (RGBA, LA, P or L/RGB with a transparency entry). High bit depth
    greyscale is scaled by its value range, not clipped as PIL's `convert` does (a 16-bit image would come out white):
    `I;16*` by 65535; `I` by 65535 when its values fit in 16 bits, else by its min..max; `F` by 1 when its values lie in
    [0, 1], else by its min..max. CMYK with an embedded ICC profile is converted through it.
    """
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in _HIGH_DEPTH_MODES:
        values = np.asarray(image, dtype=np.float64)
        lo, hi = float(values.min()), float(values.max())
        if image.mode.startswith("I;16") or (image.mode == "I" and lo >= 0 and hi <= 65535):
            lo, hi = 0.0, 65535.0
        elif image.mode == "F" and lo >= 0 and hi <= 1:
            lo, hi = 0.0, 1.0
        scaled = (values - lo) / max(hi - lo, 1e-12) * 255.0
        return Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8)).convert("RGB")  # (H, W) -> L
    if image.mode == "CMYK" and image.info.get("icc_profile"):
        try:
            from PIL import ImageCms  # needs Pillow built with littlecms

            source = ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))
            return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception as err:  # ImportError (Pillow without littlecms), ImageCms.PyCMSError (broken profile), ...
            logger.debug("ICC conversion failed (%s); using PIL's naive CMYK conversion", err, exc_info=True)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(value: Any, *, min_side: int | None = None) -> Image.Image:
    """Decode an image cell (`{"bytes", "path"}` dict, bytes, path or PIL image) to an upright RGB PIL image.

    Args:
        value: the raw cell of an `Image(decode=False)` column (or an already decoded PIL image).
        min_side (`int`, *optional*): JPEGs may be decoded at a reduced scale (DCT scaling, fast for big photos) as
            long as their shorter side stays at least `min_side`.

    Raises whatever PIL raises on an undecodable file (callers catch it).
    """
    if isinstance(value, Image.Image):
        image = value
    else:
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
        elif isinstance(value, (bytes, bytearray)):
            data, path = value, None
        elif isinstance(value, (str, os.PathLike)):
            data, path = None, os.fspath(value)
        else:
            raise TypeError(f"unsupported image cell of type {type(value).__name__}")
        if data is None:
            if path is None:
                raise ValueError("image cell has neither bytes nor path")
            if "://" in path:  # remote or chained (zip://...::hf://...) path of a streamed dataset
                import fsspec

                with fsspec.open(path, "rb") as f:
                    data = f.read()
            else:
                with open(path, "rb") as f:
                    data = f.read()
        image = Image.open(io.BytesIO(data))
        if min_side is not None and image.format == "JPEG":
            W, H = image.size
            scale = min_side / max(min(W, H), 1)
            image.draft(image.mode, (int(np.ceil(W * scale)), int(np.ceil(H * scale))))
        image.load()  # decode now, inside the caller's try: PIL opens lazily
    if image.getexif().get(0x0112, 1) != 1:  # EXIF orientation: camera photos are stored rotated
        image = ImageOps.exif_transpose(image)
    return to_rgb(image)


class ImageTransform:
    """Resize the shorter side to `resolution` (bicubic, antialiased), crop a square, maybe flip, scale to [-1, 1].

    Random crop offsets and flips come from the `generator` the dataset passes in, seeded from (seed, epoch, sample
    index): augmentation then depends on neither worker scheduling nor the data loader's prefetching, so a resumed
    run sees exactly the crops an uninterrupted run would have seen.

    Args:
        resolution (`int`): output side `R`.
        random_crop (`bool`, defaults to `False`): random crop position, else the center.
        random_flip (`bool`, defaults to `False`): horizontal flip with probability 0.5.
        channels (`int`, defaults to 3): 3 for RGB output, 1 for greyscale (`(1, R, R)`).
    """

    def __init__(self, *, resolution: int, random_crop: bool = False, random_flip: bool = False, channels: int = 3):
        assert resolution > 0, f"resolution must be positive, got {resolution}"
        self.resolution = resolution
        self.channels = channels
        self.random_crop = random_crop
        self.random_flip = random_flip

    @property
    def is_random(self) -> bool:
        return self.random_crop or self.random_flip

    def __call__(self, image: Image.Image, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Map an RGB PIL image to a `(3, R, R)` float tensor in [-1, 1]; randomness drawn from `generator`."""
        R = self.resolution
        W, H = image.size
        scale = R / min(W, H)
        out_w, out_h = max(R, round(W * scale)), max(R, round(H * scale))  # size after resizing the shorter side
        if self.random_crop:
            left = int(torch.randint(0, out_w - R + 1, (), generator=generator))
            top = int(torch.randint(0, out_h - R + 1, (), generator=generator))
        else:
            left, top = (out_w - R) // 2, (out_h - R) // 2
        # Resample only the crop: `box` (in source pixels) gives the same pixels as resizing the whole image and then
        # cropping (the filter still reads outside the box), without materialising a huge upscaled image.
        sx, sy = out_w / W, out_h / H
        box = (left / sx, top / sy, (left + R) / sx, (top + R) / sy)
        image = image.resize((R, R), Image.Resampling.BICUBIC, box=box)
        if self.channels == 1:
            image = image.convert("L")
        x = torch.from_numpy(np.array(image, dtype=np.uint8).reshape(R, R, -1)).permute(2, 0, 1)  # (C, R, R)
        if self.random_flip and bool(torch.rand((), generator=generator) < 0.5):
            x = x.flip(-1)
        return x.float().div_(127.5).sub_(1.0)


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


def build_dataset(config: DataConfig, *, train: bool = True, seed: int = 0, holdout: Holdout | None = None
                  ) -> ImageDataset | IterableImageDataset:
    """Build the dataset that `config` describes.

    Args:
        config (`DataConfig`): the data settings.
        train (`bool`, defaults to `True`): training transforms (`config.crop`, `config.flip`); `False` gives the
            deterministic evaluation / encoding transform (center crop, no flip) whatever the config says.
        seed (`int`, defaults to 0): seeds the random crops and flips, with the epoch (`dataset.set_epoch`) and the
            sample index; and, with `train=True`, a streaming dataset's shuffle (`config.shuffle_buffer`).
        holdout (`"exclude"` or `"only"`, *optional*): drop the `config.val_fraction` validation holdout, or keep only
            it (see `ldtok.splits`); applied before `max_samples`.

    Returns:
        A map-style `ImageDataset` (with `__len__`), or an `IterableImageDataset` when `config.streaming`. Items are
        dicts as described in the module docstring; batch them with `collate`.
    """
    import datasets

    common = {"split": config.split, "streaming": config.streaming, "cache_dir": config.cache_dir}
    root = None
    if config.source == "default":
        from ldtok.default_dataset import default_dataset_dir

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
        from ldtok.digits_dataset import load_digits_dataset

        ds = load_digits_dataset(config.split)
        id_from = "index"
    elif config.source == "webdataset":
        ds = datasets.load_dataset("webdataset", data_files={config.split: _shard_list(config.path)}, **common)
        id_from = "key"
    else:
        raise DataError(f"unknown data.source {config.source!r}; expected default, folder, hf, webdataset or digits")

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

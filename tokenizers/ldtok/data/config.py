"""`DataConfig` (the `data.*` keys of every config and the shared `--data-*` flags) and `DataError`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import check_choice, check_range, invalid
from ..errors import LdtokError

DATA_SOURCES = ("default", "folder", "hf", "webdataset", "digits")


class DataError(LdtokError, ValueError):
    """The configured data cannot be read: a missing path, an empty folder, an unknown column (one-line message)."""


@dataclass
class DataConfig:
    """Where the images come from and how they are turned into training tensors.

    Args:
        source (`"default"`, `"folder"`, `"hf"`, `"webdataset"` or `"digits"`, defaults to `"default"`):
            `"default"`: the embedded photo crops of `ldtok.data.default_dataset` (splits `"train"`, `"validation"`);
            `"folder"`: a local folder of images (HF `imagefolder`; sub-folders `train/`, `validation/`... become
            splits); `"hf"`: `load_dataset(name)`, a Hub dataset in the local HF cache or a local dataset directory;
            `"webdataset"`: `.tar` shards read by HF's `webdataset` builder; `"digits"`: scikit-learn's bundled 8x8
            handwritten digits with labels (`ldtok.data.digits_dataset`; splits `"train"`, `"validation"`; greyscale).
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
        hue_jitter (`float`, defaults to 0): in training, rotate each image's hue by a uniform fraction of the colour
            wheel in `[-hue_jitter, hue_jitter]` (at most 0.5, torchvision `ColorJitter`'s `hue`). With few source
            photos a tokenizer otherwise learns which colours each kind of content has, and paints them onto
            unseen regions (issue 15: grey suits come back tinted); RGB only.
        saturation_jitter (`float`, defaults to 0): in training, scale each image's saturation by a uniform factor in
            `[1 - saturation_jitter, 1 + saturation_jitter]` (below 1; `ColorJitter`'s `saturation`); RGB only.
        on_bad_image (`"skip"` or `"error"`, defaults to `"skip"`): what an undecodable image does: yield a
            `{"skipped": id}` item (and log a warning), or raise a `ValueError` naming it.
        num_workers (`int`, defaults to 0): DataLoader worker processes (read by the scripts that build loaders).
        max_samples (`int`, *optional*): keep only the first `max_samples` samples.
        cache_dir (`str`, *optional*): HF datasets cache directory (defaults to HF's own, `HF_DATASETS_CACHE`).
        channels (`int`, 1 or 3, defaults to 3): image channels of the tensors: 3 (RGB) or 1 (greyscale, PIL's `L`
            conversion of the RGB image); must equal the model's `in_channels`.
        val_fraction (`float`, defaults to 0.05): when the dataset has no validation split, this fraction of its
            images (chosen by a hash of their ids, see `ldtok.data.splits`) is held out of training for validation; 0
            turns the holdout off.
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
    hue_jitter: float = 0.0
    saturation_jitter: float = 0.0
    on_bad_image: Literal["skip", "error"] = "skip"
    num_workers: int = 0
    max_samples: int | None = None
    cache_dir: str | None = None
    channels: int = 3
    val_fraction: float = 0.05
    shuffle_buffer: int = 1000

    def __post_init__(self):
        check_choice(self, "source", DATA_SOURCES)
        check_choice(self, "crop", ("random", "center"))
        check_choice(self, "on_bad_image", ("skip", "error"))
        if self.channels not in (1, 3):
            raise invalid("channels", f"the number of data channels must be 1 (greyscale) or 3 (RGB), got "
                                      f"{self.channels!r}")
        check_range(self, "resolution", gt=0)
        check_range(self, "num_workers", ge=0)
        check_range(self, "max_samples", ge=0)
        check_range(self, "val_fraction", ge=0.0, lt=1.0)
        check_range(self, "hue_jitter", ge=0.0, le=0.5)
        check_range(self, "saturation_jitter", ge=0.0, lt=1.0)
        check_range(self, "shuffle_buffer", ge=0)

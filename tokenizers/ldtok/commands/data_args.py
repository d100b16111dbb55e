"""The dataset flags that `ldtok encode` and `ldtok eval` share (the `data.*` keys of training configs)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ldtok.data import DataConfig
from ldtok.errors import LdtokError

# what HF's imagefolder reads (PIL formats); a folder with none of these is empty for `--data-source folder`
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".jp2")


def add_data_arguments(parser: argparse.ArgumentParser, *, split_default: str | None, split_help: str,
                       verb: str) -> argparse._ArgumentGroup:
    """Add `--data-source`, `--data-path`, `--data-name`, `--data-subset`, `--split`, `--image-column`,
    `--streaming`, `--max-samples` and `--cache-dir` in a "data" group, which is returned for command-specific flags.
    `verb` completes the help of `--max-samples` ("encode only the first N samples")."""
    data = parser.add_argument_group("data (as `data.*` in training configs)")
    data.add_argument("--data-source", choices=["default", "folder", "hf", "webdataset", "digits"], default="default")
    data.add_argument("--data-path", help="image folder (folder) or .tar shards glob / list (webdataset)")
    data.add_argument("--data-name", help="HF dataset name or local dataset directory (hf)")
    data.add_argument("--data-subset", help="HF dataset configuration name (hf)")
    data.add_argument("--split", default=split_default, help=split_help)
    data.add_argument("--image-column", default="image")
    data.add_argument("--streaming", action="store_true", help="stream the dataset")
    data.add_argument("--max-samples", type=int, help=f"{verb} only the first N samples")
    data.add_argument("--cache-dir", help="HF datasets cache directory")
    return data


def data_config_from_args(args: argparse.Namespace, *, split: str, resolution: int, **extra) -> DataConfig:
    """The `DataConfig` the shared flags describe, with the deterministic transform (center crop, no flip);
    `extra` sets the command-specific fields (label/caption columns, `on_bad_image`)."""
    return DataConfig(
        source=args.data_source, path=args.data_path, name=args.data_name, subset=args.data_subset, split=split,
        image_column=args.image_column, streaming=args.streaming, resolution=resolution, crop="center", flip=False,
        num_workers=args.num_workers, max_samples=args.max_samples, cache_dir=args.cache_dir, **extra,
    )  # fmt: skip


def check_data_path(config: DataConfig) -> None:
    """One-line errors, before anything is loaded, for a folder source without a usable `--data-path`."""
    if config.source != "folder":
        return
    if not config.path:
        raise LdtokError("--data-source folder needs --data-path DIR (the folder of images)", exit_code=2)
    path = Path(config.path).expanduser()
    if not path.exists():
        raise LdtokError(f"--data-path {path}: no such folder")
    if not path.is_dir():
        raise LdtokError(f"--data-path {path}: a file, not a folder of images")
    if not any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*")):
        raise LdtokError(f"--data-path {path}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)})")


def build_dataset_or_error(config: DataConfig, *, train: bool = False):
    """`build_dataset(config)`, with a missing path, an empty folder or an unreadable dataset as one-line
    `LdtokError`s naming the data flags."""
    from ldtok.data import build_dataset

    check_data_path(config)
    where = config.path or config.name or config.source
    try:
        dataset = build_dataset(config, train=train)
    except (ValueError, FileNotFoundError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise LdtokError(f"cannot read the {config.source!r} data at {where} (split {config.split!r}): {first}") from e
    if not config.streaming and len(dataset) == 0:
        raise LdtokError(f"the {config.source!r} data at {where} (split {config.split!r}) holds no images")
    return dataset

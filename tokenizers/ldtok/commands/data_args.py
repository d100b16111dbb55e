"""The dataset flags that `ldtok encode` and `ldtok eval` share, generated from `DataConfig` (the `data.*` keys of
training configs): `--data-source`, `--data-path`, `--data-name`, `--data-subset`, `--split`, `--image-column`,
`--streaming/--no-streaming`, `--max-samples`, `--cache-dir`."""

from __future__ import annotations

import argparse
from pathlib import Path

from ldtok.config_cli import add_config_arguments, config_from_args
from ldtok.data import DataConfig
from ldtok.errors import LdtokError

# what HF's imagefolder reads (PIL formats); a folder with none of these is empty for `--data-source folder`
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".jp2")

SHARED = ("source", "path", "name", "subset", "split", "image_column", "streaming", "max_samples", "cache_dir")
# field -> flag where the flag is not the field's name (`--data-source` reads better than `--source` in a command)
RENAME = {"source": "data-source", "path": "data-path", "name": "data-name", "subset": "data-subset"}


def add_data_arguments(parser: argparse.ArgumentParser, *, split_default: str | None, split_help: str,
                       verb: str) -> argparse._ArgumentGroup:
    """Add the shared flags (`SHARED` fields of `DataConfig`) in a "data" group, which is returned for
    command-specific flags. `verb` completes the help of `--max-samples` ("encode only the first N samples")."""
    data = parser.add_argument_group("data (as `data.*` in training configs)")
    return add_config_arguments(
        data, DataConfig, only=SHARED, rename=RENAME, defaults={"split": split_default},
        help={"split": split_help, "max_samples": f"{verb} only the first N samples",
              "source": "where the images come from: the embedded photo crops (default), a folder of images, an HF "
                        "dataset, WebDataset shards or scikit-learn's digits"},
    )


def data_config_from_args(args: argparse.Namespace, *, split: str, resolution: int, **extra) -> DataConfig:
    """The `DataConfig` the shared flags describe, with the deterministic transform (center crop, no flip);
    `extra` sets the command-specific fields (label/caption columns, `on_bad_image`). Values are validated as in a
    YAML config: a bad one is a one-line `ConfigError` naming the flag (exit code 2)."""
    overrides = {"split": split, "resolution": resolution, "crop": "center", "flip": False,
                 "num_workers": args.num_workers, **extra}
    return config_from_args(DataConfig, args, only=SHARED, rename=RENAME, overrides=overrides)


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

"""The embedded default dataset: real photos that arrive with pip.

scikit-image ships a handful of colour photographs inside its wheel (`skimage/data/*.png|jpg`), scikit-learn two more
(`sklearn/datasets/images/china.jpg`, `flower.jpg`, what `load_sample_images` reads). We cut them into fixed 128x128
crops so every install can train and evaluate a tokenizer end to end with no download: 512 training crops and 64
validation crops, written once into a local cache directory:

```
<cache>/default-v2/
    train/0000_astronaut.png ...
    validation/0000_astronaut.png ...
    manifest.json        # source images (sha256, size), every crop's source, box and sha256
```

The crops are deterministic: positions and scales come from a seeded numpy `Generator`, so two builds (on the same
Pillow / zlib) are byte-identical. Training and validation crops never overlap: each photo is split into a left
region (training crops only) and a right strip (validation crops only).

The source files are read by path from the installed packages; we never call `skimage.data.*` (those functions may
fetch missing files with pooch, and nothing here may touch the network).

Versions (`DATASETS`): `default-v1` had only the 7 scikit-image photos, mostly warm-toned (a cat, coffee, a red
motorcycle, a stained tissue section, an orange-suited astronaut): tiny tokenizers trained on it drift white and grey
towards red-brown (issue 15, `eval/ablate_colour.py`). `default-v2`, the default, adds scikit-learn's two photos (a
blue-sky temple among green trees, a pink flower on green), which are every other colour photo in a wheel we depend
on. A new version gets a new directory name, so a cache of an older one is never reused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

DATASET_NAME = "default-v2"
CROP_SIZE = 128
NUM_TRAIN = 512
NUM_VALIDATION = 64
# Fraction of each photo's width reserved (on the right) for validation crops; at least CROP_SIZE pixels.
VALIDATION_FRACTION = 0.3
# Crop sides are drawn log-uniformly in [CROP_SIZE, MAX_CROP_SIDE] (clipped to the region), then resized to CROP_SIZE:
# scales from native resolution to 2x downsampling.
MAX_CROP_SIDE = 256
SPLIT_SEEDS = {"train": 0, "validation": 1}
# Colour photographs whose files ship inside the scikit-image wheel. Not included: synthetic images (chessboard,
# colour wheel, phantom, logo), greyscale photos, `motorcycle_right` (the stereo twin of `motorcycle_left` would leak
# content between splits) and `retina` (mostly black background).
SKIMAGE_PHOTOS = (
    ("skimage", "astronaut.png"),
    ("skimage", "chelsea.png"),
    ("skimage", "coffee.png"),
    ("skimage", "hubble_deep_field.jpg"),
    ("skimage", "ihc.png"),
    ("skimage", "motorcycle_left.png"),
    ("skimage", "rocket.jpg"),
)
# scikit-learn's sample images (`sklearn.datasets.load_sample_images`); its other image data are greyscale faces
# fetched from the network.
SKLEARN_PHOTOS = (("sklearn", "china.jpg"), ("sklearn", "flower.jpg"))
# dataset name -> its source photos as (package, file); the package's data folder is `PACKAGE_DATA_DIRS`.
DATASETS = {"default-v1": SKIMAGE_PHOTOS, "default-v2": SKIMAGE_PHOTOS + SKLEARN_PHOTOS}
PACKAGE_DATA_DIRS = {"skimage": ("data",), "sklearn": ("datasets", "images")}
PACKAGE_PIP_NAMES = {"skimage": "scikit-image", "sklearn": "scikit-learn"}
SOURCE_IMAGES = tuple(name for _, name in DATASETS[DATASET_NAME])


def cache_root() -> Path:
    """The ldtok cache directory: `$LDTOK_CACHE_DIR` if set, else `~/.cache/ldtok`."""
    return Path(os.environ.get("LDTOK_CACHE_DIR", Path.home() / ".cache" / "ldtok")).expanduser()


def package_data_dir(package: str) -> Path:
    """The folder holding the photos of an installed package (`"skimage"`, `"sklearn"`), found without importing
    (or executing) it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = PACKAGE_PIP_NAMES[package]
        raise ModuleNotFoundError(f"{pip_name} is required to build the default dataset (pip install {pip_name})")
    return Path(next(iter(spec.submodule_search_locations))).joinpath(*PACKAGE_DATA_DIRS[package])


def skimage_data_dir() -> Path:
    """The `data/` folder of the installed scikit-image package."""
    return package_data_dir("skimage")


def default_dataset_dir(cache_dir: str | os.PathLike | None = None, *, name: str = DATASET_NAME) -> Path:
    """Return the directory of the default dataset, building it first if it is missing.

    Safe under concurrency (e.g. every rank of `accelerate launch` calling it at once): each caller builds in a
    private temporary directory next to the final one and renames it into place; a caller that loses the rename race
    discards its copy and uses the winner's. A directory that exists is complete, because it only appears by rename.

    Args:
        cache_dir (`str` or `PathLike`, *optional*, defaults to `cache_root()`):
            Parent directory; the dataset lives in `<cache_dir>/<name>`.
        name (`str`, defaults to `DATASET_NAME`): a key of `DATASETS` (an older version, e.g. for comparisons).

    Returns:
        `Path`: the dataset directory, with `train/`, `validation/` and `manifest.json`.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown default dataset {name!r}; have {sorted(DATASETS)}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    final = root / name
    if final.exists():
        return _check_complete(final)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    try:
        build_default_dataset(tmp, name=name)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
            # Another process renamed its build into place first: use that one.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _check_complete(final)


def _check_complete(directory: Path) -> Path:
    if not (directory / "manifest.json").is_file():
        raise RuntimeError(
            f"{directory} exists but has no manifest.json (not built by ldtok, or damaged); delete it to rebuild"
        )
    return directory


def build_default_dataset(out_dir: str | os.PathLike, *, name: str = DATASET_NAME) -> dict:
    """Write the crops and `manifest.json` into `out_dir` (not atomic: use `default_dataset_dir`).

    Args:
        out_dir (`str` or `PathLike`): an existing, empty directory.
        name (`str`, defaults to `DATASET_NAME`): which version of the dataset (a key of `DATASETS`).

    Returns:
        `dict`: the manifest that was written.
    """
    out_dir = Path(out_dir)
    source_images = tuple(file for _, file in DATASETS[name])
    photos, sources = [], {}
    for package, file in DATASETS[name]:
        path = package_data_dir(package) / file
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: this {PACKAGE_PIP_NAMES[package]} install does not ship {file} in its wheel "
                "(the default dataset never downloads it)"
            )
        raw = path.read_bytes()
        with Image.open(io.BytesIO(raw)) as image:
            photo = image.convert("RGB")
        photos.append(photo)
        sources[file] = {"package": PACKAGE_PIP_NAMES[package], "sha256": hashlib.sha256(raw).hexdigest(),
                         "size": list(photo.size)}

    files = []
    for split, count in (("train", NUM_TRAIN), ("validation", NUM_VALIDATION)):
        (out_dir / split).mkdir()
        rng = np.random.default_rng(SPLIT_SEEDS[split])
        for i in range(count):
            source = source_images[i % len(source_images)]  # round-robin: every photo gets the same share
            photo = photos[i % len(source_images)]
            box = _sample_box(rng, *_split_region(*photo.size, split=split))
            # crop, then resize: resizing with `box=` would let the filter read pixels outside the box
            crop = photo.crop(box).resize((CROP_SIZE, CROP_SIZE), Image.Resampling.LANCZOS)
            buffer = io.BytesIO()
            crop.save(buffer, format="PNG", compress_level=1)  # photos barely compress: favour speed
            rel = f"{split}/{i:04d}_{Path(source).stem}.png"
            (out_dir / rel).write_bytes(buffer.getvalue())
            files.append(
                {
                    "file": rel,
                    "split": split,
                    "source": source,
                    "box": list(box),
                    "sha256": hashlib.sha256(buffer.getvalue()).hexdigest(),
                }
            )

    manifest = {
        "name": name,
        "crop_size": CROP_SIZE,
        "origin": "sample photos bundled in the scikit-image (skimage/data) and scikit-learn (sklearn/datasets/images) "
                  "wheels; see those packages' licenses for their terms",
        "sources": sources,
        "files": files,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def _split_region(width: int, height: int, *, split: str) -> tuple[int, int, int, int]:
    """The `(left, top, right, bottom)` region of a photo that `split` may crop from (disjoint across splits)."""
    strip = max(CROP_SIZE, round(VALIDATION_FRACTION * width))
    assert width - strip >= CROP_SIZE and height >= CROP_SIZE, f"photo {width}x{height} too small for two regions"
    if split == "train":
        return 0, 0, width - strip, height
    return width - strip, 0, width, height


def _sample_box(rng: np.random.Generator, left: int, top: int, right: int, bottom: int) -> tuple[int, int, int, int]:
    """A random square box inside the region, side log-uniform in [CROP_SIZE, MAX_CROP_SIDE] (clipped to fit)."""
    max_side = min(MAX_CROP_SIDE, right - left, bottom - top)
    side = round(float(np.exp(rng.uniform(np.log(CROP_SIZE), np.log(max_side)))))
    x0 = left + int(rng.integers(0, right - left - side + 1))
    y0 = top + int(rng.integers(0, bottom - top - side + 1))
    return x0, y0, x0 + side, y0 + side

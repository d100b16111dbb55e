"""The embedded default dataset: real photos that arrive with pip.

scikit-image ships a handful of colour photographs inside its wheel (`skimage/data/*.png|jpg`). We cut them into
fixed 128x128 crops so every install can train and evaluate a tokenizer end to end with no download: 512 training
crops and 64 validation crops, written once into a local cache directory:

```
<cache>/default-v1/
    train/0000_astronaut.png ...
    validation/0000_astronaut.png ...
    manifest.json        # source images (sha256, size), every crop's source, box and sha256
```

The crops are deterministic: positions and scales come from a seeded numpy `Generator`, so two builds (on the same
Pillow / zlib) are byte-identical. Training and validation crops never overlap: each photo is split into a left
region (training crops only) and a right strip (validation crops only).

The source files are read by path from the installed package; we never call `skimage.data.*` (those functions may
fetch missing files with pooch, and nothing here may touch the network).
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

DATASET_NAME = "default-v1"
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
SOURCE_IMAGES = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "motorcycle_left.png",
    "rocket.jpg",
)


def cache_root() -> Path:
    """The ldtok cache directory: `$LDTOK_CACHE_DIR` if set, else `~/.cache/ldtok`."""
    return Path(os.environ.get("LDTOK_CACHE_DIR", Path.home() / ".cache" / "ldtok")).expanduser()


def skimage_data_dir() -> Path:
    """The `data/` folder of the installed scikit-image package, found without importing (or executing) it."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("scikit-image is required to build the default dataset (pip install scikit-image)")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def default_dataset_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the directory of the default dataset, building it first if it is missing.

    Safe under concurrency (e.g. every rank of `accelerate launch` calling it at once): each caller builds in a
    private temporary directory next to the final one and renames it into place; a caller that loses the rename race
    discards its copy and uses the winner's. A directory that exists is complete, because it only appears by rename.

    Args:
        cache_dir (`str` or `PathLike`, *optional*, defaults to `cache_root()`):
            Parent directory; the dataset lives in `<cache_dir>/default-v1`.

    Returns:
        `Path`: the dataset directory, with `train/`, `validation/` and `manifest.json`.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    final = root / DATASET_NAME
    if final.exists():
        return _check_complete(final)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DATASET_NAME}.tmp-", dir=root))
    try:
        build_default_dataset(tmp)
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


def build_default_dataset(out_dir: str | os.PathLike) -> dict:
    """Write the crops and `manifest.json` into `out_dir` (not atomic: use `default_dataset_dir`).

    Args:
        out_dir (`str` or `PathLike`): an existing, empty directory.

    Returns:
        `dict`: the manifest that was written.
    """
    out_dir = Path(out_dir)
    data_dir = skimage_data_dir()
    photos, sources = [], {}
    for name in SOURCE_IMAGES:
        path = data_dir / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: this scikit-image install does not ship {name} in its wheel "
                "(the default dataset never downloads it)"
            )
        raw = path.read_bytes()
        with Image.open(io.BytesIO(raw)) as image:
            photo = image.convert("RGB")
        photos.append(photo)
        sources[name] = {"sha256": hashlib.sha256(raw).hexdigest(), "size": list(photo.size)}

    files = []
    for split, count in (("train", NUM_TRAIN), ("validation", NUM_VALIDATION)):
        (out_dir / split).mkdir()
        rng = np.random.default_rng(SPLIT_SEEDS[split])
        for i in range(count):
            name = SOURCE_IMAGES[i % len(SOURCE_IMAGES)]  # round-robin: every photo gets the same share
            photo = photos[i % len(SOURCE_IMAGES)]
            box = _sample_box(rng, *_split_region(*photo.size, split=split))
            # crop, then resize: resizing with `box=` would let the filter read pixels outside the box
            crop = photo.crop(box).resize((CROP_SIZE, CROP_SIZE), Image.Resampling.LANCZOS)
            buffer = io.BytesIO()
            crop.save(buffer, format="PNG", compress_level=1)  # photos barely compress: favour speed
            rel = f"{split}/{i:04d}_{Path(name).stem}.png"
            (out_dir / rel).write_bytes(buffer.getvalue())
            files.append(
                {
                    "file": rel,
                    "split": split,
                    "source": name,
                    "box": list(box),
                    "sha256": hashlib.sha256(buffer.getvalue()).hexdigest(),
                }
            )

    manifest = {
        "name": DATASET_NAME,
        "crop_size": CROP_SIZE,
        "origin": "scikit-image bundled sample photos (skimage/data); see the scikit-image license for their terms",
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

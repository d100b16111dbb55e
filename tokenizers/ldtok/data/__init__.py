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

The package: `config` (`DataConfig`, `DataError`), `decode` (`decode_image`, `to_rgb`), `transforms`
(`ImageTransform`), `datasets` (`SampleProcessor`, `ImageDataset`, `IterableImageDataset`), `build` (`build_dataset`,
the sources), `collate`, `splits` (the validation holdout), `default_dataset` (the embedded photo crops) and
`digits_dataset` (scikit-learn's digits).
"""

from .build import build_dataset
from .collate import collate
from .config import DATA_SOURCES, DataConfig, DataError
from .datasets import ImageDataset, IterableImageDataset, SampleProcessor
from .decode import decode_image, to_rgb
from .transforms import ImageTransform

__all__ = [
    "DATA_SOURCES",
    "DataConfig",
    "DataError",
    "ImageDataset",
    "ImageTransform",
    "IterableImageDataset",
    "SampleProcessor",
    "build_dataset",
    "collate",
    "decode_image",
    "to_rgb",
]

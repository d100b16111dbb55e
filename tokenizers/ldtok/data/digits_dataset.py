"""scikit-learn's bundled handwritten digits (`data.source: digits`): a small labelled greyscale set that ships with
pip, for the classic autoencoder experiments (MNIST-style demos with no download).

`sklearn.datasets.load_digits` holds 1797 images of 8x8 pixels with 17 grey levels (0..16) and their labels 0..9
(the UCI "optical recognition of handwritten digits" test set). Here they are scaled to 8-bit (`round(v * 255 / 16)`,
white digits on black as MNIST) and split deterministically: a fixed permutation (seed `SPLIT_SEED`) sends
`VALIDATION_FRACTION` of the images to `validation`, the rest to `train`. The data pipeline then upsamples them to
`data.resolution` (e.g. 28 or 32) like any other image. Sample ids are `<split>/<row>`, rows in `load_digits` order.
"""

from __future__ import annotations

import numpy as np

SPLIT_SEED = 0
VALIDATION_FRACTION = 0.1
SPLITS = ("train", "validation")


def digits_split_indices(split: str) -> np.ndarray:
    """Indices into `load_digits()` of `split` (sorted), disjoint across splits and together all 1797."""
    from sklearn.datasets import load_digits

    if split not in SPLITS:
        raise ValueError(f"the digits dataset has splits {SPLITS}, not {split!r}")
    n = len(load_digits().target)
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_val = round(VALIDATION_FRACTION * n)
    return np.sort(order[:n_val] if split == "validation" else order[n_val:])


def load_digits_dataset(split: str):
    """The `split` as an HF `datasets.Dataset` with columns `image` (8x8 greyscale) and `label` (0..9)."""
    import datasets
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    idx = digits_split_indices(split)
    images = np.round(digits.images[idx] * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(a) for a in images], "label": [int(v) for v in digits.target[idx]]},
        features=features,
    )

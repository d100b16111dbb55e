"""Evaluate a trained tokenizer on an image set: reconstruction metrics, latent-space health and pictures.

`evaluate_tokenizer(model, dataset, accelerator=..., options=...)` is what `eval/reconstruct.py` and `ldtok eval` run.
It works in one process or under `accelerate launch`: process `r` of `W` evaluates the items `r, r + W, r + 2W, ...`
of the dataset (no padding, no collectives during the pass), per-sample results are keyed by the sample id in a
`MetricAccumulator`, and `gather` merges them so every image is counted once. Every process gets the same metrics;
the pictures are made on the main process only, from the first images of the dataset (the same whatever `W` is).

What is measured (numbers carry the `val/` prefix that training's validation logs use):

- `val/psnr`, `val/ssim`, `val/mse`: per image on 8-bit quantized images (`ldtok.metrics.image`), then the mean over
  images; PSNR of an exact reconstruction is `+inf` and counts as `PSNR_CAP` in the mean; MSE is in 8-bit units.
- `val/<net>` for every perceptual network asked for (`lpips-vgg`, `lpips-alex`, `stlpips-vgg`, `stlpips-alex`):
  mean distance between the image and its reconstruction (clamped to `[-1, 1]`). A network whose weights are not
  available offline is listed as not run, with the reason.
- `val/rfid`: Frechet distance between the features of the images and of their reconstructions, with the feature
  network's name, weights sha256 and resize method stated.
- `val/delta_e`, `val/lab_shift_l|a|b`, `val/chroma_ratio`: colour fidelity in CIELAB (`ldtok.metrics.colour`):
  mean CIEDE2000, mean Lab shift (reconstruction - original; +a* = towards red) and reconstructed / original mean
  chroma (1.0 = no desaturation), with the chroma histograms of the whole set as a picture.
- VQ models: code usage, perplexity and entropy over the whole set, per level (suffix `_top` / `_bottom` for VQ-VAE-2).
- KL models: mean KL to N(0, I) per latent channel (nats per image, summed over positions), collapsed channels, and
  the std of the posterior means before and after `scaling_factor`.
- Per-image MSE / PSNR / SSIM / perceptual distances, sorted by MSE, highest first (an anomaly score).

The package: `options` (`EvalOptions`), `result` (`Metric`, `Picture`, `EvalResult`), `pipeline`
(`evaluate_tokenizer`, sharding across processes), `summary` (merged values -> metrics), `pictures` (grids,
interpolations, prior samples) and `report` (`write_report`: report.json / report.html / per_image.csv / PNGs).
"""

from .options import PERCEPTUAL_DEFAULT, EvalOptions
from .pictures import VQ_INTERPOLATION, first_images, first_items, make_pictures, vq_interpolation
from .pipeline import evaluate_tokenizer, shard_dataset
from .result import EvalResult, Metric, Picture

__all__ = [
    "PERCEPTUAL_DEFAULT",
    "VQ_INTERPOLATION",
    "EvalOptions",
    "EvalResult",
    "Metric",
    "Picture",
    "evaluate_tokenizer",
    "first_images",
    "first_items",
    "make_pictures",
    "shard_dataset",
    "vq_interpolation",
]

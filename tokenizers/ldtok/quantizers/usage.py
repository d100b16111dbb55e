"""Code-usage bookkeeping shared by the implicit-codebook quantizers (FSQ, LFQ, BSQ).

`CodeUsageTracker` keeps, in buffers (saved by `accelerator.save_state`, so a resumed run continues the window), the
training step at which each code was last used over all ranks, and gives the batch histogram's perplexity and usage.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..distributed import all_reduce_sum_


def histogram_stats(counts: Tensor) -> tuple[Tensor, Tensor]:
    """`(perplexity, usage)` of a `(K,)` code histogram: `exp(entropy)` and the fraction of codes used (fp32)."""
    counts = counts.float()
    probs = counts / counts.sum().clamp_min(1.0)
    perplexity = torch.exp(-torch.special.xlogy(probs, probs).sum())
    return perplexity, (counts > 0).float().mean()


class CodeUsageTracker(nn.Module):
    """Windowed codebook usage of `codebook_size` codes (a collective in training mode).

    Args:
        codebook_size (`int`): number of codes K.
        usage_window (`int`, defaults to 100): training steps over which `window_usage()` counts the codes used.
    """

    def __init__(self, *, codebook_size: int, usage_window: int = 100):
        super().__init__()
        self.codebook_size = codebook_size
        self.usage_window = usage_window
        self.register_buffer("num_steps", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("last_used", torch.full((codebook_size,), -1, dtype=torch.int64))

    @torch.no_grad()
    def update(self, indices: Tensor, *, training: bool) -> tuple[Tensor, Tensor]:
        """Histogram of `indices` (any shape); in training all-reduced over ranks and recorded in the window.

        Returns:
            `(perplexity, usage)` of the (all ranks' in training) batch, fp32 scalars.
        """
        counts = torch.bincount(indices.reshape(-1), minlength=self.codebook_size).float()
        if training:
            all_reduce_sum_(counts)
            used = counts > 0
            self.last_used.copy_(torch.where(used, self.num_steps.expand_as(self.last_used), self.last_used))
            self.num_steps.add_(1)
        return histogram_stats(counts)

    @torch.no_grad()
    def window_usage(self) -> Tensor:
        """Fraction of codes used in the last `usage_window` training steps (all ranks), a `()` fp32 tensor."""
        recent = (self.last_used >= 0) & (self.last_used >= self.num_steps - self.usage_window)
        return recent.float().mean()

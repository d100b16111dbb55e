"""Finite scalar quantization (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple").

Every channel `i` is bounded by a shifted tanh to `L_i` values and rounded; the code is the tuple of rounded values,
its index the mixed-radix integer of the digits (channel 0 least significant, as in `vector-quantize-pytorch`'s
`FSQ`, whose outputs and indices this module reproduces). The codebook is implicit (`prod(levels)` codes, no
parameters), so it cannot collapse and needs no auxiliary loss.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor, nn

from ..outputs import QuantizerOutput
from .state import DiffusersQuantizerAPI
from .usage import CodeUsageTracker

# tanh bound slightly past the outermost level, so that it is reached (FSQ's reference implementation)
_BOUND_EPS = 1e-3


class FiniteScalarQuantizer(DiffusersQuantizerAPI, nn.Module):
    """FSQ, channels-first in and out.

    Args:
        levels (`list[int]`): values per channel, each >= 3 (e.g. `[8, 8, 8, 5, 5, 5]`: 64000 codes of dimension 6).
        usage_window (`int`, defaults to 100): training steps over which `window_usage()` counts the codes used.
    """

    def __init__(self, *, levels: list[int], usage_window: int = 100):
        super().__init__()
        if not levels or min(levels) < 3:
            raise ValueError(f"levels must be a non-empty list of integers >= 3, got {levels}")
        self.levels = list(levels)
        self.codebook_dim = len(levels)
        self.codebook_size = math.prod(levels)
        self.beta = 0.0
        basis = [math.prod(levels[:i]) for i in range(len(levels))]
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.float32), persistent=False)
        self.register_buffer("_basis", torch.tensor(basis, dtype=torch.int64), persistent=False)
        self.usage = CodeUsageTracker(codebook_size=self.codebook_size, usage_window=usage_window)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, codebook_size={self.codebook_size}"

    def _half_width(self) -> Tensor:
        return torch.div(self._levels, 2, rounding_mode="floor")  # (D,)

    def bound(self, z: Tensor) -> Tensor:
        """Channels-last `(..., D)` fp32 -> values in `(-L/2, L/2)` (shifted for even `L`) before rounding."""
        half_l = (self._levels - 1) * (1 + _BOUND_EPS) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize `z` `(B, D, H, W)` (any float dtype); `quantized` in `[-1, 1]` has the dtype of `z`."""
        assert z.ndim == 4, f"expected (B, D, H, W) input, got shape {tuple(z.shape)}"
        B, D, H, W = z.shape
        assert D == self.codebook_dim, f"input has {D} channels, FSQ has {self.codebook_dim} levels"
        # fp32 with autocast off: bf16 moves values across rounding boundaries
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = rearrange(z.float(), "b d h w -> b h w d")
            bounded = self.bound(flat)
            rounded = bounded.round()
            half_width = self._half_width()
            scaled = bounded / half_width
            # value exactly rounded / half_width (so codes_from_indices is a bitwise inverse), gradient of the bound
            quantized = (rounded / half_width).detach() + (scaled - scaled.detach())
            indices = ((rounded + half_width).long() * self._basis).sum(dim=-1)  # (B, H, W)
            perplexity, usage = self.usage.update(indices, training=self.training)
            zero = flat.new_zeros(())
        quantized = rearrange(quantized, "b h w d -> b d h w").to(z.dtype).contiguous()
        return QuantizerOutput(quantized=quantized, indices=indices, loss=zero, commit_loss=zero,
                               codebook_loss=zero, perplexity=perplexity, usage=usage)

    @torch.no_grad()
    def codes_from_indices(self, indices: Tensor) -> Tensor:
        """Codes `(B, D, H, W)` fp32 of mixed-radix `indices` `(B, H, W)`: the exact inverse of quantization."""
        digits = (indices.long().unsqueeze(-1) // self._basis) % self._levels.long()  # (B, H, W, D)
        half_width = self._half_width()
        codes = (digits.float() - half_width) / half_width
        return rearrange(codes, "b h w d -> b d h w").contiguous()

    def window_usage(self) -> Tensor:
        return self.usage.window_usage()

    def training_metrics(self, suffix: str = "") -> dict[str, float]:
        return {f"codebook_usage_window_pct{suffix}": 100.0 * float(self.window_usage())}

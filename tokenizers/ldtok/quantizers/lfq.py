"""Lookup-free quantization (MAGVIT-v2, Yu et al. 2023) with its entropy loss.

Each of the `d` channels is quantized to its sign (`+1` / `-1`): `2 ** d` implicit codes, index = the bits read
most-significant first (as `vector-quantize-pytorch`'s `LFQ`, whose outputs, indices and entropy loss this module
reproduces with `entropy_groups=1`). The entropy loss `per_sample_entropy - diversity_gamma * codebook_entropy` uses
the soft assignment `softmax(2 <x, c> / temperature)` over the codes: it makes every position confident and the
batch use all codes. Its codebook term averages the assignment over the batch of **every rank**
(`global_mean_with_local_grad`), so 2 processes compute the loss of the concatenated batch.

With `entropy_groups=G` the `d` bits are split into `G` groups of `d / G` bits whose entropies are summed
(Open-MAGVIT2's factorization: `2 ** 18` codes cost two softmaxes over 512 instead of one over 262144). Per-sample
entropy is additive over independent groups; the codebook entropy of the groups is an upper bound of the joint one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..distributed import global_mean_with_local_grad
from ..outputs import QuantizerOutput
from .state import DiffusersQuantizerAPI
from .usage import CodeUsageTracker

MAX_BITS = 20  # 2**20 codes: the usage window holds one int64 per code


def entropy(probs: Tensor) -> Tensor:
    """Entropy (nats) along the last dim; `log` clamped at 1e-5, as in MAGVIT-v2 / `vector-quantize-pytorch`."""
    return -(probs * probs.clamp_min(1e-5).log()).sum(dim=-1)


class LookupFreeQuantizer(DiffusersQuantizerAPI, nn.Module):
    """LFQ, channels-first in and out.

    Args:
        codebook_dim (`int`): bits `d` (the input's channels), 1 to 20; `2 ** d` codes.
        entropy_weight (`float`, defaults to 0.1): weight of the entropy loss in `loss`.
        entropy_temperature (`float`, defaults to 0.01): temperature of the soft assignment.
        diversity_gamma (`float`, defaults to 1.0): weight of the codebook entropy inside the entropy loss.
        entropy_groups (`int`, defaults to 1): groups of bits whose entropies are computed separately; divides `d`.
        beta (`float`, defaults to 0.25): weight of the commitment loss `||x - sg(q)||^2`.
        usage_window (`int`, defaults to 100): training steps over which `window_usage()` counts the codes used.
    """

    spherical = False

    def __init__(self, *, codebook_dim: int, entropy_weight: float = 0.1, entropy_temperature: float = 0.01,
                 diversity_gamma: float = 1.0, entropy_groups: int = 1, beta: float = 0.25, usage_window: int = 100):
        super().__init__()
        if not 1 <= codebook_dim <= MAX_BITS:
            raise ValueError(f"codebook_dim must be in [1, {MAX_BITS}], got {codebook_dim}")
        if entropy_groups < 1 or codebook_dim % entropy_groups:
            raise ValueError(f"entropy_groups ({entropy_groups}) must divide codebook_dim ({codebook_dim})")
        if entropy_temperature <= 0.0:
            raise ValueError(f"entropy_temperature must be > 0, got {entropy_temperature}")
        self.codebook_dim = codebook_dim
        self.codebook_size = 2**codebook_dim
        self.entropy_weight = entropy_weight
        self.entropy_temperature = entropy_temperature
        self.diversity_gamma = diversity_gamma
        self.entropy_groups = entropy_groups
        self.beta = beta
        self.register_buffer("_mask", 2 ** torch.arange(codebook_dim - 1, -1, -1), persistent=False)  # MSB first
        bits = codebook_dim // entropy_groups
        group_codes = torch.arange(2**bits).unsqueeze(1).bitwise_and(2 ** torch.arange(bits - 1, -1, -1)) != 0
        self.register_buffer("_group_codebook", group_codes.float() * 2 - 1, persistent=False)  # (2^b, b) of +-1
        self.usage = CodeUsageTracker(codebook_size=self.codebook_size, usage_window=usage_window)

    @property
    def index_bits(self) -> int:
        """The index is a `d`-bit word, one bit per channel (MSB first): evaluation reports each bit's entropy."""
        return self.codebook_dim

    def extra_repr(self) -> str:
        return (f"codebook_dim={self.codebook_dim}, entropy_weight={self.entropy_weight}, "
                f"entropy_groups={self.entropy_groups}, beta={self.beta}")

    @property
    def code_scale(self) -> float:
        """The magnitude of every code's coordinates (1 for LFQ)."""
        return 1.0

    def prepare(self, x: Tensor) -> Tensor:
        """The vector that is quantized, channels-last fp32 (identity for LFQ)."""
        return x

    def entropy_terms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """`(per_sample_entropy, codebook_entropy)` of `x` `(N, d)` fp32 over every rank's rows (a collective)."""
        G = self.entropy_groups
        grouped = rearrange(x, "n (g b) -> n g b", g=G)
        codebook = self._group_codebook * self.code_scale  # (2^b, b)
        # -distance / T with distance = -2 <x, c> (euclidean up to terms constant in c)
        logits = 2.0 * torch.einsum("ngb,kb->ngk", grouped, codebook) / self.entropy_temperature
        probs = logits.softmax(dim=-1)  # (N, G, 2^b)
        N = x.shape[0]
        per_sample = global_mean_with_local_grad(entropy(probs).sum(dim=1).sum(), N)
        avg_probs = global_mean_with_local_grad(probs.sum(dim=0), N)  # (G, 2^b)
        return per_sample, entropy(avg_probs).sum()

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize `z` `(B, d, H, W)` (any float dtype); a collective in training mode (the entropy and usage).

        Returns:
            `QuantizerOutput`; `loss = beta * commit_loss + entropy_weight * entropy_loss` (the entropy term in
            training mode only), `quantized` in the dtype of `z`.
        """
        assert z.ndim == 4, f"expected (B, d, H, W) input, got shape {tuple(z.shape)}"
        B, D, H, W = z.shape
        assert D == self.codebook_dim, f"input has {D} channels, the quantizer has {self.codebook_dim} bits"
        # fp32 with autocast off: bf16 flips the sign of near-zero values and underflows the softmax
        with torch.autocast(device_type=z.device.type, enabled=False):
            x = self.prepare(rearrange(z.float(), "b d h w -> (b h w) d"))
            positive = x > 0
            q = torch.where(positive, self.code_scale, -self.code_scale)  # (N, d)
            indices = (positive.long() * self._mask).sum(dim=1)  # (N,)
            quantized = q + (x - x.detach())  # value exactly q, gradient identity to x
            commit_loss = F.mse_loss(x, q)
            if self.training:
                per_sample, codebook_entropy = self.entropy_terms(x)
                entropy_loss = per_sample - self.diversity_gamma * codebook_entropy
            else:
                entropy_loss = x.new_zeros(())
            loss = self.beta * commit_loss + self.entropy_weight * entropy_loss
            perplexity, usage = self.usage.update(indices, training=self.training)
        quantized = rearrange(quantized, "(b h w) d -> b d h w", b=B, h=H, w=W).to(z.dtype).contiguous()
        return QuantizerOutput(quantized=quantized, indices=indices.view(B, H, W), loss=loss, commit_loss=commit_loss,
                               codebook_loss=x.new_zeros(()), perplexity=perplexity, usage=usage,
                               entropy_loss=entropy_loss)

    @torch.no_grad()
    def bits_from_indices(self, indices: Tensor) -> Tensor:
        """Bits `(..., d)` bool of `indices` (most significant first)."""
        return indices.long().unsqueeze(-1).bitwise_and(self._mask) != 0

    @torch.no_grad()
    def codes_from_indices(self, indices: Tensor) -> Tensor:
        """Codes `(B, d, H, W)` fp32 of `indices` `(B, H, W)`: the exact inverse of quantization."""
        bits = self.bits_from_indices(indices)  # (B, H, W, d)
        codes = torch.where(bits, self.code_scale, -self.code_scale)
        return rearrange(codes, "b h w d -> b d h w").contiguous()

    def window_usage(self) -> Tensor:
        return self.usage.window_usage()

    def training_metrics(self, suffix: str = "") -> dict[str, float]:
        return {f"codebook_usage_window_pct{suffix}": 100.0 * float(self.window_usage())}

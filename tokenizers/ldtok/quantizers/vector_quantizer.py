"""Vector quantizer with an EMA (or gradient-trained) codebook, k-means init and dead-code restarts.

Fixes the usual complaints about taming / rosinality / LlamaGen quantizers:

- EMA statistics are all-reduced across ranks before every update, and k-means init and dead-code restarts pick the
  same vectors on every rank, so all ranks hold a bit-identical codebook (no silent divergence under DDP);
- distances, lookup and statistics run in fp32 with autocast off (no fp16 overflow / NaN, no bf16 near-tie flips);
- `beta` weights the commitment term (the encoder's), never the codebook term;
- k-means init and dead-code restarts against codebook collapse, with a windowed usage metric to watch it;
- SimVQ (Zhu et al. 2024, `codebook_transform="linear"`): the codes are a learned linear map of a frozen random basis,
  so a gradient step moves every code, used or not (no collapse at 262k codes); the export folds the map into the table;
- the rotation trick (Fifty et al. 2024, `gradient="rotation"`): the gradient reaching the encoder is that of the
  rotation and rescaling that takes `z_e` to its code, instead of the identity; the forward value is unchanged.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..distributed import all_reduce_sum_
from ..outputs import QuantizerOutput
from .kmeans import kmeans, nearest_codes, sample_rows
from .state import DiffusersQuantizerAPI

# Fixed seeds: every rank must make the same random choices, whatever its global RNG state.
_INIT_SEED = 0
_KMEANS_SEED = 1
_RESTART_SEED = 2**20  # + the training step, so restarts at different steps draw different vectors


# The constructor arguments of `VectorQuantizer` (the `QuantizerConfig` keys it takes).
VQ_FIELDS = ("codebook_size", "codebook_dim", "l2_normalize", "ema", "decay", "eps", "beta", "kmeans_init",
             "kmeans_iters", "dead_code_steps", "usage_window", "gradient", "codebook_transform")


def rotate_to(e: Tensor, q: Tensor) -> Tensor:
    """The rotation trick: `e` `(N, D)` rotated and rescaled onto `q` `(N, D)` (detached), differentiable in `e`.

    `R e * ||q|| / ||e||` with `R` the rotation taking `e / ||e||` to `q / ||q||` (treated as a constant, Fifty et
    al. 2024, eq. 4's efficient Householder form); its value is `q` up to rounding.
    """
    q = q.detach()
    e_norm = e.norm(dim=1, keepdim=True).clamp_min(1e-12)
    q_norm = q.norm(dim=1, keepdim=True).clamp_min(1e-12)
    u = (e / e_norm).detach()
    q_hat = q / q_norm
    w = F.normalize(u + q_hat, dim=1)
    rotated = e - 2 * (e * w).sum(1, keepdim=True) * w + 2 * (e * u).sum(1, keepdim=True) * q_hat
    return rotated * (q_norm / e_norm).detach()


class VectorQuantizer(DiffusersQuantizerAPI, nn.Module):
    """Nearest-neighbour vector quantizer, channels-first in and out.

    Arguments are those of `QuantizerConfig` (keyword-only); `VectorQuantizer.from_config(cfg)` builds from one.
    With `codebook_transform="linear"` (SimVQ, gradient mode only) `embedding` is a frozen basis buffer and
    `codebook_transform` an `nn.Linear(D, D)` (initialized to the identity): the codes are `embedding @ W^T`.

    State:
        - `embedding` (`(K, D)`): the codebook; a buffer when `ema=True`, an `nn.Parameter` otherwise. With
          `l2_normalize` the stored rows need not be unit norm: use `export_codebook()` for the table decoding uses.
        - training state (buffers, saved by `accelerator.save_state`, **dropped by the diffusers export**, which
          keeps only `export_codebook()`): `cluster_size` `(K,)` and `embed_sum` `(K, D)` (EMA mode only),
          `initialized` `()`, `num_steps` `()`, `steps_unused` `(K,)`, `last_used` `(K,)` (training step a code
          was last used, -1 = never), `num_restarts` `()` (total restarted codes), `last_restarts` `()` (codes
          restarted by the latest training step).

    Training-mode `forward` is a collective under `torch.distributed` (all-reduce of the code histogram and EMA sums;
    k-means and restarts also gather sizes and rows): call it on every rank, in step, as DDP requires anyway. Eval
    mode uses no collectives (its `perplexity` / `usage` are then this rank's). Keep this module in fp32 (use
    autocast for mixed precision): its EMA statistics are asserted to be fp32 in training.
    """

    def __init__(
        self,
        *,
        codebook_size: int = 16384,
        codebook_dim: int = 4,
        l2_normalize: bool = False,
        ema: bool = True,
        decay: float = 0.99,
        eps: float = 1e-5,
        beta: float = 0.25,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        dead_code_steps: int = 50,
        usage_window: int = 100,
        gradient: Literal["straight_through", "rotation"] = "straight_through",
        codebook_transform: Literal["none", "linear"] = "none",
    ):
        super().__init__()
        if gradient not in ("straight_through", "rotation"):
            raise ValueError(f"gradient must be 'straight_through' or 'rotation', got {gradient!r}")
        if codebook_transform not in ("none", "linear"):
            raise ValueError(f"codebook_transform must be 'none' or 'linear', got {codebook_transform!r}")
        if codebook_transform == "linear" and ema:
            raise ValueError("codebook_transform='linear' (SimVQ) trains the map by gradient: it needs ema=False")
        if codebook_size < 1 or codebook_dim < 1:
            raise ValueError(f"codebook_size and codebook_dim must be >= 1, got {codebook_size}, {codebook_dim}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if eps <= 0.0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if beta < 0.0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if kmeans_iters < 0 or dead_code_steps < 0:
            raise ValueError(f"kmeans_iters and dead_code_steps must be >= 0, got {kmeans_iters}, {dead_code_steps}")
        if usage_window < 1:
            raise ValueError(f"usage_window must be >= 1, got {usage_window}")
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.l2_normalize = l2_normalize
        self.ema = ema
        self.decay = decay
        self.eps = eps
        self.beta = beta
        self.kmeans_init = kmeans_init
        self.kmeans_iters = kmeans_iters
        self.dead_code_steps = dead_code_steps
        self.usage_window = usage_window
        self.gradient = gradient
        self.linear_codebook = codebook_transform == "linear"

        K, D = codebook_size, codebook_dim
        # unit-variance codes (taming's uniform(-1/K, 1/K) puts every code near 0 and collapses); a fixed generator
        # so ranks agree even without DDP's initial broadcast
        embedding = torch.randn(K, D, generator=torch.Generator().manual_seed(_INIT_SEED))
        if l2_normalize:
            embedding = F.normalize(embedding, dim=1)
        if ema:
            self.register_buffer("embedding", embedding)
            # cluster_size 1 and embed_sum == embedding keep embed_sum / cluster_size == embedding from the start
            self.register_buffer("cluster_size", torch.ones(K))
            self.register_buffer("embed_sum", embedding.clone())
        elif self.linear_codebook:
            self.register_buffer("embedding", embedding)  # SimVQ's frozen basis
            self.codebook_transform = nn.Linear(D, D, bias=False)
            nn.init.eye_(self.codebook_transform.weight)
        else:
            self.embedding = nn.Parameter(embedding)
        self.register_buffer("initialized", torch.tensor(0 if kmeans_init else 1, dtype=torch.int64))
        self.register_buffer("num_steps", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("steps_unused", torch.zeros(K, dtype=torch.int64))
        self.register_buffer("last_used", torch.full((K,), -1, dtype=torch.int64))
        self.register_buffer("num_restarts", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("last_restarts", torch.tensor(0, dtype=torch.int64))

    @classmethod
    def from_config(cls, config) -> VectorQuantizer:
        """Build from a `QuantizerConfig` (its `VQ_FIELDS`)."""
        return cls(**{name: getattr(config, name) for name in VQ_FIELDS})

    def extra_repr(self) -> str:
        return (
            f"codebook_size={self.codebook_size}, codebook_dim={self.codebook_dim}, ema={self.ema}, "
            f"l2_normalize={self.l2_normalize}, beta={self.beta}, gradient={self.gradient}, "
            f"codebook_transform={'linear' if self.linear_codebook else 'none'}"
        )

    # ------------------------------------------------------------------ lookup

    def _codebook_fp32(self) -> Tensor:
        """`(K, D)` fp32 table used for distances and lookup (normalized with `l2_normalize`); keeps the graph."""
        codes = self.embedding.float()
        if self.linear_codebook:
            codes = codes @ self.codebook_transform.weight.float().t()  # (K, D)
        return F.normalize(codes, dim=1) if self.l2_normalize else codes

    @torch.no_grad()
    def export_codebook(self) -> Tensor:
        """The `(K, D)` table decoding uses, in the codebook's dtype (normalized when `l2_normalize`).

        The model export writes it into diffusers' `VQModel.quantize.embedding.weight`.
        """
        with torch.autocast(device_type=self.embedding.device.type, enabled=False):
            return self._codebook_fp32().to(self.embedding.dtype)

    @torch.no_grad()
    def codes_from_indices(self, indices: Tensor) -> Tensor:
        """Codes of `indices`: the exact inverse of quantization (bitwise equal to eval `quantized` in fp32).

        Args:
            indices (`Tensor` of shape `(B, H, W)`, int64): code indices.

        Returns:
            `Tensor` of shape `(B, D, H, W)` in the codebook's dtype (not differentiable).
        """
        codes = F.embedding(indices, self.export_codebook())  # (B, H, W, D)
        return rearrange(codes, "b h w d -> b d h w")

    @torch.no_grad()
    def _to_basis(self, rows: Tensor) -> Tensor:
        """Basis rows whose codes are `rows` `(M, D)`: `rows` itself, or SimVQ's `solve(W, rows^T)^T`."""
        if not self.linear_codebook:
            return rows
        weight = self.codebook_transform.weight.detach().float()  # codes = basis @ W^T
        return torch.linalg.lstsq(weight, rows.t()).solution.t()

    def training_metrics(self, suffix: str = "") -> dict[str, float]:
        """Training-log metrics: windowed usage in percent, codes restarted by the latest step and in total."""
        return {
            f"codebook_usage_window_pct{suffix}": 100.0 * float(self.window_usage()),
            f"codebook_restarts{suffix}": float(self.last_restarts),
            f"codebook_restarts_total{suffix}": float(self.num_restarts),
        }

    @torch.no_grad()
    def window_usage(self) -> Tensor:
        """Fraction of codes used in the last `usage_window` training steps (all ranks), a `()` fp32 tensor."""
        recent = (self.last_used >= 0) & (self.last_used >= self.num_steps - self.usage_window)
        return recent.float().mean()

    # ------------------------------------------------------------------ forward

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize `z` to its nearest codes.

        Args:
            z (`Tensor` of shape `(B, D, H, W)`): encoder output after `quant_conv`; any float dtype.

        Returns:
            `QuantizerOutput`; `quantized` has the dtype of `z`, every loss and metric is fp32.
        """
        assert z.ndim == 4, f"expected (B, D, H, W) input, got shape {tuple(z.shape)}"
        B, D, H, W = z.shape
        assert D == self.codebook_dim, f"input has {D} channels, codebook_dim is {self.codebook_dim}"

        # fp32 with autocast off: fp16 squared distances overflow to inf (NaN), bf16 ones flip near ties
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = rearrange(z.float(), "b d h w -> (b h w) d")
            if self.l2_normalize:
                flat = F.normalize(flat, dim=1)
            if self.training:
                self._check_fp32_state()
                with torch.no_grad():
                    if not bool(self.initialized):
                        self._init_kmeans(flat.detach())
                    if self.dead_code_steps > 0:
                        self._restart_dead_codes(flat.detach())

            codes = self._codebook_fp32()  # (K, D)
            idx = nearest_codes(flat.detach(), codes.detach())  # (B*H*W,)
            z_q = F.embedding(idx, codes)  # (B*H*W, D); graph to the codebook in gradient mode

            commit_loss = F.mse_loss(flat, z_q.detach())  # beta's term: gradient to the encoder only
            if self.ema:
                codebook_loss = flat.new_zeros(())
            else:
                codebook_loss = F.mse_loss(flat.detach(), z_q)  # gradient to the codebook only
            loss = self.beta * commit_loss + codebook_loss

            # value exactly z_q (so codes_from_indices is a bitwise inverse); gradient to z: the identity
            # (straight-through) or the rotation trick's. (taming's z + (z_q - z).detach() rounds the value.)
            carrier = rotate_to(flat, z_q) if self.gradient == "rotation" else flat
            quantized = z_q.detach() + (carrier - carrier.detach())

            if self.training:
                with torch.no_grad():
                    counts = self._update_statistics(flat.detach(), idx)
            else:
                counts = torch.bincount(idx, minlength=self.codebook_size).float()
            probs = counts / counts.sum().clamp_min(1.0)
            perplexity = torch.exp(-torch.special.xlogy(probs, probs).sum())
            usage = (counts > 0).float().mean()

        # contiguous NCHW: the rearranged view has channels-last strides, and convolutions pick other kernels for those
        quantized = rearrange(quantized, "(b h w) d -> b d h w", b=B, h=H, w=W).to(z.dtype).contiguous()
        return QuantizerOutput(
            quantized=quantized,
            indices=idx.view(B, H, W),
            loss=loss,
            commit_loss=commit_loss,
            codebook_loss=codebook_loss,
            perplexity=perplexity,
            usage=usage,
        )

    # ------------------------------------------------------------------ training state

    def _check_fp32_state(self) -> None:
        assert self.embedding.dtype == torch.float32, (
            f"quantizer codebook is {self.embedding.dtype}; keep the quantizer in fp32 and use autocast for mixed "
            "precision (EMA statistics and Laplace smoothing underflow in half precision)"
        )

    def _init_kmeans(self, flat: Tensor) -> None:
        """k-means over every rank's `flat` `(N_rank, D)`; identical result on every rank."""
        generator = torch.Generator().manual_seed(_KMEANS_SEED)
        centroids, counts = kmeans(
            flat, self.codebook_size, iters=self.kmeans_iters, generator=generator, l2_normalize=self.l2_normalize
        )
        self.embedding.copy_(self._to_basis(centroids))
        if self.ema:
            # EMA stats consistent with the centroids, at the scale of one batch's counts
            self.cluster_size.copy_(counts)
            self.embed_sum.copy_(centroids * counts.unsqueeze(1))
        self.steps_unused.zero_()
        self.initialized.fill_(1)

    def _restart_dead_codes(self, flat: Tensor) -> None:
        """Replace codes unused for `dead_code_steps` steps by encoder outputs drawn from every rank's batch.

        `steps_unused` is identical on every rank (built from all-reduced counts), so all ranks agree on whether to
        enter the collectives, and the draw uses a generator seeded by the step, so they pick the same vectors.
        """
        dead = self.steps_unused >= self.dead_code_steps
        num_dead = int(dead.sum())
        self.last_restarts.fill_(num_dead)
        if num_dead == 0:
            return
        generator = torch.Generator().manual_seed(_RESTART_SEED + int(self.num_steps))
        new_codes = sample_rows(flat, num_dead, generator=generator)  # (num_dead, D)
        dead_idx = dead.nonzero().squeeze(1)
        self.embedding[dead_idx] = self._to_basis(new_codes).to(self.embedding.dtype)
        if self.ema:
            self.cluster_size[dead_idx] = 1.0
            self.embed_sum[dead_idx] = new_codes
        self.steps_unused[dead_idx] = 0
        self.num_restarts.add_(num_dead)

    def _update_statistics(self, flat: Tensor, idx: Tensor) -> Tensor:
        """All-reduce this batch's code histogram (and sums), apply the EMA update, track usage.

        Args:
            flat (`Tensor` of shape `(N_rank, D)`, fp32): this rank's (normalized) encoder outputs.
            idx (`Tensor` of shape `(N_rank,)`): their codes.

        Returns:
            `(K,)` fp32 counts of every code over all ranks' batches.
        """
        K, D = self.codebook_size, self.codebook_dim
        if self.ema:
            packed = flat.new_zeros(K, D + 1)  # [sums | counts]: one collective for both
            packed[:, :D].index_add_(0, idx, flat)
            packed[:, D].index_add_(0, idx, flat.new_ones(idx.shape[0]))
            all_reduce_sum_(packed)
            sums, counts = packed[:, :D], packed[:, D]

            self.cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
            self.embed_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (n + K * self.eps) * n  # Laplace smoothing
            updated = self.embed_sum / smoothed.unsqueeze(1)
            # only codes used by this step move; the others stay bit-identical
            self.embedding.copy_(torch.where(counts.unsqueeze(1) > 0, updated, self.embedding))
        else:
            counts = all_reduce_sum_(torch.bincount(idx, minlength=K).float())

        used = counts > 0
        self.steps_unused.copy_(torch.where(used, torch.zeros_like(self.steps_unused), self.steps_unused + 1))
        self.last_used.copy_(torch.where(used, self.num_steps.expand_as(self.last_used), self.last_used))
        self.num_steps.add_(1)
        return counts

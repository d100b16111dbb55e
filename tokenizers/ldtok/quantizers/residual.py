"""Residual vector quantization (RQ-VAE, Lee et al. 2022; SoundStream): S stages of `VectorQuantizer`, each quantizing
what the previous stages left, `z_q = q_0 + q_1 + ... + q_{S-1}`.

Every stage is a full `VectorQuantizer` (EMA or gradient codebook, k-means init on its own residuals, dead-code
restarts, SimVQ), all ranks agreeing; the gradient of the sum passes straight through to the input. Quantize dropout
(a step uses only the first `n` stages) is drawn from a generator seeded by the step, so every rank drops the same
stages.

`indices` are `(B, S, H, W)`, stage axis second; a latent shard stores each stage as its own `(N, h, w)` field,
`indices_stage0` ... `indices_stage{S-1}` (`Tokenizer.encode_fields`, `ldtok.latent_kinds`), which the tokenizer's
`index_stages` (this quantizer's `num_stages`) announces.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..outputs import QuantizerOutput
from .state import DiffusersQuantizerAPI
from .vector_quantizer import VQ_FIELDS, VectorQuantizer

_DROPOUT_SEED = 3 * 2**20  # + the training step


class ResidualVectorQuantizer(DiffusersQuantizerAPI, nn.Module):
    """Residual VQ, channels-first in and out.

    Args:
        num_stages (`int`): stages S.
        shared_codebook (`bool`, defaults to `False`): one `VectorQuantizer` applied at every stage (its statistics,
            usage window and dead-code counters then advance once per stage call).
        quantize_dropout (`float`, defaults to 0.0): probability that a training step uses only the first `n`
            stages, `n` uniform in `1 .. S - 1`; the dropped stages' indices are -1 in that step's output.
        **stage_options: `VectorQuantizer`'s keyword arguments, for every stage.
    """

    def __init__(self, *, num_stages: int, shared_codebook: bool = False, quantize_dropout: float = 0.0,
                 stage_options: dict):
        super().__init__()
        if num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {num_stages}")
        self.num_stages = num_stages
        self.shared_codebook = shared_codebook
        self.quantize_dropout = quantize_dropout
        count = 1 if shared_codebook else num_stages
        self.stages = nn.ModuleList(VectorQuantizer(**stage_options) for _ in range(count))
        self.codebook_size = self.stages[0].codebook_size
        self.codebook_dim = self.stages[0].codebook_dim
        self.register_buffer("num_steps", torch.tensor(0, dtype=torch.int64))

    @classmethod
    def from_config(cls, config) -> ResidualVectorQuantizer:
        return cls(num_stages=config.num_stages, shared_codebook=config.shared_codebook,
                   quantize_dropout=config.quantize_dropout,
                   stage_options={name: getattr(config, name) for name in VQ_FIELDS})

    def extra_repr(self) -> str:
        return f"num_stages={self.num_stages}, shared_codebook={self.shared_codebook}"

    def stage(self, s: int) -> VectorQuantizer:
        return self.stages[0 if self.shared_codebook else s]

    def _active_stages(self) -> int:
        if not self.training or self.quantize_dropout <= 0 or self.num_stages == 1:
            return self.num_stages
        generator = torch.Generator().manual_seed(_DROPOUT_SEED + int(self.num_steps))
        self.num_steps.add_(1)
        if torch.rand((), generator=generator).item() >= self.quantize_dropout:
            return self.num_stages
        return int(torch.randint(1, self.num_stages, (), generator=generator))

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize `z` `(B, D, H, W)`; `indices` are `(B, S, H, W)`, `stages` every stage's output."""
        B, D, H, W = z.shape
        active = self._active_stages()
        residual = z.float()
        total = None
        outputs = []
        for s in range(active):
            out = self.stage(s)(residual)  # quantized: (B, D, H, W) fp32
            outputs.append(out)
            total = out.quantized.detach() if total is None else total + out.quantized.detach()
            residual = residual - out.quantized.detach()
        # straight-through on the sum (RQ-VAE): value exactly the codes' sum, gradient identity to z (the stages'
        # own straight-through would pass it S times); the stages' commitment terms reach z through `residual`
        flat = z.float()
        total = total + (flat - flat.detach())
        indices = torch.full((B, self.num_stages, H, W), -1, dtype=torch.int64, device=z.device)
        indices[:, :active] = torch.stack([o.indices for o in outputs], dim=1)
        stack = lambda name: torch.stack([getattr(o, name) for o in outputs])  # noqa: E731
        return QuantizerOutput(
            quantized=total.to(z.dtype), indices=indices, loss=stack("loss").sum(),
            commit_loss=stack("commit_loss").sum(), codebook_loss=stack("codebook_loss").sum(),
            perplexity=stack("perplexity").mean(), usage=stack("usage").mean(), stages=outputs,
        )

    @torch.no_grad()
    def codes_from_indices(self, indices: Tensor) -> Tensor:
        """`(B, D, H, W)` sum of every stage's codes of `indices` `(B, S, H, W)`: the exact inverse (eval mode)."""
        assert indices.ndim == 4 and indices.shape[1] == self.num_stages, (
            f"expected (B, {self.num_stages}, H, W) indices, got shape {tuple(indices.shape)}"
        )
        total = None
        for s in range(self.num_stages):
            codes = self.stage(s).codes_from_indices(indices[:, s]).float()
            total = codes if total is None else total + codes
        return total

    def window_usage(self) -> Tensor:
        return torch.stack([q.window_usage() for q in self.stages]).mean()

    def training_metrics(self, suffix: str = "") -> dict[str, float]:
        metrics = {}
        for s, q in enumerate(self.stages):
            metrics.update(q.training_metrics(f"{suffix}_stage{s}" if len(self.stages) > 1 else suffix))
        return metrics

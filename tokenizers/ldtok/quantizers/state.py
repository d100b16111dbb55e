"""Helpers around a quantizer's state, shared by the VQ families (`models/vqgan.py`, `models/vqvae2.py`) and the
evaluation: eval mode for a block, training-log metrics, structural checks against a checkpoint, loading a code table,
and the two calls diffusers' `VQModel` makes on its `quantize` module (so a `VQModel` holding one of ours still works
through its own `encode` / `decode` / `forward`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .config import QuantizerConfig

# QuantizerConfig fields that change the quantizer's state layout or the meaning of its codes: a checkpoint must agree.
STRUCTURAL_QUANTIZER_FIELDS = ("type", "codebook_size", "codebook_dim", "l2_normalize", "ema")


@contextlib.contextmanager
def quantizers_eval(*quantizers: nn.Module) -> Iterator[None]:
    """Put quantizers in eval mode for the block (no EMA update, no k-means, no restart, no collective), then restore
    their mode. Only the quantizers change mode: the diffusers blocks behave the same in both."""
    modes = [q.training for q in quantizers]
    try:
        for q in quantizers:
            q.eval()
        yield
    finally:
        for q, mode in zip(quantizers, modes):
            q.train(mode)


def quantizer_metrics(quantizer: nn.Module, suffix: str = "") -> dict[str, float]:
    """Training-log metrics of one quantizer (its `training_metrics`): windowed usage in percent and, for VQ, the
    codes restarted by the latest training step and in total."""
    return quantizer.training_metrics(suffix)


def check_quantizer_matches(quantizer: QuantizerConfig, checkpoint: dict, *, source: str, key: str) -> None:
    """Raise a `ValueError` naming `model.<key>.<field>` when a structural field differs from the checkpoint's."""
    for name in STRUCTURAL_QUANTIZER_FIELDS:
        if name in checkpoint and getattr(quantizer, name) != checkpoint[name]:
            raise ValueError(
                f"model.{key}.{name}={getattr(quantizer, name)!r} does not match {source} ({name}={checkpoint[name]!r})"
            )


@torch.no_grad()
def load_codebook_(quantizer: nn.Module, table: Tensor) -> None:
    """Start a `VectorQuantizer` from a `(K, D)` code table: the EMA statistics agree with it (`embed_sum = table`,
    `cluster_size = 1`) and it is marked initialized, so k-means does not overwrite it."""
    K, D = quantizer.codebook_size, quantizer.codebook_dim
    if tuple(table.shape) != (K, D):
        raise ValueError(f"codebook of shape {tuple(table.shape)}, the quantizer expects {(K, D)}")
    table = table.to(quantizer.embedding.device, torch.float32)
    quantizer.embedding.copy_(table)
    if quantizer.ema:
        quantizer.embed_sum.copy_(table)
        quantizer.cluster_size.fill_(1.0)
    quantizer.initialized.fill_(1)
    quantizer.steps_unused.zero_()


class DiffusersQuantizerAPI:
    """Mixin of ldtok's quantizers: the calls diffusers' `VQModel` makes on `self.quantize`.

    `VQModel.decode(h)` unpacks `quant, commit_loss, _ = self.quantize(h)` (our `QuantizerOutput` iterates as
    diffusers' `(quantized, loss, (perplexity, None, indices))`), and `decode(indices, force_not_quantize=True,
    shape=(B, h, w, D))` with `lookup_from_codebook` calls `get_codebook_entry(indices, shape)`.
    """

    def get_codebook_entry(self, indices: Tensor, shape: tuple[int, ...] | None = None) -> Tensor:
        """Codes `(B, D, h, w)` of `indices` (`(B, h, w)`, or flat with `shape=(B, h, w, D)`)."""
        if shape is not None and indices.ndim < 3:
            indices = indices.reshape(*shape[:3])  # (B, h, w)
        return self.codes_from_indices(indices.long())


__all__ = [
    "STRUCTURAL_QUANTIZER_FIELDS", "DiffusersQuantizerAPI", "check_quantizer_matches", "load_codebook_",
    "quantizer_metrics", "quantizers_eval",
]

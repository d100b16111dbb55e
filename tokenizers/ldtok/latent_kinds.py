"""Latent kinds: what a shard directory stores per sample (`index.json`'s `kind`), independent of the model family.

A model *family* (`model.type`: `kl`, `mlp`, `vae2`, `vqgan`, `vqvae2`) is an architecture; a *latent kind* is what
its encoder produces and what a shard stores. Several families share a kind: `kl` and `mlp` both give `kl` latents
(a diagonal Gaussian posterior), a `vqgan` with any quantizer gives `vq` indices. This module is light (torch only), so
shard readers and priors can use it without loading the model code; `ldtok.models.base.Tokenizer` is the model side.

| kind     | fields (row = sample)                                              | stored dtype                        |
|----------|--------------------------------------------------------------------|-------------------------------------|
| `kl`     | `mean`, `logvar` `(C, h, w)`                                       | float16 / bfloat16 / float32        |
| `vq`     | `indices` `(h, w)` (residual VQ: `(S, h, w)`)                      | `index_dtype_for(codebook_size)`    |
| `vqvae2` | `indices_top` `(h_t, w_t)`, `indices_bottom` `(h_b, w_b)`          | `index_dtype_for(max codebook)`     |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GAUSSIAN_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

FIELD_DESCRIPTIONS = {
    "mean": "posterior mean (C, h, w)",
    "logvar": "posterior log-variance (C, h, w)",
    "indices": "codebook indices (h, w)",
    "indices_top": "top-level codebook indices (h_t, w_t)",
    "indices_bottom": "bottom-level codebook indices (h_b, w_b)",
    "label": "class label, int64 scalar",
}


@dataclass(frozen=True)
class LatentKind:
    """One latent kind.

    Args:
        name (`str`): the `kind` written in shards and `index.json`.
        fields (`tuple[str, ...]`): the latent fields a shard stores (without `_flip` twins), in order.
        gaussian (`bool`): `True`: the fields are a diagonal Gaussian posterior (`mean`, `logvar`), stored as floats;
            `False`: they are integer code indices, one field per code level.
    """

    name: str
    fields: tuple[str, ...]
    gaussian: bool

    def description(self, field: str) -> str:
        base = field.removesuffix("_flip")
        return FIELD_DESCRIPTIONS[base] + (", horizontally flipped image" if field.endswith("_flip") else "")


LATENT_KINDS: dict[str, LatentKind] = {
    "kl": LatentKind(name="kl", fields=("mean", "logvar"), gaussian=True),
    "vq": LatentKind(name="vq", fields=("indices",), gaussian=False),
    "vqvae2": LatentKind(name="vqvae2", fields=("indices_top", "indices_bottom"), gaussian=False),
}


def latent_kind(name: str) -> LatentKind:
    """The `LatentKind` called `name` (`ValueError` naming the known kinds otherwise)."""
    if name not in LATENT_KINDS:
        raise ValueError(f"unknown latent kind {name!r}: shards store one of {sorted(LATENT_KINDS)}")
    return LATENT_KINDS[name]


def index_dtype_for(codebook_size: int) -> torch.dtype:
    """Smallest safetensors integer dtype that holds the indices `0 .. codebook_size - 1`.

    uint8 up to 256 codes, int16 up to 32768, int32 beyond. uint16 is avoided although recent safetensors/torch store
    it: torch gained uint16 only in 2.3 and most CPU ops (indexing, embedding) still reject it, so readers would have to
    convert before every use; int16 costs nothing below 32768 codes.
    """
    if codebook_size < 1:
        raise ValueError(f"codebook_size must be positive, got {codebook_size}")
    if codebook_size <= 256:
        return torch.uint8
    if codebook_size <= 32768:
        return torch.int16
    if codebook_size > 2**31:
        raise ValueError(f"codebook_size {codebook_size} does not fit int32 indices")
    return torch.int32


__all__ = ["GAUSSIAN_DTYPES", "LATENT_KINDS", "LatentKind", "index_dtype_for", "latent_kind"]

"""Latent kinds: what a shard directory stores per sample (`index.json`'s `kind`), independent of the model family.

A model *family* (`model.type`: `kl`, `mlp`, `vae2`, `vqgan`, `vqvae2`) is an architecture; a *latent kind* is what
its encoder produces and what a shard stores. Several families share a kind: `kl` and `mlp` both give `kl` latents
(a diagonal Gaussian posterior), a `vqgan` with any quantizer gives `vq` indices. This module is light (torch only), so
shard readers and priors can use it without loading the model code; `ldtok.models.base.Tokenizer` is the model side.

| kind     | fields (row = sample)                                              | stored dtype                        |
|----------|--------------------------------------------------------------------|-------------------------------------|
| `kl`     | `mean`, `logvar` `(C, h, w)`                                       | float16 / bfloat16 / float32        |
| `vq`     | `indices` `(h, w)`                                                 | `index_dtype_for(codebook_size)`    |
| `vqvae2` | `indices_top` `(h_t, w_t)`, `indices_bottom` `(h_b, w_b)`          | `index_dtype_for(max codebook)`     |

**Residual stages.** A tokenizer whose quantizer has `S` residual stages (residual VQ, `LatentKind.with_stages`) keeps
its kind (`vq`) and stores each code level as one tensor per stage: `indices_stage0`, `indices_stage1`, ...,
`indices_stage{S-1}`, each `(h, w)` in `index_dtype_for(codebook_size)` (`uint8` up to 256 codes per stage). There is
no plain `indices` field then, so a reader that knows only the single-map layout fails on a missing field instead of
reading stage 0 alone. `stored_latent(kind, fields)` reads the stage count back from a manifest's fields; shards of
the earlier residual layout (one `indices` tensor `(S, h, w)` with a stage axis) are refused with a one-line
`LdtokError` that says to re-encode.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

from .errors import LdtokError

GAUSSIAN_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

FIELD_DESCRIPTIONS = {
    "mean": "posterior mean (C, h, w)",
    "logvar": "posterior log-variance (C, h, w)",
    "indices": "codebook indices (h, w)",
    "indices_top": "top-level codebook indices (h_t, w_t)",
    "indices_bottom": "bottom-level codebook indices (h_b, w_b)",
    "label": "class label, int64 scalar",
}
STAGE_RE = re.compile(r"^(?P<level>.+)_stage(?P<stage>\d+)$")


def stage_field(level: str, stage: int) -> str:
    """The field holding residual stage `stage` of code level `level` (`indices` -> `indices_stage0`, ...)."""
    return f"{level}_stage{stage}"


@dataclass(frozen=True)
class LatentKind:
    """One latent kind.

    Args:
        name (`str`): the `kind` written in shards and `index.json`.
        fields (`tuple[str, ...]`): the latent fields a shard stores (without `_flip` twins), in order.
        gaussian (`bool`): `True`: the fields are a diagonal Gaussian posterior (`mean`, `logvar`), stored as floats;
            `False`: they are integer code indices, one field per code level (and per stage, with `num_stages`).
        num_stages (`int`, *optional*): residual stages `S` (`with_stages`): every code level is stored as `S` fields
            `{level}_stage{s}`; `None`: one field per level.
        levels (`tuple[str, ...]`, defaults to `fields`): the code levels' field names without the stage suffix.
    """

    name: str
    fields: tuple[str, ...]
    gaussian: bool
    num_stages: int | None = None
    levels: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.levels:
            object.__setattr__(self, "levels", self.fields)

    def with_stages(self, num_stages: int) -> LatentKind:
        """This kind with each code level stored as `num_stages` residual-stage fields (`indices_stage0`, ...)."""
        if self.gaussian or self.num_stages is not None:
            raise ValueError(f"kind {self.name!r} {'is Gaussian' if self.gaussian else 'already has stages'}: "
                             "only code levels take residual stages")
        if num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {num_stages}")
        fields = tuple(stage_field(level, s) for level in self.levels for s in range(num_stages))
        return replace(self, fields=fields, num_stages=num_stages, levels=self.levels)

    def fields_by_level(self) -> dict[str, tuple[str, ...]]:
        """`{level: its fields}`: one field per level, or its `num_stages` stage fields in stage order."""
        if self.num_stages is None:
            return {level: (level,) for level in self.levels}
        return {level: tuple(stage_field(level, s) for s in range(self.num_stages)) for level in self.levels}

    def description(self, field: str) -> str:
        base = field.removesuffix("_flip")
        staged = STAGE_RE.match(base)
        text = FIELD_DESCRIPTIONS[staged["level"] if staged else base]
        if staged:
            text += f", residual stage {staged['stage']}"
        return text + (", horizontally flipped image" if field.endswith("_flip") else "")


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


def stored_latent(kind: str, fields: dict | None) -> LatentKind:
    """The `LatentKind` of a shard directory: its `kind` with the residual stages its stored `fields` show.

    Args:
        kind (`str`): the manifest's `kind`.
        fields (`dict`, *optional*): the manifest's `fields` (`{name: {"dtype", "shape", ...}}`; `None`: no sample).

    Raises:
        `LdtokError`: shards of the earlier residual-VQ layout (one index tensor `(S, h, w)` with a stage axis), or
        stage fields that do not cover every level's stages `0 .. S-1`. `ValueError`: an unknown kind.
    """
    base = latent_kind(kind)
    if base.gaussian or not fields:
        return base
    stages = {level: set() for level in base.levels}
    for name in fields:
        m = STAGE_RE.match(name)
        if m and m["level"] in stages:
            stages[m["level"]].add(int(m["stage"]))
    if not any(stages.values()):
        old = [name for name in base.levels if name in fields and len(fields[name]["shape"]) != 2]
        if old:
            raise LdtokError(f"these shards store residual-VQ indices in the earlier layout ({old[0]!r} of shape "
                             f"{fields[old[0]]['shape']}, a stage axis first), which ldtok no longer reads: "
                             "re-encode them with `ldtok encode` (one tensor per stage: indices_stage0, ...)")
        return base
    counts = {len(found) for found in stages.values()}
    S = max(counts)
    if len(counts) != 1 or any(found != set(range(S)) for found in stages.values()):
        raise LdtokError(f"kind {kind!r} shards with incomplete residual-stage fields "
                         f"{ {level: sorted(found) for level, found in stages.items()} }: re-encode them")
    return base.with_stages(S)


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


__all__ = ["GAUSSIAN_DTYPES", "LATENT_KINDS", "LatentKind", "index_dtype_for", "latent_kind", "stage_field",
           "stored_latent"]

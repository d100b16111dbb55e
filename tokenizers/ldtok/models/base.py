"""The `Tokenizer` interface: what every model family answers, so that nobody switches on its kind.

A shard writer, the decode command, a prior or an evaluator asks the tokenizer what it stores and how to decode it
(as diffusers' pipelines call `vae.encode(...)` whatever the VAE is), instead of `if kind == "vq": ...`.

**Family vs latent kind.** `family` is the architecture, the `model.type` of a training config (`"kl"`, `"mlp"`,
`"vae2"`, `"vqgan"`, `"vqvae2"`). `latent_kind` is what the encoder produces and what a shard directory stores, the
`kind` of its `index.json` (`"kl"`: a Gaussian posterior `mean` / `logvar`; `"vq"`: one map of code indices;
`"vqvae2"`: top and bottom maps; see `ldtok.latent_kinds`). Several families share a latent kind (`kl` and `mlp` store
`kl` latents; a `vqgan` with any quantizer stores `vq`), so `model.type="vqgan"` writes shards of kind `"vq"`. The
kind values of existing manifests are latent kinds and stay valid. `Tokenizer.kind` is `latent_kind` (its old name).

Every family implements:

- `family`, `latent_kind` (class attributes): the two names above;
- `latent`: the `LatentKind` (its fields; Gaussian or indices), a one-line `LdtokError` for a family without a shard
  format; `has_gaussian_latent`: `latent.gaussian`, `False` for those families (never raises);
- `level_names`: code / latent levels, one per quantizer output (`["code"]`, `["top", "bottom"]`; `[]` for one
  Gaussian latent; residual VQ is one level `"code"` of `index_stages` stages);
- `codebook_sizes`: codes per level (`[]` for Gaussian latents; residual VQ: the codes of each stage's codebook);
- `index_stages`: residual stages per code level (`None`: one index map per level); a shard then stores each level as
  one field per stage, `indices_stage0`, `indices_stage1`, ... (`ldtok.latent_kinds`);
- `field_codebook_sizes`: `{field: codes}` for every index field a shard stores (`{}` for Gaussian latents);
- `shard_fields(dtype=...)`: `{field: stored torch dtype}` of what a shard stores (without the `_flip` twins);
- `encode_fields(x, dtype=...)`: `{field: (B, ...) tensor}`: `mean` / `logvar` in `dtype`, or int64 `(B, h, w)`
  indices per level (and per stage);
- `decode_fields(fields, sample=..., generator=...)`: images `(B, C, H, W)` in [-1, 1] from those fields (Gaussian:
  the mean, or a posterior sample);
- `last_layer`: the decoder's output weight (for the adaptive GAN weight); `downsample_factor`: what image sides must
  be multiples of; `config_sha256()`: the architecture's hash; `export(path)`: write the model directory.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ..errors import LdtokError
from ..latent_kinds import GAUSSIAN_DTYPES, LatentKind, index_dtype_for, latent_kind

LOGVAR_CLAMP = (-30.0, 20.0)  # as diffusers' DiagonalGaussianDistribution


class Tokenizer:
    """Mixin of every trainable / loadable autoencoder (next to `nn.Module`); see the module docstring."""

    family: ClassVar[str]
    latent_kind: ClassVar[str]
    level_names: ClassVar[list[str]] = []

    @property
    def kind(self) -> str:
        """The latent kind (the shards' `kind`); the name the interface had before `latent_kind`."""
        return self.latent_kind

    @property
    def latent(self) -> LatentKind:
        """What a shard of this tokenizer stores (with `index_stages`, one field per level and stage)."""
        kind = latent_kind(self.latent_kind)
        stages = None if kind.gaussian else self.index_stages
        return kind if stages is None else kind.with_stages(stages)

    @property
    def index_stages(self) -> int | None:
        """Residual stages `S` per code level (indices `(B, S, h, w)`); `None`: one `(B, h, w)` map per level."""
        return None

    @property
    def has_gaussian_latent(self) -> bool:
        """Whether the latent is a diagonal Gaussian posterior (`encode_posterior` / `decode_latents`); never raises."""
        from ..latent_kinds import LATENT_KINDS

        kind = LATENT_KINDS.get(self.latent_kind)
        return kind is not None and kind.gaussian

    @property
    def codebook_sizes(self) -> list[int]:
        return []

    @property
    def field_codebook_sizes(self) -> dict[str, int]:
        """`{field: codes}` of every stored index field (a level's stage fields share its codebook size)."""
        latent = self.latent
        if latent.gaussian:
            return {}
        levels = latent.fields_by_level()
        return {field: size for fields, size in zip(levels.values(), self.codebook_sizes, strict=True)
                for field in fields}

    def shard_fields(self, *, dtype: torch.dtype = torch.float32) -> dict[str, torch.dtype]:
        """The latent fields a shard stores (without `_flip` twins) and their stored dtype (`dtype`: Gaussian)."""
        latent = self.latent
        if latent.gaussian:
            if dtype not in GAUSSIAN_DTYPES:
                raise ValueError(f"Gaussian latents are stored in one of {GAUSSIAN_DTYPES}, not {dtype}")
            return dict.fromkeys(latent.fields, dtype)
        return dict.fromkeys(latent.fields, index_dtype_for(max(self.codebook_sizes)))

    def encode_fields(self, x: Tensor, *, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """The shard fields of images `x` `(B, C, H, W)` in [-1, 1] (eval semantics; no codebook update).

        Returns:
            Gaussian kinds: `mean`, `logvar` `(B, C_z, h, w)` in `dtype`; index kinds: one int64 `(B, h, w)` tensor
            per level (residual VQ: per level and stage), named as `latent.fields`.
        """
        raise NotImplementedError

    def decode_fields(self, fields: dict[str, Tensor], *, sample: bool = False,
                      generator: torch.Generator | None = None) -> Tensor:
        """Images `(B, C, H, W)` from stored fields (names without `_flip`, any dtype or device).

        Args:
            fields (`dict[str, Tensor]`): `latent.fields` rows; Gaussian kinds need `logvar` only with `sample`.
            sample (`bool`, defaults to `False`): Gaussian kinds: decode `mean + std * eps` instead of the mean.
            generator (`torch.Generator`, *optional*): a CPU generator for `eps`.
        """
        raise NotImplementedError


class GaussianTokenizer(Tokenizer):
    """A tokenizer with one diagonal Gaussian latent: implements the interface through `encode_posterior(x)` and
    `decode_latents(z)` (unscaled latents)."""

    latent_kind: ClassVar[str] = "kl"

    @torch.no_grad()
    def encode_fields(self, x: Tensor, *, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        posterior = self.encode_posterior(x)
        # logvar is clamped to [-30, 20] by diffusers
        return {"mean": posterior.mean.to(dtype), "logvar": posterior.logvar.to(dtype)}  # (B, C, h, w) each

    @torch.no_grad()
    def decode_fields(self, fields: dict[str, Tensor], *, sample: bool = False,
                      generator: torch.Generator | None = None) -> Tensor:
        z = fields["mean"].float()  # (B, C, h, w), unscaled
        if sample:
            std = torch.exp(0.5 * fields["logvar"].float().clamp(*LOGVAR_CLAMP))
            z = z + std * torch.randn(z.shape, generator=generator)
        return self.decode_latents(z.to(self.last_layer.device))


class CodeTokenizer(Tokenizer):
    """A tokenizer of code indices: implements the interface through `encode_to_indices(x)` (a tensor, or a tuple
    of one tensor per level; `(B, S, h, w)` with residual stages) and `decode_indices(*levels)`."""

    @property
    def index_stages(self) -> int | None:
        # the quantizer says: residual VQ (`ldtok.quantizers.residual`) has `num_stages`, the others one index map
        return getattr(getattr(self, "quantizer", None), "num_stages", None)

    @torch.no_grad()
    def encode_fields(self, x: Tensor, *, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        levels = self.encode_to_indices(x)
        levels = tuple(levels) if isinstance(levels, tuple) else (levels,)
        fields = {}
        for names, indices in zip(self.latent.fields_by_level().values(), levels, strict=True):
            if self.index_stages is None:
                fields[names[0]] = indices  # (B, h, w)
            else:  # (B, S, h, w): one (B, h, w) tensor per stage
                assert indices.ndim == 4 and indices.shape[1] == len(names), (
                    f"expected (B, {len(names)}, h, w) residual indices, got shape {tuple(indices.shape)}")
                fields.update({name: indices[:, s].contiguous() for s, name in enumerate(names)})
        return fields

    @torch.no_grad()
    def decode_fields(self, fields: dict[str, Tensor], *, sample: bool = False,
                      generator: torch.Generator | None = None) -> Tensor:
        device = self.last_layer.device
        levels = []
        for names in self.latent.fields_by_level().values():
            maps = [fields[name].long().to(device) for name in names]  # (B, h, w) each
            levels.append(maps[0] if self.index_stages is None else torch.stack(maps, dim=1))  # (B, S, h, w)
        return self.decode_indices(*levels)


class NoShardFormat(Tokenizer):
    """A family whose latents have no shard format yet (`latent` raises a one-line `LdtokError`)."""

    @property
    def latent(self) -> LatentKind:
        raise LdtokError(f"model.type {self.family!r} has no latent-shard format yet (its latents are "
                         f"{self.latent_kind!r}); `ldtok encode` and the priors take kl, mlp, vqgan and vqvae2 models")


__all__ = ["CodeTokenizer", "GaussianTokenizer", "LatentKind", "NoShardFormat", "Tokenizer"]

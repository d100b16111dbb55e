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
- `level_names`: code / latent levels (`["code"]`, `["top", "bottom"]`; `[]` for one Gaussian latent);
- `codebook_sizes`: codes per level (`[]` for Gaussian latents);
- `shard_fields(dtype=...)`: `{field: stored torch dtype}` of what a shard stores (without the `_flip` twins);
- `encode_fields(x, dtype=...)`: `{field: (B, ...) tensor}`: `mean` / `logvar` in `dtype`, or int64 indices per level;
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
        """What a shard of this tokenizer stores."""
        return latent_kind(self.latent_kind)

    @property
    def has_gaussian_latent(self) -> bool:
        """Whether the latent is a diagonal Gaussian posterior (`encode_posterior` / `decode_latents`); never raises."""
        from ..latent_kinds import LATENT_KINDS

        kind = LATENT_KINDS.get(self.latent_kind)
        return kind is not None and kind.gaussian

    @property
    def codebook_sizes(self) -> list[int]:
        return []

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
            Gaussian kinds: `mean`, `logvar` `(B, C_z, h, w)` in `dtype`; index kinds: one int64 `(B, h, w)` (residual
            VQ: `(B, S, h, w)`) tensor per level, named as `latent.fields`.
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
    of one tensor per level) and `decode_indices(*levels)`."""

    @torch.no_grad()
    def encode_fields(self, x: Tensor, *, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        levels = self.encode_to_indices(x)
        levels = tuple(levels) if isinstance(levels, tuple) else (levels,)
        return dict(zip(self.latent.fields, levels, strict=True))

    @torch.no_grad()
    def decode_fields(self, fields: dict[str, Tensor], *, sample: bool = False,
                      generator: torch.Generator | None = None) -> Tensor:
        device = self.last_layer.device
        return self.decode_indices(*(fields[name].long().to(device) for name in self.latent.fields))


class NoShardFormat(Tokenizer):
    """A family whose latents have no shard format yet (`latent` raises a one-line `LdtokError`)."""

    @property
    def latent(self) -> LatentKind:
        raise LdtokError(f"model.type {self.family!r} has no latent-shard format yet (its latents are "
                         f"{self.latent_kind!r}); `ldtok encode` and the priors take kl, mlp, vqgan and vqvae2 models")


__all__ = ["CodeTokenizer", "GaussianTokenizer", "LatentKind", "NoShardFormat", "Tokenizer"]

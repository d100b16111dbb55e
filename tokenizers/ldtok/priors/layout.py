"""The layout of a tokenizer's codes in one token sequence, and back.

`CodeLayout` lays every level's code map out in raster order: VQGAN's `(h, w)` indices; VQ-VAE-2's top codes, then its
bottom codes. Each level has its own vocabulary offset (bottom token `top_codebook_size + i` is bottom code `i`), so one
softmax covers both levels and a position can only be sampled from its own range (`CodeLayout.allowed_tokens`).

Two kinds of codes take several tokens per position, written one after the other (position-major, so the prior
predicts a position's tokens in a row, each conditioned on the previous ones):

- residual VQ's stages (shard fields `indices_stage0` ... `indices_stage{S-1}`, `(h, w)` each): one token per stage
  (`stages`), stage `s` with its own vocabulary range;
- large implicit codebooks (LFQ / BSQ `2 ** 18`): with `groups=G` each code index is split into `G` digits of radix
  `K ** (1 / G)` (most significant first; the bits of LFQ split into groups of bits), each digit a token of its own
  range, so the vocabulary is `G * 512` instead of 262144 for 18 bits and `G = 2`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor

from ..config import ConfigError
from ..latent_kinds import stage_field, stored_latent

# level fields of the index kinds, derived from `ldtok.latent_kinds` (kept for ldtok.priors.transformer's re-export)


@dataclass
class CodeLevel:
    """One code map of a tokenizer, as laid out in the token sequence.

    Args:
        name (`str`): the shard field holding its indices (`"indices"`, `"indices_top"`, `"indices_bottom"`), or with
            `staged` the level's name before the stage suffix.
        height (`int`), width (`int`): the code map's size.
        codebook_size (`int`): codes of this level (per stage).
        offset (`int`): vocabulary offset of the level's first token range.
        stages (`int`, defaults to 1): residual stages (`staged`).
        groups (`int`, defaults to 1): digits each code is split into; `radix ** groups == codebook_size`.
        staged (`bool`, defaults to `False`): the codes are residual stages, one `(h, w)` map per stage in the fields
            `{name}_stage0` ... (`fields`).
    """

    name: str
    height: int
    width: int
    codebook_size: int
    offset: int
    stages: int = 1
    groups: int = 1
    staged: bool = False

    def __post_init__(self):
        assert self.radix**self.groups == self.codebook_size, (
            f"{self.name}: codebook_size {self.codebook_size} is not a {self.groups}-th power"
        )
        assert self.staged or self.stages == 1, f"{self.name}: {self.stages} stages need staged=True"

    @property
    def fields(self) -> tuple[str, ...]:
        """The shard fields of this level's codes, in stage order."""
        return tuple(stage_field(self.name, s) for s in range(self.stages)) if self.staged else (self.name,)

    @property
    def radix(self) -> int:
        return round(self.codebook_size ** (1.0 / self.groups))

    @property
    def tokens_per_position(self) -> int:
        return self.stages * self.groups

    @property
    def length(self) -> int:
        return self.height * self.width * self.tokens_per_position

    @property
    def vocab_span(self) -> int:
        """Vocabulary entries of this level: one range of `radix` tokens per stage and digit."""
        return self.tokens_per_position * self.radix

    def sub_offsets(self) -> Tensor:
        """`(stages * groups,)` int64: the first token of each stage's / digit's range."""
        return self.offset + torch.arange(self.tokens_per_position) * self.radix


def _groups_for(codebook_size: int, groups: int, name: str) -> int:
    radix = round(codebook_size ** (1.0 / groups))
    if groups < 1 or radix**groups != codebook_size:
        raise ConfigError(f"code_groups: {groups} does not split {name}'s {codebook_size} codes into equal digits "
                          f"(codebook_size must be a {groups}-th power; use 1)")
    return groups


class CodeLayout:
    """Code maps of one or more levels, concatenated in raster order into one token sequence.

    Args:
        levels (`list[CodeLevel]`): in sequence order, with non-overlapping vocabulary ranges.
    """

    def __init__(self, *, levels: list[CodeLevel]):
        assert levels, "a layout needs at least one level"
        self.levels = list(levels)
        ranges = sorted((lv.offset, lv.offset + lv.vocab_span) for lv in self.levels)
        for (_, end), (start, _) in itertools.pairwise(ranges):
            assert end <= start, f"levels have overlapping vocabulary ranges: {ranges}"

    @classmethod
    def from_manifest(cls, manifest: dict, *, codebook_sizes: list[int] | None = None, groups: int = 1
                      ) -> CodeLayout:
        """The layout of a VQ shard directory's `index.json` (`kind` `"vq"` or `"vqvae2"`; residual VQ's stage
        fields become one level of `stages` tokens per position).

        Args:
            manifest (`dict`): as returned by `ldtok.shards.load_manifest`.
            codebook_sizes (`list[int]`, *optional*): codes per level (`Tokenizer.codebook_sizes`; a residual level's
                stages share one size); defaults to the manifest's `codebook_size` for every level (for VQ-VAE-2 that
                is the larger level's: the vocabulary then has unused tokens).
            groups (`int`, defaults to 1): digits per code (`code_groups`), for large implicit codebooks.

        Raises:
            `LdtokError`: shards of the earlier residual layout (`ldtok.latent_kinds.stored_latent`).
        """
        kind = stored_latent(manifest["kind"], manifest["fields"])
        if kind.gaussian:
            raise ValueError(f"a code layout needs shards of code indices (kind 'vq' or 'vqvae2'), got {kind.name!r}")
        by_level = kind.fields_by_level()
        sizes = list(codebook_sizes) if codebook_sizes is not None else [manifest["codebook_size"]] * len(by_level)
        assert len(sizes) == len(by_level), f"{len(by_level)} levels need {len(by_level)} codebook sizes, got {sizes}"
        levels, offset = [], 0
        for (name, fields), size in zip(by_level.items(), sizes):
            h, w = manifest["fields"][fields[0]]["shape"]  # (h, w), every stage alike
            level = CodeLevel(name=name, height=h, width=w, codebook_size=size, offset=offset, stages=len(fields),
                              groups=_groups_for(size, groups, name), staged=kind.num_stages is not None)
            levels.append(level)
            offset += level.vocab_span
        return cls(levels=levels)

    @property
    def length(self) -> int:
        """Tokens per sequence."""
        return sum(lv.length for lv in self.levels)

    def tokens_per_step(self, residual_stages: str) -> int:
        """Tokens a prior step takes (`GPT.tokens_per_step`): 1 for `residual_stages="tokens"` (stages and digits as
        extra tokens); a position's stages and digits for `"summed"` (every level must have the same number).

        Raises:
            `ConfigError`: `"summed"` for levels of different tokens per position (VQ-VAE-2's levels are one each).
        """
        if residual_stages == "tokens":
            return 1
        counts = {lv.tokens_per_position for lv in self.levels}
        if len(counts) != 1:
            raise ConfigError(f"residual_stages: summed needs the same tokens per position in every level, got "
                              f"{ {lv.name: lv.tokens_per_position for lv in self.levels} } (use tokens)")
        return counts.pop()

    @property
    def vocab_size(self) -> int:
        return max(lv.offset + lv.vocab_span for lv in self.levels)

    def pack(self, codes: dict[str, Tensor]) -> Tensor:
        """Token sequences `(B, length)` int64 from the code maps `codes[field]` `(B, h, w)` of every level's
        `fields` (residual levels: one per stage)."""
        parts = []
        for lv in self.levels:
            c = torch.stack([codes[name].long() for name in lv.fields], dim=1)  # (B, S, h, w)
            assert c.shape[1:] == (lv.stages, lv.height, lv.width), (
                f"{lv.name}: codes of shape {tuple(c.shape)}, the layout has {lv.stages}x{lv.height}x{lv.width}"
            )
            powers = lv.radix ** torch.arange(lv.groups - 1, -1, -1, device=c.device)  # most significant first
            digits = (c.unsqueeze(-1) // powers) % lv.radix  # (B, S, h, w, G)
            tokens = rearrange(digits, "b s h w g -> b (h w) (s g)") + lv.sub_offsets().to(c.device)
            parts.append(rearrange(tokens, "b p t -> b (p t)"))  # raster order, a position's tokens together
        return torch.cat(parts, dim=1)

    def unpack(self, tokens: Tensor) -> dict[str, Tensor]:
        """Code maps `{field: (B, h, w)}` of every level's `fields` (residual levels: one per stage) of sequences
        `(B, length)`."""
        assert tokens.shape[1] == self.length, f"sequences of {tokens.shape[1]} tokens, the layout has {self.length}"
        codes, start = {}, 0
        for lv in self.levels:
            part = rearrange(tokens[:, start : start + lv.length], "b (p t) -> b p t", t=lv.tokens_per_position)
            digits = rearrange(part - lv.sub_offsets().to(part.device), "b (h w) (s g) -> b s h w g",
                               h=lv.height, s=lv.stages)
            powers = lv.radix ** torch.arange(lv.groups - 1, -1, -1, device=part.device)
            c = (digits * powers).sum(dim=-1)  # (B, S, h, w)
            codes.update({name: c[:, s] for s, name in enumerate(lv.fields)})  # (B, h, w) each
            start += lv.length
        return codes

    def allowed_tokens(self) -> Tensor:
        """`(length, vocab_size)` bool: the tokens of each position's level, stage and digit."""
        mask = torch.zeros(self.length, self.vocab_size, dtype=torch.bool)
        start = 0
        for lv in self.levels:
            for i, first in enumerate(lv.sub_offsets().tolist()):
                mask[start + i : start + lv.length : lv.tokens_per_position, first : first + lv.radix] = True
            start += lv.length
        return mask

    def to_json(self) -> dict:
        return {"levels": [vars(lv).copy() for lv in self.levels]}

    @classmethod
    def from_json(cls, data: dict) -> CodeLayout:
        """The layout `to_json` wrote. A residual level written before stages had their own fields (`stages > 1`,
        no `staged` key) reads as staged: its token sequence is the same, its codes now go to `indices_stage{s}`."""
        levels = [dict(lv) for lv in data["levels"]]
        for lv in levels:
            lv.setdefault("staged", lv.get("stages", 1) > 1)
        return cls(levels=[CodeLevel(**lv) for lv in levels])

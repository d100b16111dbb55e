"""`model.quantizer`: which quantizer a VQ model uses and its hyperparameters, validated; `build_quantizer`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from torch import nn

from ..config import check_choice, check_range, invalid

_DEFAULT_CODEBOOK_SIZE = 16384
_DEFAULT_CODEBOOK_DIM = 4
QUANTIZER_TYPES = ("vq", "fsq", "lfq", "bsq", "residual")


@dataclass
class QuantizerConfig:
    """Hyperparameters of a VQ model's quantizer (`model.quantizer.*`).

    Args:
        type (`"vq"`, `"fsq"`, `"lfq"`, `"bsq"` or `"residual"`, defaults to `"vq"`): nearest-neighbour VQ
            (`VectorQuantizer`), finite scalar quantization, lookup-free quantization, binary spherical quantization,
            or residual VQ (`num_stages` VQs, each quantizing the previous stages' residual).
        codebook_size (`int`, defaults to 16384): number of codes K (per stage for `residual`). Derived for `fsq`
            (`prod(levels)`), `lfq` and `bsq` (`2 ** codebook_dim`): leave it at its default or give that value.
        codebook_dim (`int`, defaults to 4): dimension D of the code space: the quantizer's input channels (the
            model maps latents to D channels with its `quant_conv`); the number of bits for `lfq` / `bsq`; derived
            (`len(levels)`) for `fsq`.
        l2_normalize (`bool`, defaults to `False`): `vq` / `residual`: LlamaGen-style cosine codebook.
        ema (`bool`, defaults to `True`): `vq` / `residual`: EMA codebook (a buffer); `False` trains it by gradient.
        decay (`float`, defaults to 0.99): EMA decay of the cluster sizes and sums.
        eps (`float`, defaults to 1e-5): Laplace smoothing of the EMA cluster sizes.
        beta (`float`, defaults to 0.25): weight of the commitment loss `||z_e - sg(z_q)||^2` (not used by `fsq`).
        kmeans_init (`bool`, defaults to `True`): `vq` / `residual`: k-means init on the first batch of all ranks.
        kmeans_iters (`int`, defaults to 10): Lloyd iterations of the k-means init.
        dead_code_steps (`int`, defaults to 50): `vq` / `residual`: restart codes unused for this many steps; 0: never.
        usage_window (`int`, defaults to 100): training steps over which the windowed usage is measured.
        gradient (`"straight_through"` or `"rotation"`, defaults to `"straight_through"`): `vq`: the gradient
            reaching the encoder (the rotation trick of Fifty et al. 2024, or the identity).
        codebook_transform (`"none"` or `"linear"`, defaults to `"none"`): `vq` / `residual`: `linear` is SimVQ
            (codes = a learned linear map of a frozen random basis; needs `ema: false`).
        levels (`list[int]`, defaults to `[]`): `fsq`: values per channel, each >= 3 (e.g. `[8, 8, 8, 5, 5, 5]`).
        entropy_weight (`float`, defaults to 0.1): `lfq` / `bsq`: weight of the entropy loss.
        entropy_temperature (`float`, defaults to 0.01): `lfq` / `bsq`: temperature of the soft code assignment.
        diversity_gamma (`float`, defaults to 1.0): `lfq` / `bsq`: weight of the codebook entropy in that loss.
        entropy_groups (`int`, defaults to 1): `lfq` / `bsq`: groups of bits whose entropies are computed apart
            (must divide `codebook_dim`; 1 is exact, 2 for 18 bits is Open-MAGVIT2's, `codebook_dim` per bit).
        num_stages (`int`, defaults to 4): `residual`: quantizer stages S.
        shared_codebook (`bool`, defaults to `False`): `residual`: one codebook for every stage.
        quantize_dropout (`float`, defaults to 0.0): `residual`: probability that a training step uses only the
            first `n` stages (`n` uniform in `1 .. S - 1`), so that fewer stages still decode (RQ-VAE, SoundStream).
    """

    type: Literal["vq", "fsq", "lfq", "bsq", "residual"] = "vq"
    codebook_size: int = _DEFAULT_CODEBOOK_SIZE
    codebook_dim: int = _DEFAULT_CODEBOOK_DIM
    l2_normalize: bool = False
    ema: bool = True
    decay: float = 0.99
    eps: float = 1e-5
    beta: float = 0.25
    kmeans_init: bool = True
    kmeans_iters: int = 10
    dead_code_steps: int = 50
    usage_window: int = 100
    gradient: Literal["straight_through", "rotation"] = "straight_through"
    codebook_transform: Literal["none", "linear"] = "none"
    levels: list[int] = ()
    entropy_weight: float = 0.1
    entropy_temperature: float = 0.01
    diversity_gamma: float = 1.0
    entropy_groups: int = 1
    num_stages: int = 4
    shared_codebook: bool = False
    quantize_dropout: float = 0.0

    def __post_init__(self):
        self.levels = list(self.levels)
        check_choice(self, "type", QUANTIZER_TYPES)
        check_choice(self, "gradient", ("straight_through", "rotation"))
        check_choice(self, "codebook_transform", ("none", "linear"))
        if self.type == "fsq":
            if not self.levels or min(self.levels) < 3:
                raise invalid("levels", f"fsq needs a list of integers >= 3 (e.g. [8, 5, 5, 5]), got {self.levels}")
            self._derive("codebook_dim", len(self.levels), _DEFAULT_CODEBOOK_DIM)
            self._derive("codebook_size", math.prod(self.levels), _DEFAULT_CODEBOOK_SIZE)
        elif self.levels:
            raise invalid("levels", f"only type fsq takes levels (type is {self.type!r})")
        if self.type in ("lfq", "bsq"):
            if not 1 <= self.codebook_dim <= 20:
                raise invalid("codebook_dim", f"{self.type} takes 1 to 20 bits, got {self.codebook_dim}")
            self._derive("codebook_size", 2**self.codebook_dim, _DEFAULT_CODEBOOK_SIZE)
            if self.entropy_groups < 1 or self.codebook_dim % self.entropy_groups:
                raise invalid("entropy_groups", f"must divide codebook_dim={self.codebook_dim}, "
                                                f"got {self.entropy_groups}")
            check_range(self, "entropy_temperature", gt=0)
            check_range(self, "entropy_weight", ge=0)
        for name in ("codebook_size", "codebook_dim", "num_stages", "usage_window"):
            check_range(self, name, ge=1)
        check_range(self, "kmeans_iters", ge=0)
        check_range(self, "dead_code_steps", ge=0)
        check_range(self, "decay", ge=0.0, lt=1.0)
        check_range(self, "eps", gt=0)
        check_range(self, "beta", ge=0)
        check_range(self, "quantize_dropout", ge=0.0, lt=1.0)
        if self.codebook_transform == "linear" and self.ema:
            raise invalid("codebook_transform", "linear (SimVQ) learns its map by gradient; set ema=false")
        if self.type == "residual" and self.gradient != "straight_through":
            raise invalid("gradient", "residual VQ passes the gradient of the stages' sum straight through; the "
                                      "rotation trick is for type vq")
        if self.type not in ("vq", "residual"):
            for name, default in (("gradient", "straight_through"), ("codebook_transform", "none")):
                if getattr(self, name) != default:
                    raise invalid(name, f"only types vq and residual take it (type is {self.type!r})")

    def _derive(self, name: str, value: int, default: int) -> None:
        given = getattr(self, name)
        if given not in (default, value):
            raise invalid(name, f"type {self.type} implies {value}, got {given} (leave it out)")
        setattr(self, name, value)

    @property
    def num_levels(self) -> int:
        """Index tensors per position: `num_stages` for residual VQ, else 1."""
        return self.num_stages if self.type == "residual" else 1


def build_quantizer(config: QuantizerConfig) -> nn.Module:
    """The quantizer module of `config.type` (channels-first, returns a `QuantizerOutput`)."""
    if config.type == "vq":
        from .vector_quantizer import VectorQuantizer

        return VectorQuantizer.from_config(config)
    if config.type == "fsq":
        from .fsq import FiniteScalarQuantizer

        return FiniteScalarQuantizer(levels=config.levels, usage_window=config.usage_window)
    if config.type in ("lfq", "bsq"):
        from .bsq import BinarySphericalQuantizer
        from .lfq import LookupFreeQuantizer

        cls = LookupFreeQuantizer if config.type == "lfq" else BinarySphericalQuantizer
        return cls(codebook_dim=config.codebook_dim, entropy_weight=config.entropy_weight,
                   entropy_temperature=config.entropy_temperature, diversity_gamma=config.diversity_gamma,
                   entropy_groups=config.entropy_groups, beta=config.beta, usage_window=config.usage_window)
    from .residual import ResidualVectorQuantizer

    return ResidualVectorQuantizer.from_config(config)

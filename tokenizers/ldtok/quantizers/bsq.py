"""Binary spherical quantization (Zhao et al. 2024, "Image and Video Tokenization with Binary Spherical Quantization").

The input is L2-normalized onto the unit sphere and each coordinate quantized to `+-1 / sqrt(d)`: the code is a
corner of the hypercube inscribed in the sphere, so input and code have unit norm and the quantization error is
bounded. Indices, entropy loss (its soft assignment over the sphere's codes) and distribution are those of
`LookupFreeQuantizer`; `entropy_groups=d` gives BSQ's per-bit factorized entropy.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from .lfq import LookupFreeQuantizer


class BinarySphericalQuantizer(LookupFreeQuantizer):
    """BSQ, channels-first in and out; arguments are `LookupFreeQuantizer`'s."""

    spherical = True

    @property
    def code_scale(self) -> float:
        return 1.0 / math.sqrt(self.codebook_dim)

    def prepare(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1)

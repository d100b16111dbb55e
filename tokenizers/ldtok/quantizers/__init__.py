"""Quantizers (channels-first, fp32 under autocast, rank-consistent statistics), one per file:
`VectorQuantizer` (EMA / gradient VQ, SimVQ, rotation trick), `FiniteScalarQuantizer`, `LookupFreeQuantizer`,
`BinarySphericalQuantizer`, `ResidualVectorQuantizer`; `build_quantizer(QuantizerConfig)` picks one by `type`."""

from .bsq import BinarySphericalQuantizer
from .config import QuantizerConfig, build_quantizer
from .fsq import FiniteScalarQuantizer
from .lfq import LookupFreeQuantizer
from .residual import ResidualVectorQuantizer
from .vector_quantizer import VQ_FIELDS, VectorQuantizer

__all__ = [
    "VQ_FIELDS",
    "BinarySphericalQuantizer",
    "FiniteScalarQuantizer",
    "LookupFreeQuantizer",
    "QuantizerConfig",
    "ResidualVectorQuantizer",
    "VectorQuantizer",
    "build_quantizer",
]

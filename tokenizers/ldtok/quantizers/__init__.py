"""Vector quantizers (channels-first, fp32 distances, rank-consistent EMA codebooks)."""

from .vector_quantizer import QuantizerConfig, VectorQuantizer

__all__ = ["QuantizerConfig", "VectorQuantizer"]

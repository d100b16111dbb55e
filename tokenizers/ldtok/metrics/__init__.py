"""Evaluation metrics that say exactly what they measure: see each module's docstring for the conventions.

- `image`: PSNR and SSIM on 8-bit quantized images.
- `fid`: feature extractors (the FID Inception from a local TorchScript file) and the Frechet distance.
- `colour`: CIEDE2000, mean Lab shift and chroma ratio of reconstructions (colour fidelity).
- `codebook`: code usage / perplexity / entropy of VQ models and per-channel KL of KL models.
- `accumulator`: per-sample, id-deduplicated accumulation merged across processes.
"""

from .accumulator import GatheredMetrics, MetricAccumulator, merge_states
from .codebook import (
    bit_entropy,
    codebook_stats,
    collapsed_channels,
    index_histogram,
    kl_per_channel,
    kl_per_sample_channel,
)
from .colour import (
    COLOUR_KEYS,
    ColourStats,
    ColourSummary,
    chroma_histogram_picture,
    colour_metrics,
    colour_stats,
    summarize_colour,
)
from .fid import (
    FID_HELPER_DEFAULT_1_SHA256,
    FeatureExtractor,
    FeatureMoments,
    FeatureStats,
    InceptionFID,
    fid_from_moments,
    find_inception_file,
    frechet_distance,
    sha256_file,
    tf_bilinear_resize,
)
from .image import PSNR_CAP, mean_psnr, psnr, ssim, to_uint8

__all__ = [
    "COLOUR_KEYS",
    "ColourStats",
    "ColourSummary",
    "chroma_histogram_picture",
    "colour_metrics",
    "colour_stats",
    "summarize_colour",
    "FID_HELPER_DEFAULT_1_SHA256",
    "PSNR_CAP",
    "FeatureExtractor",
    "FeatureMoments",
    "FeatureStats",
    "GatheredMetrics",
    "InceptionFID",
    "MetricAccumulator",
    "bit_entropy",
    "codebook_stats",
    "collapsed_channels",
    "fid_from_moments",
    "find_inception_file",
    "frechet_distance",
    "index_histogram",
    "kl_per_channel",
    "kl_per_sample_channel",
    "mean_psnr",
    "merge_states",
    "psnr",
    "sha256_file",
    "ssim",
    "tf_bilinear_resize",
    "to_uint8",
]

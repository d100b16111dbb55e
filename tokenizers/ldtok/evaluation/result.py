"""The typed result of an evaluation: `Metric` (one line of the report), `Picture` and `EvalResult`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass
class Metric:
    """One line of the report's table.

    Args:
        key (`str`): e.g. `"val/psnr"` (the name training logs), `"val/stlpips-vgg"`.
        value (`float`, *optional*): `None` when the metric was not run.
        label (`str`): a human name, e.g. `"PSNR (dB)"`.
        detail (`str`): how it was measured (network, weights, conventions), or `"not run: <reason>"`.
    """

    key: str
    value: float | None
    label: str
    detail: str


@dataclass
class Picture:
    """A PNG of the report: `image` (PIL) and a `caption` that says what it shows."""

    image: Image.Image
    caption: str


@dataclass
class EvalResult:
    """Everything `evaluate_tokenizer` measured (identical on every process, except `pictures`: main process only).

    Args:
        kind (`str`): the model's `kind` (`"kl"`, `"vq"`, `"vqvae2"`), or `"autoencoder"` when it has none.
        num_images (`int`): evaluated images, each counted once.
        skipped (`list[str]`): ids of images that could not be decoded.
        num_processes (`int`): processes that took part.
        metrics (`list[Metric]`): every aggregate number, in report order.
        per_image (`list[dict]`): `{"id", "mse", "psnr", "ssim", "delta_e", "chroma_ratio", <perceptual net>...}`
            per image, highest MSE first (ties by id); PSNR `inf` for exact reconstructions; `chroma_ratio` `None`
            for images below `CHROMA_MIN` mean chroma (`ldtok.metrics.colour`).
        kl_per_channel (`list[float]`, *optional*): KL models: mean KL per latent channel, nats per image.
        collapsed_channels (`list[int]`, *optional*): KL models: channels below `collapse_threshold`.
        codebook (`dict[str, dict[str, float]]`, *optional*): VQ models: level name -> `codebook_stats`.
        feature_net (`dict[str, Any]`, *optional*): rFID's network: `name`, `sha256`, `resize`, `num_images`.
        pictures (`dict[str, Picture]`): `"reconstructions"`, `"interpolations"`, `"prior_samples"` (KL only),
            `"chroma_histogram"`.
        chroma_histogram (`list[list[float]]`, *optional*): per-pixel chroma counts over the set, originals then
            reconstructions, in bins of `ldtok.metrics.colour.CHROMA_BIN_WIDTH`.
        duplicates (`dict[str, int]`): repeated sample ids that were dropped, by metric (normally empty).
    """

    kind: str
    num_images: int
    skipped: list[str]
    num_processes: int
    metrics: list[Metric]
    per_image: list[dict[str, Any]]
    kl_per_channel: list[float] | None = None
    collapsed_channels: list[int] | None = None
    codebook: dict[str, dict[str, float]] | None = None
    feature_net: dict[str, Any] | None = None
    pictures: dict[str, Picture] = field(default_factory=dict)
    chroma_histogram: list[list[float]] | None = None
    duplicates: dict[str, int] = field(default_factory=dict)

    def value(self, key: str) -> float | None:
        """The value of metric `key` (`None` when it was not run); `KeyError` if there is no such metric."""
        for m in self.metrics:
            if m.key == key:
                return m.value
        raise KeyError(f"no metric {key!r}; have {[m.key for m in self.metrics]}")

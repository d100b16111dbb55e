"""Aggregate the merged per-sample values of an evaluation into `Metric`s, the per-image table and an `EvalResult`."""

from __future__ import annotations

import math

import torch

from ..data import DataError
from ..metrics import PSNR_CAP, bit_entropy, codebook_stats, collapsed_channels, fid_from_moments
from ..metrics.colour import CHROMA_MIN, image_chroma_ratios
from .result import EvalResult, Metric


def _summarize(model, gathered, options, *, nets, not_run, features, fid_reason) -> EvalResult:
    """Aggregate the merged per-sample values into `Metric`s and the per-image table."""
    ids = gathered.ids("psnr")
    if not ids:
        raise DataError("no image was evaluated (empty dataset, or every image failed to decode)")
    metrics = _image_metrics(gathered, len(ids)) + _perceptual_metrics(gathered, options.perceptual, nets, not_run)
    fid_metric, feature_info = _fid_metric(gathered, features, fid_reason)
    codebook_metrics, codebook = _codebook_metrics(model, gathered)
    kl_metrics, kl_c, collapsed = _kl_metrics(model, gathered, options.collapse_threshold)
    metrics += [fid_metric, *codebook_metrics, *_colour_metrics(gathered), *kl_metrics]
    return EvalResult(
        kind=getattr(model, "latent_kind", "autoencoder"), num_images=len(ids), skipped=gathered.ids("skipped"),
        num_processes=gathered.num_processes, metrics=metrics, per_image=_per_image_rows(gathered, ids, nets),
        kl_per_channel=kl_c, collapsed_channels=collapsed, codebook=codebook, feature_net=feature_info,
        duplicates=gathered.duplicates, chroma_histogram=gathered.colour().chroma_hist.tolist(),
    )


def _image_metrics(gathered, n: int) -> list[Metric]:
    """PSNR, SSIM and MSE on 8-bit images, mean over the `n` images."""
    psnrs = gathered.stack("psnr")
    exact = int(torch.isinf(psnrs).sum())
    return [
        Metric("val/psnr", float(psnrs.clamp(max=PSNR_CAP).mean()), "PSNR (dB)",
               f"per image on 8-bit images (peak 255), mean over {n} images; an exact reconstruction (PSNR +inf) "
               f"counts as {PSNR_CAP:g} dB ({exact} such images)"),
        Metric("val/ssim", float(gathered.mean("ssim")), "SSIM",
               "Wang et al. 2004 on 8-bit images: 11x11 Gaussian window (sigma 1.5), valid region, mean over channels"),
        Metric("val/mse", float(gathered.mean("mse")), "MSE (8-bit units)",
               "per image over pixels and channels of the 8-bit images, mean over images"),
    ]


def _perceptual_metrics(gathered, names, nets, not_run) -> list[Metric]:
    """One line per perceptual network asked for: its mean distance, or "not run" with the reason."""
    metrics = []
    for name in names:
        label = ("LPIPS " if name.startswith("lpips") else "ST-LPIPS ") + name.split("-")[1]
        if name in nets:
            metrics.append(Metric(f"val/{name}", float(gathered.mean(name)), label,
                                  f"{name}: distance between image and reconstruction (clamped to [-1, 1])"))
        else:
            metrics.append(Metric(f"val/{name}", None, label, f"not run: {not_run[name]}"))
    return metrics


def _fid_metric(gathered, features, fid_reason) -> tuple[Metric, dict | None]:
    """The rFID line and the feature network's description (`None` when rFID was not run)."""
    if features is None:
        return Metric("val/rfid", None, "rFID", f"not run: {fid_reason}"), None
    real, rec = gathered.features["real"], gathered.features["reconstructed"]
    feature_info = {"name": features.name, "sha256": features.sha256, "resize": features.resize,
                    "num_images": real.num_samples}
    detail = (f"{features.name}; weights sha256 {features.sha256}; {real.num_samples} images vs their "
              f"reconstructions; resize: {features.resize}")
    dim = real.sum.shape[0] if real.sum is not None else 0
    if real.num_samples <= dim:
        detail += f"; fewer images than feature dimensions ({dim}): biased upward, compare only equal counts"
    if real.num_samples < 2:
        return Metric("val/rfid", None, "rFID", "not run: needs at least 2 images"), feature_info
    return Metric("val/rfid", fid_from_moments(real, rec), "rFID", detail), feature_info


def _codebook_metrics(model, gathered) -> tuple[list[Metric], dict | None]:
    """VQ models: usage, perplexity and entropy per level (and per bit for LFQ / BSQ); `([], None)` otherwise."""
    order = list(getattr(model, "level_names", []))
    levels = sorted((k.removeprefix("codes/") for k in gathered.histograms if k.startswith("codes/")),
                    key=lambda level: (order.index(level) if level in order else len(order), level))
    if not levels:
        return [], None
    metrics, codebook = [], {}
    for level in levels:
        stats = codebook_stats(gathered.histograms[f"codes/{level}"])
        size = int(stats["num_codes"])
        codebook[level] = stats
        sfx = "" if len(levels) == 1 else f"_{level}"
        where = "" if len(levels) == 1 else f" ({level} level)"
        metrics += [
            Metric(f"val/codebook_usage{sfx}", stats["usage"], f"codebook usage{where}",
                   f"{int(stats['used'])} of {size} codes occur at least once over the whole set"),
            Metric(f"val/perplexity{sfx}", stats["perplexity"], f"code perplexity{where}",
                   "exp(entropy) of the code frequencies over the whole set"),
            Metric(f"val/codebook_entropy{sfx}", stats["entropy"], f"code entropy (nats){where}",
                   f"normalized by log K: {stats['normalized_entropy']:.4f}"),
        ]
        bits = getattr(getattr(model, "quantizer", None), "index_bits", None)  # LFQ / BSQ: codes are bit words
        if bits is not None and len(levels) == 1:
            per_bit = bit_entropy(gathered.histograms[f"codes/{level}"], bits=bits)
            stats["bit_entropy"] = [float(v) for v in per_bit]
            metrics += [
                Metric("val/bit_entropy_mean", float(per_bit.mean()), "mean entropy per bit (bits)",
                       f"{bits} bits; 1 = every bit a fair coin"),
                Metric("val/bit_entropy_min", float(per_bit.min()), "lowest entropy of a bit (bits)",
                       f"bit {int(per_bit.argmin())} (MSB = 0); near 0: a channel stuck at one sign"),
            ]
    return metrics, codebook


def _kl_metrics(model, gathered, threshold: float) -> tuple[list[Metric], list[float] | None, list[int] | None]:
    """KL models: KL per channel, collapsed channels and the latent std (scaled too when the model has a scale)."""
    if not gathered.ids("kl_channel"):
        return [], None, None
    kl = gathered.mean("kl_channel")  # (C,)
    kl_c = [float(v) for v in kl]
    collapsed = [int(c) for c in collapsed_channels(kl, threshold)]
    metrics = [
        Metric("val/kl", float(kl.sum()), "KL to N(0, I) (nats per image)",
               "posterior KL summed over latent channels and positions, mean over images"),
        Metric("val/kl_collapsed_channels", float(len(collapsed)), "collapsed latent channels",
               f"channels with KL < {threshold:g} nats per image: {collapsed or 'none'}"),
    ]
    moments = gathered.stack("latent_moments").sum(dim=0)  # (3,): sum, sum of squares, count
    mu = float(moments[0] / moments[2])
    std = math.sqrt(max(float(moments[1] / moments[2]) - mu * mu, 0.0))
    metrics.append(Metric("val/latent_std", std, "latent std (posterior means)", f"unscaled; mean {mu:.4f}"))
    scale = _latent_scale(model)
    if scale is not None:
        metrics.append(Metric("val/scaled_latent_std", std * scale[0], "scaled latent std",
                              f"std of (z - shift) * scaling_factor with scaling_factor {scale[0]:.6g}, "
                              f"shift {scale[1]:.6g}; diffusion models expect about 1"))
    return metrics, kl_c, collapsed


def _per_image_rows(gathered, ids: list[str], nets) -> list[dict]:
    """`{"id", "mse", "psnr", "ssim", "delta_e", <net>...}` per image, highest MSE first (ties by id)."""
    rows = []
    for sid in ids:
        v = gathered.values[sid]
        ratio = float(image_chroma_ratios(v["colour/chroma"], v["colour/chroma_rec"]))  # NaN: a near-grey image
        row = {"id": sid, "mse": v["mse"], "psnr": v["psnr"], "ssim": v["ssim"], "delta_e": v["colour/delta_e"],
               "chroma_ratio": None if math.isnan(ratio) else ratio}
        row.update({name: v[name] for name in nets})
        rows.append(row)
    rows.sort(key=lambda r: (-r["mse"], r["id"]))
    return rows


def _colour_metrics(gathered) -> list[Metric]:
    """The colour-fidelity lines of the report (`ldtok.metrics.colour`)."""
    c = gathered.colour()
    how = f"on 8-bit images as sRGB -> CIELAB (D65, skimage rgb2lab), {c.num_images} images"
    shift = "mean over images of (reconstruction - original) mean"
    return [
        Metric("val/delta_e", c.delta_e, "colour difference CIEDE2000",
               f"mean over pixels, then images; {how}; ~1 just noticeable, >5 obvious"),
        Metric("val/lab_shift_l", c.lab_shift_l, "lightness shift (L*)", f"{shift} L*; {how}"),
        Metric("val/lab_shift_a", c.lab_shift_a, "red-green shift (a*)", f"{shift} a*, + = towards red; {how}"),
        Metric("val/lab_shift_b", c.lab_shift_b, "yellow-blue shift (b*)", f"{shift} b*, + = towards yellow; {how}"),
        Metric("val/chroma_ratio", c.chroma_ratio, "chroma ratio",
               f"sum of reconstructions' mean chroma C* / the same for originals; 1 = no desaturation; {how}"),
        Metric("val/chroma_ratio_median", c.chroma_ratio_median, "median image's chroma ratio",
               f"median over the {c.colourful_images} colourful images (mean C* >= {CHROMA_MIN:g}) of each one's "
               f"reconstruction / original mean chroma: what a typical image keeps; {how}" if c.colourful_images else
               f"not run: no image has a mean chroma C* of {CHROMA_MIN:g} or more (a grey set)"),
    ]


def _latent_scale(model) -> tuple[float, float] | None:
    """`(scaling_factor, shift_factor)` of a KL model's diffusers config (shift 0 when unset), else `None`."""
    config = getattr(getattr(model, "vae", None), "config", None)
    if config is None or getattr(config, "scaling_factor", None) is None:
        return None
    return float(config.scaling_factor), float(getattr(config, "shift_factor", None) or 0.0)

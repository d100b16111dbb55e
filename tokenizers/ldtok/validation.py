"""Validation during training: reconstruction metrics on a fixed set of images, and latent-scale calibration (the
scaling convention of `ldtok.shards.stats`, written as `ldtok encode --write-scaling-factor` writes it)."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from .metrics.codebook import codebook_stats, index_histogram
from .metrics.colour import colour_stats, summarize_colour
from .metrics.image import PSNR_CAP, psnr, ssim


@torch.no_grad()
def validate(model: nn.Module, images: Tensor, *, device, autocast=contextlib.nullcontext,
             batch_size: int = 16) -> dict[str, float]:
    """PSNR and SSIM (on [0, 255]-quantized images) of `model`'s reconstructions of `images` `(N, 3, H, W)`, their
    colour fidelity (`ldtok.metrics.colour`: `delta_e`, `lab_shift_l/a/b`, `chroma_ratio`, `chroma_ratio_median`
    unless no image is colourful), and for VQ models the
    codebook usage and perplexity over the set (per level for VQ-VAE-2)."""
    was_training = model.training
    model.eval()
    psnrs, ssims, colours, histograms = [], [], [], None
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device)
        with autocast():
            output = model(x)
        x_rec = output.sample.float()
        psnrs.append(psnr(x, x_rec).clamp(max=PSNR_CAP).cpu())
        ssims.append(ssim(x, x_rec).cpu())
        rgb = (x, x_rec) if x.shape[1] == 3 else (x.expand(-1, 3, -1, -1), x_rec.expand(-1, 3, -1, -1))  # greyscale
        colours.append(colour_stats(*rgb).values())
        if output.quant is not None:
            levels = output.quant if isinstance(output.quant, list) else [output.quant]
            sizes = model.codebook_sizes
            counts = [index_histogram(q.indices, k) for q, k in zip(levels, sizes)]
            histograms = counts if histograms is None else [a + b for a, b in zip(histograms, counts)]
    model.train(was_training)
    result = {"psnr": float(torch.cat(psnrs).mean()), "ssim": float(torch.cat(ssims).mean())}
    result.update(summarize_colour(**{k.removeprefix("colour/"): torch.cat([c[k] for c in colours])
                                      for k in colours[0]}).as_dict())
    for level, counts in enumerate(histograms or []):
        suffix = "" if len(histograms) == 1 else f"_{model.level_names[level]}"
        stats = codebook_stats(counts)
        result[f"codebook_usage{suffix}"] = float(stats["usage"])
        result[f"perplexity{suffix}"] = float(stats["perplexity"])
    return result


@torch.no_grad()
def calibrate_latent_scale(model: nn.Module, images: Tensor, *, device, batch_size: int = 16,
                           convention: str = "sd") -> dict | None:  # fmt: skip
    """Measure a KL model's latent scale on `images` and store it in the model's diffusers config, the same way
    `ldtok encode --write-scaling-factor` does (the expected moments of posterior samples, `ChannelStats`).

    Under the default `"sd"` convention (what `StableDiffusionPipeline` expects: `latents = z * scaling_factor`)
    `scaling_factor = 1 / sqrt(E[z^2])` and no `shift_factor` is written; under `"sd3"` (SD3 / Flux:
    `(z - shift_factor) * scaling_factor`) `shift_factor` = mean and `scaling_factor` = 1 / std.

    Returns:
        The statistics (`scaling_factor`, `shift_factor`, `convention`, `latent_mean`, `latent_std`, `latent_rms`,
        `num_images`), or `None` for models without a continuous latent space.
    """
    from .shards.stats import ChannelStats

    if not hasattr(model, "set_latent_statistics"):
        return None
    was_training = model.training
    model.eval()
    stats = None
    for s in range(0, images.shape[0], batch_size):
        posterior = model.encode_posterior(images[s : s + batch_size].to(device))
        if stats is None:
            stats = ChannelStats(num_channels=posterior.mean.shape[1])
        stats.update_gaussian(posterior.mean.float(), posterior.logvar.float())  # (b, C, h, w) each
    model.train(was_training)
    result = stats.result(convention=convention)
    model.set_latent_statistics(scaling_factor=result["scaling_factor"], shift_factor=result["shift_factor"])
    return {"scaling_factor": result["scaling_factor"], "shift_factor": result["shift_factor"],
            "convention": convention, "latent_std": result["std"], "latent_mean": result["mean"],
            "latent_rms": result["rms"], "num_images": int(images.shape[0])}

"""Validation during training: reconstruction metrics on a fixed set of images, and latent-scale calibration."""

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
    colour fidelity (`ldtok.metrics.colour`: `delta_e`, `lab_shift_l/a/b`, `chroma_ratio`), and for VQ models the
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
        colours.append(colour_stats(x, x_rec).values())
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
def calibrate_latent_scale(model: nn.Module, images: Tensor, *, device, batch_size: int = 16) -> dict | None:
    """Measure the std of a KL model's latents (posterior samples, as Stable Diffusion did) on `images` and store
    `scaling_factor = 1 / std` in the model's diffusers config, so pipelines scale our latents to unit variance.
    Returns the statistics, or `None` for models without a continuous latent space."""
    if not hasattr(model, "set_latent_statistics"):
        return None
    was_training = model.training
    model.eval()
    latents = torch.cat([
        model.encode_latents(images[s : s + batch_size].to(device), sample=True).float().cpu()
        for s in range(0, images.shape[0], batch_size)
    ])  # (N, C, h, w)
    model.train(was_training)
    std = float(latents.std())
    model.set_latent_statistics(scaling_factor=1.0 / std)
    return {"scaling_factor": 1.0 / std, "latent_std": std, "latent_mean": float(latents.mean()),
            "num_images": int(images.shape[0])}

"""The pictures of an evaluation: reconstruction grid, latent interpolations (KL and VQ) and KL prior samples."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, IterableDataset

from ..images import make_grid
from ..outputs import AutoencoderOutput
from .options import EvalOptions
from .result import Picture
from .summary import _latent_scale

VQ_INTERPOLATION = (
    "pre-quantization latents interpolated linearly, then re-quantized to the nearest codes and decoded"
)


def _as_output(out: Any) -> AutoencoderOutput:
    return out if isinstance(out, AutoencoderOutput) else AutoencoderOutput(sample=out, posterior=None, quant=None)



def first_items(dataset: Dataset, n: int) -> list[dict]:
    """The first `n` decodable items of `dataset` (fewer for small sets); undecodable ones are passed over."""
    items = []
    source = iter(dataset) if isinstance(dataset, IterableDataset) else (dataset[i] for i in range(len(dataset)))
    for item in source:
        if len(items) >= n:
            break
        if "skipped" not in item:
            items.append(item)
    return items


def first_images(dataset: Dataset, n: int) -> tuple[Tensor, list[str]]:
    """The first `n` decodable images of `dataset`, `(n', 3, H, W)` with their ids (`n' < n` for small sets)."""
    items = first_items(dataset, n)
    if not items:
        return torch.empty(0, 3, 0, 0), []
    return torch.stack([it["pixel_values"] for it in items]), [it["id"] for it in items]


@torch.no_grad()
def make_pictures(model, dataset: Dataset, *, options: EvalOptions, device, autocast) -> dict[str, Picture]:
    """Reconstruction grid, latent interpolations and (KL) prior samples from the first images of `dataset`."""
    pairs = options.interpolation_pairs
    images, ids = first_images(dataset, max(options.grid_images, 2 * pairs))
    pictures = {}
    if not ids:
        return pictures
    x = images.to(device)
    g = x[: options.grid_images]
    with autocast():
        rec = _as_output(model(g)).sample.float().clamp(-1, 1)
    caption = f"top: {len(g)} originals ({', '.join(ids[: len(g)])}); bottom: reconstructions"
    pictures["reconstructions"] = Picture(make_grid([g.cpu(), rec.cpu()]), caption)
    pairs = min(pairs, len(ids) // 2)
    t = torch.linspace(0, 1, options.interpolation_steps, device=device)
    kl = _is_kl(model)
    if pairs and kl and hasattr(model, "encode_posterior"):
        with autocast():
            z = model.encode_posterior(x[: 2 * pairs]).mean.float()  # (2P, C, h, w)
            rows = [_lerp_row(model.decode_latents, [z[2 * k]], [z[2 * k + 1]], t) for k in range(pairs)]
        how = "posterior means interpolated linearly in latent space and decoded"
        pictures["interpolations"] = _interp_picture(x, rows, ids, how)
    elif pairs and (vq := vq_interpolation(model)) is not None:
        encode, decode, how = vq
        with autocast():
            z = encode(x[: 2 * pairs])  # (2P, D, h, w)
            rows = [_lerp_row(decode, [z[2 * k]], [z[2 * k + 1]], t) for k in range(pairs)]
        pictures["interpolations"] = _interp_picture(x, rows, ids, how)
    scale = _latent_scale(model)
    if kl and scale is not None and options.prior_samples > 0 and hasattr(model, "decode_latents"):
        with autocast():
            C, h, w = model.encode_posterior(x[:1]).mean.shape[1:]
        gen = torch.Generator().manual_seed(options.seed)
        eps = torch.randn(options.prior_samples, C, h, w, generator=gen).to(device)  # (N, C, h, w)
        with autocast():
            samples = _decoded(model.decode_latents(eps / scale[0] + scale[1])).cpu()  # unscaled z = eps / sf + shift
        per_row = min(8, options.prior_samples)
        rows = [samples[i : i + per_row] for i in range(0, len(samples) - per_row + 1, per_row)]
        pictures["prior_samples"] = Picture(
            make_grid(rows),
            f"{len(rows) * per_row} samples: z = eps / scaling_factor + shift_factor (scaling_factor {scale[0]:.6g}, "
            f"shift {scale[1]:.6g}), eps ~ N(0, I) with seed {options.seed}, decoded",
        )
    return pictures


def _is_kl(model) -> bool:
    """Whether `model`'s latent is a Gaussian posterior (posterior-mean interpolation, prior samples): the Tokenizer
    interface says it (`ldtok.models.base`); a plain module that does not implement it has none."""
    return bool(getattr(model, "has_gaussian_latent", False))


def _decoded(out) -> Tensor:
    """A decoder's images (a tensor or a diffusers `DecoderOutput`) as fp32 in `[-1, 1]`."""
    return (out.sample if hasattr(out, "sample") else out).float().clamp(-1, 1)


def _lerp_row(decode, a: list[Tensor], b: list[Tensor], t: Tensor) -> Tensor:
    """Decode `(1 - t) a + t b` for every `t`: `(T, 3, H, W)`. `a`, `b`: one latent `(C, h, w)` each, in a list."""
    z = torch.stack([(1 - s) * a[0] + s * b[0] for s in t])  # (T, C, h, w)
    return _decoded(decode(z))


def vq_interpolation(model: nn.Module):
    """How to interpolate a VQ model's images: `(encode, decode, description)` or `None` for other models.

    The interpolated latent is the one quantization starts from, and `decode` re-quantizes it to the nearest codes:
    VQGAN (ldtok's, or a diffusers `VQModel`): the quantizer's input (after `quant_conv`); VQ-VAE-2: the bottom
    encoder's features, from which both levels are quantized as in `forward`. The model is searched for one of these
    modules, so any wrapper around them works.
    """
    from diffusers import VQModel

    from ..models.vqgan import VQGAN
    from ..models.vqvae2 import VQVAE2

    def find(cls):
        return next((m for m in model.modules() if isinstance(m, cls)), None)

    if (vq := find(VQGAN)) is not None:
        return vq.encode_latents, vq.reconstruct_from_latents, VQ_INTERPOLATION
    if (v2 := find(VQVAE2)) is not None:
        how = ("bottom encoder features interpolated linearly, then both levels re-quantized from them (as in "
               "forward: top code, then the bottom code conditioned on it) and decoded")
        return v2.encoder, v2.reconstruct_from_features, how
    if (dq := find(VQModel)) is not None:
        # diffusers' decode() quantizes its input unless force_not_quantize
        return (lambda x: dq.encode(x).latents), (lambda z: dq.decode(z).sample), VQ_INTERPOLATION
    return None


def _interp_picture(x: Tensor, rows: list[Tensor], ids: list[str], how: str) -> Picture:
    grid_rows = [torch.cat([x[2 * k : 2 * k + 1], r, x[2 * k + 1 : 2 * k + 2]]).cpu() for k, r in enumerate(rows)]
    names = ", ".join(f"{ids[2 * k]} -> {ids[2 * k + 1]}" for k in range(len(rows)))
    caption = f"each row: original, {rows[0].shape[0]} decodings of {how}, original ({names})"
    return Picture(make_grid(grid_rows), caption)

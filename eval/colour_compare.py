"""Before/after colour comparison of trained tokenizers on the same validation images (issue 15).

    PYTHONPATH=tokenizers python eval/colour_compare.py --model before=runs/before-demo-kl/final \
        --model after=runs/demo-kl/final --data ~/.cache/ldtok/default-v1/validation --out runs/colour/demo-kl.png

Every model reconstructs every image of `--data` (a folder, evaluation transform: resize + center crop to
`--resolution`); the script prints PSNR, SSIM, mean CIEDE2000, chroma ratio and mean Lab shifts per model
(`ldtok.validation.validate`, the numbers training logs) and writes one grid: the first `--grid` originals on top, then
one row of reconstructions per model, in the order given. `--json` also writes the numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ldtok.config import check_range, invalid
from ldtok.config_cli import ArgumentParser, add_config_arguments, config_from_args
from ldtok.errors import run_cli

COLUMNS = ("psnr", "ssim", "delta_e", "chroma_ratio", "lab_shift_l", "lab_shift_a", "lab_shift_b")


def load_folder(path: str, *, resolution: int) -> torch.Tensor:
    """Every decodable image of the folder, `(N, 3, R, R)` in `[-1, 1]`, in file order."""
    from ldtok.data import DataConfig, build_dataset

    dataset = build_dataset(DataConfig(source="folder", path=path, resolution=resolution), train=False)
    return torch.stack([item["pixel_values"] for item in dataset if "pixel_values" in item])


@dataclass
class CompareOptions:
    """What to compare.

    Args:
        model (`list[str]`): `NAME=DIR` per model (a diffusers model directory); repeat the flag for more.
        data (`str`): folder of validation images.
        resolution (`int`, defaults to 64): side of the center crops.
        grid (`int`, defaults to 8): images in the grid.
        out (`str`): the grid PNG.
        json (`str`, *optional*): also write the numbers here.
    """

    model: list[str]
    data: str
    out: str
    resolution: int = 64
    grid: int = 8
    json: str | None = None

    def __post_init__(self):
        bad = [m for m in self.model if "=" not in m]
        if bad:
            raise invalid("model", f"expected NAME=DIR, got {bad}")
        check_range(self, "resolution", gt=0)
        check_range(self, "grid", ge=0)


def main() -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    args = config_from_args(CompareOptions, add_config_arguments(parser, CompareOptions).parse_args())

    from ldtok.images import make_grid, save_image_atomic
    from ldtok.models import load_tokenizer
    from ldtok.validation import validate

    images = load_folder(str(Path(args.data).expanduser()), resolution=args.resolution)
    rows, results = [images[: args.grid]], {}
    for spec in args.model:
        name, _, path = spec.partition("=")
        model = load_tokenizer(path).eval()
        results[name] = {"path": path, **{k: v for k, v in validate(model, images, device="cpu").items()}}
        with torch.no_grad():
            rows.append(model(images[: args.grid]).sample.float().clamp(-1, 1))
    print(f"{len(images)} images from {args.data} at {args.resolution} px")
    print(f"{'model':<16}" + "".join(f"{c:>13}" for c in COLUMNS))
    for name, r in results.items():
        print(f"{name:<16}" + "".join(f"{r[c]:>13.4f}" for c in COLUMNS))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_image_atomic(make_grid(rows), args.out)
    print(f"grid: {args.out} (top: originals; then one row per model: {', '.join(results)})")
    if args.json:
        Path(args.json).write_text(json.dumps({"data": args.data, "num_images": len(images), "models": results},
                                              indent=2) + "\n")


if __name__ == "__main__":
    run_cli(main)

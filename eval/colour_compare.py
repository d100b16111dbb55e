"""Before/after colour comparison of trained tokenizers on the same validation images (issue 15).

    PYTHONPATH=tokenizers python eval/colour_compare.py --model before=runs/before-demo-kl/final \
        --model after=runs/demo-kl/final --data ~/.cache/ldtok/default-v1/validation --out runs/colour/demo-kl.png

Every model reconstructs every image of `--data` (a folder, evaluation transform: resize + center crop to
`--resolution`); the script prints PSNR, SSIM, mean CIEDE2000, chroma ratio and mean Lab shifts per model
(`ldtok.validation.validate`, the numbers training logs) and writes one grid: the first `--grid` originals on top, then
one row of reconstructions per model, in the order given. `--json` also writes the numbers; `--breakdown` adds the
chroma ratio per source photo and after pooling (is it noise, one photo, or every region?).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ldtok.atomic import write_json_atomic
from ldtok.config import check_range, invalid
from ldtok.config_cli import ArgumentParser, add_config_arguments, config_from_args
from ldtok.errors import run_cli

COLUMNS = ("psnr", "ssim", "delta_e", "chroma_ratio", "chroma_ratio_median", "lab_shift_l", "lab_shift_a",
           "lab_shift_b")


def load_folder(path: str, *, resolution: int, with_ids: bool = False):
    """Every decodable image of the folder, `(N, 3, R, R)` in `[-1, 1]`, in file order (and, with `with_ids`, their
    file names)."""
    from ldtok.data import DataConfig, build_dataset

    dataset = build_dataset(DataConfig(source="folder", path=path, resolution=resolution), train=False)
    items = [item for item in dataset if "pixel_values" in item]
    images = torch.stack([item["pixel_values"] for item in items])
    return (images, [item["id"] for item in items]) if with_ids else images


def reconstruct(model, images: torch.Tensor) -> torch.Tensor:
    """The model's reconstructions of `images`, clamped to `[-1, 1]`, 16 at a time, without gradients."""
    with torch.no_grad():
        return torch.cat([model(chunk).sample.float().clamp(-1, 1) for chunk in images.split(16)])


def chroma_breakdown(images: torch.Tensor, rec: torch.Tensor, ids: list[str]) -> dict:
    """Where the chroma ratio comes from: per source photo (the embedded crops are named `NNNN_<photo>.png`), with
    the photo's mean original chroma, and for the whole set after average-pooling both images by 2, 4 and 8 (colour
    noise raises the per-pixel ratio; a regional over- or under-saturation survives the pooling)."""
    import torch.nn.functional as F

    from ldtok.metrics.colour import colour_metrics, colour_stats

    stats = colour_stats(images, rec)
    photos: dict[str, list[int]] = {}
    for i, name in enumerate(ids):
        photos.setdefault(Path(name).stem.split("_", 1)[-1], []).append(i)
    per_photo = {photo: {"images": len(idx), "chroma": float(stats.chroma[idx].mean()),
                         "chroma_ratio": float(stats.chroma_rec[idx].sum() / stats.chroma[idx].sum())}
                 for photo, idx in photos.items()}
    pooled = {f"pool_{k}": colour_metrics(F.avg_pool2d(images, k), F.avg_pool2d(rec, k)).chroma_ratio
              for k in (2, 4, 8) if images.shape[-1] % k == 0}
    return {"per_photo": per_photo, **pooled}


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
        breakdown (`bool`, defaults to `False`): also print each model's chroma ratio per source photo and after
            pooling (`chroma_breakdown`).
    """

    model: list[str]
    data: str
    out: str
    resolution: int = 64
    grid: int = 8
    json: str | None = None
    breakdown: bool = False

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

    images, ids = load_folder(str(Path(args.data).expanduser()), resolution=args.resolution, with_ids=True)
    rows, results = [images[: args.grid]], {}
    for spec in args.model:
        name, _, path = spec.partition("=")
        model = load_tokenizer(path).eval()
        results[name] = {"path": path, **{k: v for k, v in validate(model, images, device="cpu").items()}}
        rec = reconstruct(model, images)
        rows.append(rec[: args.grid])
        if args.breakdown:
            results[name]["breakdown"] = chroma_breakdown(images, rec, ids)
    print(f"{len(images)} images from {args.data} at {args.resolution} px")
    print(f"{'model':<16}" + "".join(f"{c:>{max(13, len(c) + 1)}}" for c in COLUMNS))
    for name, r in results.items():
        print(f"{name:<16}" + "".join(f"{r.get(c, float('nan')):>{max(13, len(c) + 1)}.4f}" for c in COLUMNS))
    if args.breakdown:
        print("\nchroma ratio per source photo (its mean original chroma), and of the whole set pooled 2x / 4x / 8x:")
        for name, r in results.items():
            b = r["breakdown"]
            photos = "  ".join(f"{p} ({v['chroma']:.0f}) {v['chroma_ratio']:.2f}" for p, v in b["per_photo"].items())
            pooled = " / ".join(f"{v:.2f}" for k, v in b.items() if k.startswith("pool_"))
            print(f"{name:<16} {photos}  |  pooled {pooled}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_image_atomic(make_grid(rows), args.out)
    print(f"grid: {args.out} (top: originals; then one row per model: {', '.join(results)})")
    if args.json:
        write_json_atomic(args.json, {"data": args.data, "num_images": len(images), "models": results}, indent=2)


if __name__ == "__main__":
    run_cli(main)

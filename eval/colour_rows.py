"""The rows of `eval/ablate_colour.py` (issue 15): which config each variant trains and the `key=value` overrides
that make it, on top of the demo recipe as it was before the colour fixes (`BEFORE_FIX`). A row's name is
`<family>/<changes>`, `+seed-k` for its other seeds; `{v1}` / `{v2}` in an override are the train folders of the
default dataset's versions.
"""

from __future__ import annotations

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
    **_with_seeds("vq/base", [], seeds=(0, 1)),
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
    **_with_seeds("vqvae2/base", [], seeds=(0, 1)),
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
    **_with_seeds("vqvae2/groups-4+data-v2+colour-1+apart", [*FIXED, "loss.colour_weight=1.0", *APART]),
    # the same at half the weight: left out, the term cost 0.5 dB against the recipe before issue 15
    **_with_seeds("vqvae2/groups-4+data-v2+colour-0.5+apart", [*FIXED, "loss.colour_weight=0.5", *APART],
                  seeds=(0, 1)),
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
    **_with_seeds("fsq/demo", ["data.path={v2}"], seeds=(0, 1)),
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

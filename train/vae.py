"""Train a KL-VAE (Stable Diffusion's AutoencoderKL) with L1/L2 + LPIPS + PatchGAN losses.

    accelerate launch train/vae.py --config configs/demo-kl.yaml [key=value ...]

Keys and defaults: `python train/vae.py --help`. Writes `output_dir/final/`, a diffusers `AutoencoderKL` directory.
"""

import sys

from ldtok.config import ConfigError, parse_args
from ldtok.training import RunConfig, train


def main() -> None:
    try:
        config = parse_args(RunConfig)
    except (ConfigError, AssertionError) as e:
        sys.exit(f"config error: {e}")
    if config.model.type != "kl":
        sys.exit(f"config error: model.type: train/vae.py trains KL models, got {config.model.type!r} "
                 "(use train/vq.py)")
    try:
        summary = train(config)
    except FileExistsError as e:
        sys.exit(f"error: {e}")
    if "final" in summary:  # the main process
        val = summary["validation"]
        print(f"final model: {summary['final']}  (diffusers AutoencoderKL)")
        print(f"validation PSNR {val['psnr']:.2f} dB, SSIM {val['ssim']:.4f}; reconstructions: {val.get('grid')}")
        print(f"training: {summary['images_per_s']:.1f} img/s, peak memory {summary['peak_memory_mib']:.0f} MiB")


if __name__ == "__main__":
    main()

"""Train a KL-VAE (Stable Diffusion's AutoencoderKL) with L1/L2 + LPIPS + PatchGAN losses, or one of the classic
small-image families: an MLP VAE / AE (`model.type: mlp`) or the hierarchical KL-VAE (`model.type: vae2`).

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
    if config.model.type not in ("kl", "mlp", "vae2"):
        sys.exit(f"config error: model.type: train/vae.py trains kl, mlp and vae2 models, got {config.model.type!r} "
                 "(use train/vq.py)")
    try:
        summary = train(config)
    except FileExistsError as e:
        sys.exit(f"error: {e}")
    if "final" in summary:  # the main process
        val = summary["validation"]
        kind = {"kl": "diffusers AutoencoderKL", "mlp": "ldtok MLPAutoencoder", "vae2": "ldtok VAE2"}
        print(f"final model: {summary['final']}  ({kind[config.model.type]})")
        print(f"validation PSNR {val['psnr']:.2f} dB, SSIM {val['ssim']:.4f}; reconstructions: {val.get('grid')}")
        print(f"training: {summary['images_per_s']:.1f} img/s, peak memory {summary['peak_memory_mib']:.0f} MiB")


if __name__ == "__main__":
    main()

"""Train a VQGAN (exported as a diffusers VQModel) or a VQ-VAE-2 with EMA codebooks, LPIPS and PatchGAN losses.

    accelerate launch train/vq.py --config configs/demo-vq.yaml [key=value ...]
    accelerate launch train/vq.py --config configs/demo-vqvae2.yaml

Keys and defaults: `python train/vq.py --help`. Codebook usage, perplexity and restarted dead codes are logged every
step; `output_dir/final/` is a diffusers `VQModel` directory (VQGAN) or an `ldtok.VQVAE2` directory.
"""

import sys

from ldtok.config import ConfigError, parse_args
from ldtok.training import RunConfig, train


def main() -> None:
    try:
        config = parse_args(RunConfig)
    except (ConfigError, AssertionError) as e:
        sys.exit(f"config error: {e}")
    if config.model.type not in ("vqgan", "vqvae2"):
        sys.exit(f"config error: model.type: train/vq.py trains vqgan or vqvae2, got {config.model.type!r} "
                 "(use train/vae.py for KL models)")
    try:
        summary = train(config)
    except FileExistsError as e:
        sys.exit(f"error: {e}")
    if "final" in summary:  # the main process
        val = summary["validation"]
        usage = ", ".join(f"{k} {100 * v:.1f}%" for k, v in val.items() if k.startswith("codebook_usage"))
        if config.model.type == "vqvae2":
            kind = "ldtok VQVAE2"
        elif config.model.quantizer.type == "vq":
            kind = "diffusers VQModel"
        else:
            kind = f"ldtok QuantizedAutoencoder, {config.model.quantizer.type}"
        print(f"final model: {summary['final']}  ({kind})")
        print(f"validation PSNR {val['psnr']:.2f} dB, SSIM {val['ssim']:.4f}, {usage}; "
              f"reconstructions: {val.get('grid')}")
        print(f"training: {summary['images_per_s']:.1f} img/s, peak memory {summary['peak_memory_mib']:.0f} MiB")


if __name__ == "__main__":
    main()

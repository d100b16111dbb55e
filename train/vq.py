"""Train a VQGAN (exported as a diffusers VQModel) or a VQ-VAE-2 with EMA codebooks, LPIPS and PatchGAN losses.

    accelerate launch train/vq.py --config configs/demo-vq.yaml [key=value ...]
    accelerate launch train/vq.py --config configs/demo-vqvae2.yaml

Keys and defaults: `python train/vq.py --help`. Codebook usage, perplexity and restarted dead codes are logged every
step; `output_dir/final/` is a diffusers `VQModel` directory (VQGAN) or an `ldtok.VQVAE2` directory.
"""

from ldtok.config import ConfigError, parse_args
from ldtok.errors import run_cli
from ldtok.training import RunConfig, summary_lines, train


def main() -> None:
    try:
        config = parse_args(RunConfig)
    except AssertionError as e:  # a section's own value checks
        raise ConfigError(str(e)) from None
    if config.model.type not in ("vqgan", "vqvae2"):
        raise ConfigError(f"model.type: train/vq.py trains vqgan or vqvae2, got {config.model.type!r} "
                          "(use train/vae.py for KL models)")
    if config.model.type == "vqvae2":
        kind = "ldtok VQVAE2"
    elif config.model.quantizer.type == "vq":
        kind = "diffusers VQModel"
    else:
        kind = f"ldtok QuantizedAutoencoder, {config.model.quantizer.type}"
    for line in summary_lines(config, train(config), kind=kind):
        print(line)

if __name__ == "__main__":
    run_cli(main)

"""Train a KL-VAE (Stable Diffusion's AutoencoderKL) with L1/L2 + LPIPS + PatchGAN losses, or one of the classic
small-image families: an MLP VAE / AE (`model.type: mlp`) or the hierarchical KL-VAE (`model.type: vae2`).

    accelerate launch train/vae.py --config configs/demo-kl.yaml [key=value ...]

Keys and defaults: `python train/vae.py --help`. Writes `output_dir/final/`, a diffusers `AutoencoderKL` directory.
"""

from ldtok.config import ConfigError, parse_args
from ldtok.errors import run_cli
from ldtok.training import RunConfig, summary_lines, train


def main() -> None:
    try:
        config = parse_args(RunConfig)
    except AssertionError as e:  # a section's own value checks
        raise ConfigError(str(e)) from None
    if config.model.type not in ("kl", "mlp", "vae2"):
        raise ConfigError(f"model.type: train/vae.py trains kl, mlp and vae2 models, got {config.model.type!r} "
                          "(use train/vq.py)")
    kind = {"kl": "diffusers AutoencoderKL", "mlp": "ldtok MLPAutoencoder", "vae2": "ldtok VAE2"}[config.model.type]
    for line in summary_lines(config, train(config), kind=kind):
        print(line)

if __name__ == "__main__":
    run_cli(main)

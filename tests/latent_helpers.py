"""Helpers of the latent-option tests: a tiny saved `AutoencoderKL`, an image folder, encoding one and reading the
shards back."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from ldtok.data import DataConfig
from ldtok.encoding import EncodeConfig, encode_dataset


def image_folder(root: Path) -> Path:
    """4 random 32 px PNGs in `root`."""
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def encode(model: Path, out: Path, folder: Path, **options):
    """`encode_dataset` (what `ldtok encode` runs) of `folder` at 32 px, fp32, one process."""
    config = EncodeConfig(model=str(model), out=str(out), data=DataConfig(source="folder", path=str(folder)),
                          resolution=32, batch_size=2, samples_per_shard=2, num_workers=0, autocast="no",
                          channels_last=False, no_progress=True, **options)
    return encode_dataset(config)


def shard_tensors(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every shard in `out`, keyed `file/field`."""
    tensors = {}
    for path in sorted(out.glob("**/*.safetensors")):
        tensors.update({f"{path.name}/{k}": v for k, v in load_file(path).items()})
    assert tensors, f"no shards in {out}"
    return tensors


def tiny_kl(path: Path) -> Path:
    """A random 2-level diffusers `AutoencoderKL` (4 latent channels) saved to `path`."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=32,
                  sample_size=32).save_pretrained(path)
    return path

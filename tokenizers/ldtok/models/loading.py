"""Load any tokenizer directory for inference: ldtok/diffusers KL-VAEs, VQGANs and VQ-VAE-2s.

`load_tokenizer(path)` looks at `config.json`'s `_class_name`:

- `AutoencoderKL` (ours or anyone's, e.g. Stable Diffusion's VAE) -> `KLAutoencoder`;
- `VQModel` (ours or anyone's) -> `VQGAN` with the directory's codebook (`ldtok.json`, written by our export, says
  whether codes are l2-normalized; other VQModels use plain nearest-code quantization, as diffusers does);
- `QuantizedAutoencoder` (ldtok's export of FSQ / LFQ / BSQ / residual-VQ VQGANs) -> `VQGAN` with that quantizer;
- `VQVAE2` -> `VQVAE2Autoencoder`;
- `MLPAutoencoder` -> `MLPVAEAutoencoder` (family "mlp", latent kind "kl"); `VAE2` -> `VAE2Autoencoder` (family
  "vae2", no shard format yet).

The result is in eval mode with gradients off and implements `ldtok.models.base.Tokenizer`: its `family` and
`latent_kind` ("kl", "vq" or "vqvae2"), `shard_fields` / `encode_fields` / `decode_fields`, `codebook_sizes`,
`forward(x) -> AutoencoderOutput`, `config_sha256()`, `downsample_factor` (what image sides must be multiples of),
and per family `encode_posterior` / `decode_latents` (KL) or `encode_to_indices` / `decode_indices` (VQ).

`tokenizer_sha256(path)` identifies a model directory by its weights *and* its architecture: latent shards record it,
so a resume or a decode with other weights is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch import nn

from ..errors import LdtokError
from ..quantizers import QuantizerConfig
from .config import ModelConfig
from .export import config_sha256
from .kl import KLAutoencoder


class ModelDirError(LdtokError, FileNotFoundError):
    """No model directory at the path, or one without `config.json` (a `FileNotFoundError`, as before)."""


class NotATokenizerError(LdtokError, ValueError):
    """A model directory of a class ldtok cannot use as a tokenizer (a `ValueError`, as before)."""


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
SIDECAR_NAMES = ("ldtok.json",)  # what changes how the weights are used (e.g. l2-normalized codes)


def _config_file(path: Path) -> Path:
    if not path.exists():
        raise ModelDirError(f"model directory {path} does not exist: give the directory of a trained tokenizer "
                         "(e.g. runs/NAME/final)")
    if not path.is_dir():
        raise ModelDirError(f"{path} is a file, not a model directory (a folder with config.json and the weights)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelDirError(f"{path} has no config.json: not a model directory (give the folder that holds "
                         "config.json and the weights, e.g. runs/NAME/final)")
    return config_file


def _read_config(config_file: Path) -> dict:
    try:
        config = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise LdtokError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise LdtokError(f"{config_file}: not a JSON object")
    return config


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_sha256(path: str | os.PathLike) -> str:
    """A sha256 that identifies a model directory by its architecture and weights.

    Hashes `config_sha256` of `config.json` (bookkeeping keys and the latent statistics `scaling_factor` /
    `shift_factor` left out, so `--write-scaling-factor` keeps the identity), the name and sha256 of every weight file
    (`*.safetensors`, `*.bin`, `*.pt`, `*.pth`) and ldtok's sidecar files. Two directories with the same hash compute
    the same latents; a checkpoint of another step, or a fine-tuned copy, does not have it.
    """
    path = checkpoint_model_dir(Path(path))
    h = hashlib.sha256(config_sha256(_read_config(_config_file(path))).encode())
    files = sorted(p for p in path.iterdir()
                   if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name in SIDECAR_NAMES))
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        raise LdtokError(f"{path} has a config.json but no weight file (*.safetensors / *.bin): an incomplete "
                         "export?")
    for p in files:
        h.update(f"\n{p.name} {_sha256_file(p)}".encode())
    return h.hexdigest()


def tokenizer_in_channels(model: nn.Module) -> int:
    """The image channels a tokenizer takes: its diffusers config's `in_channels` (3 when no config says)."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and "in_channels" in config:
            return int(config["in_channels"])
    return 3


def checkpoint_model_dir(path: Path) -> Path:
    """`path/diffusers` when `path` is a training checkpoint (no `config.json`, a `diffusers/` export in it)."""
    if not (path / "config.json").exists() and (path / "diffusers" / "config.json").is_file():
        return path / "diffusers"
    return path


def load_tokenizer(path: str | os.PathLike, *, device: torch.device | str = "cpu") -> nn.Module:
    """Load the tokenizer saved at `path` (see the module docstring), in eval mode on `device`. `path` may also be a
    training checkpoint (`output_dir/checkpoints/step_XXXXXXXX`): its `diffusers/` export is loaded."""
    path = checkpoint_model_dir(Path(path))
    config_file = _config_file(path)
    config = _read_config(config_file)
    try:
        model = _load(path, config, config_file)
    except LdtokError:
        raise
    except Exception as e:  # noqa: BLE001 - a truncated or foreign weight file: name the directory
        first = (str(e).splitlines() or [""])[0]
        raise LdtokError(f"{path}: cannot load the model ({type(e).__name__}: {first}); is the export complete?") from e
    return model.eval().requires_grad_(False).to(device)


def _load(path: Path, config: dict, config_file: Path) -> nn.Module:
    class_name = config.get("_class_name")
    if class_name == "AutoencoderKL":
        model = KLAutoencoder(vae=AutoencoderKL.from_pretrained(path))
    elif class_name == "VQModel":
        from .vqgan import LDTOK_SIDECAR, VQGAN

        sidecar = json.loads((path / LDTOK_SIDECAR).read_text()) if (path / LDTOK_SIDECAR).is_file() else {}
        quantizer = QuantizerConfig(
            codebook_size=config["num_vq_embeddings"],
            codebook_dim=config.get("vq_embed_dim") or config["latent_channels"],
            l2_normalize=bool(sidecar.get("l2_normalize", False)),
            kmeans_init=False,
        )
        model = VQGAN.from_config(ModelConfig(type="vqgan", init_from=str(path), quantizer=quantizer))
    elif class_name == "QuantizedAutoencoder":
        from .quantized import QuantizedAutoencoder

        model = QuantizedAutoencoder.from_pretrained(path).to_vqgan()
    elif class_name == "VQVAE2":
        from .vqvae2 import VQVAE2, VQVAE2Autoencoder

        model = VQVAE2Autoencoder(vqvae2=VQVAE2.from_pretrained(path))
    elif class_name == "MLPAutoencoder":
        from .mlp import MLPAutoencoder, MLPVAEAutoencoder

        model = MLPVAEAutoencoder(vae=MLPAutoencoder.from_pretrained(path))
    elif class_name == "VAE2":
        from .vae2 import VAE2, VAE2Autoencoder

        model = VAE2Autoencoder(vae2=VAE2.from_pretrained(path))
    else:
        raise NotATokenizerError(f"{config_file}: _class_name {class_name!r} is not a tokenizer ldtok can load "
                                 "(AutoencoderKL, VQModel, QuantizedAutoencoder, VQVAE2, MLPAutoencoder or VAE2)")
    return model

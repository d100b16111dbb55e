"""Shared pieces of the prior tests: tiny shards encoded by tiny untrained tokenizers, and running the prior scripts
under `accelerate launch --cpu`."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, VQModel

from ldtok.models import KLAutoencoder, ModelConfig
from ldtok.shards import ShardWriter, write_manifest

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_machines", "1",
              "--num_processes", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
N_IMAGES, RES = 16, 32


def tiny_vqmodel(**overrides) -> VQModel:
    return VQModel(**{"block_out_channels": (32, 32, 32), "down_block_types": ("DownEncoderBlock2D",) * 3,
                      "up_block_types": ("UpDecoderBlock2D",) * 3, "layers_per_block": 1, "latent_channels": 4,
                      "num_vq_embeddings": 32, "norm_num_groups": 32, "sample_size": RES,
                      "mid_block_add_attention": False, **overrides})


def images(n: int = N_IMAGES) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, RES, RES, generator=g) * 2 - 1


def write_shards(out: Path, *, kind: str, batch: dict, model_dir: Path, codebook_size: int | None = None) -> Path:
    with ShardWriter(out, kind=kind, samples_per_shard=8, metadata={"resolution": str(RES)},
                     codebook_size=codebook_size) as writer:
        writer.add(batch, [f"img{i:03d}" for i in range(N_IMAGES)])
    write_manifest(out, model={"path": str(model_dir)})
    return out


def make_prior_shards(root: Path) -> dict[str, Path]:
    """KL, VQ and VQ-VAE-2 shard directories of 16 random 32 px images, each with the model that encoded them."""
    labels = torch.arange(N_IMAGES) % 4
    torch.manual_seed(0)
    KLAutoencoder.from_config(ModelConfig(type="kl", block_out_channels=[32, 64], layers_per_block=1,
                                          norm_num_groups=32, latent_channels=4, sample_size=RES,
                                          mid_block_add_attention=False)).export(root / "vae")
    vae = AutoencoderKL.from_pretrained(root / "vae").eval()
    with torch.no_grad():
        posterior = vae.encode(images()).latent_dist  # (16, 4, 16, 16)
    kl = write_shards(root / "kl", kind="kl", model_dir=root / "vae",
                      batch={"mean": posterior.mean, "logvar": posterior.logvar, "label": labels})

    vq = tiny_vqmodel().eval()
    vq.save_pretrained(root / "vq")
    with torch.no_grad():
        _, _, (_, _, indices) = vq.quantize(vq.encode(images()).latents)
    vq_shards = write_shards(root / "vq", kind="vq", model_dir=root / "vq", codebook_size=32,
                             batch={"indices": indices.reshape(N_IMAGES, 8, 8)})

    from ldtok.models.vqvae2 import VQVAE2

    vqvae2 = VQVAE2(block_out_channels=(32, 32, 32), layers_per_block=1, latent_channels=16, sample_size=RES,
                    mid_block_add_attention=False, top_codebook_size=16, top_codebook_dim=8, bottom_codebook_size=32,
                    bottom_codebook_dim=8, kmeans_init=False).eval()
    vqvae2.save_pretrained(root / "vqvae2")
    codes = vqvae2.encode_to_indices(images())  # top (16, 4, 4), bottom (16, 8, 8)
    vqvae2_shards = write_shards(root / "vqvae2", kind="vqvae2", model_dir=root / "vqvae2", codebook_size=32,
                                 batch={"indices_top": codes.top, "indices_bottom": codes.bottom, "label": labels})
    return {"kl": kl, "vq": vq_shards, "vqvae2": vqvae2_shards}


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "train" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def launch(script: str, config: str, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [*ACCELERATE, str(ROOT / "train" / script), "--config", str(ROOT / "configs" / config), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    if check:
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    return result


def logged(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def grid_size(n: int, cols: int, res: int = RES, padding: int = 2) -> tuple[int, int]:
    rows = -(-n // cols)
    return cols * (res + padding) + padding, rows * (res + padding) + padding


TINY_UNET = ["unet.block_out_channels=[32, 32]", "unet.attention=[false, true]", "unet.layers_per_block=1",
             "unet.attention_head_dim=8", "train.batch_size=8", "train.lr=1e-3", "train.warmup_steps=0",
             "train.ema_decay=null", "train.checkpoint_every=0", "num_samples=6", "grid_columns=4",
             "num_inference_steps=4"]

TINY_GPT = ["model.num_layers=2", "model.num_heads=2", "model.hidden_size=64", "model.dropout=0.0",
            "train.batch_size=8", "train.lr=3e-3", "train.warmup_steps=0", "train.weight_decay=0.0",
            "num_samples=6", "grid_columns=4", "top_k=null"]

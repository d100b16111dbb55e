"""Model cards: the `README.md` of every exported tokenizer directory, in the Hugging Face Hub's format.

A card is YAML front matter (`library_name: diffusers`, `tags`, `license`, and `base_model`-free metadata the Hub
indexes) followed by Markdown: what the model is, its architecture (read from the directory's `config.json`), how it
was trained (data and steps, when known), the measured metrics, the latent statistics with the scaling convention, and
code that loads it in diffusers and in ldtok.

`write_model_card(directory)` alone writes a minimal card from `config.json` (every export does this); the trainer
calls it again with what it knows (`config`, `step`, `metrics`, `latent_statistics`) for `final/` and each checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .atomic import write_text_atomic

CARD_NAME = "README.md"

# _class_name -> (what it is, the class that loads it, its import line, ldtok's family tag)
_FAMILIES = {
    "AutoencoderKL": ("a KL-regularized autoencoder (latent-diffusion VAE)", "AutoencoderKL",
                      "from diffusers import AutoencoderKL", "kl-vae"),
    "VQModel": ("a vector-quantized autoencoder (VQGAN)", "VQModel", "from diffusers import VQModel", "vqgan"),
    "VQVAE2": ("a two-level vector-quantized autoencoder (VQ-VAE-2)", "VQVAE2", "from ldtok import VQVAE2",
               "vqvae2"),
}
_ARCHITECTURE_KEYS = (
    "in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block", "norm_num_groups",
    "num_vq_embeddings", "vq_embed_dim", "sample_size", "codebook_size", "codebook_sizes", "codebook_dim",
    "embed_dim", "hidden_channels",
)


def render_model_card(
    model_config: Mapping[str, Any],
    *,
    run_config: Any = None,
    step: int | None = None,
    metrics: Mapping[str, float] | None = None,
    latent_statistics: Mapping[str, float] | None = None,
    repo_id: str | None = None,
    license: str = "apache-2.0",
) -> str:
    """The card's text for a model whose diffusers `config.json` is `model_config`.

    Args:
        model_config (`Mapping`): the exported `config.json` (its `_class_name` picks the family).
        run_config (*optional*): the training `RunConfig` (a dataclass) or its plain dict.
        step (`int`, *optional*): optimizer steps trained.
        metrics (`Mapping[str, float]`, *optional*): measured validation metrics, e.g. `{"psnr": 24.1}`.
        latent_statistics (`Mapping[str, float]`, *optional*): `calibrate_latent_scale`'s result.
        repo_id (`str`, *optional*): the Hub repository the card will live in; the load snippets use it (else `"."`).
        license (`str`, defaults to `"apache-2.0"`): the card's license (the code's; the data's may differ).
    """
    class_name = str(model_config.get("_class_name", "unknown"))
    what, load_class, import_line, family = _FAMILIES.get(
        class_name, (f"a `{class_name}` model", class_name, f"from diffusers import {class_name}", "autoencoder"))
    run = _plain(run_config)
    front = {"library_name": "diffusers", "license": license,
             "tags": ["ldtok", "image-tokenizer", "autoencoder", family, "latent-diffusion"],
             "pipeline_tag": "image-to-image"}
    if run.get("data"):
        front["datasets"] = [_dataset_name(run["data"])]
    where = repo_id or "."
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {repo_id.split('/')[-1] if repo_id else 'ldtok ' + family}", "",
             f"This is {what}, trained with [ldtok](https://github.com/ldtok/ldtok) and exported as a diffusers "
             f"`{class_name}` directory.", ""]
    lines += _architecture(model_config)
    lines += _training(run, step)
    lines += _metrics(metrics)
    lines += _latents(model_config, latent_statistics, class_name)
    lines += _usage(where, load_class, import_line, class_name)
    return "\n".join(lines).rstrip() + "\n"


def write_model_card(directory: str | os.PathLike, **kwargs: Any) -> Path:
    """Write `directory/README.md` (atomically) from the directory's `config.json` and `kwargs` (see
    `render_model_card`); returns its path."""
    directory = Path(directory)
    model_config = json.loads((directory / "config.json").read_text())
    return write_text_atomic(directory / CARD_NAME, render_model_card(model_config, **kwargs))


def read_front_matter(path: str | os.PathLike) -> dict[str, Any]:
    """The YAML front matter of a model card (what the Hub reads as the repository's metadata)."""
    text = Path(path).read_text()
    if not text.startswith("---\n"):
        return {}
    head, sep, _ = text[4:].partition("\n---\n")
    return yaml.safe_load(head) if sep else {}


def _plain(run_config: Any) -> dict[str, Any]:
    if run_config is None:
        return {}
    if isinstance(run_config, Mapping):
        return dict(run_config)
    from .config import to_dict

    return to_dict(run_config)


def _dataset_name(data: Mapping[str, Any]) -> str:
    source = data.get("source", "unknown")
    if source == "default":
        return "ldtok-default-dataset"
    return str(data.get("name") or data.get("path") or source)


def _architecture(config: Mapping[str, Any]) -> list[str]:
    rows = [f"| `{k}` | `{json.dumps(config[k])}` |" for k in _ARCHITECTURE_KEYS if k in config]
    if not rows:
        return []
    return ["## Architecture", "", "| key | value |", "| --- | --- |", *rows, "",
            "The full configuration is in `config.json`.", ""]


def _training(run: Mapping[str, Any], step: int | None) -> list[str]:
    if not run and step is None:
        return ["## Training", "", "Training details were not recorded with this export.", ""]
    lines = ["## Training", ""]
    if step is not None:
        lines.append(f"- optimizer steps: {step}")
    data, train, loss = run.get("data") or {}, run.get("train") or {}, run.get("loss") or {}
    if data:
        lines.append(f"- data: `{_dataset_name(data)}` (source `{data.get('source')}`, split `{data.get('split')}`, "
                     f"resolution {data.get('resolution')})")
    if train:
        lines.append(f"- batch size {train.get('batch_size')} per process x {train.get('gradient_accumulation_steps')} "
                     f"accumulation, lr {train.get('lr')}, EMA decay {train.get('ema_decay')}")
    if loss:
        lines.append(f"- loss: perceptual `{loss.get('perceptual')}` (weight {loss.get('perceptual_weight')}), "
                     f"GAN weight {loss.get('disc_weight')} from step {loss.get('disc_start')}")
    return [*lines, "", "The resolved training config is in the run directory's `config.yaml`.", ""]


def _metrics(metrics: Mapping[str, float] | None) -> list[str]:
    values = {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if not values:
        return ["## Metrics", "", "No metrics were measured for this export (run `ldtok eval` on it).", ""]
    rows = [f"| {k} | {v:.4g} |" for k, v in sorted(values.items())]
    return ["## Metrics", "", "Measured on the run's validation images:", "", "| metric | value |", "| --- | --- |",
            *rows, ""]


def _latents(config: Mapping[str, Any], stats: Mapping[str, float] | None, class_name: str) -> list[str]:
    if class_name != "AutoencoderKL":
        return ["## Latents", "", "Discrete tokens: `encode` gives codebook indices, `decode` maps them back to "
                "images; there is no latent scaling.", ""]
    scale, shift = config.get("scaling_factor"), config.get("shift_factor")
    lines = ["## Latents and scaling", "",
             f"`scaling_factor = {scale}`" + (f", `shift_factor = {shift}`" if shift is not None else "")
             + " (in `config.json`). A diffusion model is trained on `(latents - shift_factor) * scaling_factor`, "
             "and decodes `latents / scaling_factor + shift_factor`, as diffusers pipelines do.", ""]
    if stats:
        lines += [f"Measured on {stats.get('num_images')} validation images: latent std {stats.get('latent_std'):.4g},"
                  f" mean {stats.get('latent_mean'):.4g}; `scaling_factor` is 1 / std.", ""]
    else:
        lines += ["The scaling factor was not measured for this export (diffusers' default may be in place).", ""]
    return lines


def _usage(where: str, load_class: str, import_line: str, class_name: str) -> list[str]:
    if class_name == "AutoencoderKL":
        code = [import_line, "", f'vae = {load_class}.from_pretrained("{where}")',
                "latents = vae.encode(images).latent_dist.sample()  # images: (B, 3, H, W) in [-1, 1]",
                "z = (latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor",
                "images = vae.decode(z / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)).sample"]
    elif class_name == "VQModel":
        code = [import_line, "", f'vq = {load_class}.from_pretrained("{where}")',
                "images = vq(images).sample  # encode, quantize, decode; images in [-1, 1]"]
    else:
        code = [import_line, "", f'model = {load_class}.from_pretrained("{where}")']
    local = f'snapshot_download("{where}")' if where != "." else '"."'
    fetch = ["from huggingface_hub import snapshot_download"] if where != "." else []
    return ["## Usage", "", "```python", *code, "```", "", "With ldtok (any family, tokens or latents):", "",
            "```python", *fetch, "from ldtok import load_tokenizer", "", f"tok = load_tokenizer({local})",
            "out = tok(images)  # AutoencoderOutput: .sample is the reconstruction", "```", ""]


__all__ = ["CARD_NAME", "read_front_matter", "render_model_card", "write_model_card"]

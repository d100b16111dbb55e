"""Decode latent shards back into images, to look at what a prior will be trained on.

    ldtok decode latents/train --model runs/kl/final --out decoded/ --limit 64 --grid

Writes one PNG per sample, named after its sample id (`image_file_name`: characters outside `[A-Za-z0-9._-]` become
`_`, and a short hash of the id is appended whenever the name had to change or is taken, so distinct ids never share
a file),
`decoded.json` (sample id -> file name) and, with `--grid`, `grid.png` of the first `--grid-size` images. KL shards
decode the stored posterior mean (the model's own reconstruction), or a posterior sample with `--sample`; VQ shards
decode their indices. Every file is written atomically.

`--model` defaults to the model `index.json` records (`ldtok.shards.resolve_model`: the path relative to the
shard directory, then the absolute one, the weights hash checked). The model must be the one the shards were encoded
with: another architecture, or the same architecture with other
weights (`tokenizer_sha256`, recorded in `index.json`), is refused with exit status 1 unless `--force` (then a
warning). So is a model whose downsampling factor does not divide the shards' resolution.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ldtok.config import check_range
from ldtok.config_cli import add_config_arguments, config_from_args
from ldtok.errors import LdtokError
from ldtok.models.loading import checkpoint_model_dir
from ldtok.models.shapes import check_resolution

SAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def _id_hash(sample_id: str) -> str:
    return hashlib.sha256(sample_id.encode()).hexdigest()[:10]


def image_file_name(sample_id: str) -> str:
    """A safe, flat PNG file name for a sample id: the id itself when it is a safe `.png` name (`img01.png`), the id
    plus `.png` when it is safe (`train/17` is not: `train_17-<hash>.png`), else the sanitized id and its hash."""
    name = SAFE_CHARS.sub("_", sample_id).strip("._")[:120]
    if name != sample_id or not name:  # changed (or empty): disambiguate with the id's hash
        name = f"{name}-{_id_hash(sample_id)}"
    return name if name.endswith(".png") else name + ".png"


@dataclass
class DecodeOptions:
    """What `ldtok decode` decodes, with which model, and where to.

    Args:
        shards (`str`): shard directory with an index.json (from `ldtok encode`).
        out (`str`): output folder for the PNGs.
        model (`str`, *optional*): the tokenizer directory the shards were encoded with (the one index.json
            records, relative to the shard directory, its weights hash checked, when left out).
        limit (`int`, *optional*): decode only the first N samples (in index order).
        grid (`bool`, defaults to `False`): also write grid.png of the first `grid_size` images.
        grid_size (`int`, defaults to 64): images in the grid, 8 per row.
        sample (`bool`, defaults to `False`): KL: decode a posterior sample instead of the mean.
        seed (`int`, defaults to 0): noise seed for `sample`.
        flipped (`bool`, defaults to `False`): decode the stored `*_flip` latents (files `*-flip.png`).
        batch_size (`int`, defaults to 16): samples per decoder forward.
        device (`str`, *optional*): torch device (cuda if available, else cpu, when left out).
        force (`bool`, defaults to `False`): decode with a model other than the one the shards were encoded with (a
            warning only).
    """

    shards: str
    out: str
    model: str | None = None
    limit: int | None = None
    grid: bool = False
    grid_size: int = 64
    sample: bool = False
    seed: int = 0
    flipped: bool = False
    batch_size: int = 16
    device: str | None = None
    force: bool = False

    def __post_init__(self):
        check_range(self, "limit", ge=0)
        check_range(self, "grid_size", gt=0)
        check_range(self, "batch_size", gt=0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, DecodeOptions, positional=("shards",))


def _grid(images: list[Tensor], *, columns: int = 8):
    """Rows of `columns` images `(3, H, W)`; the last row padded with white."""
    from ldtok.images import make_grid

    columns = min(columns, len(images))
    pad = (-len(images)) % columns
    images = images + [torch.ones_like(images[0])] * pad  # 1.0 is white in [-1, 1]
    rows = [torch.stack(images[i : i + columns]) for i in range(0, len(images), columns)]  # each (columns, 3, H, W)
    return make_grid(rows)


def check_same_model(model, model_dir: Path, manifest: dict, shard_dir: Path, *, force: bool) -> None:
    """Refuse (or with `force`, warn about) a model other than the one that encoded the shards."""
    from ldtok.models import tokenizer_sha256

    recorded = manifest.get("model") or {}
    meta = manifest["metadata"]
    problems = []
    if model.latent_kind != manifest["kind"]:
        problems.append(f"it is a {model.family!r} model of {model.latent_kind!r} latents and the shards hold "
                        f"{manifest['kind']!r} latents")
    expected = meta.get("model_config_sha256")
    if expected and model.config_sha256() != expected:
        problems.append(f"its architecture (config sha256 {model.config_sha256()[:12]}) differs from the encoder's "
                        f"({expected[:12]})")  # fmt: skip
    expected = meta.get("model_sha256")
    found = tokenizer_sha256(model_dir) if not problems and expected else None
    if found is not None and found != expected:
        problems.append(f"its weights differ (model sha256 {found[:12]}, the encoder's {expected[:12]})")
    if not problems:
        return
    message = (f"{model_dir} is not the model {shard_dir} was encoded with ({recorded.get('path', 'path unknown')}): "
               f"{'; '.join(problems)}")  # fmt: skip
    if not force or model.latent_kind != manifest["kind"]:
        raise LdtokError(message + ("" if model.latent_kind != manifest["kind"] else "; pass --force to decode anyway"))
    print(f"warning: {message}; decoding anyway (--force)", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    options = config_from_args(DecodeOptions, args, positional=("shards",))  # checked before anything is read
    from safetensors import safe_open

    from ldtok.atomic import write_json_atomic
    from ldtok.images import save_image_atomic, to_pil
    from ldtok.models import load_tokenizer
    from ldtok.shards import load_manifest, resolve_model
    from ldtok.shards.verify import index_problems

    shard_dir, out_dir = Path(options.shards), Path(options.out)
    try:
        manifest = load_manifest(shard_dir)
    except (FileNotFoundError, ValueError) as e:
        raise LdtokError(f"{shard_dir}: cannot read index.json ({e}); is it a shard directory from `ldtok encode`?"
                         ) from None  # fmt: skip
    problems = index_problems(manifest)
    if problems:
        raise LdtokError(f"{shard_dir}: {problems[0]}")
    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if options.model is None:  # the recorded model, found relative to the shards and checked by its weights hash
        model_dir = resolve_model(shard_dir, manifest=manifest)
    else:
        model_dir = checkpoint_model_dir(Path(options.model).expanduser().resolve())
    model = load_tokenizer(model_dir, device=device)
    check_same_model(model, model_dir, manifest, shard_dir, force=options.force)
    resolution = manifest["metadata"].get("resolution")
    if resolution is not None:
        check_resolution(int(resolution), model.downsample_factor, what=f"the shards' resolution ({shard_dir})")
    names = list(model.latent.fields)
    if model.latent.gaussian and not options.sample:
        names = ["mean"]
    suffix = "_flip" if options.flipped else ""
    missing = [n + suffix for n in names if n + suffix not in (manifest["fields"] or {})]
    if missing:
        raise LdtokError(f"{shard_dir} stores no {missing}")

    generator = torch.Generator().manual_seed(options.seed) if options.sample else None
    limit = options.limit if options.limit is not None else manifest["totals"]["num_samples"]
    files: dict[str, str] = {}  # sample id -> file name
    used: set[str] = set()
    grid: list[Tensor] = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for rec in manifest["shards"]:
        if len(files) >= limit:
            break
        if rec["num_samples"] == 0:
            continue
        with safe_open(str(shard_dir / rec["file"]), framework="pt") as f:
            ids = json.loads(f.metadata()["ids"])
            n = min(len(ids), limit - len(files))
            for lo in range(0, n, options.batch_size):
                hi = min(lo + options.batch_size, n)
                rows = {name: f.get_slice(name + suffix)[lo:hi] for name in names}
                images = model.decode_fields(rows, sample=options.sample, generator=generator)
                for sample_id, image in zip(ids[lo:hi], images.float().cpu()):
                    name = image_file_name(sample_id)
                    if name in used:  # ids "a" and "a.png" would both be a.png
                        name = f"{name.removesuffix('.png')}-{_id_hash(sample_id)}.png"
                    used.add(name)
                    if options.flipped:
                        name = name.removesuffix(".png") + "-flip.png"
                    save_image_atomic(to_pil(image), out_dir / name)
                    files[sample_id] = name
                    if options.grid and len(grid) < options.grid_size:
                        grid.append(image)
    write_json_atomic(out_dir / "decoded.json", {"shards": str(shard_dir.resolve()), "model": str(model_dir),
                                                 "sample": options.sample, "flipped": options.flipped, "files": files})
    if options.grid and grid:
        save_image_atomic(_grid(grid), out_dir / "grid.png")
    print(f"decoded {len(files)} samples of {shard_dir} into {out_dir}" + (" (+ grid.png)" if grid else ""))
    return 0

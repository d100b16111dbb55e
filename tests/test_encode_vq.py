"""`ldtok encode` / `decode` of VQ tokenizers (VQGAN, VQ-VAE-2) on tiny models (CPU), and decode's file names; the
KL and engine tests are in test_encode.py, whose fixtures and helpers these use."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_encode import (  # noqa: F401  (data_dir and one_thread are fixtures)
    TINY,
    check_decode_matches_reconstructions,
    data_dir,
    dataset_items,
    encode_args,
    one_thread,
    read_shards,
)

from ldtok.cli import main as ldtok
from ldtok.models import ModelConfig, build_model, load_tokenizer

# ---------------------------------------------------------------------------------------------------------- VQ


def tiny_vq_export(kind: str, path: Path) -> Path:
    """A tiny VQGAN / VQ-VAE-2 whose codebooks were set by one training-mode forward (k-means init), exported."""
    from ldtok.quantizers import QuantizerConfig

    torch.manual_seed(0)
    quantizer = QuantizerConfig(codebook_size=64, codebook_dim=4, kmeans_init=True, kmeans_iters=3, dead_code_steps=0)
    model = build_model(ModelConfig(type=kind, **TINY, quantizer=quantizer)).train()
    with torch.no_grad():
        model(torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    model.eval().export(path)
    return path


@pytest.mark.parametrize("kind", ["vqgan", "vqvae2"])
def test_vq_encode_decode_reproduces_reconstructions(kind, data_dir, tmp_path):  # noqa: F811 - the fixture
    model_dir = tiny_vq_export(kind, tmp_path / kind)
    out = tmp_path / "shards"
    assert ldtok(encode_args(model_dir, out, data_dir, "--flip")) == 0
    assert ldtok(["verify", str(out)]) == 0
    manifest, rows, _ = read_shards(out)
    names = ["indices"] if kind == "vqgan" else ["indices_top", "indices_bottom"]
    assert manifest["kind"] == ("vq" if kind == "vqgan" else "vqvae2") and manifest["codebook_size"] == 64
    assert set(manifest["fields"]) == {*names, *(n + "_flip" for n in names), "label"}
    assert all(manifest["fields"][n]["dtype"] == "uint8" for n in names)  # 64 codes fit in a byte

    model = load_tokenizer(str(model_dir))
    counts = {n: torch.zeros(64, dtype=torch.int64) for n in names}
    for item in dataset_items(data_dir):
        x, row = item["pixel_values"][None], rows[item["id"]]
        for suffix, view in (("", x), ("_flip", x.flip(-1))):
            codes = model.encode_to_indices(view)
            codes = [codes] if kind == "vqgan" else [codes.top, codes.bottom]
            for name, c in zip(names, codes):
                assert torch.equal(row[name + suffix].long(), c[0]), f"{item['id']} {name + suffix}"
        for name in names:
            counts[name] += torch.bincount(row[name].long().flatten(), minlength=64)
    for name in names:  # code usage in the manifest, from a direct count
        usage = manifest["stats"]["code_usage"][name]
        assert usage["codes_used"] == int((counts[name] > 0).sum()) and usage["count"] == int(counts[name].sum())
    check_decode_matches_reconstructions(out, model_dir, data_dir, tmp_path / "decoded")


def test_image_file_names_are_safe_and_distinct():
    from ldtok.commands.decode import image_file_name

    assert image_file_name("img01.png") == "img01.png" and image_file_name("n01440764_10026") == "n01440764_10026.png"
    ids = ["train/17", "train_17", "../../etc/passwd", "a b.jpg", "", ".", "x" * 500]
    names = [image_file_name(i) for i in ids]
    assert len(set(names)) == len(ids)
    assert all("/" not in n and not n.startswith(".") and n.endswith(".png") and len(n) < 160 for n in names)



"""The encode engine as a library: `EncodeConfig` mirrors the `ldtok encode` flags one to one (defaults stated once),
validates its values as config errors naming the key, and `encode_dataset` returns a typed `EncodeResult` (counts,
rate, statistics, code usage) for any tokenizer that has a shard format."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldtok.commands import encode as encode_command
from ldtok.config import ConfigError, from_dict
from ldtok.data import DataConfig
from ldtok.encoding import EncodeConfig, EncodeResult, encode_dataset
from ldtok.errors import LdtokError
from ldtok.models import ModelConfig, build_model
from ldtok.quantizers import QuantizerConfig

TINY = {"block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 32, "latent_channels": 4,
        "sample_size": 32, "mid_block_add_attention": False}
DATA_FLAGS = {"data_source": "source", "data_path": "path", "data_name": "name", "data_subset": "subset",
              "split": "split", "image_column": "image_column", "label_column": "label_column",
              "caption_column": "caption_column", "streaming": "streaming", "max_samples": "max_samples",
              "cache_dir": "cache_dir", "on_bad_image": "on_bad_image"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    encode_command.add_arguments(p)
    return p


def test_flags_and_config_fields_correspond_one_to_one_with_the_same_defaults():
    p = parser()
    dests = {a.dest for a in p._actions if a.dest != "help"}
    fields = {f.name for f in dataclasses.fields(EncodeConfig)} - {"data"}
    assert dests == fields | set(DATA_FLAGS), dests ^ (fields | set(DATA_FLAGS))
    args = p.parse_args(["--model", "m", "--out", "o"])
    config = encode_command.config_from_args(args)
    assert config == EncodeConfig(model="m", out="o"), "flag defaults are the dataclass defaults"
    args = p.parse_args(["--model", "m", "--out", "o", "--data-source", "folder", "--data-path", "imgs", "--flip",
                         "--no-channels-last", "--batch-size", "4", "--samples-per-shard", "8", "--crop", "resize"])
    config = encode_command.config_from_args(args)
    assert (config.data.source, config.data.path, config.flip, config.channels_last, config.crop) == (
        "folder", "imgs", True, False, "resize")


def test_config_values_are_validated_naming_the_key():
    with pytest.raises(ConfigError, match=r"^crop: unknown choice 'square' \(allowed: center, resize\)"):
        EncodeConfig(model="m", out="o", crop="square")
    with pytest.raises(ConfigError, match=r"^encode\.dtype: expected one of 'fp16', 'bf16', 'fp32', got 'fp8'"):
        from_dict(EncodeConfig, {"model": "m", "out": "o", "dtype": "fp8"}, prefix="encode.")
    with pytest.raises(ConfigError, match=r"^num_workers: must be >= 0"):
        EncodeConfig(model="m", out="o", num_workers=-1)
    with pytest.raises(LdtokError, match=r"multiple of --batch-size \(4\)") as e:
        EncodeConfig(model="m", out="o", batch_size=4, samples_per_shard=6)
    assert e.value.exit_code == 2


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")
    (root / "broken.png").write_bytes(b"not a png")
    return root


def config_for(model: Path, out: Path, folder: Path) -> EncodeConfig:
    return EncodeConfig(model=str(model), out=str(out), data=DataConfig(source="folder", path=str(folder)),
                        resolution=32, batch_size=2, samples_per_shard=2, num_workers=0, autocast="no",
                        channels_last=False, no_progress=True)  # fmt: skip


def test_a_vq_run_returns_counts_and_code_usage(folder, tmp_path):
    torch.manual_seed(0)
    quantizer = QuantizerConfig(codebook_size=64, codebook_dim=4, kmeans_init=False)
    build_model(ModelConfig(type="vqgan", **TINY, quantizer=quantizer)).eval().export(tmp_path / "vq")
    notes = []
    result = encode_dataset(config_for(tmp_path / "vq", tmp_path / "shards", folder), log=notes.append)
    assert isinstance(result, EncodeResult) and result.kind == "vq" and result.world_size == 1
    assert (result.encoded, result.skipped, result.resumed_items) == (5, 1, 0) and result.images_per_s > 0
    assert result.totals == {**result.totals, "num_samples": 5, "num_skipped": 1, "num_shards": 3}
    usage = result.code_usage["indices"]
    assert usage["count"] == 5 * 16 * 16 and usage["codebook_size"] == 64 and 1 <= usage["codes_used"] <= 64
    assert result.manifest["model"]["family"] == "vqgan" and result.manifest["kind"] == "vq"
    again = encode_dataset(config_for(tmp_path / "vq", tmp_path / "shards", folder), log=notes.append)
    assert (again.encoded, again.skipped, again.resumed_items) == (0, 0, 6), "a finished directory: nothing to do"
    assert again.totals == result.totals


def test_a_family_without_a_shard_format_is_a_one_line_error(folder, tmp_path):
    torch.manual_seed(0)
    build_model(ModelConfig(type="vae2", **TINY)).eval().export(tmp_path / "vae2")
    with pytest.raises(LdtokError, match=r"^model.type 'vae2' has no latent-shard format yet") as e:
        encode_dataset(config_for(tmp_path / "vae2", tmp_path / "shards", folder))
    assert "\n" not in str(e.value) and not (tmp_path / "shards").exists()

"""Shards refer to their model by a path relative to the shard directory (and the absolute path as a hint) and by
its weights hash: a shard directory moved together with its model still decodes, a changed model is refused with a
one-line message naming the path, the expected hash and the fix, and an explicit `--model` overrides the paths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldtok.cli import main as ldtok
from ldtok.data import DataConfig
from ldtok.encoding import EncodeConfig, encode_dataset
from ldtok.errors import run_cli
from ldtok.models import ModelConfig, build_model, tokenizer_sha256
from ldtok.shards import ModelMismatchError, load_manifest, resolve_model

TINY = {"block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 32, "latent_channels": 4,
        "sample_size": 32, "mid_block_add_attention": False}


def make_model(path: Path, *, seed: int) -> Path:
    torch.manual_seed(seed)
    build_model(ModelConfig(type="kl", **TINY)).export(path)
    return path


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Path:
    """`project/{model, images, latents}`: 4 images encoded (in-process) with the model next to the shards."""
    project = tmp_path_factory.mktemp("project")
    (project / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(project / "images" / f"{i}.png")
    make_model(project / "model", seed=0)
    config = EncodeConfig(model=str(project / "model"), out=str(project / "latents"),
                          data=DataConfig(source="folder", path=str(project / "images")), resolution=32,
                          batch_size=2, samples_per_shard=2, num_workers=0, autocast="no", channels_last=False,
                          no_progress=True)  # fmt: skip
    result = encode_dataset(config, log=lambda message: None)
    assert result.encoded == 4 and result.skipped == 0 and result.totals["num_shards"] == 2
    return project


def moved(original: Path, tmp_path: Path) -> Path:
    """A copy of the whole project somewhere else, the original left in place."""
    target = tmp_path / "elsewhere" / "project"
    shutil.copytree(original, target)
    return target


def test_the_manifest_records_a_relative_path_the_absolute_hint_and_the_hash(original):
    info = load_manifest(original / "latents")["model"]
    assert info["relative_path"] == "../model" and info["path"] == str((original / "model").resolve())
    assert info["sha256"] == tokenizer_sha256(original / "model") and info["family"] == "kl"
    assert resolve_model(original / "latents") == (original / "model").resolve()


def test_shards_moved_with_their_model_still_decode(original, tmp_path):
    project = moved(original, tmp_path)
    (original / "model").rename(original / "model-gone")  # the absolute hint now points nowhere
    try:
        assert resolve_model(project / "latents") == (project / "model").resolve()
        assert ldtok(["decode", str(project / "latents"), "--out", str(tmp_path / "png")]) == 0
    finally:
        (original / "model-gone").rename(original / "model")
    decoded = json.loads((tmp_path / "png" / "decoded.json").read_text())
    assert len(decoded["files"]) == 4 and decoded["model"] == str((project / "model").resolve())


def test_a_changed_model_is_refused_naming_path_hash_and_fix(original, tmp_path, capsys):
    project = moved(original, tmp_path)
    expected = tokenizer_sha256(project / "model")
    shutil.rmtree(project / "model")
    make_model(project / "model", seed=1)  # same architecture, other weights, same place
    (original / "model").rename(original / "model-gone")
    try:
        with pytest.raises(ModelMismatchError) as e:
            resolve_model(project / "latents")
        message = str(e.value)
        assert "\n" not in message and str((project / "model").resolve()) in message and expected[:12] in message
        assert "--model" in message and "changed or replaced" in message
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            run_cli(lambda: ldtok(["decode", str(project / "latents"), "--out", str(tmp_path / "png")]))
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 1 and err == f"error: {message}" and "Traceback" not in err
        assert not (tmp_path / "png" / "decoded.json").exists()
        shutil.rmtree(project / "model")  # nothing at either path: the message says so
        with pytest.raises(ModelMismatchError, match=r"no model is at .* \(moved or deleted\?\): pass --model DIR"):
            resolve_model(project / "latents")
    finally:
        (original / "model-gone").rename(original / "model")


def test_an_explicit_model_overrides_the_recorded_paths(original, tmp_path):
    project = moved(original, tmp_path)
    kept = tmp_path / "kept-model"
    shutil.move(project / "model", kept)
    make_model(project / "model", seed=1)  # the recorded relative path now holds another model
    assert resolve_model(project / "latents", kept) == kept.resolve()
    with pytest.raises(ModelMismatchError, match="changed or replaced"):
        resolve_model(project / "latents", project / "model")
    assert ldtok(["decode", str(project / "latents"), "--model", str(kept), "--out", str(tmp_path / "png"),
                  "--limit", "2"]) == 0
    assert len(json.loads((tmp_path / "png" / "decoded.json").read_text())["files"]) == 2

"""The encoding benchmark (`eval/bench_encode.py`, `eval/_bench_encode.py`): a CPU smoke run of both sides on a tiny
exported KL model, the Kx image folder, and both sides computing the same latents of the same images (the ldtok side
calls `encode_dataset` in process and reports its own counts)."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))  # the benchmark code lives beside the library
from _bench_encode import EncodeBenchConfig, ldtok_case, link_images, source_images  # noqa: E402
from _bench_encode_naive import naive_encode  # noqa: E402
from safetensors import safe_open  # noqa: E402

from ldtok.config import ConfigError
from ldtok.models import ModelConfig, build_model

ROOT = Path(__file__).resolve().parents[1]
TINY = {"block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 32, "latent_channels": 4,
        "sample_size": 32, "mid_block_add_attention": False}
NUM_IMAGES = 8


def _script():
    spec = importlib.util.spec_from_file_location("bench_encode_script", ROOT / "eval" / "bench_encode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """8 PNGs of mixed sizes and aspect ratios, and a file that is not an image (never linked)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
        h, w = [(40, 48), (48, 40), (36, 36)][i % 3]
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def kl_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "kl"
    build_model(ModelConfig(type="kl", **TINY)).export(path)
    return path


def test_the_large_folder_links_every_image_scale_times(images, tmp_path):
    files = source_images(images)
    assert [f.name for f in files] == [f"img{i}.png" for i in range(NUM_IMAGES)]
    assert link_images(files[:3], tmp_path / "3x", repeats=3) == 9
    made = sorted((tmp_path / "3x").iterdir())
    assert len(made) == 9 and {f.name.split("_", 1)[1] for f in made} == {"img0.png", "img1.png", "img2.png"}
    for f in made:  # links, not copies: the same file as the source
        assert os.path.samefile(f, images / f.name.split("_", 1)[1])


def test_smoke_run_prints_the_table_and_writes_json(images, kl_model, tmp_path, capsys):
    out = tmp_path / "report" / "encode.json"
    _script().main(["--model", str(kl_model), "--resolution", "32", "--num-images", str(NUM_IMAGES), "--scale", "2",
                    "--batch-size", "4", "--threads", "1", "--source-dir", str(images), "--work-dir", str(tmp_path),
                    "--out", str(out)])
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("name"))
    assert header.split() == ["name", "img/s", "ratio", "e2e", "img/s", "peak", "MiB", "1x", "peak", "MiB", "2x",
                              "growth", "MiB"]
    label = "/".join(kl_model.resolve().parts[-2:])
    assert f"ldtok encode, equal {label}" in printed and f"ldtok encode, defaults {label}" in printed
    assert f"naive loop {label}" in printed

    report = json.loads(out.read_text())
    assert [p.name for p in out.parent.iterdir()] == ["encode.json"], "the atomic write left a temporary file"
    assert report["config"]["num_images"] == NUM_IMAGES and report["config"]["scale"] == 2
    assert report["config"]["samples_per_shard"] == NUM_IMAGES, "shards default to the 1x size (at most 1024)"
    rows = {row["setting"]: row for row in report["rows"]}
    assert set(rows) == {"equal", "defaults", "baseline"}
    assert {row["side"] for row in report["rows"]} == {"ldtok", "naive"}
    rows["naive"], rows["ldtok"] = rows.pop("baseline"), rows["defaults"]
    for side, row in rows.items():  # equal, defaults (also as "ldtok"), naive
        assert row["small"]["images"] == NUM_IMAGES and row["large"]["images"] == 2 * NUM_IMAGES, side
        for size in ("small", "large"):
            r = row[size]
            for key in ("images_per_s", "e2e_images_per_s", "seconds", "wall_seconds", "peak_memory_mib",
                        "output_mib"):
                assert r[key] > 0, (side, size, key, r)
            assert r["e2e_images_per_s"] < r["images_per_s"], "the whole process cannot be faster than its loop"
            assert r["peak_memory_mib"] > 50, "a process that imported torch holds more than 50 MiB"
        assert row["growth_mib"] == pytest.approx(row["large"]["peak_memory_mib"] - row["small"]["peak_memory_mib"])
    assert rows["naive"]["ratio"] == 1.0
    assert rows["ldtok"]["ratio"] == pytest.approx(rows["ldtok"]["large"]["images_per_s"] /
                                                   rows["naive"]["large"]["images_per_s"])
    # what each side wrote (f = 2): fp16 mean + logvar (4 x 16 x 16 each) per image and metadata; fp32 samples
    assert rows["ldtok"]["large"]["output_mib"] * 2**20 > 2 * NUM_IMAGES * 2 * 4 * 16 * 16 * 2
    assert rows["naive"]["large"]["output_mib"] * 2**20 > 2 * NUM_IMAGES * 4 * 16 * 16 * 4
    assert not list(tmp_path.glob("ldtok-bench-encode-*")), "the temporary folder was left behind"


def test_shard_size_defaults_to_the_1x_size_and_models_need_a_diffusers_class(kl_model, tmp_path):
    sizes = {(n, b): EncodeBenchConfig(models=[str(kl_model)], num_images=n, batch_size=b).samples_per_shard
             for n, b in [(256, 32), (4096, 32), (100, 32), (8, 32)]}
    assert sizes == {(256, 32): 256, (4096, 32): 1024, (100, 32): 96, (8, 32): 32}
    with pytest.raises(ConfigError, match=r"^samples_per_shard: must be a positive multiple of batch_size \(32\)"):
        EncodeBenchConfig(models=[str(kl_model)], batch_size=32, samples_per_shard=48)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "VQVAE2"}))
    with pytest.raises(ConfigError, match="^models: .* needs a diffusers class"):
        EncodeBenchConfig(models=[str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="no config.json"):
        EncodeBenchConfig(models=[str(tmp_path / "missing")])


def test_both_sides_write_the_same_latents_of_the_same_images(kl_model, tmp_path):
    """Square images at the encoder's resolution (no resampling on either side): ldtok's stored posterior means
    (fp32, the `equal` setting), scaled, are the naive loop's `mode() * scaling_factor`; the counts are the files'."""
    folder = tmp_path / "square"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(folder / f"sq{i}.png")
    config = EncodeBenchConfig(models=[str(kl_model)], resolution=32, num_images=6, scale=2, batch_size=2,
                               dtype="fp32")
    assert config.samples_per_shard == 6
    work = tmp_path / "work"
    work.mkdir()
    case = ldtok_case(config, model=str(kl_model), images=folder, count=6, work=work, setting="equal",
                      keep_output=True)
    assert case.images == 6 and case.seconds > 0 and case.images_per_s == pytest.approx(6 / case.seconds)
    with pytest.raises(AssertionError, match="encoded 6 .* of 7 images"):  # a wrong count is caught
        ldtok_case(config, model=str(kl_model), images=folder, count=7, work=work, setting="equal")
    stored = {}
    for shard in sorted((work / "ldtok-shards").glob("shard-*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for sample_id, mean in zip(json.loads(f.metadata()["ids"]), f.get_tensor("mean")):
                stored[Path(sample_id).name] = mean
    assert sorted(stored) == [f"sq{i}.png" for i in range(6)]
    measured = naive_encode(model=str(kl_model), images=str(folder), resolution=32, out=str(tmp_path / "naive.pt"),
                            sample=False)
    assert measured["images"] == 6
    naive = torch.load(tmp_path / "naive.pt", weights_only=True)  # (6, C, h, w), files in sorted order
    scaling = json.loads((kl_model / "config.json").read_text())["scaling_factor"]
    ours = torch.stack([stored[f"sq{i}.png"] for i in range(6)]) * scaling
    assert naive.shape == ours.shape == (6, 4, 16, 16)
    assert torch.allclose(ours, naive, atol=1e-5), (ours - naive).abs().max()

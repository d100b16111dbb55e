"""Data module: image decoding of every mode, bad files, HF / streaming / WebDataset sources, the default dataset."""

import dataclasses
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldtok.data import DataConfig, ImageTransform, build_dataset, collate, decode_image, default_dataset

R = 32  # test resolution


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _gradient16(w: int = 64, h: int = 16) -> np.ndarray:
    return np.tile(np.linspace(0, 65535, w).round().astype(np.uint16), (h, 1))  # (H, W) left-to-right ramp


@pytest.fixture()
def image_folder(tmp_path: Path) -> Path:
    """One good file per awkward mode, plus one truncated JPEG."""
    folder = tmp_path / "images"
    folder.mkdir()
    _noise(48, 40).save(folder / "normal.jpg", quality=90)
    good = io.BytesIO()
    _noise(64, 48, seed=1).save(good, format="JPEG")
    (folder / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    Image.new("RGB", (40, 36), (255, 0, 0)).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    Image.fromarray(_gradient16()).save(folder / "gray16.png")
    rgba = np.zeros((36, 40, 4), dtype=np.uint8)  # fully transparent black: must come out white
    Image.fromarray(rgba).save(folder / "rgba.png")
    Image.new("RGB", (1, 1), (0, 0, 255)).save(folder / "tiny.png")
    palette = _noise(30, 20, seed=2).convert("P")
    palette.info["transparency"] = 0
    palette.save(folder / "palette.png")
    return folder


def _items(dataset) -> list[dict]:
    return [dataset[i] for i in range(len(dataset))] if hasattr(dataset, "__len__") else list(dataset)


def test_folder_decodes_every_mode_and_skips_only_the_truncated_file(image_folder, tmp_path, caplog):
    config = DataConfig(source="folder", path=str(image_folder), resolution=R, cache_dir=str(tmp_path / "hf"))
    dataset = build_dataset(config, train=False)
    assert len(dataset) == 7
    with caplog.at_level(logging.WARNING, logger="ldtok.data"):
        loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collate)
        batches = list(loader)
    # A batch whose every item was skipped is empty (B == 0); callers skip it.
    pixels = torch.cat([b["pixel_values"] for b in batches if b["pixel_values"].shape[0] > 0])
    ids = [i for b in batches for i in b["id"]]
    skipped = [i for b in batches for i in b["skipped"]]

    assert skipped == ["truncated.jpg"]
    assert any("truncated.jpg" in r.getMessage() for r in caplog.records)
    assert sorted(ids) == ["cmyk.jpg", "gray16.png", "normal.jpg", "palette.png", "rgba.png", "tiny.png"]
    assert pixels.shape == (6, 3, R, R) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1
    by_id = dict(zip(ids, pixels))
    assert torch.allclose(by_id["rgba.png"], torch.ones(3, R, R))  # transparent -> composited on white
    assert torch.allclose(by_id["tiny.png"], torch.tensor([-1.0, -1.0, 1.0]).view(3, 1, 1).expand(3, R, R))
    red = by_id["cmyk.jpg"].mean(dim=(1, 2))
    assert red[0] > 0.8 and red[1] < -0.8 and red[2] < -0.8, f"CMYK red came out as {red}"
    gray = by_id["gray16.png"]
    # The center quarter of the 0..65535 ramp: mid-greys from about -0.25 to 0.25, not a white (clipped) square.
    assert torch.equal(gray[0], gray[1]) and gray.max() - gray.min() > 0.4 and gray.mean().abs() < 0.05


def test_folder_error_mode_names_the_bad_file(image_folder, tmp_path):
    config = DataConfig(
        source="folder", path=str(image_folder), resolution=R, on_bad_image="error", cache_dir=str(tmp_path / "hf")
    )
    with pytest.raises(ValueError, match="truncated.jpg"):
        _items(build_dataset(config, train=False))


def test_16bit_png_keeps_its_content():
    ramp = _gradient16()
    rgb = np.asarray(decode_image(_png_bytes(Image.fromarray(ramp))))
    assert rgb.dtype == np.uint8 and rgb.shape == (*ramp.shape, 3)
    np.testing.assert_allclose(rgb[..., 0], ramp / 257.0, atol=0.51)  # 65535 -> 255, by value range
    assert rgb[..., 0].min() == 0 and rgb[..., 0].max() == 255


def test_collate_all_skipped_gives_an_empty_batch():
    batch = collate([{"skipped": "a.png", "error": "x"}, {"skipped": "b.png", "error": "y"}])
    assert batch["pixel_values"].shape[0] == 0 and batch["id"] == [] and batch["skipped"] == ["a.png", "b.png"]


@pytest.fixture()
def parquet_dataset(tmp_path: Path) -> Path:
    """A local HF dataset directory (two parquet shards) with varied image sizes, labels and one corrupt image."""
    import datasets

    images = [_png_bytes(_noise(w, h, seed=i)) for i, (w, h) in enumerate([(40, 24), (24, 40), (33, 33), (50, 20)])]
    images.insert(2, b"\x89PNG\r\n\x1a\n not really a png")
    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b in images], "label": [3, 1, 4, 1, 5]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    root = tmp_path / "local_hf"
    (root / "data").mkdir(parents=True)
    table.select(range(3)).to_parquet(str(root / "data" / "train-00000-of-00002.parquet"))
    table.select(range(3, 5)).to_parquet(str(root / "data" / "train-00001-of-00002.parquet"))
    return root


def test_hf_local_dir_streaming_matches_map_style(parquet_dataset, tmp_path):
    common = {"source": "hf", "name": str(parquet_dataset), "label_column": "label", "resolution": 16}
    common["cache_dir"] = str(tmp_path / "hf")
    mapped = build_dataset(DataConfig(**common), train=False)
    streamed = build_dataset(DataConfig(**common, streaming=True), train=False)
    assert isinstance(streamed, torch.utils.data.IterableDataset) and len(mapped) == 5
    a, b = collate(_items(mapped)), collate(_items(streamed))
    assert a["id"] == b["id"] == ["train/0", "train/1", "train/3", "train/4"]
    assert a["skipped"] == b["skipped"] == ["train/2"]
    assert a["label"].tolist() == b["label"].tolist() == [3, 1, 1, 5]
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["pixel_values"].shape == (4, 3, 16, 16)

    for streaming in (False, True):
        head = _items(build_dataset(DataConfig(**common, streaming=streaming, max_samples=2), train=False))
        assert [s["id"] for s in head] == ["train/0", "train/1"]


def test_missing_column_is_named(parquet_dataset, tmp_path):
    config = DataConfig(source="hf", name=str(parquet_dataset), label_column="class", cache_dir=str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="class"):
        build_dataset(config)


def test_webdataset_shards(tmp_path):
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for k in range(3):
            for ext, data in (("png", _png_bytes(_noise(20, 30, seed=k))), ("cls", b"%d" % k), ("txt", b"cap %d" % k)):
                info = tarfile.TarInfo(f"{k:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    config = DataConfig(
        source="webdataset", path=str(tmp_path / "shard-*.tar"), image_column="png", label_column="cls",
        caption_column="txt", resolution=R, cache_dir=str(tmp_path / "hf"),
    )  # fmt: skip
    batch = collate(_items(build_dataset(config)))
    assert batch["id"] == ["shard-000.tar/00000", "shard-000.tar/00001", "shard-000.tar/00002"]
    assert batch["label"].tolist() == [0, 1, 2] and batch["caption"] == ["cap 0", "cap 1", "cap 2"]
    assert batch["pixel_values"].shape == (3, 3, R, R)


def test_eval_is_deterministic_and_training_augmentation_follows_seed_and_epoch(parquet_dataset, tmp_path):
    config = DataConfig(source="hf", name=str(parquet_dataset), resolution=16, cache_dir=str(tmp_path / "hf"))
    train, evaluation = build_dataset(config, train=True, seed=0), build_dataset(config, train=False)

    def pixels(dataset, epoch=0):
        dataset.set_epoch(epoch)
        return collate(_items(dataset))["pixel_values"]

    assert torch.equal(pixels(evaluation), pixels(evaluation))
    first = pixels(train)
    torch.manual_seed(123)  # the global RNG plays no part: resumed runs and data-loader prefetching see the same crops
    assert torch.equal(first, pixels(train))
    assert torch.equal(first, pixels(build_dataset(config, train=True, seed=0)))
    assert not all(torch.equal(first, pixels(train, epoch)) for epoch in (1, 2, 3)), "crops / flips never changed"
    assert not torch.equal(first, pixels(build_dataset(config, train=True, seed=1)))
    streaming = build_dataset(dataclasses.replace(config, streaming=True), train=True, seed=0)
    assert pixels(streaming).shape == first.shape
    # the same sample gets the same crop however the dataset is indexed (map-style and worker order independent)
    train.set_epoch(0)
    assert torch.equal(train[1]["pixel_values"], first[1])


def test_crop_box_resize_equals_resize_then_crop():
    image = _noise(57, 31)
    x = ImageTransform(resolution=R)(image)
    W, H = round(57 * R / 31), R
    full = image.resize((W, H), Image.Resampling.BICUBIC)
    left = (W - R) // 2
    expected = torch.from_numpy(np.array(full.crop((left, 0, left + R, R)))).permute(2, 0, 1).float() / 127.5 - 1
    assert (x - expected).abs().max() <= 2.5 / 127.5


def _build_in(cache_dir: Path) -> dict:
    path = default_dataset.default_dataset_dir(cache_dir)
    assert path == cache_dir / default_dataset.DATASET_NAME
    return json.loads((path / "manifest.json").read_text())


def test_default_dataset_is_deterministic_disjoint_and_race_safe(tmp_path, monkeypatch):
    # Two processes race to build into one cache dir; a third build goes to another dir.
    code = ("import sys; from ldtok.data.default_dataset import default_dataset_dir; "
            "print(default_dataset_dir(sys.argv[1]))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "tokenizers")}
    racers = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "a")], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    monkeypatch.setenv("LDTOK_CACHE_DIR", str(tmp_path / "b"))
    manifest_b = _build_in(tmp_path / "b")
    outputs = [p.communicate(timeout=120)[0].strip() for p in racers]
    assert all(p.returncode == 0 for p in racers)
    name = default_dataset.DATASET_NAME
    assert outputs == [str(tmp_path / "a" / name)] * 2
    assert os.listdir(tmp_path / "a") == [name], "a temporary build directory was left behind"
    manifest_a = _build_in(tmp_path / "a")
    assert manifest_a == manifest_b

    root = tmp_path / "a" / name
    files = manifest_a["files"]
    assert len(list((root / "train").glob("*.png"))) == default_dataset.NUM_TRAIN == 512
    assert len(list((root / "validation").glob("*.png"))) == default_dataset.NUM_VALIDATION == 64
    for entry in files[::37]:
        assert hashlib.sha256((root / entry["file"]).read_bytes()).hexdigest() == entry["sha256"]
    # Disjoint: no validation crop box overlaps a training crop box of the same photo.
    for source in manifest_a["sources"]:
        boxes = {
            s: [f["box"] for f in files if f["source"] == source and f["split"] == s] for s in ("train", "validation")
        }
        assert boxes["train"] and boxes["validation"]
        for x0, y0, x1, y1 in boxes["validation"]:
            for u0, v0, u1, v1 in boxes["train"]:
                assert min(x1, u1) <= max(x0, u0) or min(y1, v1) <= max(y0, v0), f"overlap in {source}"

    # build_dataset reads it through LDTOK_CACHE_DIR.
    dataset = build_dataset(
        DataConfig(source="default", split="validation", resolution=R, cache_dir=str(tmp_path / "hf")), train=False
    )
    assert len(dataset) == 64
    item = dataset[0]
    assert item["id"] == "validation/0000_astronaut.png" and item["pixel_values"].shape == (3, R, R)


def test_default_dataset_uses_the_winner_when_losing_the_rename_race(tmp_path, monkeypatch):
    final = tmp_path / default_dataset.DATASET_NAME

    def build_while_another_process_wins(out_dir, *, name):
        (Path(out_dir) / "manifest.json").write_text("{}")
        final.mkdir()  # the other process renames its complete build into place first
        (final / "manifest.json").write_text('{"winner": true}')

    monkeypatch.setattr(default_dataset, "build_default_dataset", build_while_another_process_wins)
    assert default_dataset.default_dataset_dir(tmp_path) == final
    assert json.loads((final / "manifest.json").read_text()) == {"winner": True}
    assert os.listdir(tmp_path) == [default_dataset.DATASET_NAME]


def _rgb_to_hsv(x):
    from skimage.color import rgb2hsv

    return torch.from_numpy(rgb2hsv(((x + 1) / 2).permute(1, 2, 0).numpy())).permute(2, 0, 1)


def test_colour_jitter_rotates_hue_scales_saturation_keeps_grey_and_the_crops():
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    photo[:, :24] = 128  # a grey half: no hue to rotate, no saturation to scale
    image = Image.fromarray(photo)
    plain = ImageTransform(resolution=32, random_crop=True, random_flip=True)
    jitter = ImageTransform(resolution=32, random_crop=True, random_flip=True, hue_jitter=0.5, saturation_jitter=0.5)
    assert jitter.is_random and ImageTransform(resolution=32, saturation_jitter=0.2).is_random
    hue_shifts, sat_ratios = [], []
    for seed in range(8):
        x = plain(image, generator=torch.Generator().manual_seed(seed))
        y = jitter(image, generator=torch.Generator().manual_seed(seed))
        grey = (x.max(0).values - x.min(0).values) < 1e-6
        assert grey.any() and (~grey).any()
        # the crop and the flip are the ones the plain transform draws: grey stays where it was, and stays grey
        assert torch.allclose(y[:, grey], x[:, grey], atol=2e-3)
        hsv_x, hsv_y = _rgb_to_hsv(x), _rgb_to_hsv(y)
        coloured = ~grey & (hsv_x[1] > 0.3)
        # every coloured pixel moves by the same hue and saturation factor (up to clipping and rounding)
        shift = torch.remainder(hsv_y[0] - hsv_x[0] + 0.5, 1.0) - 0.5
        hue_shifts.append(shift[coloured].median())
        sat_ratios.append((hsv_y[1][coloured] / hsv_x[1][coloured]).median())
        assert y.min() >= -1 and y.max() <= 1
        assert torch.equal(y, jitter(image, generator=torch.Generator().manual_seed(seed)))
    hue_shifts, sat_ratios = torch.stack(hue_shifts), torch.stack(sat_ratios)
    assert hue_shifts.abs().max() <= 0.5 and hue_shifts.std() > 0.1, hue_shifts
    assert sat_ratios.min() >= 0.49 and sat_ratios.max() <= 1.51 and sat_ratios.std() > 0.1, sat_ratios


def test_colour_jitter_is_training_only_validated_and_named(parquet_dataset, tmp_path):
    config = DataConfig(source="hf", name=str(parquet_dataset), resolution=16, cache_dir=str(tmp_path / "hf"),
                        crop="center", flip=False, hue_jitter=0.5, saturation_jitter=0.5)
    plain = dataclasses.replace(config, hue_jitter=0.0, saturation_jitter=0.0)

    def pixels(c, train):
        return collate(_items(build_dataset(c, train=train, seed=0)))["pixel_values"]

    assert torch.equal(pixels(config, False), pixels(plain, False))  # evaluation and encoding never jitter
    assert not torch.equal(pixels(config, True), pixels(plain, True))
    assert torch.equal(pixels(plain, True), pixels(plain, False))  # center crop, no flip, no jitter: nothing random
    for key, value in (("hue_jitter", 0.6), ("hue_jitter", -0.1), ("saturation_jitter", 1.0)):
        with pytest.raises(ValueError, match=key):
            DataConfig(**{key: value})

"""`ldtok.evaluation` (and its `report`) / `eval/reconstruct.py`: metrics of a perfect model, KL and VQ statistics, the
report files, and a 2-process run under `accelerate launch --cpu` that must give the numbers of a 1-process run."""

import base64
import csv
import io
import json
import math
import os
import re
import socket
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from ldtok.evaluation import EvalOptions, evaluate_tokenizer
from ldtok.evaluation.report import write_report
from ldtok.metrics import PSNR_CAP, codebook_stats, index_histogram
from ldtok.models import KLAutoencoder, ModelConfig
from ldtok.outputs import AutoencoderOutput

ROOT = Path(__file__).resolve().parents[1]
# `accelerate launch --cpu --num_processes 2` starts ONE process (accelerate 1.x's simple launcher); torchrun's
# launcher (`--multi_gpu`) with ACCELERATE_USE_CPU=1 starts two on the CPU with gloo.
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]
NUM_IMAGES = 9  # odd: the 2-process split is uneven
TINY_KL = {"type": "kl", "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 32,
           "latent_channels": 4, "sample_size": 32, "mid_block_add_attention": False}


class TinyFeatures(nn.Module):
    """A fixed random conv net standing in for the FID Inception (8 features per image)."""

    name = "tiny-test-features (random 3x3 conv, seed 0, mean+max pooled)"
    sha256 = None
    resize = "none (32x32 input used as is)"

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            for p in self.conv.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))

    @torch.no_grad()
    def forward(self, x):
        h = torch.tanh(self.conv(x.float()))  # (B, 4, H-2, W-2)
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)  # (B, 8)


def tiny_feature_net():
    """Factory for `--feature-net tests/test_evaluation.py:tiny_feature_net`."""
    return TinyFeatures()


class Perfect(nn.Module):
    """A "perfect" tokenizer: the reconstruction is the input."""

    def forward(self, x):
        return AutoencoderOutput(sample=x, posterior=None, quant=None)


class Images(Dataset):
    """`NUM_IMAGES` smooth random 32x32 images on the 8-bit grid, ids `img<i>`."""

    def __init__(self, n: int = NUM_IMAGES):
        gen = torch.Generator().manual_seed(1)
        x = torch.nn.functional.interpolate(torch.rand(n, 3, 8, 8, generator=gen), size=32, mode="bilinear")
        self.x = (x * 255).round() / 127.5 - 1  # exactly representable as 8-bit pixels
        self.ids = [f"img{i}" for i in range(n)]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "id": self.ids[i]}


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def kl_dir(tmp_path: Path) -> tuple[Path, KLAutoencoder]:
    torch.manual_seed(0)
    ae = KLAutoencoder.from_config(ModelConfig(**TINY_KL))
    ae.set_latent_statistics(scaling_factor=0.5, shift_factor=0.1)
    ae.export(tmp_path / "kl")
    return tmp_path / "kl", ae


def load_model(path: Path):
    from ldtok.models import load_tokenizer

    return load_tokenizer(str(path), device="cpu")


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.values = [], {}
        self._key = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a["src"])
        if tag == "tr" and "data-key" in a:
            self._key = a["data-key"]
        if tag == "td" and "data-value" in a and self._key is not None:
            self.values[self._key] = float(a["data-value"])
            self._key = None


def parse_html(path: Path) -> _Tags:
    parser = _Tags()
    parser.feed(path.read_text())
    return parser


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------------------- library


def test_perfect_model_gives_capped_psnr_ssim_one_zero_distance_and_zero_fid(accelerator):
    options = EvalOptions(batch_size=4, perceptual=["stlpips-alex", "lpips-vgg"], progress=False)
    result = evaluate_tokenizer(Perfect(), Images(), accelerator=accelerator, options=options,
                                feature_net=TinyFeatures())
    assert result.num_images == NUM_IMAGES and result.skipped == []
    assert result.value("val/psnr") == PSNR_CAP  # every image exact: +inf, counted as the cap in the mean
    assert all(math.isinf(row["psnr"]) for row in result.per_image)
    assert result.value("val/ssim") == pytest.approx(1.0, abs=1e-12)
    assert result.value("val/mse") == 0.0
    assert result.value("val/stlpips-alex") == pytest.approx(0.0, abs=1e-7)
    assert result.value("val/rfid") == pytest.approx(0.0, abs=1e-6)
    assert result.feature_net["num_images"] == NUM_IMAGES and result.feature_net["name"] == TinyFeatures.name
    lpips = next(m for m in result.metrics if m.key == "val/lpips-vgg")
    if lpips.value is None:  # no torchvision VGG16 in the hub cache: reported, not dropped
        assert lpips.detail.startswith("not run: ") and "vgg16" in lpips.detail
    assert set(result.pictures) == {"reconstructions", "chroma_histogram"}  # no latent space: no interpolations


def test_a_set_of_only_undecodable_images_is_a_one_line_data_error(accelerator):
    from ldtok.data import DataError

    class Broken(Images):
        def __getitem__(self, i):
            return {"skipped": self.ids[i], "error": "cannot decode"}

    options = EvalOptions(perceptual=[], fid="off", progress=False)
    with pytest.raises(DataError, match="no image was evaluated"):
        evaluate_tokenizer(Perfect(), Broken(3), accelerator=accelerator, options=options)


def test_eval_options_reject_values_out_of_range_naming_the_key():
    from ldtok.config import ConfigError, from_dict

    for key, value, text in (("batch_size", 0, "must be > 0"), ("interpolation_steps", 1, "must be >= 2"),
                             ("perceptual", ["lpips-foo"], "allowed: lpips-vgg"), ("fid", "on", "'auto', 'off'")):
        with pytest.raises(ConfigError, match=f"^{key}: .*{re.escape(text)}"):
            from_dict(EvalOptions, {key: value})


def test_fid_off_and_missing_weights_are_reported_not_dropped(accelerator):
    options = EvalOptions(batch_size=8, perceptual=["stlpips-alex"], fid="off", progress=False)
    result = evaluate_tokenizer(Perfect(), Images(4), accelerator=accelerator, options=options)
    fid = next(m for m in result.metrics if m.key == "val/rfid")
    assert fid.value is None and fid.detail == "not run: --fid off"


def test_kl_model_report_files(tmp_path, accelerator):
    model = load_model(kl_dir(tmp_path)[0])
    options = EvalOptions(batch_size=4, perceptual=["stlpips-alex", "lpips-alex"], grid_images=4, interpolation_pairs=2,
                          interpolation_steps=5, prior_samples=8, progress=False)
    dataset = Images()
    result = evaluate_tokenizer(model, dataset, accelerator=accelerator, options=options, feature_net=TinyFeatures())
    assert result.kind == "kl"
    assert len(result.kl_per_channel) == 4 and all(v >= 0 for v in result.kl_per_channel)
    assert result.value("val/kl") == pytest.approx(sum(result.kl_per_channel))
    # independent check of the per-channel KL: the posterior of every image, averaged
    posterior = model.encode_posterior(dataset.x)
    kl = 0.5 * (posterior.mean**2 + posterior.logvar.exp() - 1 - posterior.logvar)
    assert result.kl_per_channel == pytest.approx(kl.sum(dim=(2, 3)).mean(0).tolist(), rel=1e-4)
    assert result.collapsed_channels == [c for c, v in enumerate(result.kl_per_channel) if v < 0.01]
    assert 0 < result.value("val/psnr") < PSNR_CAP and result.value("val/rfid") > 0
    assert set(result.pictures) == {"reconstructions", "interpolations", "prior_samples", "latent_traversals",
                                    "latent_arithmetic", "chroma_histogram"}  # traversals, arithmetic: latent_tools

    paths = write_report(result, tmp_path / "report", model={"path": "kl", "kind": "kl", "config_sha256": "x"},
                         dataset={"source": "test"})
    report = json.loads(paths["json"].read_text())
    html = parse_html(paths["html"])
    pngs = [base64.b64decode(src.removeprefix("data:image/png;base64,")) for src in html.imgs]
    assert len(pngs) == 6 and all(src.startswith("data:image/png;base64,") for src in html.imgs)
    sizes = [Image.open(io.BytesIO(png)).size for png in pngs]
    assert sizes[0] == Image.open(paths["reconstructions"]).size
    assert sizes[1] == (2 + 7 * 34, 2 + 2 * 34)  # 2 rows of original + 5 steps + original, 32 px and padding 2
    assert html.values["val/psnr"] == report["metrics"]["val/psnr"] == result.value("val/psnr")
    assert html.values["val/ssim"] == report["metrics"]["val/ssim"]
    assert report["kl_per_channel"] == result.kl_per_channel and report["num_images"] == NUM_IMAGES
    expected = {"val/kl", "val/latent_std", "val/scaled_latent_std", "val/rfid", "val/stlpips-alex"}
    assert expected <= set(report["metrics"])
    assert report["feature_net"]["name"] == TinyFeatures.name
    # a network that cannot run offline is in the report with its reason, not silently dropped
    assert ("val/lpips-alex" in report["not_run"]) != ("val/lpips-alex" in report["metrics"])
    if "val/lpips-alex" in report["not_run"]:
        assert "alexnet" in report["not_run"]["val/lpips-alex"] and "val/lpips-alex" not in html.values
        assert 'data-key="val/lpips-alex"' in paths["html"].read_text()
    for key in ("date", "ldtok", "torch", "model", "dataset"):
        assert report[key], key

    rows = read_csv(paths["per_image"])
    assert sorted(r["id"] for r in rows) == sorted(dataset.ids)  # one row per image
    mse = [float(r["mse"]) for r in rows]
    assert mse == sorted(mse, reverse=True) and mse[0] > mse[-1]
    x, ids = dataset.x, dataset.ids
    rec = model(x).sample.clamp(-1, 1)
    expected = ((x + 1) * 127.5).round() - ((rec + 1) * 127.5).round()
    worst = ids[int(expected.double().pow(2).flatten(1).mean(1).argmax())]
    assert rows[0]["id"] == worst


def test_vq_codebook_usage_over_the_whole_set(tmp_path, accelerator):
    from ldtok.models.vqgan import VQGAN
    from ldtok.quantizers import QuantizerConfig

    torch.manual_seed(0)
    vq = VQGAN.from_config(ModelConfig(**{**TINY_KL, "type": "vqgan"}),
                           QuantizerConfig(codebook_size=32, codebook_dim=4, kmeans_init=False))
    vq.export(tmp_path / "vq")
    model = load_model(tmp_path / "vq")
    dataset = Images()
    options = EvalOptions(batch_size=5, perceptual=[], fid="off", grid_images=2, interpolation_pairs=1,
                          interpolation_steps=3, progress=False)
    result = evaluate_tokenizer(model, dataset, accelerator=accelerator, options=options)
    expected = codebook_stats(index_histogram(model.encode_to_indices(dataset.x), 32))
    assert result.value("val/codebook_usage") == pytest.approx(expected["usage"])
    assert result.value("val/perplexity") == pytest.approx(expected["perplexity"])
    assert result.value("val/codebook_entropy") == pytest.approx(expected["entropy"])
    assert result.codebook["code"]["total"] == NUM_IMAGES * 16 * 16
    assert result.kl_per_channel is None and "interpolations" in result.pictures


def test_vqvae2_codebook_usage_per_level(tmp_path, accelerator):
    from ldtok.models.vqvae2 import VQVAE2

    torch.manual_seed(0)
    vq2 = VQVAE2(block_out_channels=(32, 32), layers_per_block=1, latent_channels=8, sample_size=32,
                 mid_block_add_attention=False, top_codebook_size=8, top_codebook_dim=4, bottom_codebook_size=16,
                 bottom_codebook_dim=4, kmeans_init=False)
    vq2.export(tmp_path / "vqvae2")
    model = load_model(tmp_path / "vqvae2")
    dataset = Images()
    options = EvalOptions(batch_size=5, perceptual=[], fid="off", grid_images=2, interpolation_pairs=1,
                          interpolation_steps=3, progress=False)
    result = evaluate_tokenizer(model, dataset, accelerator=accelerator, options=options)
    top, bottom = model.encode_to_indices(dataset.x)
    for level, idx, K in (("top", top, 8), ("bottom", bottom, 16)):
        expected = codebook_stats(index_histogram(idx, K))
        assert result.value(f"val/codebook_usage_{level}") == pytest.approx(expected["usage"])
        assert result.value(f"val/perplexity_{level}") == pytest.approx(expected["perplexity"])
    assert "bottom encoder features" in result.pictures["interpolations"].caption


# --------------------------------------------------------------------------------------------------- scripts


def save_pngs(folder: Path) -> list[str]:
    folder.mkdir(parents=True)
    images = Images()
    for i, name in enumerate(images.ids):
        array = ((images.x[i] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(array).save(folder / f"{name}.png")
    return [f"{name}.png" for name in images.ids]


def run_eval(model: Path, data: Path, out: Path, *, processes: int) -> subprocess.CompletedProcess:
    args = [str(ROOT / "eval" / "reconstruct.py"), "--model", str(model), "--out", str(out), "--data-source",
            "folder", "--data-path", str(data), "--resolution", "32", "--batch-size", "2", "--grid-images", "4",
            "--interpolation-pairs", "2", "--interpolation-steps", "4", "--prior-samples", "8",
            "--feature-net", f"{ROOT / 'tests' / 'test_evaluation.py'}:tiny_feature_net", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if processes == 1:
        cmd = [sys.executable, *args, "--cpu"]  # a plain run, no launcher
    else:
        with socket.socket() as s:  # a free port: other test runs may hold torchrun's default 29500
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [*ACCELERATE, "--num_processes", str(processes), "--main_process_port", str(port), *args]
        env["ACCELERATE_USE_CPU"] = "1"
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    return result


def test_two_processes_give_the_numbers_of_one(tmp_path):
    names = save_pngs(tmp_path / "images")
    model, _ = kl_dir(tmp_path)
    one = run_eval(model, tmp_path / "images", tmp_path / "one", processes=1)
    run_eval(model, tmp_path / "images", tmp_path / "two", processes=2)
    assert "val/psnr" in one.stdout
    r1, r2 = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert (r1["num_processes"], r2["num_processes"]) == (1, 2)
    assert r1["num_images"] == r2["num_images"] == NUM_IMAGES
    assert r1["metrics"].keys() == r2["metrics"].keys()
    expected = {"val/psnr", "val/ssim", "val/stlpips-vgg", "val/stlpips-alex", "val/rfid", "val/kl"}
    assert expected <= r1["metrics"].keys()
    for key, value in r1["metrics"].items():
        assert r2["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert r1["not_run"].keys() == r2["not_run"].keys()
    assert r1["kl_per_channel"] == pytest.approx(r2["kl_per_channel"], rel=1e-5)
    rows1, rows2 = read_csv(tmp_path / "one" / "per_image.csv"), read_csv(tmp_path / "two" / "per_image.csv")
    assert sorted(r["id"] for r in rows1) == sorted(names)
    assert [r["id"] for r in rows1] == [r["id"] for r in rows2]
    for a, b in zip(rows1, rows2):
        assert float(a["mse"]) == pytest.approx(float(b["mse"]), rel=1e-5)
    for name in ("report.html", "reconstructions.png", "interpolations.png", "prior_samples.png"):
        assert (tmp_path / "two" / name).stat().st_size > 0
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes() or name == "report.html"

"""Issue 8, metrics and scaling side: non-finite images are refused (metrics, verify, reports, `ldtok eval`), and one
scaling convention (SD by default, SD3 opt-in) written by training's calibration and by encode, read back by the shard
readers and by `StableDiffusionPipeline`'s own latent path."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldtok.cli import main as ldtok
from ldtok.errors import LdtokError, run_cli
from ldtok.evaluation import EvalResult, Metric
from ldtok.evaluation.report import write_report
from ldtok.metrics.image import psnr, ssim, to_uint8
from ldtok.models import ModelConfig, build_model, load_tokenizer
from ldtok.shards import LatentShardDataset, verify
from ldtok.validation import calibrate_latent_scale

TINY = {"block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 32, "latent_channels": 4,
        "sample_size": 32, "mid_block_add_attention": False}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("relm")
    data = root / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((32, 32), Image.Resampling.BILINEAR).save(data / f"img{i}.png")
    torch.manual_seed(0)
    model = root / "kl"
    build_model(ModelConfig(type="kl", **TINY)).export(model)
    return {"data": data, "model": model, "root": root}


def encode(model: Path, out: Path, data: Path, *extra: str) -> list[str]:
    return ["encode", "--model", str(model), "--out", str(out), "--data-source", "folder", "--data-path", str(data),
            "--resolution", "32", "--batch-size", "2", "--samples-per-shard", "4", "--num-workers", "0",
            "--no-progress", "--autocast", "no", "--no-channels-last", *extra]  # the reference computation


def cli(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: ldtok(argv))
    return exit_info.value.code, capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ 1: non-finite
def test_metrics_refuse_non_finite_images_naming_the_count():
    x = torch.zeros(2, 3, 16, 16)
    y = x.clone()
    y[0, 0, :2, :3] = float("nan")
    y[1, 2, 0, 0] = float("inf")
    for fn in (to_uint8, lambda a: psnr(x, a), lambda a: ssim(x, a)):
        with pytest.raises(LdtokError, match=r"7 of 1536 .*non-finite"):
            fn(y)
    assert psnr(x, x.clone()).isinf().all()  # finite images still score (identical: +inf, documented)


def test_verify_reports_non_finite_latents(setup, tmp_path):
    out = tmp_path / "shards"
    assert ldtok(encode(setup["model"], out, setup["data"])) == 0
    assert verify(out).ok
    shard = out / "shard-r00-00001.safetensors"
    with safe_open(str(shard), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(shard)
    tensors["mean"][0, 0, 0, :3] = float("nan")
    save_file(tensors, shard, metadata=metadata)
    report = verify(out)
    assert any("shard-r00-00001.safetensors" in p and "3 non-finite" in p for p in report.problems), report.problems


def test_encode_refuses_non_finite_latents(setup, tmp_path):
    model = load_tokenizer(setup["model"])
    with torch.no_grad():
        model.vae.quant_conv.bias.fill_(float("nan"))
    model.export(tmp_path / "nan")
    with pytest.raises(LdtokError, match=r"non-finite mean .* 2 of 2 images .*'img0.png'"):
        ldtok(encode(tmp_path / "nan", tmp_path / "shards", setup["data"]))
    assert not list((tmp_path / "shards").glob("shard-*"))


def test_report_json_is_valid_with_non_finite_numbers(tmp_path):
    result = EvalResult(kind="kl", num_images=1, skipped=[], num_processes=1,
                        metrics=[Metric(key="val/psnr", label="PSNR", value=float("nan"), detail="per image"),
                                 Metric(key="val/rfid", label="rFID", value=float("inf"), detail="fid")],
                        per_image=[{"id": "a", "mse": float("nan"), "psnr": float("inf"), "ssim": 0.5}],
                        kl_per_channel=[0.1, float("nan")], collapsed_channels=[])
    paths = write_report(result, tmp_path, model={"path": "m"}, dataset={})
    report = json.loads(paths["json"].read_text(), parse_constant=lambda c: pytest.fail(f"{c} in report.json"))
    assert report["metrics"]["val/psnr"] is None and report["kl_per_channel"] == [0.1, None]
    assert report["per_image"][0]["mse"] is None


def test_eval_of_a_diverged_model_is_a_one_line_error(setup, tmp_path, capsys):
    nan_model = tmp_path / "nan"
    model = load_tokenizer(setup["model"])
    with torch.no_grad():
        model.vae.decoder.conv_out.bias.fill_(float("nan"))
    model.export(nan_model)
    code, err = cli(["eval", "--model", str(nan_model), "--out", str(tmp_path / "eval"), "--data-source", "folder",
                     "--data-path", str(setup["data"]), "--resolution", "32", "--perceptual", "none", "--fid", "off",
                     "--no-progress", "--cpu"], capsys)
    lines = err.strip().splitlines()
    assert code != 0 and "Traceback" not in err and lines[-1].startswith("error: ") and "non-finite" in lines[-1], err


# ------------------------------------------------------------------------------------------------ 5: scaling
def test_sd_convention_by_default_sd3_opt_in_and_training_writes_the_same(setup, tmp_path):
    from diffusers import AutoencoderKL

    model_dir = tmp_path / "kl"
    load_tokenizer(setup["model"]).export(model_dir)
    assert ldtok(encode(model_dir, tmp_path / "sd", setup["data"], "--write-scaling-factor")) == 0
    config = AutoencoderKL.load_config(model_dir)
    stats = json.loads((tmp_path / "sd" / "index.json").read_text())["stats"]
    assert config["shift_factor"] is None and stats["shift_factor"] is None and stats["convention"] == "sd"
    assert config["scaling_factor"] == pytest.approx(1 / stats["rms"], rel=1e-12)
    ds = LatentShardDataset(tmp_path / "sd", sample_posterior=False)
    assert stats["scaling_factor"] == config["scaling_factor"]
    first = ds[0]
    raw = load_tokenizer(model_dir).encode_posterior(ds_image(setup["data"], first["id"])).mean[0]
    # the shards were encoded in batches, `raw` alone: float rounding differs by a few ulp of these unit-RMS latents
    torch.testing.assert_close(first["latents"], raw * config["scaling_factor"], rtol=1e-5, atol=1e-5)  # no shift

    # training's end-of-run calibration on the same images writes the same number the same way
    model = load_tokenizer(setup["model"])
    images = torch.cat([ds_image(setup["data"], f"img{i}.png") for i in range(8)])
    result = calibrate_latent_scale(model, images, device="cpu")
    assert model.vae.config.shift_factor is None and result["convention"] == "sd"
    assert model.vae.config.scaling_factor == pytest.approx(config["scaling_factor"], rel=1e-5)

    assert ldtok(encode(model_dir, tmp_path / "sd3", setup["data"], "--write-scaling-factor",
                        "--latent-convention", "sd3")) == 0
    config = AutoencoderKL.load_config(model_dir)
    stats = json.loads((tmp_path / "sd3" / "index.json").read_text())["stats"]
    assert config["shift_factor"] == pytest.approx(stats["mean"]) and config["shift_factor"] != 0
    assert config["scaling_factor"] == pytest.approx(1 / stats["std"])
    z = LatentShardDataset(tmp_path / "sd3", sample_posterior=False)[0]["latents"]
    torch.testing.assert_close(z, (raw - config["shift_factor"]) * config["scaling_factor"], rtol=1e-5, atol=1e-5)


def ds_image(data: Path, sample_id: str) -> torch.Tensor:
    from ldtok.data import DataConfig, build_dataset

    dataset = build_dataset(DataConfig(source="folder", path=str(data), resolution=32), train=False)
    items = {item["id"]: item for item in (dataset[i] for i in range(len(dataset)))}
    return items[sample_id]["pixel_values"][None]


def test_stable_diffusion_pipeline_decodes_shard_latents_at_the_models_psnr(setup, tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from test_train_vae import tiny_clip_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel

    model_dir = tmp_path / "kl"
    load_tokenizer(setup["model"]).export(model_dir)
    assert ldtok(encode(model_dir, tmp_path / "shards", setup["data"], "--write-scaling-factor")) == 0
    vae = AutoencoderKL.from_pretrained(model_dir)
    tokenizer, vocab_size = tiny_clip_tokenizer(tmp_path / "tok")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        cross_attention_dim=32, norm_num_groups=32, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    ds = LatentShardDataset(tmp_path / "shards", sample_posterior=False)
    items = [ds[i] for i in range(len(ds))]
    images = torch.cat([ds_image(setup["data"], item["id"]) for item in items])  # (N, 3, 32, 32) in [-1, 1]
    with torch.no_grad():
        decoded = pipe.decode_latents(torch.stack([item["latents"] for item in items]))  # (N, 32, 32, 3) in [0, 1]
        plain = load_tokenizer(model_dir).forward(images).sample
    via_pipeline = psnr(images, torch.from_numpy(decoded).permute(0, 3, 1, 2) * 2 - 1).mean().item()
    model_psnr = psnr(images, plain).mean().item()
    assert math.isfinite(model_psnr) and via_pipeline == pytest.approx(model_psnr, abs=1e-3)

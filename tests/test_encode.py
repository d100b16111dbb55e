"""`ldtok encode` / `decode` / `verify` on tiny untrained models (CPU): decoded shards are the models'
reconstructions, 1 and 2 processes agree, a SIGKILLed run resumes, corruption is caught, statistics and the written
scaling factor are right."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from ldtok.cli import main as ldtok
from ldtok.data import DataConfig, build_dataset
from ldtok.errors import LdtokError
from ldtok.images import to_pil
from ldtok.models import ModelConfig, build_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join(p for p in [str(ROOT / "tokenizers"), os.environ.get("PYTHONPATH")] if p)}
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]
TINY = {"block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 32, "latent_channels": 4,
        "sample_size": 32, "mid_block_add_attention": False}
NUM_IMAGES = 24  # plus one undecodable file: 25 items, 7 shards of <= 4 items with one process
SHARD_FILE = "shard-r00-00000.safetensors"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """2 busy cores: one intra-op thread is many times faster than two fighting for them."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """24 PNGs of mixed aspect ratios with integer labels and captions (metadata.jsonl), and one broken file."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(NUM_IMAGES):
        h, w = [(40, 48), (48, 40), (36, 36)][i % 3]
        coarse = rng.integers(0, 256, size=(h // 4, w // 4, 3), dtype=np.uint8)  # smooth-ish content
        Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR).save(root / f"img{i:02d}.png")
        rows.append({"file_name": f"img{i:02d}.png", "label": i % 3, "text": f"picture number {i}"})
    (root / "broken.png").write_bytes(b"not a png at all")
    rows.append({"file_name": "broken.png", "label": 0, "text": "broken"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def kl_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "kl"
    build_model(ModelConfig(type="kl", **TINY)).export(path)
    return path


def encode_args(model: Path, out: Path, data: Path, *extra: str) -> list[str]:
    return ["encode", "--model", str(model), "--out", str(out), "--data-source", "folder", "--data-path", str(data),
            "--label-column", "label", "--caption-column", "text", "--resolution", "32", "--batch-size", "2",
            "--samples-per-shard", "4", "--num-workers", "0", "--no-progress",
            "--autocast", "no", "--no-channels-last", *extra]  # the reference computation: fp32, contiguous


@pytest.fixture(scope="module")
def kl_shards(tmp_path_factory, kl_model, data_dir) -> Path:
    """The reference: one process, in this process, flips stored, scaling factor written into the model."""
    out = tmp_path_factory.mktemp("kl") / "shards"
    assert ldtok(encode_args(kl_model, out, data_dir, "--flip", "--write-scaling-factor")) == 0
    return out


def read_shards(root: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """The manifest, every sample's stored tensors by id (no id twice), and captions by id."""
    manifest = json.loads((root / "index.json").read_text())
    rows, captions = {}, {}
    for rec in manifest["shards"]:
        with safe_open(str(root / rec["file"]), framework="pt") as f:
            meta = f.metadata()
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        ids, caps = json.loads(meta["ids"]), json.loads(meta.get("captions", "[]"))
        for i, sample_id in enumerate(ids):
            assert sample_id not in rows, f"sample {sample_id!r} stored twice"
            rows[sample_id] = {name: t[i] for name, t in tensors.items()}
            if caps:
                captions[sample_id] = caps[i]
    return manifest, rows, captions


def dataset_items(data: Path) -> list[dict]:
    config = DataConfig(source="folder", path=str(data), resolution=32, label_column="label", caption_column="text")
    dataset = build_dataset(config, train=False)
    return [item for item in (dataset[i] for i in range(len(dataset))) if "skipped" not in item]


@torch.no_grad()
def reconstruction(model, x: torch.Tensor) -> np.ndarray:
    """The model's own reconstruction of one image `(3, R, R)`, as the uint8 array a PNG holds."""
    x = x[None]
    if model.kind == "kl":
        y = model.decode_latents(model.encode_posterior(x).mean)
    elif model.kind == "vq":
        y = model.decode_indices(model.encode_to_indices(x))
    else:
        levels = model.encode_to_indices(x)
        y = model.decode_indices(levels.top, levels.bottom)
    return np.asarray(to_pil(y[0]))


def check_decode_matches_reconstructions(shards: Path, model_dir: Path, data: Path, out: Path) -> None:
    assert ldtok(["decode", str(shards), "--model", str(model_dir), "--out", str(out), "--grid"]) == 0
    files = json.loads((out / "decoded.json").read_text())["files"]
    model = load_tokenizer(str(model_dir))
    items = dataset_items(data)
    assert sorted(files) == sorted(item["id"] for item in items)
    for item in items:
        decoded = np.asarray(Image.open(out / files[item["id"]]).convert("RGB")).astype(int)
        diff = np.abs(decoded - reconstruction(model, item["pixel_values"]).astype(int)).max()
        assert diff <= 1, f"{item['id']}: decoded shard differs from the model's reconstruction by {diff} levels"
    assert Image.open(out / "grid.png").size[0] > 32
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporary files left in the output"


# ---------------------------------------------------------------------------------------------------------- KL


def test_kl_shards_hold_posteriors_flips_labels_captions(kl_shards, kl_model, data_dir):
    manifest, rows, captions = read_shards(kl_shards)
    assert manifest["kind"] == "kl" and manifest["totals"]["num_samples"] == NUM_IMAGES
    assert manifest["totals"]["num_skipped"] == 1 and manifest["totals"]["num_shards"] == 7  # 25 items / 4
    assert set(manifest["fields"]) == {"mean", "logvar", "mean_flip", "logvar_flip", "label"}
    meta = manifest["metadata"]
    assert meta["model_config_sha256"] == load_tokenizer(str(kl_model)).config_sha256()
    assert manifest["fields"]["mean"]["dtype"] == "float32"
    with safe_open(str(kl_shards / SHARD_FILE), framework="pt") as f:
        assert f.metadata()["dtype"] == "float32" and f.metadata()["model_config_sha256"] == meta["model_config_sha256"]
    assert meta["resolution"] == "32" and json.loads(meta["transforms"])["crop"] == "center"
    assert manifest["model"]["path"] == str(kl_model.resolve())

    model = load_tokenizer(str(kl_model))
    for item in dataset_items(data_dir):
        row, x = rows[item["id"]], item["pixel_values"][None]
        with torch.no_grad():
            posterior, flipped = model.encode_posterior(x), model.encode_posterior(x.flip(-1))
        torch.testing.assert_close(row["mean"], posterior.mean[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(row["logvar"], posterior.logvar[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(row["mean_flip"], flipped.mean[0], rtol=1e-5, atol=1e-5)
        assert int(row["label"]) == item["label"] and captions[item["id"]] == item["caption"]


def test_kl_decode_reproduces_reconstructions(kl_shards, kl_model, data_dir, tmp_path):
    check_decode_matches_reconstructions(kl_shards, kl_model, data_dir, tmp_path / "decoded")


def test_kl_statistics_and_written_scaling_factor(kl_shards, kl_model):
    from diffusers import AutoencoderKL

    manifest, rows, _ = read_shards(kl_shards)
    mean = torch.stack([r["mean"] for r in rows.values()]).double()  # (N, C, h, w)
    var = torch.stack([r["logvar"] for r in rows.values()]).double().exp()
    # moments of posterior samples z = mean + std * eps over all samples and positions, per channel and globally
    n = mean.numel() // mean.shape[1]
    channel_mean = mean.mean(dim=(0, 2, 3))
    channel_m2 = (mean - channel_mean.view(1, -1, 1, 1)).square().sum(dim=(0, 2, 3)) + var.sum(dim=(0, 2, 3))
    global_std = (((mean - mean.mean()).square().sum() + var.sum()) / (mean.numel() - 1)).sqrt()
    stats = manifest["stats"]
    assert stats["count"] == n
    np.testing.assert_allclose(stats["channel_mean"], channel_mean.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats["channel_std"], (channel_m2 / (n - 1)).sqrt().numpy(), rtol=1e-9)
    np.testing.assert_allclose(stats["mean"], mean.mean().item(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats["std"], global_std.item(), rtol=1e-9)
    # SD convention (the default): unit second moment of posterior samples, no shift
    global_rms = ((mean.square().sum() + var.sum()) / mean.numel()).sqrt()
    assert stats["convention"] == "sd" and stats["shift_factor"] is None
    np.testing.assert_allclose(stats["scaling_factor"], 1 / global_rms.item(), rtol=1e-9)

    config = AutoencoderKL.from_pretrained(kl_model).config  # what a diffusers pipeline reads
    assert config.scaling_factor == stats["scaling_factor"] and config.shift_factor is None
    assert config.latents_mean is None and config.latents_std is None  # SDXL-style pipelines would scale twice
    assert not [p.name for p in kl_model.iterdir() if p.name.startswith(".")], "temporary config file left behind"


def test_two_processes_store_the_same_latents(kl_shards, kl_model, data_dir, tmp_path):
    out = tmp_path / "shards"
    # `launch --cpu` starts one process whatever --num_processes says (accelerate 1.x); torchrun's launcher with
    # ACCELERATE_USE_CPU=1 gives 2 CPU processes on gloo, on machines with or without GPUs
    with socket.socket() as s:  # a free port: other test runs on this machine may be rendezvousing on 29500
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [*ACCELERATE, "--multi_gpu", "--num_processes", "2", "--main_process_port", str(port), "-m", "ldtok.cli",
           *encode_args(kl_model, out, data_dir, "--flip")]
    result = subprocess.run(cmd, cwd=tmp_path, env={**ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "img/s" in result.stdout and "on 2 process(es)" in result.stdout

    ref_manifest, ref_rows, ref_captions = read_shards(kl_shards)
    manifest, rows, captions = read_shards(out)
    assert manifest["world_size"] == 2 and {s["rank"] for s in manifest["shards"]} == {0, 1}
    assert sorted(rows) == sorted(ref_rows) and captions == ref_captions
    assert manifest["totals"]["num_skipped"] == 1
    for sample_id, ref in ref_rows.items():
        for name, t in ref.items():
            assert torch.equal(rows[sample_id][name], t), f"{sample_id} {name} differs between 1 and 2 processes"
    for key in ("channel_mean", "channel_std", "scaling_factor", "mean", "std"):  # merged in another order
        np.testing.assert_allclose(manifest["stats"][key], ref_manifest["stats"][key], rtol=1e-9, atol=1e-12)
    assert ldtok(["verify", str(out)]) == 0


def test_sigkill_mid_run_then_rerun_completes(kl_shards, kl_model, data_dir, tmp_path):
    out = tmp_path / "shards"
    args = encode_args(kl_model, out, data_dir, "--flip")
    proc = subprocess.Popen([sys.executable, "-m", "ldtok.cli", *args], cwd=tmp_path, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / SHARD_FILE).exists():
        assert proc.poll() is None, f"encoder exited ({proc.returncode}) before writing a shard: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "no shard written within 300 s"
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    shards_before = sorted(p.name for p in out.glob("shard-*.safetensors"))
    assert not (out / "index.json").exists() and 1 <= len(shards_before) < 7, f"not killed mid-run: {shards_before}"

    assert ldtok(args) == 0  # the same command again
    assert ldtok(["verify", str(out)]) == 0
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"
    _, ref_rows, _ = read_shards(kl_shards)
    manifest, rows, _ = read_shards(out)  # raises on a duplicate id
    assert sorted(rows) == sorted(ref_rows) and manifest["totals"]["num_skipped"] == 1
    for sample_id, ref in ref_rows.items():
        assert all(torch.equal(rows[sample_id][name], t) for name, t in ref.items()), sample_id


def test_verify_detects_a_corrupted_shard(kl_shards, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(kl_shards, copy)
    assert ldtok(["verify", str(copy)]) == 0
    path = copy / "shard-r00-00002.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte inside the tensor data: the header still parses
    path.write_bytes(bytes(data))
    result = subprocess.run([sys.executable, "-m", "ldtok.cli", "verify", str(copy)], env=ENV, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "shard-r00-00002.safetensors: sha256 mismatch" in result.stdout


def test_samples_per_shard_must_be_a_multiple_of_the_batch_size(kl_model, data_dir, tmp_path):
    args = encode_args(kl_model, tmp_path / "shards", data_dir)
    args[args.index("--samples-per-shard") + 1] = "5"
    with pytest.raises(LdtokError, match="multiple of --batch-size"):
        ldtok(args)


def test_streaming_encode_resumes_by_skipping(kl_shards, kl_model, data_dir, tmp_path, monkeypatch):
    from ldtok.shards import ShardWriter

    out = tmp_path / "shards"
    args = encode_args(kl_model, out, data_dir, "--flip", "--streaming")
    flush = ShardWriter._flush
    calls = []

    def crash_on_third_shard(self):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        flush(self)

    monkeypatch.setattr(ShardWriter, "_flush", crash_on_third_shard)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ldtok(args)
    monkeypatch.setattr(ShardWriter, "_flush", flush)
    assert len(list(out.glob("shard-*.safetensors"))) == 2
    assert ldtok(args) == 0  # resumes after the 2 complete shards, reading past their rows
    assert ldtok(["verify", str(out)]) == 0
    _, ref_rows, ref_captions = read_shards(kl_shards)
    manifest, rows, captions = read_shards(out)
    assert sorted(rows) == sorted(ref_rows) and captions == ref_captions and manifest["totals"]["num_skipped"] == 1
    for sample_id, ref in ref_rows.items():
        assert all(torch.equal(rows[sample_id][name], t) for name, t in ref.items()), sample_id


def test_resume_with_other_settings_is_refused(kl_shards, kl_model, data_dir, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(kl_shards, copy)
    with pytest.raises(LdtokError, match="resume with the same settings"):
        ldtok(encode_args(kl_model, copy, data_dir, "--flip", "--samples-per-shard", "2"))
    with pytest.raises(LdtokError, match="cannot resume"):  # other metadata: resolution and transforms
        ldtok(encode_args(kl_model, copy, data_dir, "--flip", "--resolution", "64"))
    assert ldtok(encode_args(kl_model, copy, data_dir, "--flip")) == 0  # same settings: nothing left to do
    assert read_shards(copy)[0]["totals"] == read_shards(kl_shards)[0]["totals"]


# ------------------------------------------------------------------------------------------- fast defaults


def test_default_pipeline_matches_the_fp32_reference(kl_shards, kl_model, data_dir, tmp_path):
    """The defaults (autocast auto = bf16 where native, channels-last, the writer on a background thread, 2 workers)
    store the same samples as the fp32 reference, and latents equal to it up to the autocast dtype's rounding."""
    out = tmp_path / "fast"
    args = encode_args(kl_model, out, data_dir, "--flip")
    args = [a for a in args if a not in ("--autocast", "--no-channels-last")]
    args.remove("no")  # the --autocast value
    args[args.index("--num-workers") + 1] = "2"
    assert ldtok(args) == 0
    _, reference, _ = read_shards(kl_shards)
    _, fast, _ = read_shards(out)
    assert set(fast) == set(reference)
    tolerance = 0.05 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else 1e-5  # bf16 keeps 8 bits of mantissa
    for sample_id, row in reference.items():
        for name in ("mean", "logvar", "mean_flip"):
            torch.testing.assert_close(fast[sample_id][name], row[name], rtol=tolerance, atol=tolerance)
    assert ldtok(["verify", str(out)]) == 0


def test_a_failing_background_write_is_raised_in_the_caller(tmp_path):
    from ldtok.shards import ShardWriter
    from ldtok.shards.background import BackgroundWriter

    writer = ShardWriter(tmp_path / "s", kind="kl", samples_per_shard=2, metadata={}, rank=0, world_size=1)
    calls = []

    def failing_add(*args, **kwargs):
        calls.append(args)
        raise OSError(28, "No space left on device")

    writer.add = failing_add
    batch = {"mean": torch.zeros(2, 4, 2, 2), "logvar": torch.zeros(2, 4, 2, 2)}
    with pytest.raises(OSError, match="No space"):
        with BackgroundWriter(writer) as sink:
            for i in range(5):
                sink.add(batch, [f"a{i}", f"b{i}"])
    assert len(calls) == 1  # nothing after the failure was attempted
    assert not list((tmp_path / "s").glob("shard-*"))


@pytest.mark.slow
def test_compiled_encoder_stores_the_reference_latents(kl_shards, kl_model, data_dir, tmp_path):
    out = tmp_path / "compiled"
    assert ldtok(encode_args(kl_model, out, data_dir, "--flip", "--compile")) == 0
    _, reference, _ = read_shards(kl_shards)
    _, compiled, _ = read_shards(out)
    assert set(compiled) == set(reference)
    for sample_id, row in reference.items():
        torch.testing.assert_close(compiled[sample_id]["mean"], row["mean"], rtol=1e-4, atol=1e-4)

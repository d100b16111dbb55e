"""Fitting the ecosystem: model cards, the Hub upload, trackers, held-out validation, the top-level API, keys."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldtok.config import ConfigError, load_config
from ldtok.data import DataConfig, build_dataset
from ldtok.model_card import read_front_matter, write_model_card
from ldtok.models import ModelConfig, build_model

ROOT = Path(__file__).resolve().parents[1]
TINY = {"block_out_channels": [32, 64], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 32,
        "sample_size": 32, "mid_block_add_attention": False}


# ------------------------------------------------------------------------------------------------- model cards


@pytest.mark.parametrize("family, load_class", [("kl", "AutoencoderKL"), ("vqgan", "VQModel"), ("vqvae2", "VQVAE2")])
def test_every_export_has_a_hub_model_card_naming_the_class_that_loads_it(tmp_path, family, load_class):
    build_model(ModelConfig(type=family, **TINY)).export(tmp_path / "final")
    card = tmp_path / "final" / "README.md"
    front = read_front_matter(card)
    assert front["library_name"] == "diffusers" and front["license"] and "ldtok" in front["tags"]
    text = card.read_text()
    assert f'{load_class}.from_pretrained(".")' in text and 'load_tokenizer(".")' in text
    assert "## Architecture" in text and "block_out_channels" in text


def test_the_trainer_card_has_data_steps_metrics_and_latent_statistics(tmp_path):
    from ldtok.training import RunConfig

    build_model(ModelConfig(type="kl", **TINY)).export(tmp_path / "final")
    config = load_config(RunConfig, ROOT / "configs" / "demo-kl.yaml")
    stats = {"scaling_factor": 2.5, "latent_std": 0.4, "latent_mean": 0.01, "num_images": 8}
    write_model_card(tmp_path / "final", run_config=config, step=123, metrics={"psnr": 21.5, "grid": "x.png"},
                     latent_statistics=stats, repo_id="me/kl-demo")
    text = (tmp_path / "final" / "README.md").read_text()
    assert read_front_matter(tmp_path / "final" / "README.md")["datasets"] == ["ldtok-default-dataset"]
    assert "optimizer steps: 123" in text and "| psnr | 21.5 |" in text and "grid" not in text
    assert "latent std 0.4" in text and "scaling_factor" in text
    assert 'AutoencoderKL.from_pretrained("me/kl-demo")' in text and 'snapshot_download("me/kl-demo")' in text


# ------------------------------------------------------------------------------------------------------ the Hub


class FakeHfApi:
    """Stands in for `huggingface_hub.HfApi`: records the calls, uploads nothing."""

    calls: list[tuple] = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        FakeHfApi.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        FakeHfApi.calls.append(("upload_folder", repo_id, folder_path, files, kwargs))
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/0"})()


@pytest.fixture()
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    return FakeHfApi.calls


def test_ldtok_push_uploads_the_folder_with_its_model_card(tmp_path, fake_hub, capsys):
    from ldtok.cli import main

    model_dir = tmp_path / "final"
    build_model(ModelConfig(type="kl", **TINY)).export(model_dir)
    (model_dir / "README.md").unlink()  # an export without a card gets one before the upload
    assert main(["push", str(model_dir), "me/tiny-kl"]) == 0
    (create, repo_id, kwargs), (upload, repo_id2, folder, files, _) = fake_hub
    assert (create, repo_id, kwargs["repo_type"], upload, repo_id2) == ("create_repo", "me/tiny-kl", "model",
                                                                         "upload_folder", "me/tiny-kl")
    assert Path(folder) == model_dir and {"README.md", "config.json", "diffusion_pytorch_model.safetensors"} <= set(
        files)
    assert 'from_pretrained("me/tiny-kl")' in (model_dir / "README.md").read_text()
    assert "me/tiny-kl" in capsys.readouterr().out


def test_push_refuses_a_directory_that_is_not_a_model(tmp_path, fake_hub):
    from ldtok.errors import LdtokError
    from ldtok.hub import push_to_hub

    with pytest.raises(LdtokError, match="no config.json"):
        push_to_hub(tmp_path, "me/x")
    assert fake_hub == []


def test_push_to_hub_needs_a_repo_id():
    from ldtok.training import RunConfig

    with pytest.raises(ConfigError, match="train.hub_repo_id"):
        load_config(RunConfig, None, ["train.push_to_hub=true"])


# ----------------------------------------------------------------------------------------------------- trackers


def test_report_to_takes_accelerate_tracker_names_and_lists():
    from ldtok.trackers import hparams, resolve_report_to
    from ldtok.training import RunConfig

    assert resolve_report_to("tensorboard, wandb") == ["tensorboard", "wandb"]
    assert resolve_report_to("none") == [] and resolve_report_to("auto") == ["tensorboard"]
    with pytest.raises(ConfigError, match="train.report_to: unknown tracker 'tensorbord'"):
        load_config(RunConfig, None, ["train.report_to=tensorbord"])
    flat = hparams(load_config(RunConfig, ROOT / "configs" / "demo-kl.yaml"))
    assert flat["train.lr"] == 1e-3 and flat["model.block_out_channels"] == "[32, 64, 64]"
    assert flat["val_data"] == "None" and all(isinstance(v, (int, float, str, bool)) for v in flat.values())


# -------------------------------------------------------------------------------------------- validation split


def _folder(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / f"img{i:03d}.png")
    return root


def _ids(dataset) -> list[str]:
    return [item["id"] for item in dataset]


def test_a_folder_without_splits_holds_out_val_fraction_disjoint_from_training(tmp_path):
    from ldtok.data.splits import plan_validation

    data = DataConfig(source="folder", path=str(_folder(tmp_path / "imgs", 40)), resolution=16, val_fraction=0.2)
    plan = plan_validation(data)
    assert plan.holdout
    train = _ids(build_dataset(plan.train, train=True, holdout="exclude"))
    val = _ids(build_dataset(plan.validation, train=False, holdout="only"))
    assert val and train and not set(train) & set(val) and len(train) + len(val) == 40
    assert val == _ids(build_dataset(plan.validation, train=False, holdout="only"))  # deterministic
    # streaming reads the same holdout
    streamed = DataConfig(**{**data.__dict__, "streaming": True})
    assert sorted(_ids(build_dataset(streamed, train=False, holdout="only"))) == sorted(val)
    # a tiny folder still validates on one image, never on the training ones
    tiny = DataConfig(source="folder", path=str(_folder(tmp_path / "tiny", 3)), resolution=16)
    val = _ids(build_dataset(tiny, train=False, holdout="only"))
    assert len(val) == 1 and not set(val) & set(_ids(build_dataset(tiny, train=False, holdout="exclude")))


def test_the_datasets_own_validation_split_is_used_when_it_has_one(tmp_path):
    from ldtok.data.splits import plan_validation

    for split in ("train", "validation"):
        _folder(tmp_path / "ds" / split, 4)
    plan = plan_validation(DataConfig(source="folder", path=str(tmp_path / "ds")))
    assert plan.validation.split == "validation" and not plan.holdout
    assert plan_validation(DataConfig()).validation.split == "validation"  # the default dataset
    off = plan_validation(DataConfig(source="folder", path=str(tmp_path / "ds" / "train"), val_fraction=0.0))
    assert not off.holdout and "training images" in off.reason


def test_val_data_inherits_every_key_of_data():
    from ldtok.training import RunConfig

    config = load_config(RunConfig, None, ["data.source=folder", "data.path=/x", "data.resolution=64",
                                           "val_data.split=test"])
    assert (config.val_data.source, config.val_data.path, config.val_data.resolution) == ("folder", "/x", 64)
    assert config.val_data.split == "test" and config.data.split == "train"
    with pytest.raises(ConfigError, match="'val_data.resolutoin'"):
        load_config(RunConfig, None, ["val_data.resolutoin=3"])


def test_streaming_training_data_is_shuffled_per_epoch_and_reproducibly(tmp_path):
    data = DataConfig(source="folder", path=str(_folder(tmp_path / "imgs", 24)), resolution=16, streaming=True,
                      shuffle_buffer=16, val_fraction=0.0)
    dataset = build_dataset(data, train=True, seed=0)
    orders = []
    for epoch in (0, 1, 0):
        dataset.set_epoch(epoch)
        orders.append(_ids(dataset))
    assert sorted(orders[0]) == sorted(orders[1]) and orders[0] != orders[1] and orders[0] == orders[2]
    plain = sorted(orders[0])
    assert orders[0] != plain  # not the file order


# ----------------------------------------------------------------------------------------------- top-level API


def test_import_ldtok_is_light_and_exposes_the_api():
    code = ("import sys, ldtok; heavy = [m for m in ('torch', 'lpips', 'diffusers') if m in sys.modules]; "
            "assert not heavy, heavy; from ldtok import load_tokenizer, VQVAE2, train, load_config, RunConfig; "
            "assert callable(ldtok.train) and ldtok.VQVAE2.__name__ == 'VQVAE2'; "
            "missing = [n for n in ldtok.__all__ if not hasattr(ldtok, n)]; assert not missing, missing")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"PYTHONPATH": str(ROOT / "tokenizers"), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]


# ------------------------------------------------------------------------------------------------- ldtok keys


def test_ldtok_keys_prints_types_defaults_and_descriptions_of_every_config(capsys):
    from ldtok.cli import main

    assert main(["keys"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.strip().startswith("train.max_steps:"))
    assert "int = 1000" in line and "optimizer steps to train for" in line
    assert any(x.strip().startswith("val_data.resolution:") and "inherits data.resolution" in x
               for x in out.splitlines())
    assert "data.val_fraction:" in out and "train.report_to:" in out
    assert main(["keys", "--config", "prior-diffusion"]) == 0
    prior = capsys.readouterr().out.splitlines()
    assert any(x.strip().startswith("shards:") and "latent-shard directory" in x for x in prior)
    assert any(x.strip().startswith("unet.") for x in prior) and not any("val_data" in x for x in prior)
    assert main(["keys", "--config", "prior-transformer"]) == 0
    assert "\n  model.num_layers: int = 8" in capsys.readouterr().out


# ------------------------------------------------------------------------- end to end: trackers and model cards


@pytest.mark.slow
def test_a_run_logs_scalars_hparams_and_images_to_tensorboard_and_wandb_and_cards_its_exports(tmp_path, monkeypatch):
    from launch import launch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb_dir").mkdir()
    out = tmp_path / "run"
    launch(f"output_dir={out}", "train.max_steps=2", "train.checkpoint_every=2", "train.report_to=tensorboard,wandb",
           "train.image_every=1", "loss.disc_start=100")
    # TensorBoard: scalars, the grid image at steps 1 and 2, and the resolved config as hyperparameters
    scalars, images, plugins = set(), {}, set()
    for events in (out / "logs").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 0}).Reload()
        scalars |= set(acc.Tags()["scalars"])
        for tag in acc.Tags()["images"]:
            images[tag] = [e.step for e in acc.Images(tag)]
        try:
            plugins |= set(acc.PluginTagToContent("hparams"))
        except KeyError:  # this event file holds no hparams
            pass
    assert {"loss", "rec", "val/psnr"} <= scalars
    assert images.get("reconstructions") == [1, 2]
    assert "_hparams_/session_start_info" in plugins
    # wandb offline: a run directory with the scalars and the images
    (run_dir,) = (tmp_path / "wandb_dir" / "wandb").glob("offline-run-*")
    media = sorted((run_dir / "files" / "media" / "images").glob("reconstructions_*.png"))
    assert len(media) == 2
    records = _wandb_records(next(run_dir.glob("run-*.wandb")))
    history = {int(row["_step"]): row for row in records["history"]}
    assert set(history) == {1, 2}
    assert {"loss", "rec", "reconstructions/path", "reconstructions/_type"} <= set(history[1])
    assert "val/psnr" in history[2] and json.loads(history[2]["reconstructions/_type"]) == "image-file"
    config = {k for update in records["config"] for k in update}
    assert {"train.max_steps", "model.block_out_channels", "data.val_fraction"} <= config
    # model cards: final/ with the measured metrics and latent statistics, and each checkpoint's diffusers dir
    final = (out / "final" / "README.md").read_text()
    assert read_front_matter(out / "final" / "README.md")["library_name"] == "diffusers"
    assert "optimizer steps: 2" in final and "| psnr |" in final and "latent std" in final
    assert (out / "checkpoints" / "step_00000002" / "diffusers" / "README.md").is_file()
    # a checkpoint loads by its own path and carries its measured scale (step 2 = final's weights: the same scale)
    from diffusers import AutoencoderKL

    from ldtok.models import load_tokenizer

    checkpoint = out / "checkpoints" / "step_00000002"
    assert load_tokenizer(checkpoint).kind == "kl"
    scale = AutoencoderKL.load_config(checkpoint / "diffusers")["scaling_factor"]
    assert scale != 0.18215 and scale == pytest.approx(AutoencoderKL.load_config(out / "final")["scaling_factor"])


def _wandb_records(path: Path) -> dict[str, list[dict]]:
    """History rows and config updates of an offline wandb run file (a LevelDB-style log of protobuf records: a
    7-byte file header, 32 KiB blocks, each record chunk behind a crc32/length/type header)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    pos, block, chunk, raw = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if length == 0 and kind == 0:  # zero padding to the end of the block
            pos += left - 7
            continue
        chunk += data[pos : pos + length]
        pos += length
        if kind in (1, 4):  # FULL or LAST
            raw.append(chunk)
            chunk = b""
    out: dict[str, list[dict]] = {"history": [], "config": []}
    for item in raw:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(item)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): i.value_json for i in record.history.item})
        elif kind == "config":
            out["config"].append({i.key or "/".join(i.nested_key): i.value_json for i in record.config.update})
    return out

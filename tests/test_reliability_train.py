"""A training run that goes wrong stops loudly, names the problem and never damages what was good (issue 8, the
training side), end to end under `accelerate launch --cpu` with the tiny KL model."""

import json
import shutil

import numpy as np
import pytest
import torch
from launch import ROOT, launch, steps_logged
from PIL import Image
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

# validation images that exist whatever the training data is, so that only the training data is under test
DEFAULT_VAL = ["val_data.source=default", "val_data.split=validation", "val_data.resolution=32"]


def assert_one_line_error(result, *needles):
    """Exit code != 0, `error: ...` naming what is wrong, and no traceback through our code."""
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error: " in line]
    assert errors, result.stderr[-3000:]
    for needle in needles:
        assert any(needle in line for line in errors), (needle, errors)
    ours = [line for line in result.stderr.splitlines() if line.strip().startswith('File "')
            and any(f'"{ROOT / part}' in line for part in ("tokenizers", "train"))]  # our code, not the in-repo .venv
    assert not ours, result.stderr[-3000:]  # accelerate's launcher adds a traceback of its own, never ours


def write_images(folder, n, *, size=40):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


# ------------------------------------------------------------------------------------------------ 1. divergence
def test_a_diverging_run_stops_naming_the_step_the_terms_and_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    result = launch(f"output_dir={out}", "train.lr=1e9", "train.max_steps=20", "train.checkpoint_every=1",
                    "train.keep_checkpoints=1", "train.max_nonfinite_steps=3", check=False)
    good = out / "checkpoints" / "step_00000001"
    assert_one_line_error(result, "training diverged: 3 optimizer steps in a row had non-finite values",
                          "step 2: ", "loss", f"last good checkpoint: {good}")
    assert "optimizer step skipped" in result.stderr
    assert [p.name for p in (out / "checkpoints").iterdir()] == [good.name]  # rotation kept the finite one
    for name in ("model.safetensors", "model_1.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(good / name).values())
    assert not (out / "final").exists() and not (out / "summary.json").exists()  # no NaN export
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["nonfinite_steps"] for e in logged if "nonfinite_steps" in e] == [1, 2]  # counted; the 3rd stops


# ------------------------------------------------------------------------------------------------ 3. progress
def test_too_few_images_for_one_batch_stop_before_training(tmp_path):
    data = write_images(tmp_path / "three", 3)
    result = launch(f"output_dir={tmp_path / 'run'}", "data.source=folder", f"data.path={data}", "train.max_steps=2",
                    *DEFAULT_VAL, check=False)
    assert_one_line_error(result, "the training data has 3 images, fewer than one batch of train.batch_size=4 per "
                                  "process on 1 process(es)")


def test_an_epoch_of_undecodable_files_stops_with_the_counts(tmp_path):
    data = tmp_path / "garbage"
    data.mkdir()
    for i in range(8):
        (data / f"broken{i}.png").write_bytes(b"\x89PNG not really" * (i + 1))
    result = launch(f"output_dir={tmp_path / 'run'}", "data.source=folder", f"data.path={data}", "train.max_steps=2",
                    *DEFAULT_VAL, check=False)
    assert_one_line_error(result, "epoch 0 yielded no training step: 8 of the 8 images this process read were "
                                  "undecodable")


# ------------------------------------------------------------------------------------------------ 4. 2-process resume
def test_a_two_process_run_with_ema_resumes(tmp_path):
    out = tmp_path / "ddp"
    common = ["train.checkpoint_every=2", "train.ema_decay=0.9", "train.lr_schedule=constant"]
    launch(f"output_dir={out}", "train.max_steps=2", *common, processes=2)
    result = launch(f"output_dir={out}", "train.max_steps=3", "resume=latest", *common, processes=2)
    assert "resumed from" in result.stderr and "step 2" in result.stderr  # ema.safetensors and loss.safetensors
    assert steps_logged(out) == [1, 2, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and len(set(summary["rank_checksums"])) == 1


# ------------------------------------------------------------------------------------------------ 6, 8. config, data
def test_a_resolution_not_divisible_by_the_downsampling_factor_is_a_config_error(tmp_path):
    result = launch(f"output_dir={tmp_path / 'run'}", "data.resolution=33", "train.max_steps=2", check=False)
    assert_one_line_error(result, "data.resolution=33 is not divisible by the model's downsampling factor 2")
    assert "exit status 2" in result.stderr  # a config error's code (accelerate's launcher itself exits 1)
    assert not (tmp_path / "run").exists()  # refused before anything was built or written


@pytest.mark.parametrize("kind", ["empty", "missing"])
def test_an_empty_or_missing_data_folder_is_a_one_line_error(tmp_path, kind):
    data = tmp_path / "data"
    if kind == "empty":
        data.mkdir()
    result = launch(f"output_dir={tmp_path / 'run'}", "data.source=folder", f"data.path={data}", "train.max_steps=2",
                    check=False)
    assert_one_line_error(result, "holds no image files" if kind == "empty" else "data.path must be an existing folder",
                          str(data))


# ------------------------------------------------------------------------------------------------ 9. finished runs
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    launch(f"output_dir={out}", "train.max_steps=2", "train.checkpoint_every=2")
    return out


def test_rerunning_a_finished_run_says_so_and_rewrites_nothing(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    summary = (run / "summary.json").read_bytes()
    result = launch(f"output_dir={run}", "train.max_steps=2", "train.checkpoint_every=2", "resume=latest")
    assert "already finished at step 2" in result.stdout and "nothing to do" in result.stdout
    assert (run / "summary.json").read_bytes() == summary
    assert steps_logged(run) == [1, 2]


def test_a_kill_during_the_final_export_is_finished_on_rerun_and_its_temp_dir_removed(finished, tmp_path):
    from diffusers import AutoencoderKL

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()  # written after the export: a kill during it leaves none
    (run / ".final.tmp-4242").mkdir()
    (run / ".final.tmp-4242" / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
    result = launch(f"output_dir={run}", "train.max_steps=2", "train.checkpoint_every=2", "resume=latest")
    assert "already finished at step 2" in result.stdout and "exported its final model" in result.stdout
    assert not (run / ".final.tmp-4242").exists()
    AutoencoderKL.from_pretrained(run / "final")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and "psnr" in summary["validation"]
    assert steps_logged(run) == [1, 2]  # no step trained again


# ------------------------------------------------------------------------------------------------ 8, 10, 11. damage
def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_data_byte(path):
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # inside the last tensor's data, past the header: the file still loads, with other weights
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("damage", "file", "message"), [
    (truncate, "model.safetensors", "model.safetensors has"),
    (truncate, "optimizer.bin", "optimizer.bin has"),
    (flip_data_byte, "model.safetensors", "model.safetensors does not match its sha256"),
    (lambda p: p.unlink(), "optimizer_1.bin", "optimizer_1.bin is missing"),
])
def test_resuming_a_damaged_checkpoint_is_refused_naming_the_file(finished, tmp_path, damage, file, message):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    checkpoint = run / "checkpoints" / "step_00000002"
    damage(checkpoint / file)
    result = launch(f"output_dir={run}", "train.max_steps=4", f"resume={checkpoint}", check=False)
    assert_one_line_error(result, f"resume={checkpoint}: not a whole checkpoint: {message}")
    assert steps_logged(run) == [1, 2]

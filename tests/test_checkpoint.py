"""Checkpoints whole or absent, and the non-finite guard, in-process on a tiny prepared model (issue 8, items 1, 3,
6, 8, 10, 11, 12): manifests, damaged files named on resume, rotation by rename, leftovers removed, disk full, skipped
steps that leave the optimizer untouched."""

import errno
import json
import logging
import shutil

import pytest
import torch
from accelerate import Accelerator

from ldtok import checkpoint as ckpt
from ldtok.checkpoint import (
    MANIFEST,
    CheckpointError,
    list_checkpoints,
    remove_leftovers,
    resolve_resume,
    save_checkpoint,
    step_dirs,
)
from ldtok.config import ConfigError
from ldtok.errors import DiskFullError
from ldtok.guard import NonFiniteGuard, TrainingDivergedError
from ldtok.run_checks import (
    EpochProgress,
    NoProgressError,
    check_batch_fills,
    check_resolution,
    downsample_factor,
)


@pytest.fixture
def prepared():
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def save(accelerator, out, step, *, keep=2, extra=None):
    def write_extra(path):
        (path / "diffusers").mkdir()
        (path / "diffusers" / "config.json").write_text("{}")
        if extra is not None:
            extra(path)

    return save_checkpoint(accelerator, out, step=step, trainer_state={"step": step}, write_extra=write_extra,
                           keep=keep)


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the last byte of a safetensors file is tensor data, not its header
    path.write_bytes(bytes(data))


def test_the_manifest_lists_every_file_and_is_written_last(prepared, tmp_path):
    accelerator, _, _ = prepared
    path = save(accelerator, tmp_path, 1)
    files = json.loads((path / MANIFEST).read_text())["files"]
    assert {"model.safetensors", "optimizer.bin", "trainer_state.json", "diffusers/config.json"} <= set(files)
    assert all(entry["size"] == (path / rel).stat().st_size and len(entry["sha256"]) == 64
               for rel, entry in files.items())
    assert list_checkpoints(tmp_path) == [path] and resolve_resume("latest", tmp_path) == path
    (path / MANIFEST).unlink()  # as if killed just before the manifest: not a checkpoint
    assert list_checkpoints(tmp_path) == []
    with pytest.raises(CheckpointError, match="no manifest.json"):
        resolve_resume(str(path), tmp_path)


@pytest.mark.parametrize(("damage", "message"), [
    (lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:100]),
     r"model.safetensors has 100 bytes, manifest.json recorded \d+ \(truncated"),
    (lambda p: (p / "optimizer.bin").write_bytes((p / "optimizer.bin").read_bytes()[:-10]),
     "optimizer.bin has .* bytes"),
    (lambda p: flip_last_byte(p / "model.safetensors"), "model.safetensors does not match its sha256"),
    (lambda p: (p / "optimizer.bin").unlink(), "optimizer.bin is missing"),
])
def test_resume_from_a_damaged_checkpoint_is_refused_naming_the_file(prepared, tmp_path, damage, message):
    accelerator, _, _ = prepared
    path = save(accelerator, tmp_path, 1)
    damage(path)
    with pytest.raises(CheckpointError, match=f"resume={path}: not a whole checkpoint: {message}"):
        resolve_resume(str(path), tmp_path)


def test_resume_latest_skips_damaged_checkpoints_with_a_warning(prepared, tmp_path, caplog):
    accelerator, _, _ = prepared
    first, second = save(accelerator, tmp_path, 1), save(accelerator, tmp_path, 2)
    flip_last_byte(second / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="ldtok.checkpoint"):
        assert resolve_resume("latest", tmp_path) == first
    assert "skipping the damaged checkpoint" in caplog.text and "model.safetensors" in caplog.text
    (first / "optimizer.bin").unlink()
    with pytest.raises(CheckpointError, match="holds no whole checkpoint.*step_00000001: optimizer.bin is missing"):
        resolve_resume("latest", tmp_path)
    assert resolve_resume("latest", tmp_path / "fresh") is None  # no checkpoint at all: a fresh run


def test_rotation_renames_before_deleting_and_startup_removes_leftovers(prepared, tmp_path, monkeypatch):
    accelerator, _, _ = prepared
    for step in (1, 2, 3):
        save(accelerator, tmp_path, step)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000003"]

    # A kill in the middle of deleting step 2 (rmtree dies half way): what is left is not a checkpoint's name.
    real_rmtree = shutil.rmtree

    def dying_rmtree(path, *args, **kwargs):
        if str(path).endswith("step_00000002.deleting") and path.exists():
            (path / "optimizer.bin").unlink()
            raise KeyboardInterrupt  # the process dies here
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "rmtree", dying_rmtree)
    with pytest.raises(KeyboardInterrupt):
        save(accelerator, tmp_path, 4)
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    assert [p.name for p in step_dirs(tmp_path)] == ["step_00000003", "step_00000004"]
    assert (root / ".step_00000002.deleting").is_dir()
    # ... and a kill while writing, and during the final export
    (root / ".step_00000005.tmp").mkdir()
    (tmp_path / ".final.tmp-4242").mkdir()
    (tmp_path / ".summary.json.tmp-4242").write_text("{")
    removed = remove_leftovers(tmp_path)
    assert sorted(p.name for p in removed) == [".final.tmp-4242", ".step_00000002.deleting", ".step_00000005.tmp",
                                              ".summary.json.tmp-4242"]
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003", "step_00000004"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]


def test_rotation_counts_only_whole_checkpoints(prepared, tmp_path):
    """A damaged newer checkpoint never makes rotation delete the newest whole ones."""
    accelerator, _, _ = prepared
    save(accelerator, tmp_path, 1)
    broken = save(accelerator, tmp_path, 2)
    (broken / "optimizer.bin").unlink()
    save(accelerator, tmp_path, 3, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001", "step_00000003"]


def test_disk_full_while_writing_a_checkpoint_names_the_path_and_removes_the_partial_write(prepared, tmp_path):
    accelerator, _, _ = prepared
    save(accelerator, tmp_path, 1)

    def fill_the_disk(path):
        (path / "ema.safetensors").write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device", str(path / "ema.safetensors"))

    with pytest.raises(DiskFullError, match=r"disk full while writing .*\.step_00000002\.tmp/ema\.safetensors"):
        save(accelerator, tmp_path, 2, extra=fill_the_disk)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001"]  # no temp files left


def test_disk_full_reported_by_torch_save_as_an_iostream_error(prepared, tmp_path, monkeypatch):
    """torch.save says only `basic_ios::clear: iostream error`; an (almost) empty disk is why."""
    accelerator, _, _ = prepared

    def iostream_error(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed; basic_ios::clear: iostream error")

    class Full:
        f_bavail, f_frsize = 3, 4096

    monkeypatch.setattr(torch, "save", iostream_error)
    monkeypatch.setattr(ckpt.os, "statvfs", lambda path: Full())
    with pytest.raises(DiskFullError, match="disk full while writing"):
        save(accelerator, tmp_path, 1)
    assert list((tmp_path / "checkpoints").iterdir()) == []


# ------------------------------------------------------------------------------------------------ the guard
def test_a_non_finite_loss_skips_the_step_untouched_and_repeated_ones_stop_the_run(prepared, tmp_path):
    accelerator, model, optimizer = prepared
    good = tmp_path / "checkpoints" / "step_00000007"
    guard = NonFiniteGuard(accelerator=accelerator, max_consecutive=3, last_good=lambda: good)
    x = torch.randn(4, 8)
    guard.step(model(x).square().mean(), optimizer, model.parameters(), max_grad_norm=1.0)
    assert not guard.end_step(step=1, terms={"loss": torch.tensor(1.0)})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exp_avg = optimizer.state[next(model.parameters())]["exp_avg"].clone()
    for step in (2, 3):
        nan_loss = model(x).square().mean() * float("nan")
        guard.step(nan_loss, optimizer, model.parameters(), max_grad_norm=1.0)
        assert guard.end_step(step=step, terms={"loss": nan_loss.detach(), "rec": torch.tensor(0.5)})
        assert all(p.grad is None for p in model.parameters())  # zeroed
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(optimizer.state[next(model.parameters())]["exp_avg"], exp_avg)  # Adam's moments untouched
    assert (guard.consecutive, guard.total) == (2, 2)
    guard.step(model(x).square().mean(), optimizer, model.parameters(), max_grad_norm=None)  # a good one resets
    assert not guard.end_step(step=2, terms={}) and guard.consecutive == 0
    with pytest.raises(TrainingDivergedError, match=rf"3 optimizer steps in a row .*step 4: loss\); last good "
                                                    rf"checkpoint: {good}"):
        for step in (2, 3, 4):
            guard.step(model(x).sum() * float("inf"), optimizer, model.parameters(), max_grad_norm=None)
            guard.end_step(step=step, terms={"loss": torch.tensor(float("inf")), "rec": torch.tensor(0.1)})


def test_non_finite_weights_are_never_written(prepared):
    accelerator, model, _ = prepared
    guard = NonFiniteGuard(accelerator=accelerator, max_consecutive=3, last_good=lambda: None)
    guard.check_weights({"model": model}, writing="final")
    with torch.no_grad():
        model.bias[2] = float("nan")
    with pytest.raises(TrainingDivergedError, match=r"refusing to write final: non-finite weights \(model.bias\); "
                                                    r"last good checkpoint: none"):
        guard.check_weights({"model": model}, writing="final")


# ------------------------------------------------------------------------------------------------ progress, shapes
def test_data_that_cannot_form_a_batch_is_an_error_with_the_counts():
    check_batch_fills(num_images=8, batch_size=4, num_processes=2)
    with pytest.raises(NoProgressError, match=r"has 6 images, fewer than one batch of train.batch_size=4 per process "
                                              r"on 2 process\(es\)"):
        check_batch_fills(num_images=6, batch_size=4, num_processes=2)
    progress = EpochProgress(fresh=True)
    for _ in range(3):
        progress.read(images=0, skipped=4)
    with pytest.raises(NoProgressError, match="epoch 0 yielded no training step: 12 of the 12 images .* undecodable"):
        progress.check(epoch=0, batch_size=4, num_processes=1)
    EpochProgress(fresh=False).check(epoch=1, batch_size=4, num_processes=1)  # a resumed epoch may have nothing left


def test_a_resolution_the_model_cannot_reproduce_is_a_config_error_naming_both_numbers(tmp_path):
    assert downsample_factor([32, 64, 64], None) == 4
    (tmp_path / "config.json").write_text(json.dumps({"block_out_channels": [32, 64, 64, 64]}))
    assert downsample_factor([32, 64], str(tmp_path)) == 8  # model.init_from's own architecture
    check_resolution(model_type="kl", downsample_factor=8, resolutions={"data.resolution": 256})
    with pytest.raises(ConfigError, match="data.resolution=66 is not divisible by the model's downsampling factor 4"):
        check_resolution(model_type="kl", downsample_factor=4, resolutions={"data.resolution": 66})
    with pytest.raises(ConfigError, match="val_data.resolution=36 .* factor 8"):  # VQ-VAE-2: the top code's 2f
        check_resolution(model_type="vqvae2", downsample_factor=4, resolutions={"val_data.resolution": 36})

"""Issue 8, encode side: model identity by weights, shape checks, one-line CLI errors, shard repair and checksums,
disk full, and the SIGKILL loop (tiny untrained models, 16 PNGs, CPU)."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
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
from ldtok.errors import LdtokError, run_cli
from ldtok.models import ModelConfig, build_model, load_tokenizer, tokenizer_sha256
from ldtok.shards import LatentShardDataset, ShardWriter, verify

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join(p for p in [str(ROOT / "tokenizers"), os.environ.get("PYTHONPATH")] if p)}
TINY = {"block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 32, "latent_channels": 4,
        "sample_size": 32, "mid_block_add_attention": False}  # f2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_images(root: Path, n: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((32, 32), Image.Resampling.BILINEAR).save(root / f"img{i:03d}.png")
    return root


def make_model(path: Path, *, seed: int, kind: str = "kl", **overrides) -> Path:
    torch.manual_seed(seed)
    build_model(ModelConfig(type=kind, **{**TINY, **overrides})).export(path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rel")
    return {"data": make_images(root / "images", 16), "a": make_model(root / "model_a", seed=0),
            "b": make_model(root / "model_b", seed=1)}


def args(model: Path, out: Path, data: Path, *extra: str, resolution: int = 32) -> list[str]:
    return ["encode", "--model", str(model), "--out", str(out), "--data-source", "folder", "--data-path", str(data),
            "--resolution", str(resolution), "--batch-size", "2", "--samples-per-shard", "4", "--num-workers", "0",
            "--no-progress", "--autocast", "no", "--no-channels-last", *extra]  # the reference computation


def cli(argv: list[str], capsys) -> tuple[int, str]:
    """`ldtok ARGV` as the console script runs it (through `run_cli`): exit code and stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: ldtok(argv))
    return exit_info.value.code, capsys.readouterr().err


def one_line_error(code: int, err: str, *needles: str) -> None:
    """Exit status != 0, no traceback, and the last line of stderr (progress bars of HF datasets may precede it) is
    the one `error: ...` line, naming every needle."""
    assert code != 0, err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:] and "Traceback" not in err, err
    for needle in needles:
        assert needle in errors[0], (needle, err)


def latents_by_id(root: Path) -> dict[str, torch.Tensor]:
    rows = {}
    for p in sorted(root.glob("shard-*.safetensors")):
        with safe_open(str(p), framework="pt") as f:
            ids, mean = json.loads(f.metadata()["ids"]), f.get_tensor("mean")
        for i, sample_id in enumerate(ids):
            assert sample_id not in rows, f"{sample_id} stored twice"
            rows[sample_id] = mean[i]
    return rows


@pytest.fixture(scope="module")
def ref_shards(setup, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "shards"
    assert ldtok(args(setup["a"], out, setup["data"])) == 0
    return out


def flip_data_byte(path: Path, offset: int = -10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------------------ 2, 7: identity
def test_other_weights_refused_on_resume_and_finished_dir_overwrite_starts_afresh(setup, tmp_path, capsys,
                                                                               monkeypatch):  # fmt: skip
    out = tmp_path / "shards"
    real_flush, flushed = ShardWriter._flush, []

    def crash_after_two(self):  # a run of model A that dies after 2 shards
        if len(flushed) == 2:
            raise KeyboardInterrupt
        flushed.append(1)
        real_flush(self)

    monkeypatch.setattr(ShardWriter, "_flush", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        ldtok(args(setup["a"], out, setup["data"]))
    monkeypatch.setattr(ShardWriter, "_flush", real_flush)
    sha_a, sha_b = tokenizer_sha256(setup["a"]), tokenizer_sha256(setup["b"])
    assert sha_a != sha_b  # same architecture, other weights
    code, err = cli(args(setup["b"], out, setup["data"]), capsys)
    one_line_error(code, err, sha_a[:12], sha_b[:12], str(setup["a"]), str(setup["b"]), "--overwrite")
    assert len(list(out.glob("shard-*"))) == 2  # nothing written by B

    assert ldtok(args(setup["a"], out, setup["data"])) == 0  # A finishes its own run
    index = json.loads((out / "index.json").read_text())
    assert index["model"]["sha256"] == sha_a
    code, err = cli(args(setup["b"], out, setup["data"]), capsys)  # B on a finished A directory
    one_line_error(code, err, sha_a[:12], sha_b[:12])
    assert json.loads((out / "index.json").read_text())["model"]["sha256"] == sha_a  # not relabelled

    assert ldtok(args(setup["b"], out, setup["data"], "--overwrite")) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["model"]["sha256"] == sha_b and verify(out).ok
    for rec in index["shards"]:
        with safe_open(str(out / rec["file"]), framework="pt") as f:
            assert f.metadata()["model_sha256"] == sha_b


def test_decode_refuses_another_model_unless_forced(setup, ref_shards, tmp_path, capsys):
    decode = ["decode", str(ref_shards), "--out", str(tmp_path / "png"), "--limit", "2"]
    code, err = cli([*decode, "--model", str(setup["b"])], capsys)
    one_line_error(code, err, str(setup["b"]), "--force")
    other_arch = make_model(tmp_path / "wide", seed=0, latent_channels=8)
    code, err = cli([*decode, "--model", str(other_arch)], capsys)
    one_line_error(code, err, str(other_arch))
    assert not (tmp_path / "png" / "decoded.json").exists()
    assert ldtok([*decode, "--model", str(setup["b"]), "--force"]) == 0
    assert "warning" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ 6: shapes
def test_resolution_not_divisible_by_the_factor_is_an_error_naming_both(setup, ref_shards, tmp_path, capsys):
    code, err = cli(args(setup["a"], tmp_path / "s", setup["data"], resolution=33), capsys)
    one_line_error(code, err, "33", "2")
    vq = load_tokenizer(make_model(tmp_path / "vq", seed=0, kind="vqgan"))
    with pytest.raises(LdtokError, match=r"33.*\b2\b"):
        vq.encode_to_indices(torch.zeros(1, 3, 33, 33))
    kl = load_tokenizer(setup["a"])
    with pytest.raises(LdtokError, match=r"33.*\b2\b"):
        kl.encode_posterior(torch.zeros(1, 3, 33, 32))
    vq2 = load_tokenizer(make_model(tmp_path / "vq2", seed=0, kind="vqvae2"))
    with pytest.raises(LdtokError, match=r"34.*\b4\b"):
        vq2.encode_to_indices(torch.zeros(1, 3, 34, 34))
    copy = tmp_path / "copy"
    shutil.copytree(ref_shards, copy)
    index = json.loads((copy / "index.json").read_text())
    index["metadata"]["resolution"] = "33"
    (copy / "index.json").write_text(json.dumps(index))
    code, err = cli(["decode", str(copy), "--model", str(setup["a"]), "--out", str(tmp_path / "png"), "--force"],
                    capsys)
    one_line_error(code, err, "33", "2")


# ------------------------------------------------------------------------------------------------ 8: CLI errors
def test_one_line_errors_for_missing_model_config_and_data(setup, tmp_path, capsys):
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.txt").write_text("no images here")
    out = str(tmp_path / "out")
    cases = [
        (args(tmp_path / "nope", tmp_path / "o1", setup["data"]), str(tmp_path / "nope")),
        (args(no_config, tmp_path / "o2", setup["data"]), "config.json"),
        (args(setup["a"], tmp_path / "o3", tmp_path / "missing"), str(tmp_path / "missing")),
        (args(setup["a"], tmp_path / "o4", empty), str(empty)),
        (["eval", "--model", str(tmp_path / "nope"), "--out", out], str(tmp_path / "nope")),
        (["eval", "--model", str(setup["a"]), "--out", out, "--data-source", "folder", "--data-path",
          str(tmp_path / "missing")], str(tmp_path / "missing")),
        (["eval", "--model", str(setup["a"]), "--out", out, "--data-source", "folder", "--data-path", str(empty)],
         str(empty)),
        (["decode", str(tmp_path / "no_shards"), "--model", str(setup["a"]), "--out", out], "index.json"),
    ]
    for argv, needle in cases:
        code, err = cli(argv, capsys)
        one_line_error(code, err, needle)
    result = subprocess.run([sys.executable, "-m", "ldtok.cli", *args(tmp_path / "nope", tmp_path / "o5",
                                                                        setup["data"])],
                            env=ENV, capture_output=True, text=True, timeout=300, check=False)
    one_line_error(result.returncode, result.stderr, str(tmp_path / "nope"))
    result = subprocess.run([sys.executable, "-m", "ldtok.cli", "--debug", "verify", str(tmp_path / "nope")],
                            env=ENV, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 1 and "problem: index.json" in result.stdout  # verify reports, never raises


# ------------------------------------------------------------------------------------------------ 11: repair
def test_rerun_reencodes_a_corrupt_shard_and_readers_verify_checksums(setup, ref_shards, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(ref_shards, copy)
    flip_data_byte(copy / "shard-r00-00001.safetensors")
    with pytest.raises(LdtokError, match="shard-r00-00001.safetensors"):
        ds = LatentShardDataset(copy, sample_posterior=False)
        [ds[i] for i in range(len(ds))]
    assert len(LatentShardDataset(copy, sample_posterior=False, verify=False)) == 16
    assert ldtok(args(setup["a"], copy, setup["data"])) == 0
    assert verify(copy).ok
    ref = latents_by_id(ref_shards)
    rows = latents_by_id(copy)
    assert sorted(rows) == sorted(ref) and all(torch.equal(rows[k], ref[k]) for k in ref)
    ds = LatentShardDataset(copy, sample_posterior=False)
    assert len([ds[i] for i in range(len(ds))]) == 16


def test_verify_checks_parts_and_reports_a_damaged_index(ref_shards, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(ref_shards, copy)
    part = copy / "part-r00.json"
    text = part.read_text()
    i = text.index('"count": ') + len('"count": ')
    part.write_text(text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1 :])  # one digit of the stats changed
    report = verify(copy)
    assert not report.ok and any("part-r00.json" in p for p in report.problems), report.problems
    part.write_text(text)
    index = json.loads((copy / "index.json").read_text())
    del index["shards"][1]["sha256"]
    (copy / "index.json").write_text(json.dumps(index))
    report = verify(copy)
    assert not report.ok and any("index.json" in p and "sha256" in p for p in report.problems), report.problems
    del index["totals"]
    (copy / "index.json").write_text(json.dumps(index))
    assert not verify(copy).ok


# ------------------------------------------------------------------------------------------------ 12: disk full
def test_disk_full_is_named_and_leaves_no_temp_files(setup, tmp_path, capsys, monkeypatch):
    out = tmp_path / "shards"
    real_fsync = os.fsync

    def full_disk(fd):  # the disk fills up while the third shard is flushed to its temporary file
        if "shard-r00-00002.safetensors.tmp" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    code, err = cli(args(setup["a"], out, setup["data"]), capsys)
    one_line_error(code, err, "disk full while writing", str(out / "shard-r00-00002.safetensors"))
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert ldtok(args(setup["a"], out, setup["data"])) == 0 and verify(out).ok


# ------------------------------------------------------------------------------------------------ kill loop
@pytest.mark.slow
def test_sigkill_at_random_moments_then_rerun_equals_uninterrupted(setup, tmp_path):
    data = make_images(tmp_path / "images", 160)  # 40 shards: a run outlasts the kill delays below
    ref = tmp_path / "ref"
    assert ldtok(args(setup["a"], ref, data)) == 0
    out = tmp_path / "shards"
    argv = [sys.executable, "-m", "ldtok.cli", *args(setup["a"], out, data)]
    rng, kills = random.Random(8), 0
    for _ in range(5):
        before = len(list(out.glob("shard-*"))) if out.exists() else 0
        proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while proc.poll() is None and (len(list(out.glob("shard-*"))) if out.exists() else 0) <= before:
            assert time.monotonic() < deadline, "no shard written within 300 s"
            time.sleep(0.002)
        # a random moment of the shard writing that follows (short: on a quiet machine, with the writer on its own
        # thread, a rank writes a 4-sample shard every few milliseconds)
        time.sleep(rng.uniform(0.0, 0.05))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
    assert kills >= 3, f"only {kills} kills landed"
    assert ldtok(args(setup["a"], out, data)) == 0
    assert verify(out).ok
    expected, rows = latents_by_id(ref), latents_by_id(out)
    assert sorted(rows) == sorted(expected)
    assert all(torch.equal(rows[k], expected[k]) for k in expected)
